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

Every ImageJ case runs ``--repeats`` times (the fresh bridge's first stack on
that many fresh bridges) and the median is printed, with the CPU seconds the
bridge's processes (bridge + engine worker with its JVM) spent per GB: on a
shared machine wall-clock rates follow the load, CPU per GB much less. The
bridge's start-up (until its engine is ready: the JVM and ImageJ) is printed
apart from its first stack.

Usage: ``python benchmarks/stream.py [--planes N] [--mirror T,Z,C] [--repeats R]``.
Timings are printed, never asserted. Targets (issue 11): a new ImageJ
hyperstack over shm >= 1.5 GB/s and >= 3x the file hand-off, the fresh
bridge's first stack included; refresh >= 2.5 GB/s; tcp inline within 2x of
shm; no-op round trip p50 <= 1 ms above in-process.
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
from typing import Iterator, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.client import BridgeClient, BridgeError, free_port_pair  # noqa: E402

Y = X = 2048
DEPTH = 16  # positions the store-ingest planes cycle through


free_port = free_port_pair

#: port -> pid of the bridge process serving it
PIDS: dict[int, int] = {}
#: port -> seconds from spawning the bridge until its engine was ready (and its memory warm)
STARTUP: dict[int, float] = {}
#: port -> the bridge's stack-memory warm-up ({"bytes", "seconds"})
WARM: dict[int, dict] = {}


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_seconds(port: int) -> float:
    """User + system CPU seconds of the bridge on ``port`` and its
    descendants (the engine worker with its JVM, Xvfb) so far."""
    stats = _proc_stats()
    root = PIDS.get(port)
    if root not in stats:
        return 0.0
    tree, total, grew = {root}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(stats[p][1] for p in tree)


@contextlib.contextmanager
def bridge(folder: Path, display: bool, warm: Optional[str] = None) -> Iterator[int]:
    """A bridge subprocess (with a live display on a private Xvfb, or none),
    started until its engine is ready and its memory warm-up done;
    ``warm``: FIJI_BRIDGE_WARM for it (default: the bridge's own)."""
    port = free_port()
    log = folder / f"bridge-{port}.log"
    env = dict(os.environ)
    env.pop("DISPLAY", None)  # --display then means the engine's private Xvfb
    if warm is not None:
        env["FIJI_BRIDGE_WARM"] = warm
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), "--display" if display else "--no-display"],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
    PIDS[port] = proc.pid
    t_spawn = time.monotonic()
    try:
        deadline = time.monotonic() + 180
        with BridgeClient(port, timeout=5) as c:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bridge did not start; see {log}")
                try:
                    st = c.status()
                    if st["engine"]["state"] == "ready" and (not display or st["memory"].get("warm") is not None):
                        WARM[port] = st["memory"].get("warm") or {}
                        break
                except BridgeError:
                    pass
                time.sleep(0.05)
        STARTUP[port] = time.monotonic() - t_spawn
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
        time.sleep(0.01)  # polling faster costs the bridge CPU the measurement would count


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
    """Seconds until a new stack streamed plane by plane is all in ImageJ
    (check it with :func:`check_mirror`)."""
    t0 = time.perf_counter()
    send_all(c, key, arr)
    c.flush()
    wait_mirror(c, key)
    return time.perf_counter() - t0


def mirror_refresh(c: BridgeClient, key: str, arr: np.ndarray) -> tuple[float, float]:
    """(seconds until every plane of the shown stack ``key`` is replaced in
    ImageJ, seconds of the StackStore ingest alone)."""
    t0 = time.perf_counter()
    send_all(c, key, arr)
    c.flush()
    ingest = time.perf_counter() - t0
    wait_mirror(c, key)
    return time.perf_counter() - t0, ingest


