"""Streaming benchmark: plane ingest into the bridge and into its live ImageJ
hyperstack, and the macro round trip.

One run prints, for 2048x2048 uint16 planes over shared memory and over tcp
inline, in planes/s and GB/s, each with its ratio to (a) numpy memcpy of the
same planes (the limit) and (b) the file hand-off users do today
(``tifffile.imwrite`` + ``IJ.openImage`` of that file, in a JVM):

1. ingest into the bridge's assembled stack (its numpy StackStore), on a
   bridge without display: from the first plane sent to the last one
   acknowledged as assembled;
2. ingest into the assembled **ImageJ hyperstack**: a bridge with a live
   display (a private Xvfb) mirrors every stack into an ImageJ hyperstack
   (CompositeImage) in its engine worker. Timed from the first plane sent
   until the bridge reports that ImageJ holds every plane (status: the window
   exists, nothing pending, the engine queue empty); then, untimed, a macro
   reads each plane's mean from that ImageJ window and it is checked against
   numpy. Cases: a *new* stack (the window is built as the stack grows;
   once as the fresh bridge's very first stack, whose memory - numpy, the
   JVM heap - is touched for the first time, then in a running bridge) and
   a *refresh* of an existing window of the same shape (every plane
   replaced, e.g. the next time point of a live acquisition); every plane
   lands at its own position, so no plane is coalesced away;
3. the hand-over of an assembled stack to a macro (``run_macro(stack=...)``,
   a no-op macro, ``outputs=[]``), for comparison;
4. the round trip of a no-op macro over the control channel (p50, p99)
   against the same macro called in-process.

Usage: ``python benchmarks/stream.py [--planes N] [--mirror T,Z,C]``. Timings
are printed, never asserted. Targets (issue 3): shm ingest >= 1.5 GB/s and
>= 10x the file hand-off; no-op round trip p50 <= 2 ms above in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.client import BridgeClient, BridgeError, free_port_pair  # noqa: E402

Y = X = 2048
DEPTH = 16  # positions the store-ingest planes cycle through


free_port = free_port_pair


@contextlib.contextmanager
def bridge(folder: Path, display: bool) -> Iterator[int]:
    """A bridge subprocess (with a live display on a private Xvfb, or none)."""
    port = free_port()
    log = folder / f"bridge-{port}.log"
    env = dict(os.environ)
    env.pop("DISPLAY", None)  # --display then means the engine's private Xvfb
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), "--display" if display else "--no-display"],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
    try:
        deadline = time.monotonic() + 180
        with BridgeClient(port, timeout=5) as c:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bridge did not start; see {log}")
                try:
                    if c.status()["engine"]["state"] == "ready":
                        break
                except BridgeError:
                    pass
                time.sleep(0.2)
        yield port
    finally:
        try:
            with BridgeClient.connect(port, timeout=5) as c:
                c.shutdown()
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait(10)


def planes(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 4096, (Y, X), dtype=np.uint16) for _ in range(4)]
    return [base[i % 4] for i in range(n)]


def distinct_stack(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A TZCYX stack whose planes all differ (so their means identify them)."""
    T, Z, C = shape
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4000, (4, Y, X), dtype=np.uint16)
    out = np.empty((T, Z, C, Y, X), np.uint16)
    for i in range(T * Z * C):
        t, z, c = np.unravel_index(i, (T, Z, C))
        np.add(base[i % 4], np.uint16(7 * i + 3 * seed), out=out[t, z, c])
    return out


# -- 1. ingest into the bridge's StackStore ---------------------------------------


def bench_store(port: int, ps: list[np.ndarray], transport: str) -> float:
    key = f"store-{transport}"
    with BridgeClient.connect(port, transport=transport, timeout=60) as c:
        for t in range(DEPTH):  # warm-up: the stack exists, the ring is mapped
            c.send_plane(ps[t], key, t=t)
        c.flush()
        t0 = time.perf_counter()
        for i, p in enumerate(ps):
            c.send_plane(p, key, t=i % DEPTH)
        c.flush()
        secs = time.perf_counter() - t0
        last = len(ps) - 1
        assert np.array_equal(c.get_stack(key)[last % DEPTH, 0, 0], ps[last]), "the store lost a plane"
        c.close_stack(key)
    return secs


def bench_macro_handover(port: int, ps: list[np.ndarray], repeat: int = 5) -> float:
    """Seconds to hand an assembled DEPTH-plane stack to a no-op macro (best of ``repeat``)."""
    key = "handover"
    with BridgeClient.connect(port, timeout=60) as c:
        for t in range(DEPTH):
            c.send_plane(ps[t], key, t=t)
        c.flush()
        best = float("inf")
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            res = c.run_macro("print(nSlices);", stack=key, outputs=[])
            best = min(best, time.perf_counter() - t0)
            assert res.log.strip() == str(DEPTH), res.log
        c.close_stack(key)
    return best


