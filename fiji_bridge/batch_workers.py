"""Where a batch's units run: bridges on this machine, or a Dask cluster.

:func:`run_unit` runs the bound macro on one unit (one well field, a TZCYX
array) through a bridge client. :func:`run_local` keeps ``workers`` bridges
busy (each runs one unit while the next is loaded); :func:`run_dask` submits
one task per unit to a Dask cluster whose worker processes each own one
bridge, started once by a worker plugin. Both hand every
:class:`UnitOutcome` to ``emit`` as it comes, in completion order; writing
the outputs is the batch's job (:mod:`fiji_bridge.batch`), the same for both.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .client import free_port_pair
from .components import Calibration

__all__ = ["BatchError", "UnitOutcome", "run_unit", "run_local", "run_dask", "unit_title"]

log = logging.getLogger("fiji_bridge.batch")


class BatchError(RuntimeError):
    """The batch cannot start (bad plate, wells, derived plate in the way)."""


@dataclass
class UnitOutcome:
    """What running the macro on one unit gave (before writing)."""

    well: str
    site: int
    ok: bool
    result: Any = None  # MacroResult when ok
    error: Optional[dict] = None  # {"kind", "message", "line"} when not
    elapsed: float = 0.0
    worker: str = ""
    imagej: str = ""


def _error_dict(e: BaseException) -> dict:
    kind = getattr(e, "kind", None) or type(e).__name__
    return {
        "kind": str(kind),
        "message": str(getattr(e, "message", None) or e),
        "line": getattr(e, "line", None),
    }


def unit_title(plate: str, well: str, site: int) -> str:
    """The title the input image gets in ImageJ: ``<plate>_<well>_s<site>``."""
    return f"{plate}_{well}_s{site:03d}"




class _BridgeWorker:
    """One bridge (connected or spawned) that runs units one at a time."""

    def __init__(self, port: int, own: bool, log_dir: Optional[str] = None) -> None:
        from .client import BridgeClient

        self.port = port
        self.client = BridgeClient.connect_or_spawn(port=port, timeout=180, own=own, log_dir=log_dir)
        self.imagej = _imagej_version(self.client)

    def reconnect(self) -> None:
        from .client import BridgeClient

        try:
            self.client.close()
        except Exception:  # pragma: no cover - best effort
            pass
        self.client = BridgeClient.connect_or_spawn(port=self.port, timeout=180, own=True)

    def close(self) -> None:
        self.client.close()


def _imagej_version(client: Any) -> str:
    try:
        r = client.run_macro('print("IJVERSION=" + getVersion());', timeout=60)
        for line in r.log.splitlines():
            if line.startswith("IJVERSION="):
                return line.split("=", 1)[1].strip()
    except Exception as e:  # pragma: no cover - reported, not fatal
        return f"unknown ({e})"
    return "unknown"


def run_unit(
    client: Any,
    code: str,
    array: np.ndarray,
    *,
    title: str,
    timeout: float,
    channel_names: Sequence[str] = (),
    calibration: Optional[Calibration] = None,
) -> Any:
    """Run the bound macro on one unit's TZCYX array; returns the MacroResult."""
    names = list(channel_names) if channel_names and len(channel_names) == array.shape[2] else None
    return client.run_macro(
        code,
        array=array,
        dims="TZCYX",
        timeout=timeout,
        title=title,
        channel_names=names,
        calibration=calibration if calibration is not None and calibration.is_set else None,
    )


def run_local(
    units: Sequence[tuple[str, int]],
    load: Callable[[str, int], np.ndarray],
    code: str,
    plate_label: str,
    timeout: float,
    structure: Any,
    ports: Sequence[int],
    own: bool,
    emit: Callable[[UnitOutcome], None],
) -> str:
    """Run ``units`` on one bridge per port; ``emit`` gets every outcome in the
    calling thread (the single writer). Returns a description of the workers."""
    workers: list[_BridgeWorker] = []
    errors: list[BaseException] = []

    def start(port: int) -> None:
        try:
            workers.append(_BridgeWorker(port, own))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for w in workers:
            w.close()
        raise BatchError(f"could not start a bridge: {errors[0]}") from errors[0]

    pending = list(units)
    lock = threading.Lock()
    outq: "queue.Queue[Optional[UnitOutcome]]" = queue.Queue()
    loader = ThreadPoolExecutor(max_workers=max(2, len(workers)), thread_name_prefix="fiji-bridge-load")

    def take() -> Optional[tuple[tuple[str, int], Any]]:
        with lock:
            if not pending:
                return None
            u = pending.pop(0)
        return u, loader.submit(load, *u)

    def loop(w: _BridgeWorker) -> None:
        nxt = take()
        while nxt is not None:
            (well, site), fut = nxt
            nxt = take()  # the next unit loads while this one runs
            t0 = time.perf_counter()
            try:
                arr = fut.result()
            except Exception as e:
                outq.put(UnitOutcome(well, site, False, error={**_error_dict(e), "kind": "load"}, worker=str(w.port)))
                continue
            try:
                r = run_unit(w.client, code, arr, title=unit_title(plate_label, well, site), timeout=timeout,
                             channel_names=structure.channel_names, calibration=structure.calibration)
                outq.put(UnitOutcome(well, site, True, result=r, elapsed=time.perf_counter() - t0, worker=str(w.port), imagej=w.imagej))
            except Exception as e:
                from .client import BridgeError

                outq.put(UnitOutcome(well, site, False, error=_error_dict(e), elapsed=time.perf_counter() - t0, worker=str(w.port), imagej=w.imagej))
                if isinstance(e, BridgeError):  # the bridge itself is in trouble: reconnect (or respawn) once
                    try:
                        w.reconnect()
                    except Exception as e2:  # pragma: no cover - the remaining units fail with this
                        log.error("bridge on port %s is gone: %s", w.port, e2)
        outq.put(None)

    runners = [threading.Thread(target=loop, args=(w,), daemon=True, name=f"fiji-bridge-worker-{w.port}") for w in workers]
    for t in runners:
        t.start()
    try:
        finished = 0
        while finished < len(runners):
            o = outq.get()
            if o is None:
                finished += 1
                continue
            emit(o)
    finally:
        for t in runners:
            t.join(timeout=5)
        loader.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            try:
                w.close()
            except Exception:  # pragma: no cover
                pass
    return f"{len(workers)} local bridge(s) on port(s) {', '.join(str(w.port) for w in workers)}"


