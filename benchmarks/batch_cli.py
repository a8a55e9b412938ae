"""Batch end to end, as a user runs it: ``fiji-bridge batch PLATE nuclei_count
--workers 1`` from the command line (bridge start-up, JVM and ImageJ
included, zarr in, zarr + CSV out) against one ImageJ JVM started with
``-batch`` on a driver macro that loops over the same fields' TIFFs (TIFF in,
TIFF + CSV out). The macro is the shipped ``nuclei_count``: Gaussian,
threshold, watershed, Analyze Particles. Wall-clock seconds and CPU seconds
of every process each side ran (the CLI, its bridge, engine worker, JVM and
Xvfb; java and its Xvfb), per unit too: CPU per unit is what decides how a
plate scales on a many-core machine. Each side runs ``--repeats`` times, in
alternation; medians are printed.

    .venv/bin/python benchmarks/batch_cli.py [--wells 12] [--fields 6] [--size 512]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch import ARGS, bench_plate, children_cpu, imagej_alone  # noqa: E402
from fiji_bridge.macros import resolve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=12)
    ap.add_argument("--fields", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fiji-bridge-bench-cli-"))
    try:
        wells, plate, uri, tiffs = bench_plate(work, a.wells, a.fields, a.size)
        n = len(tiffs)
        code = resolve("nuclei_count").bind(ARGS)
        print(f"plate: {n} fields of TZCYX {plate.fields[(wells[0], 0)].array.shape} uint16, macro nuclei_count, "
              f"{a.repeats} runs per side (medians)")
        ij_runs, fb_runs = [], []
        for rep in range(a.repeats):
            st: dict = {}
            _, done = imagej_alone(tiffs, code, work, st)
            assert done == n
            ij_runs.append((st["wall"], st["cpu"]))
            cmd = [sys.executable, "-m", "fiji_bridge.cli", "batch", "--plate", uri, "--macro", "nuclei_count",
                   *[f"--arg={k}={v}" for k, v in ARGS.items()], "--out", f"zarr://{work}/out_{rep}.zarr", "--workers", "1"]
            cpu0, t0 = children_cpu(), time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
            if r.returncode != 0:
                raise RuntimeError(f"fiji-bridge batch failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            fb_runs.append((wall, cpu))
        ij_wall, ij_cpu = (float(np.median([r[i] for r in ij_runs])) for i in (0, 1))
        fb_wall, fb_cpu = (float(np.median([r[i] for r in fb_runs])) for i in (0, 1))
        print(f"ImageJ alone (java -batch, one JVM):   {ij_wall:6.2f} s wall, {n / ij_wall:5.2f} units/s; "
              f"CPU {ij_cpu:6.2f} s = {1000 * ij_cpu / n:5.0f} ms/unit   runs {[(round(w, 1), round(c, 1)) for w, c in ij_runs]}")
        print(f"fiji-bridge batch --workers 1 (CLI):   {fb_wall:6.2f} s wall, {n / fb_wall:5.2f} units/s; "
              f"CPU {fb_cpu:6.2f} s = {1000 * fb_cpu / n:5.0f} ms/unit   runs {[(round(w, 1), round(c, 1)) for w, c in fb_runs]}")
        print(f"ratio (speed of fiji-bridge / ImageJ alone): {ij_wall / fb_wall:.2f}x wall, {ij_cpu / fb_cpu:.2f}x CPU")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
