"""Batch end to end, as a user runs it: ``fiji-bridge batch PLATE nuclei_count
--workers N`` from the command line (engine start-up, JVM and ImageJ
included, zarr in, zarr + CSV out) against one ImageJ JVM started with
``-batch`` on a driver macro that loops over the same fields' TIFFs (TIFF in,
TIFF + CSV out). The macro is the shipped ``nuclei_count``: Gaussian,
threshold, watershed, Analyze Particles.

Printed per side: wall-clock seconds and CPU seconds of every process the
side ran (CPU per unit is what decides how a plate scales on a many-core
machine), and where the time went: start-up (to the first unit done; for
ImageJ alone the run minus its timed loop), ms per unit after it, the end
(last unit to exit), and the CPU split by process (the CLI, engine
workers, Xvfb, java; sampled from /proc every 20 ms, so each process may
miss its last few ms), and the JVMs' CPU by thread (main; an engine worker's
macro threads; JIT compilers; GC and VM threads; AWT; other; threads that
exited unseen). ``--baseline DIR`` runs a second fiji-bridge
checkout (``PYTHONPATH=DIR``, e.g. ``/work/main``) as a third side: every
side runs ``--repeats`` times in alternation, so a shared machine's load
falls on all of them; medians are printed. ``--baseline-env KEY=VALUE``
(repeatable) sets a variable for the baseline side alone: with ``--baseline``
this checkout's own folder, it compares two settings of the same code
(e.g. ``FIJI_BRIDGE_BATCH_JAVA_OPTIONS``). All fiji-bridge runs share a
class-data archive cache of this benchmark's own; the first run, untimed in
the medians, starts without an archive and writes it (printed apart). Each
checkout's bytecode is compiled first, as a pip install compiles it: where
PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile the
package's modules again (0.15 s in the CLI, 0.1 s in a worker).

    .venv/bin/python benchmarks/batch_cli.py [--wells 12] [--fields 6] [--size 512] [--workers 1] [--baseline DIR]
        [--baseline-env KEY=VALUE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from batch import ARGS, bench_plate, children_cpu, imagej_alone  # noqa: E402
from fiji_bridge.macros import resolve  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _kind(cmd: list[str]) -> str:
    text = " ".join(cmd)
    if "engine_worker" in text:
        return "engine worker (JVM)"
    if "fiji_bridge.cli serve" in text:
        return "bridge"
    if "fiji_bridge.cli" in text:
        return "CLI"
    if cmd and cmd[0].endswith("Xvfb"):
        return "Xvfb"
    if cmd and cmd[0].endswith("java"):
        return "java"
    return Path(cmd[0]).name if cmd else "?"


def _thread_kind(name: str, main: bool) -> str:
    """What a JVM process's thread does, from its name (/proc/PID/task/TID/comm)."""
    if main:
        return "main"  # java -batch: the macro; an engine worker: Python, JPype calls, the reply
    if "Compiler" in name:
        return "JIT"
    if "GC" in name or name.startswith("VM "):
        return "GC+VM"
    if name.startswith("Run$"):
        return "macro"  # an engine worker's macro thread (ImageJ's Interpreter)
    if name.startswith("AWT") or name.startswith("Java2D"):
        return "AWT"
    return "other"


def _stat(path: str) -> tuple[str, int, float]:
    """(name, parent pid, CPU seconds) from a /proc ``stat`` file (a process's or a thread's)."""
    text = Path(path).read_text()
    name, rest = text.split("(", 1)[1].rsplit(")", 1)
    f = rest.split()
    return name, int(f[1]), (int(f[11]) + int(f[12])) / TICK


