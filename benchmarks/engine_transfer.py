"""numpy <-> ImageJ 1 pixel transfer throughput, against memcpy.

Prints GB/s for: numpy memcpy into a preallocated array (the limit) and into
a new array (what any result that is a fresh array pays), numpy ->
ImagePlus and ImagePlus -> numpy through fiji_bridge.engine.transfer (bulk
copies over direct buffers), and the naive ``JArray(JShort)(ndarray)`` path;
each with its ratio to memcpy. For the 2048x2048 stacks also the live
display's streaming path (``update_planes``): into an existing hyperstack of
the same shape (planes copied into its own pixel arrays, display ranges
widened: what a live window pays per refresh) and into a new one (Java
arrays allocated first). Sizes: one 2048x2048 uint16 plane, a small stack
(2C x 5Z x 2T of 512x512 uint16), 1C x 16Z and 2C x 8Z x 2T of 2048x2048
uint16.

    python benchmarks/engine_transfer.py [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up (JIT, page faults)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    opts = ap.parse_args()

    from fiji_bridge.engine import open_engine
    from fiji_bridge.engine.transfer import from_imageplus, to_imageplus

    engine = open_engine("imagej1").start()  # the JVM and ImageJ (offline)
    from jpype import JArray, JShort

    rng = np.random.default_rng(0)
    cases = {
        "plane 2048x2048 uint16": rng.integers(0, 65535, (1, 1, 1, 2048, 2048), dtype=np.uint16),
        "stack 2Cx5Zx2T 512x512 uint16": rng.integers(0, 65535, (2, 5, 2, 512, 512), dtype=np.uint16),
        "stack 1Cx16Z 2048x2048 uint16": rng.integers(0, 65535, (1, 16, 1, 2048, 2048), dtype=np.uint16),
        "stack 2Cx8Zx2T 2048x2048 uint16": rng.integers(0, 65535, (2, 8, 2, 2048, 2048), dtype=np.uint16),
    }
    print(f"ImageJ {engine.version}; best of {opts.repeat}")
    print(f"{'case':34s} {'path':30s} {'GB/s':>8s} {'x memcpy':>9s}")
    for name, arr in cases.items():
        gb = arr.nbytes / 1e9
        dst = np.empty_like(arr)
        memcpy = gb / best_seconds(lambda: np.copyto(dst, arr), opts.repeat)
        copy_new = gb / best_seconds(lambda: arr.copy(), opts.repeat)
        imp = to_imageplus(arr, "bench")
        assert np.array_equal(from_imageplus(imp)[0], arr)
        into = gb / best_seconds(lambda: to_imageplus(arr, "bench").flush(), opts.repeat)
        back = gb / best_seconds(lambda: from_imageplus(imp), opts.repeat)
        planes = arr.reshape(-1, arr.shape[-2] * arr.shape[-1]).view(np.int16)
        naive_repeat = max(1, opts.repeat // 5)
        naive = gb / best_seconds(lambda: [JArray(JShort)(p) for p in planes], naive_repeat)
        rows = [
            ("numpy memcpy (limit)", memcpy),
            ("numpy copy to a new array", copy_new),
            ("numpy -> ImagePlus", into),
            ("ImagePlus -> numpy", back),
            ("naive JArray(JShort)(nd)", naive),
        ]
        if arr.shape[-1] == 2048 and arr.shape[:3] != (1, 1, 1):
            T, Z, C = arr.shape[:3]
            positions = [(t, z, c) for t in range(T) for z in range(Z) for c in range(C)]
            planes = arr.reshape(-1, *arr.shape[-2:])
            engine.update_planes("bench", arr.shape, positions, planes)
            refresh = gb / best_seconds(lambda: engine.update_planes("bench", arr.shape, positions, planes), opts.repeat)

            def fresh() -> None:
                engine.close_stack("bench")
                engine.update_planes("bench", arr.shape, positions, planes)

            new = gb / best_seconds(fresh, max(1, opts.repeat // 2))
            engine.close_stack("bench")
            rows += [("live stack: refresh in place", refresh), ("live stack: new", new)]
        for path, rate in rows:
            print(f"{name:34s} {path:30s} {rate:8.2f} {rate / memcpy:9.2f}")
        imp.flush()
    engine.close()


if __name__ == "__main__":
    main()
