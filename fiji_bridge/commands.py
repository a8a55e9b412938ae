"""The bodies of the ``fiji-bridge`` client commands: status, stop, stream,
snapshot, run. Each talks to a bridge through :class:`~fiji_bridge.client.BridgeClient`
(which finds the per-user secret itself), prints what a user needs and
returns an exit code; :mod:`fiji_bridge.cli` parses the options."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .client import BridgeClient, BridgeError, _prepare_macro
from .protocol import DEFAULT_PORT

__all__ = ["status_command", "stop_command", "stream_command", "snapshot_command", "run_command", "write_png"]



def status_command(port: int = DEFAULT_PORT, host: str = "127.0.0.1", as_json: bool = False) -> int:
    """``fiji-bridge status``."""
    import json

    try:
        with BridgeClient.connect(port, host, timeout=5.0) as c:
            st = c.status()
    except BridgeError as e:
        print(f"no bridge on {host}:{port}: {e}")
        return 1
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    eng = st["engine"]
    print(f"fiji-bridge {st['version']} pid {st['pid']} on {st['control']} (data {st['data']}), up {st['uptime']:.0f} s")
    print(f"engine: {eng['state']} ({eng.get('engine') or eng['kind']} {eng.get('version') or ''}), worker pid {eng['pid']}, restarts {eng['restarts']}, queued {eng['queued']}")
    if eng.get("imagej2"):  # Fiji: ImageJ2 and the ImageJ 1 under its legacy layer
        print(f"  Fiji {eng.get('fiji')}: ImageJ2 {eng['imagej2']}, ImageJ 1 {eng.get('imagej1')}, started via {eng.get('start')}{', headless' if eng.get('headless') else ''}")
    print(f"display: {'on' if st['display'] else 'off'}{' (' + st['display_error'] + ')' if st.get('display_error') else ''}; memory {st['memory']['used'] / 2**20:.1f} MiB")
    for s in st["stacks"]:
        names = ",".join(n or "?" for n in s["channel_names"])
        print(f"  stack {s['key']}: TZCYX {tuple(s['shape'])} {s['dtype']}, {s['planes']} planes, {s['missing']} missing, channels [{names}]")
    if st.get("dropped"):
        print(f"dropped by live producers: {st['dropped']}")
    for ep in st.get("subscriptions", []):
        print(f"  subscribed to {ep}")
    return 0


def stop_command(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> int:
    """``fiji-bridge stop``: shut the bridge down and wait until it is gone."""
    try:
        with BridgeClient.connect(port, host, timeout=5.0) as c:
            c.shutdown()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    c.ping(timeout=0.5)
                except BridgeError:
                    print(f"bridge on {host}:{port} stopped")
                    return 0
    except BridgeError as e:
        print(f"no bridge on {host}:{port}: {e}")
        return 1
    print(f"the bridge on {host}:{port} accepted shutdown but still answers")
    return 1


def _cellomics_components(name: str) -> Optional[tuple[str, int, int]]:
    import re

    m = re.search(r"_([A-Z]{1,2}\d{2})f(\d+)d(\d+)\.tiff?$", name, re.IGNORECASE)
    if not m:
        return None
    return m.group(1).upper(), int(m.group(2)), int(m.group(3))


def stream_command(source: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1", wells: str = "all", live: bool = False) -> int:
    """``fiji-bridge stream``: a plate URI (through the backends) or a folder of TIFFs."""
    want = None if wells in ("all", "", None) else {w.strip().upper() for w in wells.split(",") if w.strip()}
    src = Path(source)
    try:
        with BridgeClient.connect_or_spawn(port, host) as c:
            n = 0
            if src.is_dir() and any(src.glob("*.tif*")) or src.is_dir() and any(src.glob("*.TIF*")):
                import tifffile

                files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
                for i, f in enumerate(files):
                    comps = _cellomics_components(f.name)
                    well, site, ch = comps if comps else ("", 0, i)
                    if want and well not in want:
                        continue
                    img = np.asarray(tifffile.imread(f))
                    stack = None if comps else src.name
                    planes = img.reshape((-1,) + img.shape[-2:])
                    for z, plane in enumerate(planes):
                        if c.send_plane(plane, stack, plate=src.name if comps else "", well=well, site=site, channel=ch, z=z, live=live):
                            n += 1
            else:
                from .backends import open_plate

                store, plate = open_plate(source)
                with store:
                    s = store.plate_structure(plate)
                    for well in s.wells:
                        if want and well not in want:
                            continue
                        for site in range(s.fields.get(well, 1)):
                            arr = store.load_field(plate, well, site)
                            for t in range(arr.shape[0]):
                                for z in range(arr.shape[1]):
                                    for ch in range(arr.shape[2]):
                                        name = s.channel_names[ch] if ch < len(s.channel_names) else None
                                        if c.send_plane(arr[t, z, ch], plate=plate, well=well, site=site, channel=ch, z=z, t=t, channel_name=name, calibration=s.calibration if s.calibration.is_set else None, live=live):
                                            n += 1
            c.flush()
            print(f"sent {n} planes" + (f", dropped {c.dropped}" if c.dropped else ""))
            for key in c.list_stacks():
                info = c.stack_info(key)
                print(f"  {key}: TZCYX {info.shape} {info.dtype}, {len(info.missing)} missing")
    except (BridgeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def snapshot_command(stack_key: str, output: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1", montage: bool = False) -> int:
    """``fiji-bridge snapshot``: render a stack to PNG through ImageJ."""
    try:
        with BridgeClient.connect(port, host) as c:
            rgb = c.render(stack_key, montage=montage)
    except BridgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_png(output, rgb)
    print(f"wrote {output} ({rgb.shape[1]}x{rgb.shape[0]})")
    return 0


def write_png(path: Union[str, Path], rgb: np.ndarray) -> None:
    """Write an RGB (or gray) uint8 array as PNG (Pillow)."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(str(path), format="PNG")