class ProcessCPU:
    """CPU seconds of ``root`` and its descendants, by kind of process,
    sampled from /proc until stopped; the JVMs' (engine workers', java's)
    also by kind of thread (:func:`_thread_kind`)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, tuple[str, float]] = {}
        self.threads: dict[tuple[int, int], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        parents: dict[int, int] = {}
        stats: dict[int, tuple[float, list[str]]] = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                _, parent, cpu = _stat(f"/proc/{p}/stat")
                cmd = [c.decode() for c in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") if c]
            except (OSError, IndexError, ValueError):
                continue
            parents[int(p)] = parent
            stats[int(p)] = (cpu, cmd)
        for pid, (cpu, cmd) in stats.items():
            q = pid
            while q in parents and q != self.root and q > 1:
                q = parents[q]
            if q == self.root:
                self.seen[pid] = kind = (_kind(cmd) if pid not in self.seen else self.seen[pid][0], cpu)
                if kind[0] in ("java", "engine worker (JVM)"):
                    self._sample_threads(pid)

    def _sample_threads(self, pid: int) -> None:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        for t in tids:
            try:
                name, _, cpu = _stat(f"/proc/{pid}/task/{t}/stat")
            except (OSError, IndexError, ValueError):
                continue
            # named anew each time: a new thread has its parent's name until it names itself
            self.threads[(pid, int(t))] = (_thread_kind(name, int(t) == pid), cpu)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        out: dict[str, float] = {}
        for kind, cpu in self.seen.values():
            out[kind] = out.get(kind, 0.0) + cpu
        return out

    def by_thread(self) -> dict[str, float]:
        """CPU seconds of the JVM processes' threads, by kind (after :meth:`stop`);
        ``exited``: what threads that ended between two samples spent (the
        process's CPU less its sampled threads': mostly a worker's ``Run$_``
        threads, one per macro)."""
        out: dict[str, float] = {}
        per_pid: dict[int, float] = {}
        for (pid, _), (kind, cpu) in self.threads.items():
            out[kind] = out.get(kind, 0.0) + cpu
            per_pid[pid] = per_pid.get(pid, 0.0) + cpu
        out["exited"] = sum(max(0.0, self.seen[pid][1] - cpu) for pid, cpu in per_pid.items())
        return out


def run_cli(uri: str, out: str, workers: int, pythonpath: str, n: int, extra_env: Optional[dict] = None) -> dict:
    """One ``fiji-bridge batch`` run: wall, CPU, phases, CPU by process."""
    cmd = [sys.executable, "-m", "fiji_bridge.cli", "batch", "--plate", uri, "--macro", "nuclei_count",
           *[f"--arg={k}={v}" for k, v in ARGS.items()], "--out", out, "--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=pythonpath, **(extra_env or {}))
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=pythonpath)
    sampler = ProcessCPU(proc.pid)
    done_at: list[float] = []
    err_lines: list[str] = []

    def read_progress() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("["):
                done_at.append(time.perf_counter() - t0)
            else:
                err_lines.append(line)

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    stdout = proc.stdout.read() if proc.stdout else ""
    code = proc.wait(timeout=1800)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    reader.join(5)
    by_kind = sampler.stop()
    if code != 0:
        raise RuntimeError(f"fiji-bridge batch failed ({code}):\n{stdout[-2000:]}\n{''.join(err_lines)[-2000:]}")
    first, last = (done_at[0], done_at[-1]) if len(done_at) == n else (float("nan"), float("nan"))
    return {"wall": wall, "cpu": cpu, "start": first, "per_unit": (last - first) / max(1, n - 1), "end": wall - last,
            "by_kind": by_kind, "by_thread": sampler.by_thread()}


def run_imagej(tiffs: list[Path], code: str, work: Path) -> dict:
    st: dict = {}
    holder: dict = {}
    result: dict = {}

    def go() -> None:
        result["loop"], result["n"] = imagej_alone(tiffs, code, work, st)

    t = threading.Thread(target=go)
    sampler = ProcessCPU(os.getpid())
    t.start()
    t.join()
    by_kind = {k: v for k, v in sampler.stop().items() if k in ("java", "Xvfb")}
    holder.update(wall=st["wall"], cpu=st["cpu"], start=st["wall"] - result["loop"], per_unit=result["loop"] / result["n"],
                  end=0.0, by_kind=by_kind, by_thread=sampler.by_thread())
    assert result["n"] == len(tiffs)
    return holder


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _line(name: str, runs: list[dict], n: int) -> str:
    wall, cpu = _median(runs, "wall"), _median(runs, "cpu")
    kinds = sorted({k for r in runs for k in r["by_kind"]})
    split = ", ".join(f"{k} {1000 * float(np.median([r['by_kind'].get(k, 0.0) for r in runs])) / n:.0f}" for k in kinds)
    threads = sorted({k for r in runs for k in r["by_thread"]})
    tsplit = ", ".join(f"{k} {1000 * float(np.median([r['by_thread'].get(k, 0.0) for r in runs])) / n:.0f}" for k in threads)
    return (f"{name:38s} {wall:6.2f} s wall, {n / wall:5.2f} units/s; CPU {cpu:6.2f} s = {1000 * cpu / n:4.0f} ms/unit "
            f"[{split} ms/unit]\n{'':38s} start-up {_median(runs, 'start'):5.2f} s, {1000 * _median(runs, 'per_unit'):4.0f} ms/unit "
            f"after it, end {_median(runs, 'end'):4.2f} s   runs {[(round(r['wall'], 1), round(r['cpu'], 1)) for r in runs]}"
            f"\n{'':38s} JVM threads: {tsplit} ms/unit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=12)
    ap.add_argument("--fields", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="another fiji-bridge checkout to run as a third side (PYTHONPATH)")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the baseline side alone (repeatable)")
    a = ap.parse_args()
    base_env = dict(kv.split("=", 1) for kv in a.baseline_env)
    work = Path(tempfile.mkdtemp(prefix="fiji-bridge-bench-cli-"))
    try:
        wells, plate, uri, tiffs = bench_plate(work, a.wells, a.fields, a.size)
        n = len(tiffs)
        code = resolve("nuclei_count").bind(ARGS)
        print(f"plate: {n} fields of TZCYX {plate.fields[(wells[0], 0)].array.shape} uint16, macro nuclei_count, "
              f"{a.repeats} runs per side in alternation (medians), {os.cpu_count()} cores")
        sides: dict[str, list[dict]] = {"ij": [], "fb": [], "base": []}
        # the JVMs' class-data archive (fiji_bridge.engine.class_archive) in a cache of this run's own:
        # the first fiji-bridge run starts without one and writes it, as a user's first batch does
        cache = {"FIJI_BRIDGE_CACHE_DIR": str(work / "cache")}
        for checkout in [ROOT, *([Path(a.baseline)] if a.baseline else [])]:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "fiji_bridge")], check=True)
        first = run_cli(uri, f"zarr://{work}/out_first.zarr", a.workers, str(ROOT), n, cache)
        for rep in range(a.repeats):
            sides["ij"].append(run_imagej(tiffs, code, work))
            sides["fb"].append(run_cli(uri, f"zarr://{work}/out_{rep}.zarr", a.workers, str(ROOT), n, cache))
            if a.baseline:
                sides["base"].append(run_cli(uri, f"zarr://{work}/base_{rep}.zarr", a.workers, a.baseline, n,
                                             {**cache, **base_env}))
        print(_line("fiji-bridge, first run (no class archive):", [first], n))
        print(_line("ImageJ alone (java -batch, one JVM):", sides["ij"], n))
        print(_line(f"fiji-bridge batch --workers {a.workers} (CLI):", sides["fb"], n))
        ij_wall, ij_cpu = _median(sides["ij"], "wall"), _median(sides["ij"], "cpu")
        fb_wall, fb_cpu = _median(sides["fb"], "wall"), _median(sides["fb"], "cpu")
        if a.baseline:
            print(_line(f"baseline {a.baseline}{' ' + ' '.join(a.baseline_env) if a.baseline_env else ''}:", sides["base"], n))
            b_wall, b_cpu = _median(sides["base"], "wall"), _median(sides["base"], "cpu")
            print(f"baseline / ImageJ alone: {ij_wall / b_wall:.2f}x wall, {ij_cpu / b_cpu:.2f}x CPU")
        print(f"ratio (speed of fiji-bridge / ImageJ alone): {ij_wall / fb_wall:.2f}x wall, {ij_cpu / fb_cpu:.2f}x CPU "
              f"(target >= 1.0x wall)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