def bench_mirror(port: int, transport: str, arrs: tuple[np.ndarray, np.ndarray], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """{"new", "refresh", "ingest"}: per repeat, (seconds, CPU seconds of the
    bridge's processes) for a new stack, its refresh, and the refresh's
    StackStore ingest alone (its CPU: that of the whole refresh)."""
    key = f"mirror-{transport}"
    out: dict[str, list[tuple[float, float]]] = {"new": [], "refresh": [], "ingest": []}
    with BridgeClient.connect(port, transport=transport, timeout=120) as c:
        send_all(c, "warm", arrs[1][:1])  # the sockets, the ring and the worker's code paths
        c.flush()
        wait_mirror(c, "warm")
        c.close_stack("warm")
        for _ in range(repeats):
            cpu0 = cpu_seconds(port)
            cold = mirror_new(c, key, arrs[0])
            cpu1 = cpu_seconds(port)
            check_mirror(c, key, arrs[0])
            cpu2 = cpu_seconds(port)
            warm, ingest = mirror_refresh(c, key, arrs[1])
            cpu3 = cpu_seconds(port)
            check_mirror(c, key, arrs[1])
            c.close_stack(key)
            out["new"].append((cold, cpu1 - cpu0))
            out["refresh"].append((warm, cpu3 - cpu2))
            out["ingest"].append((ingest, cpu3 - cpu2))
    return out


def bench_first_stack(port: int, arr: np.ndarray) -> tuple[float, float]:
    """(seconds, CPU seconds) of the first full-size stack of a fresh bridge:
    its memory (numpy, the JVM heap) is touched for the first time."""
    with BridgeClient.connect(port, transport="shm", timeout=120) as c:
        cpu0 = cpu_seconds(port)
        secs = mirror_new(c, "first", arr)
        cpu = cpu_seconds(port) - cpu0
        check_mirror(c, "first", arr)
        c.close_stack("first")
    return secs, cpu


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
    ap.add_argument("--repeats", type=int, default=3, help="runs of each ImageJ case, median reported (default 3)")
    ap.add_argument("--roundtrips", type=int, default=300)
    a = ap.parse_args()
    mshape = tuple(int(v) for v in a.mirror.split(","))
    assert len(mshape) == 3
    n_mirror = int(np.prod(mshape))
    ps = planes(a.planes)
    mirror_arrs = (distinct_stack(mshape, 1), distinct_stack(mshape, 2))  # type: ignore[arg-type]
    tmp = Path(tempfile.mkdtemp(prefix="fjb-bench-"))
    # rows: (name, planes, [(seconds, CPU seconds or nan) per run])
    rows: list[tuple[str, int, list[tuple[float, float]]]] = []
    nan = float("nan")
    with bridge(tmp, display=False) as port:
        for tr in ("shm", "inline"):
            rows.append((f"bridge StackStore, {'tcp inline' if tr == 'inline' else tr}", a.planes, [(bench_store(port, ps, tr), nan)]))
        handover = bench_macro_handover(port, ps)
        from fiji_bridge.engine import open_engine

        ij = open_engine("imagej1").start()
        remote, local = bench_roundtrip(port, ij, a.roundtrips)
    firsts, startups, warms, cold_firsts, cold_startups = [], [], [], [], []
    for _ in range(a.repeats):
        with bridge(tmp, display=True) as port:
            startups.append(STARTUP[port])
            warms.append(WARM[port].get("seconds", 0.0))
            firsts.append(bench_first_stack(port, mirror_arrs[1]))
        with bridge(tmp, display=True, warm="0") as port:  # the same without warm-up
            cold_startups.append(STARTUP[port])
            cold_firsts.append(bench_first_stack(port, mirror_arrs[1]))
    rows.append(("ImageJ hyperstack, fresh bridge's 1st stack, shm", n_mirror, firsts))
    rows.append(("  (the same, bridge without warm-up)", n_mirror, cold_firsts))
    with bridge(tmp, display=True) as port:
        for tr in ("shm", "inline"):
            res = bench_mirror(port, tr, mirror_arrs, a.repeats)
            name = "tcp inline" if tr == "inline" else tr
            rows.append((f"ImageJ hyperstack, new stack, {name}", n_mirror, res["new"]))
            rows.append((f"ImageJ hyperstack, refresh, {name}", n_mirror, res["refresh"]))
            rows.append((f"  (its StackStore part, {name})", n_mirror, [(s, nan) for s, _ in res["ingest"]]))
    rows.append((f"stack -> no-op macro input ({DEPTH} planes)", DEPTH, [(handover, nan)]))
    t_mem = bench_memcpy(ps)
    t_file = bench_file_handoff(ps, tmp)
    ij.close()

    gb_per_plane = Y * X * 2 / 1e9
    mem_rate, file_rate = a.planes / t_mem, a.planes / t_file
    print(f"fiji-bridge streaming benchmark: {Y}x{X} uint16 planes, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"store ingest {a.planes} planes over {DEPTH} positions; ImageJ mirror T,Z,C={mshape} ({n_mirror} planes); "
          f"ImageJ rows: median of {a.repeats}")
    print(f"{'path':50s} {'planes/s':>9s} {'GB/s':>7s} {'memcpy/x':>9s} {'x/file':>8s} {'CPU s/GB':>9s}  runs (GB/s)")

    def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))

    by: dict[str, float] = {}

    def row(name: str, n: int, runs: list[tuple[float, float]]) -> None:
        secs, cpu = median(runs)
        rate = n / secs
        by[name] = rate
        each = " ".join(f"{n * gb_per_plane / r[0]:.2f}" for r in runs) if len(runs) > 1 else ""
        cpu_gb = f"{cpu / (n * gb_per_plane):9.2f}" if cpu == cpu else f"{'':9s}"
        print(f"{name:50s} {rate:9.1f} {rate * gb_per_plane:7.2f} {mem_rate / rate:8.1f}x {rate / file_rate:7.1f}x {cpu_gb}  {each}")

    row("numpy memcpy (limit)", a.planes, [(t_mem, nan)])
    for r in rows:
        row(*r)
    row("file hand-off (tifffile.imwrite+IJ.openImage)", a.planes, [(t_file, nan)])
    print("(memcpy/x = times slower than memcpy; x/file = times faster than the file hand-off; CPU s/GB = CPU of"
          " the bridge + engine worker + JVM per GB; ImageJ rows: until ImageJ holds every plane, checked by a macro reading them back)")
    print(f"fresh bridge start-up until its engine is ready and its memory warm (JVM + ImageJ + warm-up): median {np.median(startups):.2f} s "
          f"of {[round(v, 2) for v in startups]}; without warm-up (FIJI_BRIDGE_WARM=0): median {np.median(cold_startups):.2f} s "
          f"of {[round(v, 2) for v in cold_startups]}; warm-up cost = the difference (the bridge's 1 GiB of stack memory took "
          f"{np.median(warms):.2f} s of it, in parallel with the JVM's start and its pretouched 2 GiB heap)")
    d = np.percentile(remote, [50, 99]) - np.percentile(local, [50, 99])
    print(f"no-op macro, control channel: p50 {np.percentile(remote, 50):.2f} ms, p99 {np.percentile(remote, 99):.2f} ms")
    print(f"no-op macro, in-process:      p50 {np.percentile(local, 50):.2f} ms, p99 {np.percentile(local, 99):.2f} ms")
    print(f"overhead of the bridge:       p50 {d[0]:+.2f} ms, p99 {d[1]:+.2f} ms")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for case in ("fresh bridge's 1st stack, shm", "new stack, shm", "refresh, shm"):
        rate = by[f"ImageJ hyperstack, {case}"]
        gbs, goal = rate * gb_per_plane, 2.5 if case.startswith("refresh") else 1.5
        line = f"target, ImageJ hyperstack {case}: {gbs:.2f} GB/s (>= {goal}: {verdict(gbs >= goal)})"
        if not case.startswith("refresh"):
            line += f", {rate / file_rate:.1f}x file (>= 3: {verdict(rate / file_rate >= 3)})"
        print(line)
    for case in ("new stack", "refresh"):
        ratio = by[f"ImageJ hyperstack, {case}, shm"] / by[f"ImageJ hyperstack, {case}, tcp inline"]
        print(f"target, tcp inline {case} within 2x of shm: shm/tcp = {ratio:.2f} ({verdict(ratio <= 2)})")
    print(f"target, round trip p50 <= +1 ms: {d[0]:+.2f} ms ({verdict(d[0] <= 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