def _tiff_dims(axes: str, shape: tuple) -> str:
    m = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X", "Q": "Z", "I": "Z"}
    dims = "".join(m.get(a, "?") for a in axes)
    if "?" in dims or len(set(dims)) != len(dims):
        raise ValueError(f"cannot map TIFF axes {axes!r} of shape {shape} to TZCYX")
    return dims


def run_command(macro: str, stack_key: Optional[str] = None, image_path: Optional[str] = None, args: Optional[dict] = None, save_to: Optional[str] = None, port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 600, out_dir: Optional[str] = None) -> int:
    """``fiji-bridge run``: a library macro or .ijm file through the bridge."""
    from .engine.base import MacroError

    try:
        code, call_args = _prepare_macro(macro, args)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    array, dims = None, "TZCYX"
    if image_path:
        import tifffile

        with tifffile.TiffFile(image_path) as tf:
            series = tf.series[0]
            array = series.asarray()
            dims = _tiff_dims(series.axes, array.shape)
    try:
        with BridgeClient.connect_or_spawn(port, host) as c:
            res = c.run_macro(code, stack=stack_key, array=array, dims=dims, args=call_args, timeout=timeout, save_to=save_to)
    except MacroError as e:
        print(f"macro failed ({e.kind}): {e}", file=sys.stderr)
        if e.log:
            print(e.log, file=sys.stderr)
        return 1
    except (BridgeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if res.log:
        print(res.log.rstrip())
    for title, cols in res.tables.items():
        n = max((len(v) for v in cols.values()), default=0)
        print(f"table {title}: {n} rows, columns {', '.join(cols)}")
    for title, img in res.images.items():
        print(f"image {title}: TZCYX {img.shape} {img.dtype}")
    for p in getattr(res, "saved", []):
        print(f"saved {p}")
    if out_dir:
        _write_outputs(res, Path(out_dir))
        print(f"wrote outputs to {out_dir}")
    return 0


def _write_outputs(res: Any, out: Path) -> None:
    import csv
    import re

    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s) or "image"  # noqa: E731
    for title, img in res.images.items():
        arr = img
        if arr.dtype not in (np.uint8, np.uint16, np.float32):
            arr = arr.astype(np.float32)
        tifffile.imwrite(out / f"{safe(title)}.tif", arr, imagej=True, metadata={"axes": "TZCYX"})
    for title, cols in res.tables.items():
        names = list(cols)
        n = max((len(v) for v in cols.values()), default=0)
        with open(out / f"{safe(title)}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for i in range(n):
                w.writerow([cols[k][i] if i < len(cols[k]) else "" for k in names])