# -- Dask: one bridge per worker process ------------------------------------------

_PROCESS: dict[str, Any] = {}  # per worker process: the bridge worker and opened plates
_PROCESS_LOCK = threading.Lock()


def _process_bridge() -> _BridgeWorker:
    with _PROCESS_LOCK:
        w = _PROCESS.get("bridge")
        if w is None:
            w = _BridgeWorker(free_port_pair(), own=True)
            _PROCESS["bridge"] = w
        return w


def _process_plate(uri: str) -> tuple[Any, str]:
    from .backends import open_plate

    with _PROCESS_LOCK:
        key = f"plate:{uri}"
        if key not in _PROCESS:
            _PROCESS[key] = open_plate(uri)
        return _PROCESS[key]


def _close_process_bridge() -> None:
    with _PROCESS_LOCK:
        w = _PROCESS.pop("bridge", None)
    if w is not None:
        w.close()


def _dask_plugin() -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class BridgePlugin(WorkerPlugin):
        """Starts this worker process's bridge once; shuts it down with the worker."""

        name = "fiji-bridge"

        def setup(self, worker: Any) -> None:
            _process_bridge()

        def teardown(self, worker: Any) -> None:
            _close_process_bridge()

    return BridgePlugin()


def _dask_unit(source_uri: str, well: str, site: int, code: str, plate_label: str, timeout: float,
               channel_names: Sequence[str], calibration: Optional[dict]) -> UnitOutcome:
    """The Dask task: load one unit in the worker and run it on the worker's bridge."""
    t0 = time.perf_counter()
    w = _process_bridge()
    try:
        backend, pid = _process_plate(source_uri)
        arr = backend.load_field(pid, well, site)
    except Exception as e:
        return UnitOutcome(well, site, False, error={**_error_dict(e), "kind": "load"}, worker=socket.gethostname())
    try:
        r = run_unit(w.client, code, arr, title=unit_title(plate_label, well, site), timeout=timeout,
                     channel_names=channel_names, calibration=Calibration.from_dict(calibration))
        return UnitOutcome(well, site, True, result=r, elapsed=time.perf_counter() - t0,
                           worker=f"{socket.gethostname()}:{w.port}", imagej=w.imagej)
    except Exception as e:
        return UnitOutcome(well, site, False, error=_error_dict(e), elapsed=time.perf_counter() - t0,
                           worker=f"{socket.gethostname()}:{w.port}", imagej=w.imagej)


def run_dask(
    units: Sequence[tuple[str, int]],
    source_uri: str,
    code: str,
    plate_label: str,
    timeout: float,
    structure: Any,
    scheduler: Any,
    emit: Callable[[UnitOutcome], None],
) -> str:
    from distributed import Client, as_completed

    own_client = False
    if isinstance(scheduler, Client):
        client = scheduler
    elif isinstance(scheduler, str):
        client = Client(scheduler, timeout=60)
        own_client = True
    else:  # a cluster object (LocalCluster, SLURMCluster...)
        client = Client(scheduler)
        own_client = True
    try:
        client.register_plugin(_dask_plugin(), name="fiji-bridge")
        cal = structure.calibration.to_dict() if structure.calibration.is_set else None
        futures = [
            client.submit(_dask_unit, source_uri, w, s, code, plate_label, timeout, list(structure.channel_names), cal,
                          pure=False, key=f"fiji-bridge-unit-{w}-{s}-{os.urandom(4).hex()}")
            for w, s in units
        ]
        for fut in as_completed(futures):
            try:
                o = fut.result()
            except Exception as e:  # the task itself died (worker lost...)
                w, s = _unit_of_key(fut.key)
                o = UnitOutcome(w, s, False, error={**_error_dict(e), "kind": "worker"})
            emit(o)
        n = len(client.scheduler_info().get("workers", {}))
        return f"Dask cluster {client.scheduler.address} with {n} worker(s)"
    finally:
        if own_client:
            client.close()


def _unit_of_key(key: str) -> tuple[str, int]:
    parts = str(key).split("-")
    return parts[3], int(parts[4])
