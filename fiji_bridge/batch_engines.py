"""The engine workers of a batch that starts its own: ``fiji-bridge batch --workers N``.

A batch that spawns its workers needs no bridge server between it and
ImageJ: :class:`BatchEngines` supervises N engine worker processes directly,
with the supervision a bridge gives its own (:class:`~fiji_bridge.supervisor.EngineSupervisor`:
one JVM per process, restarted after a crash, a ``System.exit`` or a macro
past its timeout; pixels through shared memory, one copy each way). That
saves a bridge process start (a Python interpreter, its imports and sockets)
and, per unit, one hop with its copies of the pixels and of the results.

The JVMs are started by :meth:`BatchEngines.start` and come up while the
caller opens its plates. A batch starts no more JVMs than the cores left
beside its own single writer (:func:`engines_for`). With more than one worker on a machine each JVM is
told its share of the cores (``-XX:ActiveProcessorCount``): the JVM sizes its
GC and compiler threads, and ImageJ its filter threads, from that count, and
N JVMs each sized for the whole machine contend for it.

This module imports the standard library alone until the workers are
supervised: ``fiji-bridge batch`` spawns them (:meth:`BatchEngines.spawn`)
before its own imports, which then run while the workers import theirs.
:mod:`fiji_bridge.batch_dispatch` feeds them the units.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from .worker_spawn import SpawnedWorker, spawn_worker

__all__ = ["BATCH_JVM_OPTIONS", "WRITER_NICE", "BatchEngines", "engines_for", "java_options_for", "runs_own_engines", "spawn_for_batch",
           "usable_cores"]

log = logging.getLogger("fiji_bridge.batch")

#: segment names are ``fjbs_<pid>_<n>``: one counter for every supervisor of this process
_SEGMENTS = itertools.count(1 << 20)


def usable_cores() -> int:
    """The cores a batch may use: ``$FIJI_BRIDGE_BATCH_CORES`` if set, else
    this process's affinity mask, else the machine's count."""
    env = os.environ.get("FIJI_BRIDGE_BATCH_CORES", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def engines_for(asked: int, units: int, cores: Optional[int] = None) -> int:
    """How many engine workers a batch starts: those asked, but no more than
    it has units, nor than the cores left beside the batch's single writer
    (it reads each field and writes its outputs: on the shipped nuclei macro
    about half the CPU a JVM spends on the unit): a JVM more than that makes
    every unit slower (measured on 2 cores: 2 JVMs gave 0.6-0.8x of one),
    and each JVM pays its own start and JIT warm-up."""
    cores = cores or usable_cores()
    return max(1, min(int(asked), int(units), cores - 1))


#: JVM options of a batch's JVMs beyond the core share.
#:
#: * The throughput collector (``-XX:+UseParallelGC``) instead of G1: a batch
#:   wants CPU per unit, not short pauses. Measured with
#:   ``benchmarks/engine_worker_cpu.py`` (144 units, 5 alternations): worker
#:   CPU 113 against 125 ms a unit, the same wall time per unit (median 79
#:   against 81 ms); C2 compiles less with ParallelGC's simpler barriers.
#:   Left out when ``$JAVA_TOOL_OPTIONS`` chooses a collector (a JVM given two
#:   refuses to start).
#: * The JVM's own tiered JIT (C1, then C2 for the hot code). The client
#:   compiler alone (``-XX:TieredStopAtLevel=1``) was tried: about the same
#:   CPU per unit, but the units ran 1.3-1.7x longer (the macro's own thread
#:   runs C1 code, and C2 compiles on a core that is idle beside one worker).
#:
#: ``$FIJI_BRIDGE_BATCH_JAVA_OPTIONS`` replaces them (e.g. ``-XX:+UseG1GC``).
BATCH_JVM_OPTIONS: tuple[str, ...] = ("-XX:+UseParallelGC",)
#: a JVM option that chooses the garbage collector
_GC_OPTION = re.compile(r"^-XX:\+Use\w*GC$")


def java_options_for(workers: int, cores: Optional[int] = None) -> list[str]:
    """JVM options for one of ``workers`` JVMs sharing this machine: the
    batch's (:data:`BATCH_JVM_OPTIONS`, or ``$FIJI_BRIDGE_BATCH_JAVA_OPTIONS``)
    and, beside others, its share of the cores."""
    cores = cores or usable_cores()
    env = os.environ.get("FIJI_BRIDGE_BATCH_JAVA_OPTIONS")
    if env is None:
        opts = list(BATCH_JVM_OPTIONS)
        if any(_GC_OPTION.match(o) for o in os.environ.get("JAVA_TOOL_OPTIONS", "").split()):
            opts = [o for o in opts if not _GC_OPTION.match(o)]  # the user's collector
    else:
        opts = env.split()
    if workers <= 1:
        return opts
    return opts + [f"-XX:ActiveProcessorCount={max(1, cores // workers)}"]


def runs_own_engines(scheduler: Any, ports: Any, resume: bool) -> bool:
    """Whether a batch starts its JVMs before it opens its plates: it runs
    on engine workers of its own (no Dask scheduler, no bridges) and does
    not resume (a resumed batch may have nothing left to run)."""
    return scheduler is None and not ports and not resume


def spawn_for_batch(workers: int) -> "BatchEngines":
    """The engine workers of a batch, spawned before it opens its plates:
    as many as the cores allow (:func:`engines_for`), since the units are
    not known yet; :meth:`BatchEngines.trim` takes them down to those."""
    return BatchEngines(engines_for(int(workers), 1 << 30), asked=int(workers)).spawn()


#: nice levels by which ``fiji-bridge batch`` steps its own threads back behind
#: its engine workers (``$FIJI_BRIDGE_BATCH_NICE``; 0: none). With every core busy,
#: the CPU then goes to the macros first: the writer has a whole unit's time to
#: read the next field and save the last outputs, while a JVM that waits for the
#: core stretches the run. On the 72-field benchmark plate on 2 cores: 8.09 s
#: against 8.54 s (medians of 8 alternations).
WRITER_NICE = 10


def yield_to_workers(env: Optional[dict] = None) -> int:
    """Lower the calling thread's CPU priority by :data:`WRITER_NICE` (or
    ``$FIJI_BRIDGE_BATCH_NICE``) below the engine workers spawned before; the
    threads it starts from now on inherit it (on Linux a priority is a
    thread's). Returns the new nice value (the old one when unchanged).

    Only a priority below one's own can be taken without privileges: engine
    workers restarted later by these threads run at theirs, on a par with the
    writer as without this call. Call it once the workers run, never in a
    caller's own interpreter (the command line only)."""
    env = os.environ if env is None else env
    raw = (env.get("FIJI_BRIDGE_BATCH_NICE") or "").strip()
    try:
        step = int(raw) if raw else WRITER_NICE
    except ValueError:
        log.warning("FIJI_BRIDGE_BATCH_NICE=%s is not a whole number: using %d", raw, WRITER_NICE)
        step = WRITER_NICE
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if step > 0 and now < 19:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, now + step))
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError) as e:  # pragma: no cover - no priorities here: run as is
        log.debug("could not lower the writer's priority: %s", e)
        return 0


