"""``fiji-bridge demo``: the main job end to end, with nothing but this package.

1. generate a synthetic plate (4 wells x 3 fields, 2 channels, 3 Z planes,
   nuclei-like blobs whose number per field is known) and write it to the
   local OME-Zarr plate store under ``DIR/plates``;
2. start a bridge (a separate process owning ImageJ);
3. run the ``nuclei_count`` macro over every field (``fiji_bridge.batch``),
   its mask stored as the NGFF label image ``nuclei`` (connected components)
   of each field of the derived plate, the results as tables in ngio's
   layout (per field: the ``nuclei_features`` feature table tied to the
   label, ``nuclei_ROI_table``, ``FOV_ROI_table``, ``counts``; per plate:
   ``results``, ``counts`` and their per-well summaries) and as CSV;
4. print a per-well table of counted vs. true nuclei, what ngio lists in the
   derived plate and how to open it (ngio, napari), and write a PNG montage
   of one field's hyperstack and its mask (``DIR/montage.png``).

Exit status 0 when every field's count is within :data:`TOLERANCE` of the
truth.
"""

from __future__ import annotations

import shutil
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["TOLERANCE", "demo_command", "montage", "run_demo", "write_png"]

#: a field's count may differ from the truth by this much
TOLERANCE = 1
WELLS = ("A01", "A02", "B01", "B02")
FIELDS = 3
PLATE = "demo"
MACRO = "nuclei_count"
#: the macro's mask as the label image "nuclei", one value per nucleus
LABELS = "mask=nuclei:objects"


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write a (Y, X, 3) or (Y, X) uint8 array as a PNG (zlib, no imaging library)."""
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def _to8(img: np.ndarray) -> np.ndarray:
    """Contrast-stretch (0.5-99.5 percentiles) to uint8."""
    img = img.astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def channel_tints(channel_names: Sequence[str], n: int) -> list[tuple[float, float, float]]:
    """Each channel's colour as ImageJ draws it (the bridge's one rule,
    :func:`fiji_bridge.colours.channel_colours`), as RGB fractions;
    a single channel is grey-scale (white)."""
    from .colours import RGB, channel_colours

    if n == 1:
        return [(1.0, 1.0, 1.0)]
    return [tuple(v / 255 for v in RGB[c]) for c in channel_colours(list(channel_names), n)]  # type: ignore[misc]


def montage(field: np.ndarray, mask: np.ndarray, gap: int = 4, channel_names: Sequence[str] = ()) -> np.ndarray:
    """One field (TZCYX, first time point) as an RGB montage: a row per
    channel (every Z plane, then the max projection) in the colour ImageJ
    gives that channel (from its name), and a last row with the mask and the
    nuclear channel's projection with the mask outlined in red."""
    f = field[0]  # ZCYX
    nz, nc, ny, nx = f.shape
    cols = nz + 1
    rows = nc + 1
    out = np.full((rows * ny + (rows - 1) * gap, cols * nx + (cols - 1) * gap, 3), 40, np.uint8)

    def put(r: int, c: int, rgb: np.ndarray) -> None:
        y, x = r * (ny + gap), c * (nx + gap)
        out[y : y + ny, x : x + nx] = rgb

    tints = channel_tints(channel_names, nc)
    for c in range(nc):
        tint = np.array(tints[c])
        planes = [f[z, c] for z in range(nz)] + [f[:, c].max(axis=0)]
        for i, p in enumerate(planes):
            put(c, i, (_to8(p)[..., None] * tint).astype(np.uint8))
    m = np.asarray(mask).reshape(-1, ny, nx)[0] > 0
    put(nc, 0, np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2))
    nuc = _to8(f[:, 0].max(axis=0))
    rgb = np.repeat(nuc[..., None], 3, axis=2)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    rgb[edge] = (255, 40, 40)
    put(nc, 1, rgb)
    return out


