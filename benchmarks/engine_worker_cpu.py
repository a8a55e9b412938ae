"""Where a batch engine worker's CPU goes, by thread: the shipped nuclei
macro over a synthetic plate through the batch's own path
(:class:`~fiji_bridge.batch_engines.BatchEngines` + ``run_engines``), the
fields handed over from memory, so that nothing but the worker (and this
process's dispatch) runs.

Printed: start-up (spawn to the first unit done, wall and the worker's CPU),
the steady state after it (ms per unit, wall and worker CPU), and the steady
CPU per unit of each worker thread, from /proc/<pid>/task (names as the
kernel keeps them, 15 characters): the macro's own ``Run$_`` threads (ended
ones, counted as the rest of the process's CPU), ImageJ's filter pool, the
Python main thread, the AWT event thread, C1, JPype's reference queue, GC.
Xvfb is a process of its own and is not counted. Compare with the same
macro in plain ``java -jar ij.jar -batch`` (benchmarks/batch_cli.py).

    .venv/bin/python benchmarks/engine_worker_cpu.py [--wells 24] [--fields 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.batch_dispatch import run_engines  # noqa: E402
from fiji_bridge.batch_engines import BatchEngines  # noqa: E402
from fiji_bridge.macros import resolve  # noqa: E402
from fiji_bridge.synthetic import make_plate  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
#: thread names that number their instances: summed under one name
NUMBERED = ("C1 Comp", "C2 Comp", "GC Thread", "G1 Conc", "G1 Refine", "pool-", "Run$_")


def process_cpu(pid: int) -> float:
    st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / TICK


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """{tid: (name, CPU seconds)} of the live threads of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        st = raw.rsplit(")", 1)[1].split()
        out[tid] = (name, (int(st[11]) + int(st[12])) / TICK)
    return out


class _Structure:
    channel_names: list = []
    calibration = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=24)
    ap.add_argument("--fields", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    wells = [f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}" for i in range(a.wells)]
    plate = make_plate(wells, a.fields, size=a.size, size_z=3, seed=1, nuclei={w: 40 for w in wells})
    units = sorted(plate.fields)
    code = resolve("nuclei_count").bind({"channel": 1})
    t_spawn = time.perf_counter()
    engines = BatchEngines(1).start()
    pid = engines.sups[0].pid
    marks: list[tuple[float, float]] = []
    first: dict = {}
    failed = []

    def emit(outcome) -> None:
        marks.append((time.perf_counter(), process_cpu(pid)))
        if len(marks) == 1:
            first.update(thread_cpu(pid))
        if not outcome.ok:
            failed.append(outcome.error)

    try:
        run_engines(units, lambda w, s: plate.fields[(w, s)].array, code, "bench", 60, _Structure, engines, emit)
        last_threads = thread_cpu(pid)
    finally:
        engines.close()
    n = len(marks)
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    print(f"{n} units of TZCYX {plate.fields[units[0]].array.shape} uint16 ({len(failed)} failed), "
          f"worker options {' '.join(engines.java_options)}")
    print(f"start-up: first unit done {t0 - t_spawn:.2f} s after spawn, worker CPU {c0:.2f} s")
    print(f"steady: {1000 * (t1 - t0) / (n - 1):.1f} ms/unit wall, worker {1000 * (c1 - c0) / (n - 1):.1f} ms/unit CPU")
    by_name: dict[str, float] = {}
    for tid, (name, cpu) in last_threads.items():
        key = name.rstrip("0123456789#") if name.startswith(NUMBERED) else name
        by_name[key] = by_name.get(key, 0.0) + cpu - first.get(tid, (name, 0.0))[1]
    by_name["(ended threads: the macro's Run$_)"] = (c1 - c0) - sum(by_name.values())
    print("steady CPU by thread, ms/unit:")
    for name, cpu in sorted(by_name.items(), key=lambda kv: -kv[1]):
        if 1000 * cpu / (n - 1) >= 0.05:
            print(f"   {name:40s} {1000 * cpu / (n - 1):6.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
