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

:func:`run_engines` keeps every worker busy: each has the next unit queued
behind the one it runs (its pixels already in shared memory), loading runs
ahead on a thread pool, and every :class:`~fiji_bridge.batch_workers.UnitOutcome`
reaches ``emit`` in the calling thread (the batch's single writer), in
completion order, as it does for bridges (:func:`fiji_bridge.batch_workers.run_local`).
A unit whose worker died or timed out fails with that error; the worker is
restarted and takes the next unit.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .batch_workers import BatchError, UnitOutcome, _error_dict, unit_title

__all__ = ["BatchEngines", "engines_for", "java_options_for", "run_engines", "usable_cores"]

log = logging.getLogger("fiji_bridge.batch")

#: units queued on a worker behind the one it runs
QUEUED_PER_WORKER = 1
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


#: JVM options of a batch's JVMs beyond the core share: none, the JVM's own
#: tiered JIT (C1, then C2 for the hot code). The client compiler alone
#: (``-XX:TieredStopAtLevel=1``) was tried: about the same CPU per unit, but
#: the units ran 1.3-1.7x longer (the macro's own thread runs C1 code, and
#: C2 compiles on a core that is idle beside one worker): see
#: ``benchmarks/engine_worker_cpu.py``. ``$FIJI_BRIDGE_BATCH_JAVA_OPTIONS``
#: replaces it (e.g. ``-XX:TieredStopAtLevel=1``).
BATCH_JIT: tuple[str, ...] = ()


def java_options_for(workers: int, cores: Optional[int] = None) -> list[str]:
    """JVM options for one of ``workers`` JVMs sharing this machine: the
    batch JIT (:data:`BATCH_JIT`) and, beside others, its share of the cores."""
    cores = cores or usable_cores()
    env = os.environ.get("FIJI_BRIDGE_BATCH_JAVA_OPTIONS")
    opts = list(BATCH_JIT) if env is None else env.split()
    if workers <= 1:
        return opts
    return opts + [f"-XX:ActiveProcessorCount={max(1, cores // workers)}"]


class BatchEngines:
    """N engine workers supervised by this process (see the module doc)."""

    def __init__(self, n: int, engine: str = "auto", java_options: Optional[Sequence[str]] = None,
                 asked: Optional[int] = None) -> None:
        import zmq

        self.n = max(1, int(n))
        self.asked = int(asked) if asked is not None else self.n
        self.engine = engine
        self.java_options = list(java_options_for(self.n) if java_options is None else java_options)
        self.ctx = zmq.Context()
        self.root = Path(tempfile.mkdtemp(prefix="fiji-bridge-batch-"))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.sups: list[Any] = []
        self._closed = False

    def start(self) -> "BatchEngines":
        """Spawn the workers (returns at once: their JVMs start meanwhile)."""
        from .supervisor import EngineSupervisor

        env = dict(os.environ)
        # a worker does no linear algebra: OpenBLAS's thread pool, started
        # with numpy, cost ~0.1 s of CPU at each worker start
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        if self.java_options:
            env["JAVA_TOOL_OPTIONS"] = " ".join([env.get("JAVA_TOOL_OPTIONS", ""), *self.java_options]).strip()
        for i in range(self.n):
            d = self.root / f"worker-{i}"
            d.mkdir()
            sup = EngineSupervisor(self.ctx, d, engine=self.engine, display=False, env=env)
            sup._seg = _SEGMENTS  # distinct segment names across this process's supervisors
            sup.start()
            self.sups.append(sup)
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
        self.ctx.term()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "BatchEngines":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _outcome(well: str, site: int, reply: dict, get: Callable[[dict], np.ndarray], t0: float, worker: str,
             imagej: str) -> UnitOutcome:
    """A worker's reply as the unit's outcome: the errors read as a bridge's
    client reports them (:class:`~fiji_bridge.engine.base.MacroError`)."""
    from .engine.base import MacroError
    from .protocol import decode_macro_result

    elapsed = time.perf_counter() - t0
    if not reply.get("ok"):
        err = dict(reply.get("error") or {})
        code = err.get("code", "engine")
        macro = err.get("macro") or {"message": err.get("message", "the macro failed"),
                                     "kind": err.get("kind", "engine" if code == "engine" else "exception")}
        return UnitOutcome(well, site, False, error=_error_dict(MacroError.from_dict(macro)), elapsed=elapsed,
                           worker=worker, imagej=imagej)
    try:
        result = decode_macro_result(reply["result"], get)
    except Exception as e:  # pragma: no cover - a worker bug
        return UnitOutcome(well, site, False, error={**_error_dict(e), "kind": "internal"}, elapsed=elapsed,
                           worker=worker, imagej=imagej)
    return UnitOutcome(well, site, True, result=result, elapsed=elapsed, worker=worker, imagej=imagej)


def run_engines(
    units: Sequence[tuple[str, int]],
    load: Callable[[str, int], np.ndarray],
    code: str,
    plate_label: str,
    timeout: float,
    structure: Any,
    engines: BatchEngines,
    emit: Callable[[UnitOutcome], None],
) -> str:
    """Run ``units`` on ``engines`` (started); ``emit`` gets every outcome in
    the calling thread. Raises :class:`BatchError` when no worker could start."""
    outq: "queue.Queue[Any]" = queue.Queue()
    d = _Dispatcher(units, load, code, plate_label, timeout, structure, engines, outq)
    t = threading.Thread(target=d.run, daemon=True, name="fiji-bridge-batch-dispatch")
    t.start()
    try:
        while True:
            item = outq.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            emit(item)
    finally:
        d.stop = True
        d.wake()
        t.join(timeout=30)
        d.close()
    return engines.describe()


class _Dispatcher:
    """The thread that feeds the workers and reads their replies."""

    def __init__(self, units: Sequence[tuple[str, int]], load: Callable[[str, int], np.ndarray], code: str,
                 plate_label: str, timeout: float, structure: Any, engines: BatchEngines, outq: "queue.Queue[Any]") -> None:
        self.pending = collections.deque(units)
        self.load, self.code, self.plate_label, self.timeout = load, code, plate_label, timeout
        self.structure, self.engines, self.outq = structure, engines, outq
        self.loader = ThreadPoolExecutor(max_workers=max(2, engines.n), thread_name_prefix="fiji-bridge-load")
        self.loads: collections.deque[tuple[tuple[str, int], Future]] = collections.deque()
        self.inflight = {id(s): 0 for s in engines.sups}
        self.stop = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)

    def close(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)  # no wake-up after the pipe is gone
        os.close(self._rfd)
        os.close(self._wfd)

    def wake(self, *_: Any) -> None:
        try:
            os.write(self._wfd, b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _body(self, well: str, site: int, arr: np.ndarray) -> dict:
        names = list(self.structure.channel_names)
        cal = self.structure.calibration
        return {
            "code": self.code, "dims": "TZCYX", "args": None, "dialog_options": None, "timeout": self.timeout,
            "title": unit_title(self.plate_label, well, site),
            "channel_names": names if names and len(names) == arr.shape[2] else None,
            "calibration": cal.to_dict() if cal is not None and cal.is_set else None, "outputs": None,
        }

    def _submit(self, sup: Any, unit: tuple[str, int], arr: np.ndarray) -> None:
        from .supervisor import WorkerJob

        well, site = unit
        t0 = time.perf_counter()
        self.inflight[id(sup)] += 1

        def done(reply: dict, get: Callable[[dict], np.ndarray]) -> None:
            self.inflight[id(sup)] -= 1
            self.outq.put(_outcome(well, site, reply, get, t0, f"engine {sup.pid}", sup.version or ""))

        sup.submit(WorkerJob("run_macro", self._body(well, site, arr), {"image": np.ascontiguousarray(arr)},
                             timeout=float(self.timeout), done=done, kind="macro"))

    def _feed(self) -> None:
        while self.pending and len(self.loads) < 2 * self.engines.n + 1:
            u = self.pending.popleft()
            fut = self.loader.submit(self.load, *u)
            fut.add_done_callback(self.wake)
            self.loads.append((u, fut))
        ready = [s for s in self.engines.sups if s.ready]
        if not ready and not any(self.inflight.values()) and all(s.state.startswith("failed") for s in self.engines.sups):
            self._fail_rest("; ".join(sorted({str(s.last_error) for s in self.engines.sups})))
            return
        while self.loads and self.loads[0][1].done():
            (u, fut) = self.loads[0]
            err = fut.exception()
            if err is not None:
                self.loads.popleft()
                self.outq.put(UnitOutcome(u[0], u[1], False, error={**_error_dict(err), "kind": "load"}))
                continue
            free = [s for s in ready if self.inflight[id(s)] <= QUEUED_PER_WORKER]
            if not free:
                return
            self.loads.popleft()
            self._submit(min(free, key=lambda s: self.inflight[id(s)]), u, fut.result())

    def _fail_rest(self, reason: str) -> None:
        """Every worker failed and none restarts: the units left fail with why."""
        error = {"kind": "engine", "message": f"the ImageJ engine failed: {reason}", "line": None}
        for u, _ in self.loads:
            self.outq.put(UnitOutcome(u[0], u[1], False, error=dict(error)))
        for u in self.pending:
            self.outq.put(UnitOutcome(u[0], u[1], False, error=dict(error)))
        self.loads.clear()
        self.pending.clear()

    def _started(self) -> bool:
        """False while no worker is ready yet; BatchError when none can start."""
        sups = self.engines.sups
        if any(s.ready for s in sups):
            return True
        if all(s.state.startswith("failed") for s in sups):
            reasons = "; ".join(sorted({str(s.last_error) for s in sups}))
            raise BatchError(f"could not start an ImageJ engine: {reasons} (log: {sups[0].log_path})")
        return False

    def run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._rfd, zmq.POLLIN)
        by_sock: dict[Any, Any] = {}

        def listen(sup: Any) -> Callable[[Any, Any], None]:
            def change(old: Any, new: Any) -> None:
                if old is not None:
                    by_sock.pop(old, None)
                    try:
                        poller.unregister(old)
                    except KeyError:
                        pass
                if new is not None:
                    by_sock[new] = sup
                    poller.register(new, zmq.POLLIN)
            return change

        for sup in self.engines.sups:
            fn = listen(sup)
            sup.set_socket_listener(fn)
            fn(None, sup.sock)
        started = False
        try:
            while not self.stop:
                if not started:
                    started = self._started()
                if started:
                    self._feed()
                    if not (self.pending or self.loads or any(self.inflight.values())):
                        break
                for sock, _ in poller.poll(50):
                    if sock == self._rfd:
                        try:
                            while os.read(self._rfd, 4096):
                                pass
                        except BlockingIOError:
                            pass
                    elif sock in by_sock:
                        by_sock[sock].on_readable()
                for sup in self.engines.sups:
                    sup.tick()
        except BaseException as e:
            self.outq.put(e)
        finally:
            for sup in self.engines.sups:
                sup.set_socket_listener(None)  # type: ignore[arg-type]
            self.outq.put(None)
