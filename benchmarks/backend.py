"""Benchmark: reading a plate from the local stores (planes/s, MB/s).

Builds a plate of 4 wells x 4 fields x 2 channels x 5 z of 1024x1024 uint16
(160 planes, 320 MiB) in a temporary folder, in the OME-Zarr store (NGFF 0.4,
Blosc-lz4, one chunk per plane) and in the OME-TIFF store (uncompressed),
then reads it back with a fresh store instance:

* ``load``        plane by plane through virtual paths (what streaming does)
* ``load_field``  one TZCYX array per field (what batch work units do)

Pixels are real microscopy (the HeLa and SBS images of ../shared/data,
tiled and scaled to 16 bits) when present, so compression behaves as on real
data; otherwise smooth synthetic images with noise. The files were just
written, so reads come from the OS page cache: these are the stores' CPU
costs, not disk speed. Then the OMERO write path over the test double
(:func:`bench_omero_write`: setPlane vs full-width strips vs pyramid tiles).
If ``benchmarks/backend_upload.py`` exists, its
``run()`` lines (the uploader figures) are printed after ours.

``bench_zarr_writes`` (the OME-Zarr writer in one run): ``save_field``
against ome-zarr-py's ``write_image`` with the same options (what
``save_field`` used before), the reads, and what writing the NGFF outputs
costs per field: a label image (ngio), the typed tables per ngio backend
(parquet, anndata, csv), and a whole ``save_result`` of a nuclei_count-like
result (mask -> label of objects, Results -> feature table, ROI tables).
Imports (ome-zarr-py pulls in dask and xarray: seconds) are done before
timing and reported apart.

Usage: ``python benchmarks/backend.py [--wells 4 --fields 4 --c 2 --z 5 --size 1024]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.backends.ome_tiff import OmeTiffStore  # noqa: E402
from fiji_bridge.backends.zarr_plate import ZarrPlateStore  # noqa: E402
from fiji_bridge.components import Calibration, PlaneComponents  # noqa: E402

DATA = Path(os.environ.get("FIJI_BRIDGE_TEST_DATA", ROOT.parent / "shared" / "data"))


def source_planes(n: int, size: int) -> list[np.ndarray]:
    """``n`` different 16-bit planes of ``size`` x ``size``."""
    import tifffile

    files = sorted(DATA.glob("*/*.tif")) + sorted(DATA.glob("*/*.TIF"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if files:
            img = tifffile.imread(files[i % len(files)]).astype(np.uint16) * 257
            reps = (-(-size // img.shape[0]), -(-size // img.shape[1]))
            plane = np.tile(np.roll(img, 37 * i, axis=1), reps)[:size, :size]
        else:
            yy, xx = np.mgrid[:size, :size]
            plane = (20000 + 15000 * np.sin(xx / (40 + i)) * np.cos(yy / 55)).astype(np.uint16)
            plane += rng.integers(0, 500, plane.shape, dtype=np.uint16)
        out.append(np.ascontiguousarray(plane))
    return out


def bench_store(name: str, make, wells: list[str], fields: int, c: int, z: int, size: int) -> list[str]:
    planes = source_planes(c * z, size)
    field = np.stack(planes).reshape(1, z, c, size, size)
    mb_field = field.nbytes / 2**20
    n_fields = len(wells) * fields
    n_planes = n_fields * c * z
    lines = []

    store = make()
    warm = store.create_plate("warmup")  # imports and first-call costs, not timed
    store.save_field(warm, "H12", 0, field[:, :1, :1])
    pid = store.create_plate("bench")
    t0 = time.perf_counter()
    for w in wells:
        for f in range(fields):
            store.save_field(pid, w, f, field, channel_names=[f"ch{i}" for i in range(c)], calibration=Calibration(0.65, 0.65, 2.0))
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} save_field : {n_fields / dt:8.1f} fields/s  {n_planes / dt:8.1f} planes/s  {n_fields * mb_field / dt:8.1f} MB/s")

    reader = make()
    t0 = time.perf_counter()
    s = reader.plate_structure(pid)
    dt_meta = time.perf_counter() - t0
    paths = [reader.path(PlaneComponents(pid, w, f, ch, zz, 0)) for w, f in s.units() for zz in range(s.size_z) for ch in range(s.size_c)]
    t0 = time.perf_counter()
    total = 0
    for p in paths:
        total += reader.load(p).nbytes
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} load       : {len(paths) / dt:8.1f} planes/s  {total / 2**20 / dt:8.1f} MB/s  ({len(paths)} planes)")

    reader2 = make()
    reader2.plate_structure(pid)
    t0 = time.perf_counter()
    total = 0
    for w, f in s.units():
        total += reader2.load_field(pid, w, f).nbytes
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} load_field : {n_planes / dt:8.1f} planes/s  {total / 2**20 / dt:8.1f} MB/s  ({n_fields} fields)")
    lines.append(f"{name:8s} structure  : {dt_meta * 1000:8.1f} ms first call ({reader.metadata_reads} metadata reads), cached after")
    store.close(), reader.close(), reader2.close()
    return lines


def bench_omero_write(planes: int = 8) -> list[str]:
    """The OMERO write path over the test double (omero-py's model objects and
    rtypes, every call pickled both ways as over Ice; the double enforces the
    server's rules): ``setPlane`` of whole planes, full-width strips (ROMIO,
    planes above the backend's plane budget) and 256x256 tiles (a pyramid,
    above 3192^2 px), then reading the planes back."""
    try:
        from fiji_bridge.backends.omero import OmeroBackend
        from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble
    except ImportError as e:  # no omero-py
        return [f"omero    (skipped: {e})"]
    cases = [  # label, plane side, backend plane budget
        ("warm-up    64^2", 64, 16 * 2**20),  # imports, the strict surface's attribute tables (not reported)
        ("setPlane 1024^2", 1024, 16 * 2**20),
        ("strips   3000^2", 3000, 16 * 2**20),  # 17.2 MiB > 16 MiB: strips of 2796 rows
        ("strips   1024^2", 1024, 256 * 2**10),  # forced: 128-row strips
        ("tiles    3300^2", 3300, 16 * 2**20),  # 10.9 Mpx > 3192^2: a pyramid, 169 tiles per plane
    ]
    lines = []
    for label, side, budget in cases:
        srv = ServerDouble(users={"bench": "bench-pw"}).register("bench-write.double", 4064)
        try:
            b = OmeroBackend(host="bench-write.double", user="bench", password="bench-pw", gateway=GatewayDouble,
                             keepalive=0, plane_bytes=budget, summaries=False)
            field = np.stack(source_planes(planes, side)).reshape(1, planes, 1, side, side)
            pid = b.create_plate("bench")
            t0 = time.perf_counter()
            b.save_field(pid, "A01", 0, field)
            dt = time.perf_counter() - t0
            r = OmeroBackend(host="bench-write.double", user="bench", password="bench-pw", gateway=GatewayDouble,
                             keepalive=0, plane_bytes=budget)
            t1 = time.perf_counter()
            back = r.load_field(pid, "A01", 0)
            dr = time.perf_counter() - t1
            assert np.array_equal(back, field)
            calls = srv.counters["rps.setPlane"] + srv.counters["rps.setTile"]
            if label.startswith("warm-up"):
                continue
            lines.append(f"omero    {label}: write {planes / dt:7.1f} planes/s {field.nbytes / 2**20 / dt:7.1f} MB/s "
                         f"({calls // planes} calls/plane), read {planes / dr:7.1f} planes/s")
            b.close(), r.close()
        finally:
            srv.unregister()
    return lines


ROUNDS = 3


def _keep(best: dict, key: str, wall: float, cpu: float) -> None:
    """Keep the fastest (wall, cpu) of ``key``."""
    if key not in best or wall < best[key][0]:
        best[key] = (wall, cpu)


def _rate(n_bytes: int, dt: float) -> str:
    return f"{n_bytes / 2**20 / dt:8.1f} MB/s"


def bench_zarr_writes(tmp: Path, fields: int, c: int, z: int, size: int) -> list[str]:
    """The OME-Zarr writer, before (ome-zarr-py write_image) and now, and the NGFF outputs' cost."""
    import warnings

    import zarr

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    from ome_zarr.writer import write_image

    import ngio  # noqa: F401
    from fiji_bridge.backends.zarr_plate import _omero_meta, _scale_units
    lines = [f"zarr     imports    : {time.perf_counter() - t0:8.2f} s once per process (ome-zarr-py, dask, ngio)"]
    planes = source_planes(c * z, size)
    field = np.stack(planes).reshape(1, z, c, size, size)
    cal = Calibration(0.65, 0.65, 2.0)
    nbytes = fields * field.nbytes
    names = [f"ch{k}" for k in range(c)]
    for fmt in (2, 3):
        v = "0.4" if fmt == 2 else "0.5"
        store = ZarrPlateStore(tmp / f"w{fmt}", zarr_format=fmt)
        store.save_field(store.create_plate("warm"), "A01", 0, field)
        pid = store.create_plate("now")
        tczyx = np.ascontiguousarray(field.transpose(0, 2, 1, 3, 4))
        scale, units = _scale_units(cal)
        best: dict[str, tuple[float, float]] = {}
        for r in range(ROUNDS):  # interleaved rounds, the best of each: the machine is shared
            # before: what save_field did up to now (write_image, dask), same chunks and compressor
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(fields):
                g = zarr.open_group(str(tmp / f"before{fmt}" / f"{r}_{i}"), mode="w", zarr_format=fmt)
                write_image(tczyx, g, scale_factors=[], axes=list("tczyx"), scale=scale, axes_units=units, name="f",
                            storage_options={"chunks": (1, 1, 1, size, size), "compressor": store._compressor()},
                            omero=_omero_meta(tczyx, names, "f"))
            _keep(best, "before", time.perf_counter() - t0, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(fields):
                store.save_field(pid, f"{'BCDEFGH'[r]}{i + 1:02d}", 0, field, channel_names=names, calibration=cal)
            _keep(best, "now", time.perf_counter() - t0, time.process_time() - c0)
            reader = ZarrPlateStore(tmp / f"w{fmt}")
            reader.plate_structure(pid)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(fields):
                reader.load_field(pid, f"{'BCDEFGH'[r]}{i + 1:02d}", 0)
            _keep(best, "read", time.perf_counter() - t0, time.process_time() - c0)
        (now, cpu_now), (before, cpu_before), (read, cpu_read) = best["now"], best["before"], best["read"]
        lines.append(f"zarr {v} save_field : {_rate(nbytes, now)} now; write_image (before) {_rate(nbytes, before)}; "
                     f"x{before / now:.2f} (best of {ROUNDS}, {fields} fields of {field.nbytes / 2**20:.0f} MiB); "
                     f"{nbytes / 2**20 / cpu_now:.0f} MB per CPU-s now, {nbytes / 2**20 / cpu_before:.0f} before")
        lines.append(f"zarr {v} load_field : {_rate(nbytes, read)}; {nbytes / 2**20 / cpu_read:.0f} MB per CPU-s")
    lines += bench_ngff_outputs(tmp / "ngff")
    return lines


def bench_ngff_outputs(tmp: Path, n_fields: int = 6, size: int = 512, objects: int = 60) -> list[str]:
    """ms per field for the labels and typed tables of a nuclei_count-like result."""
    from fiji_bridge.backends.base import ObjectTable
    from fiji_bridge.engine.base import MacroResult
    from fiji_bridge.objects import object_boxes, to_labels
    from fiji_bridge.outputs import save_result

    rng = np.random.default_rng(1)
    mask = np.zeros((1, 1, 1, size, size), np.uint8)
    for i in range(objects):
        y, x = (i // 8) * (size // 8) + 5, (i % 8) * (size // 8) + 5
        mask[..., y:y + 20, x:x + 25] = 255
    image = rng.integers(0, 255, (1, 1, 1, size, size), dtype=np.uint8)
    cols = {k: rng.random(objects) for k in "Area Mean StdDev Min Max X Y Perim. Circ. AR Round Solidity IntDen RawIntDen".split()}
    labels = to_labels(mask, objects=True)
    boxes = object_boxes(labels)
    lines = []
    for backend in ("parquet", "anndata", "csv"):
        store = ZarrPlateStore(tmp / backend, table_backend=backend)
        pid = store.create_plate("p")
        for s in range(n_fields + 1):
            store.save_field(pid, "A01", s, image)
        store.save_labels(pid, "A01", n_fields, "warm", labels)
        store.save_field_tables(pid, "A01", n_fields, [ObjectTable("warm", {"label": [1]}, kind="feature", label="warm")])
        t0 = time.perf_counter()
        for s in range(n_fields):
            store.save_labels(pid, "A01", s, "nuclei", labels)
        t_label = (time.perf_counter() - t0) / n_fields
        t0 = time.perf_counter()
        for s in range(n_fields):
            store.save_field_tables(pid, "A01", s, [
                ObjectTable("nuclei_features", {"label": boxes["label"], **cols}, kind="feature", label="nuclei"),
                ObjectTable("nuclei_ROI_table", boxes, kind="masking_roi", label="nuclei")])
        t_tables = (time.perf_counter() - t0) / n_fields
        res = MacroResult(images={"mask": mask}, tables={"Results": cols, "Counts": {"Count": np.array([objects])}})
        out = store.create_plate("d")
        t0 = time.perf_counter()
        for s in range(n_fields):
            save_result(res, "", well="A01", site=s, backend=store, plate=out, labels="mask=nuclei:objects", input=image)
        t_all = (time.perf_counter() - t0) / n_fields
        t0 = time.perf_counter()
        for s in range(n_fields):
            save_result(res, "", well="A02", site=s, backend=store, plate=out)
        t_plain = (time.perf_counter() - t0) / n_fields
        if backend == "parquet":
            lines.append(f"ngff     label      : {t_label * 1000:8.1f} ms per {size}x{size} label ({objects} objects, ngio), "
                         f"{labels.nbytes / 2**20 / t_label:6.1f} MB/s")
        lines.append(f"ngff     tables {backend:8s}: {t_tables * 1000:6.1f} ms per field (feature {objects} rows x {len(cols)} "
                     f"columns + masking ROI); save_result with labels {t_all * 1000:6.1f} ms, without {t_plain * 1000:6.1f} ms")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--c", type=int, default=2)
    ap.add_argument("--z", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args(argv)
    wells = [f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}" for i in range(a.wells)]
    print(f"== local plate stores: {a.wells} wells x {a.fields} fields x {a.c} C x {a.z} Z of {a.size}x{a.size} uint16")
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        for name, make in (
            ("zarr", lambda: ZarrPlateStore(Path(tmp) / "zarr")),
            ("ometiff", lambda: OmeTiffStore(Path(tmp) / "tiff")),
        ):
            for line in bench_store(name, make, wells, a.fields, a.c, a.z, a.size):
                print(line, flush=True)
        print("== OMERO write path (test double, uint16 planes)")
        for line in bench_omero_write():
            print(line, flush=True)
        print(f"== OME-Zarr writer and NGFF outputs (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        for line in bench_zarr_writes(Path(tmp) / "writes", a.wells * a.fields // 2 or 1, a.c, a.z, a.size):
            print(line, flush=True)
    upload = Path(__file__).with_name("backend_upload.py")
    if upload.exists():
        spec = importlib.util.spec_from_file_location("backend_upload", upload)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        print("== uploader")
        for line in mod.run():
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
