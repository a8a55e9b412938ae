"""Feeding a batch's units to its engine workers: ``fiji-bridge batch --workers N``.

:func:`run_engines` keeps every worker of a :class:`~fiji_bridge.batch_engines.BatchEngines`
busy: each has the next unit queued behind the one it runs (its pixels
already in shared memory), loading runs ahead on a thread pool, and every
:class:`~fiji_bridge.batch_workers.UnitOutcome` reaches ``emit`` in the
calling thread (the batch's single writer), in completion order, as it does
for bridges (:func:`fiji_bridge.batch_workers.run_local`). A unit whose
worker died or timed out fails with that error; the worker is restarted and
takes the next unit.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from .batch_engines import BatchEngines
from .batch_workers import BatchError, UnitOutcome, _error_dict, unit_title

__all__ = ["QUEUED_PER_WORKER", "run_engines"]

#: units queued on a worker behind the one it runs
QUEUED_PER_WORKER = 1


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