# -- 2. ingest into the live ImageJ hyperstack ----------------------------------------


def wait_mirror(c: BridgeClient, key: str, timeout: float = 120.0) -> None:
    """Until the bridge says ImageJ holds every plane of ``key``."""
    deadline = time.monotonic() + timeout
    while True:
        st = c.status()
        if st.get("display_error"):
            raise RuntimeError(f"live display failed: {st['display_error']}")
        if key in st["windows"] and key not in st["display_pending"] and st["engine"]["queued"] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"ImageJ did not get all planes of {key} in {timeout} s: {st}")
        time.sleep(0.002)


READBACK = """
selectImage("%s");
getDimensions(w, h, nc, nz, nt);
print(w + " " + h + " " + nc + " " + nz + " " + nt);
for (i = 1; i <= nSlices; i++) { setSlice(i); getRawStatistics(n, mean); print(d2s(mean, 6)); }
"""


def check_mirror(c: BridgeClient, key: str, arr: np.ndarray) -> None:
    """ImageJ's own per-plane means of the live window == numpy's (CZT order)."""
    T, Z, C = arr.shape[:3]
    lines = c.run_macro(READBACK % key, outputs=[]).log.split()
    dims = [int(v) for v in lines[:5]]
    assert dims == [X, Y, C, Z, T], f"ImageJ window {key}: dims {dims}, expected {[X, Y, C, Z, T]}"
    got = np.array([float(v) for v in lines[5:]])
    want = arr.reshape(T * Z * C, -1).mean(axis=1, dtype=np.float64)  # t, z, c order = ImageJ's
    assert got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-4), f"ImageJ window {key} differs from what was sent"


def send_all(c: BridgeClient, key: str, arr: np.ndarray) -> None:
    T, Z, C = arr.shape[:3]
    for t in range(T):
        for z in range(Z):
            for ch in range(C):
                c.send_plane(arr[t, z, ch], key, t=t, z=z, channel=ch)


def mirror_new(c: BridgeClient, key: str, arr: np.ndarray) -> float:
    """Seconds until a new stack streamed plane by plane is all in ImageJ."""
    t0 = time.perf_counter()
    send_all(c, key, arr)
    c.flush()
    wait_mirror(c, key)
    secs = time.perf_counter() - t0
    check_mirror(c, key, arr)
    return secs


def mirror_refresh(c: BridgeClient, key: str, arr: np.ndarray) -> tuple[float, float]:
    """(seconds until every plane of the shown stack ``key`` is replaced in
    ImageJ, seconds of the StackStore ingest alone)."""
    t0 = time.perf_counter()
    send_all(c, key, arr)
    c.flush()
    ingest = time.perf_counter() - t0
    wait_mirror(c, key)
    secs = time.perf_counter() - t0
    check_mirror(c, key, arr)
    return secs, ingest