def run_demo(out_dir: str | Path = "demo-output", port: Optional[int] = None, *, quiet: bool = False) -> dict[str, Any]:
    """Run the demo; returns ``{"rows": [...], "ok": bool, "montage": path,
    "report": BatchReport, "source": uri, "derived": uri}``."""
    from .backends import open_plate
    from .batch import free_port_pair, run_batch
    from .client import BridgeClient
    from .synthetic import make_plate, write_plate

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    out = Path(out_dir).absolute()
    plates = out / "plates"
    plates.mkdir(parents=True, exist_ok=True)
    for old in (plates / f"{PLATE}.zarr", plates / f"{PLATE}_{MACRO}.zarr"):  # our own previous run
        if old.exists():
            shutil.rmtree(old)

    plate = make_plate(WELLS, FIELDS, name=PLATE, size=256, size_z=3, seed=2024)
    source = f"zarr://{plates}/{PLATE}.zarr"
    write_plate(plate, source)
    say(f"wrote a synthetic plate of {len(WELLS)} wells x {FIELDS} fields (2 channels, 3 Z, 256x256) to {source}")

    port = port or free_port_pair()
    say(f"starting a bridge on port {port} ...")
    with BridgeClient.connect_or_spawn(port=port, timeout=180, own=True) as bridge:
        say(f"bridge up after {time.perf_counter() - t0:.1f} s; running {MACRO} over {len(plate.fields)} fields")
        report = run_batch(source, MACRO, args={"channel": 1}, ports=[port], progress=not quiet, timeout=120,
                           labels=LABELS)
        eng = bridge.status()["engine"]
        say(f"engine: {eng.get('engine') or eng.get('kind')} {eng.get('version') or ''}"
            + (f" (Fiji {eng.get('fiji')}: ImageJ2 {eng['imagej2']}, ImageJ 1 {eng.get('imagej1')})" if eng.get("imagej2") else ""))
        backend, pid = open_plate(report.derived)
        counts = _read_counts(backend, pid, report.tables.get("Counts"))
        well, site = WELLS[0], 0
        listing = ngff_listing(backend.plate_dir(pid))
        mask = listing.pop("_first_label")
        field = plate.fields[(well, site)].array
        png = out / "montage.png"
        write_png(png, montage(field, mask, channel_names=plate.channel_names))
        rendered = _bridge_render(bridge, field, plate.channel_names, out / "composite.png")
    rows, ok = _compare(plate.truth(), counts)
    _print_table(rows, quiet)
    say(f"derived plate: {report.derived}")
    for name, path in report.tables.items():
        say(f"  table {name} (CSV): {path}")
    say(f"what ngio finds in it: {listing['images']} images; plate tables {listing['plate_tables']}; "
        f"in each image labels {listing['labels']} and tables {listing['image_tables']}")
    say(howto(backend.plate_dir(pid)))
    say(f"montage of {well} field {site} (rows: channels over Z + max; mask; outlines): {png}")
    if rendered:
        say(f"ImageJ's own composite rendering of that field: {rendered}")
    say(f"demo finished in {time.perf_counter() - t0:.1f} s: "
        + ("every field within " if ok else "some fields NOT within ") + f"{TOLERANCE} nucleus of the truth")
    return {"rows": rows, "ok": ok and report.ok, "montage": str(png), "report": report, "source": source,
            "derived": report.derived, "ngff": listing}


def ngff_listing(plate_dir: Path) -> dict[str, Any]:
    """What ngio lists in an OME-Zarr plate: images, plate tables, and the
    labels and tables of its first image (plus ``_first_label``: that
    image's first label as a TZYX array, or None)."""
    import warnings

    import ngio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plate = ngio.open_ome_zarr_plate(str(plate_dir))
        images = plate.get_images(max_workers=1)
        first = next(iter(images.values()), None)
        labels = first.list_labels() if first is not None else []
        label = np.asarray(first.get_label(labels[0]).get_array()) if labels else None
        return {"images": len(images), "plate_tables": plate.list_tables(), "labels": labels,
                "image_tables": first.list_tables() if first is not None else [], "_first_label": label}


def howto(plate_dir: Path) -> str:
    """How to open the derived plate's labels and tables."""
    return (
        "open it with ngio:\n"
        f"    import ngio; plate = ngio.open_ome_zarr_plate({str(plate_dir)!r})\n"
        "    plate.list_tables(); plate.get_table('counts').dataframe\n"
        "    img = plate.get_image('A', '1', '0'); img.list_labels(); img.list_tables()\n"
        "    img.get_label('nuclei').get_array(); img.get_table('nuclei_features').dataframe\n"
        f"or in napari (napari-ome-zarr): napari {plate_dir}/A/1/0  (image + 'nuclei' labels)")


def _read_counts(backend: Any, plate: str, path: Optional[str]) -> dict[tuple[str, int], int]:
    import csv
    import io

    if not path:
        return {}
    rows = list(csv.DictReader(io.StringIO(backend.load(path))))
    return {(r["well"], int(r["field"])): int(float(r["Count"])) for r in rows}


def _compare(truth: dict[tuple[str, int], int], counted: dict[tuple[str, int], int]) -> tuple[list[dict], bool]:
    rows = []
    ok = True
    for w in sorted({w for w, _ in truth}):
        fields = sorted(s for ww, s in truth if ww == w)
        t = [truth[(w, s)] for s in fields]
        c = [counted.get((w, s), -1) for s in fields]
        good = all(ci >= 0 and abs(ci - ti) <= TOLERANCE for ci, ti in zip(c, t))
        ok &= good
        rows.append({"well": w, "fields": len(fields), "true": t, "counted": c, "true_total": sum(t),
                     "counted_total": sum(x for x in c if x >= 0), "ok": good})
    return rows, ok


def _print_table(rows: Sequence[dict], quiet: bool) -> None:
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="nuclei per well: counted by ImageJ (nuclei_count) vs. truth")
    for col in ("well", "fields", "true per field", "counted per field", "true", "counted", "match"):
        t.add_column(col, justify="right" if col in ("fields", "true", "counted") else "left")
    for r in rows:
        t.add_row(r["well"], str(r["fields"]), " ".join(map(str, r["true"])), " ".join(map(str, r["counted"])),
                  str(r["true_total"]), str(r["counted_total"]), "yes" if r["ok"] else "NO")
    Console().print(t)


def _bridge_render(bridge: Any, field: np.ndarray, names: Sequence[str], path: Path) -> Optional[str]:
    """ImageJ's composite of the field through the bridge's renderer, when it has one."""
    key = "demo/montage"
    try:
        bridge.send_stack(field, key, channel_names=list(names))
        rgb = bridge.render(key)
        write_png(path, rgb)
        bridge.close_stack(key)
        return str(path)
    except Exception:
        return None


def demo_command(out_dir: str = "demo-output", port: Optional[int] = None) -> int:
    try:
        res = run_demo(out_dir, port)
    except Exception as e:
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0 if res["ok"] else 1
