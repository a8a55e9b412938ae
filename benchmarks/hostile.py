"""What the defences against hostile peers cost, and what a stack really costs.

Measures, against a real bridge process (no display):

1. ingest of 2048x2048 uint16 planes over shared memory (the bridge copies
   each plane out of the producer's segment with ``preadv`` instead of
   reading a mapping, so that a shrunk segment cannot SIGBUS it) and inline
   over loopback tcp (every frame CURVE-encrypted with the keys derived from
   the per-user secret): planes/s and GB/s from the first plane sent to the
   last acknowledged;
2. connecting: ``BridgeClient.connect`` + ``ping`` (the handshake presents
   the per-user secret), p50 and p90 over N connections;
3. the bridge's memory growth (RSS, from /proc) per one-plane stack, over
   20,000 stacks of one 4x4 uint8 plane each: the number the memory cap's
   per-stack bookkeeping (``server.STACK_OVERHEAD``) stands for.

Usage: ``python benchmarks/hostile.py [--planes 200] [--stacks 20000] [--connects 50]``.
Timings are printed, never asserted. Run it with ``PYTHONPATH`` pointing at
another checkout to compare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("FIJI_BRIDGE_SRC", str(ROOT)))

from fiji_bridge.client import BridgeClient, BridgeError, free_port_pair  # noqa: E402


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_bridge(tmp: Path, env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port_pair()
    log = open(tmp / f"bridge-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), "--no-display"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while True:
        try:
            with BridgeClient.connect(port, timeout=2) as c:
                c.ping()
            return proc, port
        except BridgeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / f"bridge-{port}.log").read_text())
            time.sleep(0.2)


def stop(proc: subprocess.Popen, port: int) -> None:
    try:
        with BridgeClient.connect(port, timeout=5) as c:
            c.shutdown()
        proc.wait(20)
    except Exception:
        proc.kill()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--planes", type=int, default=200)
    ap.add_argument("--stacks", type=int, default=20000)
    ap.add_argument("--connects", type=int, default=50)
    a = ap.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="fjb-bench-hostile-"))
    proc, port = start_bridge(tmp, {"FIJI_BRIDGE_MAX_STACK_BYTES": str(64 << 30)})
    try:
        plane = np.random.default_rng(0).integers(0, 4000, (2048, 2048), dtype=np.uint16)
        for transport in ("shm", "inline"):
            with BridgeClient.connect(port, transport=transport) as c:
                for i in range(8):  # warm: ring, stack allocation
                    c.send_plane(plane, "warm", t=i)
                c.flush()
                c.close_stack("warm")
                t0 = time.perf_counter()
                for i in range(a.planes):
                    c.send_plane(plane, "bench", t=i % 64)
                c.flush()
                dt = time.perf_counter() - t0
                c.close_stack("bench")
            gb = a.planes * plane.nbytes / 1e9
            print(f"{transport} ingest, {a.planes} planes 2048x2048 uint16: {a.planes / dt:.0f} planes/s, {gb / dt:.2f} GB/s")

        times = []
        for _ in range(a.connects):
            t = time.perf_counter()
            with BridgeClient.connect(port, timeout=5) as c:
                c.ping()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"connect + ping: p50 {1000 * times[len(times) // 2]:.1f} ms, p90 {1000 * times[int(len(times) * 0.9)]:.1f} ms")

        with BridgeClient.connect(port, transport="inline") as c:
            before = rss(proc.pid)
            tiny = np.ones((4, 4), np.uint8)
            for i in range(a.stacks):
                c.send_plane(tiny, f"tiny{i}")
            c.flush()
            time.sleep(0.5)
            grown = rss(proc.pid) - before
            mem = c.status()["memory"]
        print(f"{a.stacks} one-plane stacks: bridge RSS +{grown / 2**20:.1f} MiB = {grown / a.stacks:.0f} bytes a stack; "
              f"counted against the cap: {mem['used'] / a.stacks:.0f} bytes a stack ({mem})")
    finally:
        stop(proc, port)


if __name__ == "__main__":
    main()
