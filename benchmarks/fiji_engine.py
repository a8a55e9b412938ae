"""The Fiji engine against ImageJ 1 and plain PyImageJ, on a real Fiji.app.

Prints, each measured in fresh processes (a process holds one JVM):

* Fiji engine start time, both start paths: the direct gateway
  (``net.imagej.ImageJ()``) and PyImageJ's ``imagej.init`` (with the
  imglib2-imglyb jars of ``--extra-jars``); the ImageJ 1 engine for scale;
* a no-op macro's round trip: over the bridge on Fiji, over the bridge on
  ImageJ 1, PyImageJ in-process (``ij.py.run_macro``, headless: what users
  would otherwise call) and the engine in-process;
* numpy -> ImagePlus throughput on Fiji (the engine's bulk transfer, and
  PyImageJ's ``ij.py.to_imageplus`` for comparison);
* the nuclei_count batch over the imported SBS plate (12 fields) on one
  warm bridge: Fiji vs ImageJ 1.

    python benchmarks/fiji_engine.py [--fiji ../shared/fiji/Fiji.app] [--extra-jars ../shared/fiji/extra]
                                     [--data ../shared/data] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def in_child(code: str, env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh Python; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_times(fiji: str, extra: str) -> dict:
    out = {}
    for label, kind, kw in (
        ("Fiji, direct gateway", "pyimagej", {"endpoint": fiji, "start": "gateway"}),
        ("Fiji, PyImageJ imagej.init", "pyimagej", {"endpoint": fiji, "start": "pyimagej", "extra_jars": extra}),
        ("Fiji headless, direct gateway", "pyimagej", {"endpoint": fiji, "start": "gateway", "headless": True}),
        ("ImageJ 1 (Debian)", "imagej1", {}),
    ):
        out[label] = in_child(f"""
            import json, time
            t0 = time.perf_counter()
            from fiji_bridge.engine import open_engine
            eng = open_engine({kind!r}, **{kw!r}).start()
            up = time.perf_counter() - t0
            eng.run_macro('print(1);')
            print(json.dumps({{"start_s": up}}))
            """)["start_s"]
    return out


def in_process_noop(fiji: str, extra: str, n: int) -> dict:
    return in_child(f"""
        import json, time, statistics
        from fiji_bridge.engine import open_engine
        eng = open_engine("pyimagej", endpoint={fiji!r}, start="pyimagej", extra_jars={extra!r}, headless=True).start()
        def med(fn):
            fn()
            ts = []
            for _ in range({n}):
                t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3
        print(json.dumps({{"PyImageJ ij.py.run_macro (in-process, headless)": med(lambda: eng.ij.py.run_macro("")),
                          "fiji-bridge engine run_macro (in-process, headless)": med(lambda: eng.run_macro(""))}}))
        """)


def bridge_noop(env: dict, n: int) -> float:
    from fiji_bridge.client import BridgeClient, free_port_pair

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        with BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=300, own=True) as c:
            c.run_macro("print(1);", timeout=120)  # the engine is up
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                c.run_macro("print(1);")
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def transfer(fiji: str, extra: str, repeat: int) -> dict:
    return in_child(f"""
        import json, time
        import numpy as np
        from fiji_bridge.engine import open_engine
        from fiji_bridge.engine.transfer import to_imageplus
        eng = open_engine("pyimagej", endpoint={fiji!r}, start="pyimagej", extra_jars={extra!r}, headless=True).start()
        arr = np.random.default_rng(0).integers(0, 65535, (1, 16, 1, 2048, 2048), dtype=np.uint16)
        def best(fn):
            fn(); b = float("inf")
            for _ in range({repeat}):
                t0 = time.perf_counter(); fn(); b = min(b, time.perf_counter() - t0)
            return arr.nbytes / 1e9 / b
        dst = np.empty_like(arr)
        print(json.dumps({{"numpy memcpy": best(lambda: np.copyto(dst, arr)),
                          "fiji-bridge to_imageplus": best(lambda: to_imageplus(arr, "x")),
                          "PyImageJ ij.py.to_imageplus": best(lambda: eng.ij.py.to_imageplus(arr[0, :, 0]))}}))
        """)


def batch(fiji: str, data: Path) -> dict:
    from fiji_bridge.batch import run_batch
    from fiji_bridge.client import BridgeClient, free_port_pair

    tmp = Path(tempfile.mkdtemp(prefix="fjb-bench-"))
    uri = f"zarr://{tmp}/sbs.zarr"
    subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "import", str(data / "sbs_plate_O01-O04"), "--plate", uri],
                   check=True, capture_output=True, timeout=300)
    args = {"channel": 1, "sigma": 1.0, "min_size": 30}
    clients = {}
    try:
        for label, imagej in (("ImageJ 1", None), ("Fiji", fiji)):
            if imagej:
                os.environ["FIJI_BRIDGE_IMAGEJ"] = imagej
            else:
                os.environ.pop("FIJI_BRIDGE_IMAGEJ", None)
            clients[label] = c = BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=300, own=True)
            c.run_macro("print(1);", timeout=120)  # warm
        os.environ.pop("FIJI_BRIDGE_IMAGEJ", None)
        best: dict[str, float] = {}
        for rnd in range(2):  # alternate, best of two: the first batch also warms the plate store
            for label, c in clients.items():
                t0 = time.perf_counter()
                rep = run_batch(uri, "nuclei_count", args=args, out_uri=f"zarr://{tmp}/{label.replace(' ', '')}{rnd}.zarr",
                                ports=[c.port], progress=False)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - t0)
                assert rep.ok, rep.failures
        return best
    finally:
        for c in clients.values():
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fiji", default=str(ROOT.parent / "shared" / "fiji" / "Fiji.app"))
    ap.add_argument("--extra-jars", default=str(ROOT.parent / "shared" / "fiji" / "extra"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=50, help="round trips per no-op measurement")
    o = ap.parse_args()
    if not Path(o.fiji, "jars").is_dir():
        sys.exit(f"no Fiji at {o.fiji}: pass --fiji /path/to/Fiji.app")

    print("== engine start (s, one fresh process each)")
    for k, v in start_times(o.fiji, o.extra_jars).items():
        print(f"  {k:40s} {v:7.2f}")

    print(f"== no-op macro round trip (ms, median of {o.repeat})")
    rt = in_process_noop(o.fiji, o.extra_jars, o.repeat)
    rt["bridge on Fiji (non-headless, Xvfb)"] = bridge_noop({"FIJI_BRIDGE_IMAGEJ": o.fiji}, o.repeat)
    rt["bridge on ImageJ 1"] = bridge_noop({"FIJI_BRIDGE_IMAGEJ": None}, o.repeat)
    base = rt["PyImageJ ij.py.run_macro (in-process, headless)"]
    for k, v in rt.items():
        print(f"  {k:52s} {v:8.2f}  x{v / base:5.2f} of PyImageJ")

    print("== numpy -> ImagePlus on Fiji, 16 x 2048x2048 uint16 (GB/s, best of 5)")
    tr = transfer(o.fiji, o.extra_jars, 5)
    for k, v in tr.items():
        print(f"  {k:40s} {v:7.2f}  x{v / tr['numpy memcpy']:5.2f} of memcpy")

    print("== nuclei_count batch over the SBS plate, 12 fields, one warm bridge each, best of 2 alternating (s)")
    b = batch(o.fiji, Path(o.data))
    for k, v in b.items():
        print(f"  {k:40s} {v:7.2f}  x{v / b['ImageJ 1']:5.2f} of ImageJ 1")


if __name__ == "__main__":
    main()
