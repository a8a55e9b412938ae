"""Streaming benchmark: plane ingest into the bridge, and the macro round trip.

One run prints:

* plane ingest of 2048x2048 uint16 planes into the bridge's assembled
  hyperstack, over shared memory and over tcp inline, in planes/s and GB/s;
  and the same followed by the hand-over of the assembled stack into an
  ImageJ hyperstack (a no-op macro on the stack);
* against (a) numpy memcpy of the same planes (the limit) and (b) the file
  hand-off users do today: ``tifffile.imwrite`` + ``IJ.openImage`` of that
  file, in a JVM;
* the round trip of a no-op macro over the control channel (p50, p99)
  against the same macro called in-process.

Usage: ``python benchmarks/stream.py [--planes N] [--repeat R]``. Timings
are printed, never asserted. Targets (issue 3): shm ingest >= 1.5 GB/s and
>= 10x the file hand-off; no-op round trip p50 <= 2 ms above in-process.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.client import BridgeClient, BridgeError  # noqa: E402

Y = X = 2048
DEPTH = 16  # T positions the planes cycle through (the assembled stack holds 16 planes)


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 1000 < 65535:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", p + 1000))
                return p
            except OSError:
                pass
    raise RuntimeError("no free port pair")


def start_bridge(port: int, log: Path) -> subprocess.Popen:
    f = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), "--no-display"], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    with BridgeClient(port, timeout=5) as c:
        while time.monotonic() < deadline:
            try:
                if c.status()["engine"]["state"] == "ready":
                    return proc
            except BridgeError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"bridge did not start; see {log}")


def planes(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 4096, (Y, X), dtype=np.uint16) for _ in range(4)]
    return [base[i % 4] for i in range(n)]


def bench_memcpy(ps: list[np.ndarray]) -> float:
    dst = np.empty((DEPTH, Y, X), np.uint16)
    np.copyto(dst[0], ps[0])
    t0 = time.perf_counter()
    for i, p in enumerate(ps):
        np.copyto(dst[i % DEPTH], p)
    return time.perf_counter() - t0


def bench_stream(port: int, ps: list[np.ndarray], transport: str) -> tuple[float, float]:
    """(seconds to ingest all planes, seconds for DEPTH planes + ImageJ hand-over)."""
    key = f"bench-{transport}"
    with BridgeClient.connect(port, transport=transport, timeout=60) as c:
        for t in range(DEPTH):  # warm-up: the stack exists, the ring is mapped
            c.send_plane(ps[t], key, t=t)
        c.flush()
        c.run_macro("x = 1;", stack=key, outputs=[])
        t0 = time.perf_counter()
        for i, p in enumerate(ps):
            c.send_plane(p, key, t=i % DEPTH)
        c.flush()
        ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in range(DEPTH):
            c.send_plane(ps[t], key, t=t)
        c.flush()
        res = c.run_macro("print(nSlices);", stack=key, outputs=[])
        handover = time.perf_counter() - t0
        assert res.log.strip() == str(DEPTH), res.log
        c.close_stack(key)
    return ingest, handover


def bench_file_handoff(ij, ps: list[np.ndarray], folder: Path) -> float:
    import jpype
    import tifffile

    IJ = jpype.JClass("ij.IJ")
    n = min(len(ps), 32)
    path = folder / "plane.tif"
    tifffile.imwrite(path, ps[0])
    IJ.openImage(str(path)).close()
    t0 = time.perf_counter()
    for i in range(n):  # one file per plane, as a pipeline hands planes over
        f = folder / f"plane_{i:04d}.tif"
        tifffile.imwrite(f, ps[i])
        imp = IJ.openImage(str(f))
        assert imp.getWidth() == X
        imp.close()
        f.unlink()
    return (time.perf_counter() - t0) * len(ps) / n


def bench_roundtrip(port: int, ij, n: int) -> tuple[np.ndarray, np.ndarray]:
    code = "x = 1;"
    with BridgeClient.connect(port) as c:
        for _ in range(20):
            c.run_macro(code)
        remote = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.run_macro(code)
            remote.append(time.perf_counter() - t0)
    for _ in range(20):
        ij.run_macro(code)
    local = []
    for _ in range(n):
        t0 = time.perf_counter()
        ij.run_macro(code)
        local.append(time.perf_counter() - t0)
    return np.array(remote) * 1e3, np.array(local) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--planes", type=int, default=96)
    ap.add_argument("--roundtrips", type=int, default=300)
    a = ap.parse_args()
    ps = planes(a.planes)
    gb = a.planes * Y * X * 2 / 1e9
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="fjb-bench-"))
    proc = start_bridge(port, tmp / "bridge.log")
    try:
        t_shm, h_shm = bench_stream(port, ps, "shm")
        t_tcp, h_tcp = bench_stream(port, ps, "inline")
        t_mem = bench_memcpy(ps)
        from fiji_bridge.engine import open_engine

        ij = open_engine("imagej1").start()
        t_file = bench_file_handoff(ij, ps, tmp)
        remote, local = bench_roundtrip(port, ij, a.roundtrips)
    finally:
        try:
            with BridgeClient.connect(port, timeout=5) as c:
                c.shutdown()
            proc.wait(20)
        except Exception:
            proc.kill()
    print(f"fiji-bridge streaming benchmark: {a.planes} planes {Y}x{X} uint16 ({gb:.2f} GB), {os.cpu_count()} CPUs")
    print(f"{'path':44s} {'planes/s':>9s} {'GB/s':>7s} {'vs memcpy':>10s} {'vs file':>8s}")

    def row(name: str, secs: float, n: int = a.planes) -> None:
        size = n * Y * X * 2 / 1e9
        print(f"{name:44s} {n / secs:9.1f} {size / secs:7.2f} {(a.planes / t_mem) / (n / secs):9.1f}x {(n / secs) / (a.planes / t_file):7.1f}x")

    row("numpy memcpy (limit)", t_mem)
    row("bridge ingest, shm", t_shm)
    row("bridge ingest, tcp inline", t_tcp)
    row(f"shm ingest + ImageJ hand-over ({DEPTH} planes)", h_shm, DEPTH)
    row(f"tcp ingest + ImageJ hand-over ({DEPTH} planes)", h_tcp, DEPTH)
    row("file hand-off (tifffile.imwrite + IJ.openImage)", t_file)
    print("('vs memcpy' = times slower than memcpy; 'vs file' = times faster than the file hand-off)")
    d = np.percentile(remote, [50, 99]) - np.percentile(local, [50, 99])
    print(f"no-op macro, control channel: p50 {np.percentile(remote, 50):.2f} ms, p99 {np.percentile(remote, 99):.2f} ms")
    print(f"no-op macro, in-process:      p50 {np.percentile(local, 50):.2f} ms, p99 {np.percentile(local, 99):.2f} ms")
    print(f"overhead of the bridge:       p50 {d[0]:+.2f} ms, p99 {d[1]:+.2f} ms")
    shm_gbs = gb / t_shm
    ratio = (a.planes / t_shm) / (a.planes / t_file)
    print(f"targets: shm ingest >= 1.5 GB/s: {shm_gbs:.2f} ({'met' if shm_gbs >= 1.5 else 'NOT met'}); "
          f">= 10x file hand-off: {ratio:.1f}x ({'met' if ratio >= 10 else 'NOT met'}); "
          f"round trip p50 <= +2 ms: {d[0]:+.2f} ms ({'met' if d[0] <= 2 else 'NOT met'})")
    ij.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