def bench_mirror(port: int, transport: str, arrs: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    """(new stack, refresh, refresh's ingest alone) seconds."""
    key = f"mirror-{transport}"
    with BridgeClient.connect(port, transport=transport, timeout=120) as c:
        send_all(c, "warm", arrs[1][:1])  # the sockets, the ring and the worker's code paths
        c.flush()
        wait_mirror(c, "warm")
        c.close_stack("warm")
        cold = mirror_new(c, key, arrs[0])
        warm, ingest = mirror_refresh(c, key, arrs[1])
        c.close_stack(key)
    return cold, warm, ingest


def bench_first_stack(port: int, arr: np.ndarray) -> float:
    """The first full-size stack of a fresh bridge: its memory (numpy, the
    JVM heap) is touched for the first time."""
    with BridgeClient.connect(port, transport="shm", timeout=120) as c:
        secs = mirror_new(c, "first", arr)
        c.close_stack("first")
    return secs


# -- references --------------------------------------------------------------------


def bench_memcpy(ps: list[np.ndarray]) -> float:
    dst = np.empty((DEPTH, Y, X), np.uint16)
    for i in range(DEPTH):
        np.copyto(dst[i], ps[i % len(ps)])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i, p in enumerate(ps):
            np.copyto(dst[i % DEPTH], p)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_file_handoff(ps: list[np.ndarray], folder: Path) -> float:
    """Seconds per len(ps) planes for tifffile.imwrite + IJ.openImage of each
    plane (one file per plane, as a pipeline hands planes over), in this
    process's JVM."""
    import jpype
    import tifffile

    IJ = jpype.JClass("ij.IJ")
    n = min(len(ps), 32)
    path = folder / "plane.tif"
    tifffile.imwrite(path, ps[0])
    IJ.openImage(str(path)).close()
    t0 = time.perf_counter()
    for i in range(n):
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


# -- report --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--planes", type=int, default=96, help="planes streamed into the store (default 96)")
    ap.add_argument("--mirror", default="4,8,2", help="T,Z,C of the stacks mirrored into ImageJ (default 4,8,2)")
    ap.add_argument("--roundtrips", type=int, default=300)
    a = ap.parse_args()
    mshape = tuple(int(v) for v in a.mirror.split(","))
    assert len(mshape) == 3
    n_mirror = int(np.prod(mshape))
    ps = planes(a.planes)
    mirror_arrs = (distinct_stack(mshape, 1), distinct_stack(mshape, 2))  # type: ignore[arg-type]
    tmp = Path(tempfile.mkdtemp(prefix="fjb-bench-"))
    rows: list[tuple[str, int, float]] = []
    with bridge(tmp, display=False) as port:
        for tr in ("shm", "inline"):
            rows.append((f"bridge StackStore, {'tcp inline' if tr == 'inline' else tr}", a.planes, bench_store(port, ps, tr)))
        handover = bench_macro_handover(port, ps)
        from fiji_bridge.engine import open_engine

        ij = open_engine("imagej1").start()
        remote, local = bench_roundtrip(port, ij, a.roundtrips)
    with bridge(tmp, display=True) as port:
        rows.append(("ImageJ hyperstack, fresh bridge's 1st stack, shm", n_mirror, bench_first_stack(port, mirror_arrs[1])))
        for tr in ("shm", "inline"):
            cold, warm, ingest = bench_mirror(port, tr, mirror_arrs)
            name = "tcp inline" if tr == "inline" else tr
            rows.append((f"ImageJ hyperstack, new stack, {name}", n_mirror, cold))
            rows.append((f"ImageJ hyperstack, refresh, {name}", n_mirror, warm))
            rows.append((f"  (its StackStore part, {name})", n_mirror, ingest))
    rows.append((f"stack -> no-op macro input ({DEPTH} planes)", DEPTH, handover))
    t_mem = bench_memcpy(ps)
    t_file = bench_file_handoff(ps, tmp)
    ij.close()

    mem_rate, file_rate = a.planes / t_mem, a.planes / t_file
    print(f"fiji-bridge streaming benchmark: {Y}x{X} uint16 planes, {os.cpu_count()} CPUs; "
          f"store ingest {a.planes} planes over {DEPTH} positions; ImageJ mirror T,Z,C={mshape} ({n_mirror} planes)")
    print(f"{'path':50s} {'planes/s':>9s} {'GB/s':>7s} {'memcpy/x':>9s} {'x/file':>8s}")

    def row(name: str, n: int, secs: float) -> None:
        rate = n / secs
        print(f"{name:50s} {rate:9.1f} {rate * Y * X * 2 / 1e9:7.2f} {mem_rate / rate:8.1f}x {rate / file_rate:7.1f}x")

    row("numpy memcpy (limit)", a.planes, t_mem)
    for r in rows:
        row(*r)
    row("file hand-off (tifffile.imwrite+IJ.openImage)", a.planes, t_file)
    print("(memcpy/x = times slower than memcpy; x/file = times faster than the file hand-off;"
          " ImageJ rows: until ImageJ holds every plane, checked by a macro reading them back)")
    d = np.percentile(remote, [50, 99]) - np.percentile(local, [50, 99])
    print(f"no-op macro, control channel: p50 {np.percentile(remote, 50):.2f} ms, p99 {np.percentile(remote, 99):.2f} ms")
    print(f"no-op macro, in-process:      p50 {np.percentile(local, 50):.2f} ms, p99 {np.percentile(local, 99):.2f} ms")
    print(f"overhead of the bridge:       p50 {d[0]:+.2f} ms, p99 {d[1]:+.2f} ms")
    by = {name: n / secs for name, n, secs in rows}
    for tr in ("shm", "tcp inline"):
        for case in ("new stack", "refresh"):
            rate = by[f"ImageJ hyperstack, {case}, {tr}"]
            gbs = rate * Y * X * 2 / 1e9
            print(f"target, ImageJ hyperstack {case} over {tr}: {gbs:.2f} GB/s (>= 1.5: {'met' if gbs >= 1.5 else 'NOT met'}), "
                  f"{rate / file_rate:.1f}x file (>= 10: {'met' if rate / file_rate >= 10 else 'NOT met'})")
    print(f"target, round trip p50 <= +2 ms: {d[0]:+.2f} ms ({'met' if d[0] <= 2 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