class BatchEngines:
    """N engine workers supervised by this process (see the module doc).

    :meth:`spawn` starts their processes (the standard library alone);
    :meth:`start` spawns them if that was not done yet and supervises them
    (zmq, :class:`~fiji_bridge.supervisor.EngineSupervisor`)."""

    def __init__(self, n: int, engine: str = "auto", java_options: Optional[Sequence[str]] = None,
                 asked: Optional[int] = None) -> None:
        self.n = max(1, int(n))
        self.asked = int(asked) if asked is not None else self.n
        self.engine = engine
        self.java_options = list(java_options_for(self.n) if java_options is None else java_options)
        self.ctx: Any = None
        self.root = Path(tempfile.mkdtemp(prefix="fiji-bridge-batch-"))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        #: the workers' environment (restarted ones too)
        self.env = dict(os.environ)
        # a worker does no linear algebra: OpenBLAS's thread pool, started
        # with numpy, cost ~0.1 s of CPU at each worker start
        self.env.setdefault("OPENBLAS_NUM_THREADS", "1")
        if self.java_options:
            self.env["JAVA_TOOL_OPTIONS"] = " ".join([self.env.get("JAVA_TOOL_OPTIONS", ""), *self.java_options]).strip()
        self.sups: list[Any] = []
        self._spawned: list[SpawnedWorker] = []
        self._closed = False

    def spawn(self) -> "BatchEngines":
        """Start the worker processes, unsupervised until :meth:`start`
        (returns at once: their imports and JVMs start meanwhile)."""
        if not self._spawned and not self.sups:
            for i in range(self.n):
                d = self.root / f"worker-{i}"
                d.mkdir()
                self._spawned.append(spawn_worker(d, 1, engine=self.engine, display=False, env=self.env))
        return self

    def start(self) -> "BatchEngines":
        """Supervise the workers, spawning them first if :meth:`spawn` was not called."""
        import zmq

        from .supervisor import EngineSupervisor

        if self.sups:
            return self
        self.spawn()
        self.ctx = zmq.Context()
        for i, spawned in enumerate(self._spawned):
            sup = EngineSupervisor(self.ctx, self.root / f"worker-{i}", engine=self.engine, display=False, env=self.env)
            sup._seg = _SEGMENTS  # distinct segment names across this process's supervisors
            sup.adopt(spawned)
            self.sups.append(sup)
        self._spawned = []
        return self

    def trim(self, n: int) -> "BatchEngines":
        """Keep the first ``n`` workers (at least one), stopping the others:
        a batch starts its JVMs before it knows how many units it has."""
        n = max(1, int(n))
        extra, self.sups = self.sups[n:], self.sups[:n]
        for sup in extra:
            try:
                sup.close()
            except Exception:  # pragma: no cover - best effort
                log.exception("stopping an engine worker failed")
        self.n = len(self.sups)
        return self

    def describe(self) -> str:
        opts = f" ({' '.join(self.java_options)})" if self.java_options else ""
        capped = (f"; {self.asked} asked, {self.n} started: {usable_cores()} core(s), one kept for the batch's writer"
                  if self.asked > self.n else "")
        return f"{self.n} engine worker(s) of this batch, pid(s) {', '.join(str(s.pid) for s in self.sups)}{opts}{capped}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sup in self.sups:
            try:
                sup.close()
            except Exception:  # pragma: no cover - best effort
                log.exception("closing an engine worker failed")
        for spawned in self._spawned:  # spawned, never supervised: nothing to say to them
            spawned.proc.kill()
            spawned.proc.wait()
        if self.ctx is not None:
            self.ctx.term()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "BatchEngines":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
