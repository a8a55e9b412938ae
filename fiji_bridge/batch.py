"""Batch macro processing of a plate: every well field through a bridge.

A *work unit* is one well field: all its C/Z/T planes as one hyperstack.
Units stream from the plate's backend into bridge workers, the macro runs on
each, and what it produces goes back through the virtual backend::

    <source>_<macro>            the derived plate (same wells and fields)
      <well>/<table>_s<site>.csv   per-field tables (plate, well, field first)
      <well>/fiji_bridge_unit_s<site>.json   the unit's marker: done | failed
      <table>.csv                  one plate-level table per macro table
      <table>_per_well.csv         rows per well and mean of numeric columns
      failures.csv, batch.json     failed units; the batch's report

Per-unit outputs are written as each unit finishes, the marker last, so an
interrupted batch resumes (``resume=True``) by skipping units whose marker
says done, and the plate tables are assembled at the end from the per-unit
tables the markers list: no unit is counted twice.

Where the macro runs (:mod:`fiji_bridge.batch_workers`; the markers and the
plate tables are :mod:`fiji_bridge.batch_tables`):

* ``workers=N``: N engine workers of the batch itself
  (:mod:`fiji_bridge.batch_engines`: the JVM processes a bridge would
  supervise, supervised by the batch directly, with no bridge process
  between), each running one unit with the next one queued behind it;
* ``ports=``: the bridges on those ports (spawned if none answers, left
  running), each running one unit at a time while the next is loaded;
* ``scheduler=``: a Dask distributed cluster (an address, a ``Client`` or a
  cluster); each worker process owns one bridge, started once by a worker
  plugin, not per task.

The unit function and the writing are the same either way, so the tables
are identical whichever way a batch ran.

A derived plate on a remote store (OMERO) is written through one
:class:`~fiji_bridge.upload.Uploader` (retries with backoff on connection
errors, spill-over to ``spill_dir``, which a resumed batch picks up); a unit's
marker is submitted after its outputs and requires them, so it reaches the
server only after they did. When the server stays away, outputs go to a local
fallback plate (``<spill_dir>/fallback``), the plate tables are assembled
there, and the report says so: run the batch again with ``resume=True`` when
the server is back. Local stores are written directly.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import __version__
from .batch_tables import MARKER, assemble, marker_path, read_marker
from .batch_workers import BatchError, UnitOutcome, _error_dict, run_dask, run_local, run_unit, unit_title
from .client import free_port_pair
from .components import Calibration, normalize_well
from .macros import Macro, resolve
from .objects import declared_labels, parse_label_specs
from .outputs import save_result, slug, table_file_name
from .upload import key_of

__all__ = ["BatchError", "BatchReport", "UnitOutcome", "run_batch", "run_unit", "batch_command", "print_report",
           "free_port_pair", "unit_title", "MARKER"]

log = logging.getLogger("fiji_bridge.batch")


@dataclass
class BatchReport:
    """The outcome of :func:`run_batch`."""

    source: str
    derived: str  # URI of the derived plate
    plate: str  # id of the derived plate in its store
    macro: str
    arguments: dict
    units: int  # units selected
    done: int  # units run now and succeeded
    skipped: int  # units already done (resume)
    failed: int
    failures: list[dict] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)  # table -> virtual path
    elapsed: float = 0.0
    workers: str = ""
    upload: dict = field(default_factory=dict)  # the uploader's counters (remote stores)
    spill: str = ""  # the uploader's spill folder (remote stores)
    fallback: str = ""  # URI of the local fallback plate, when outputs went there
    fallback_items: list[str] = field(default_factory=list)  # keys written to the fallback plate
    upload_left: dict[str, str] = field(default_factory=dict)  # key -> why it is nowhere yet (spilled)

    @property
    def ok(self) -> bool:
        """Every unit succeeded and its outputs reached the derived plate."""
        return self.failed == 0 and not self.fallback_items and not self.upload_left

    @property
    def units_per_s(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units_per_s"] = self.units_per_s
        return d


# --------------------------------------------------------------------------- helpers


def _default_derived_uri(plate_uri: str, src_id: str, macro: Macro) -> tuple[Any, str]:
    from .backends import PlateURI

    u = PlateURI.parse(plate_uri)
    return u, f"{slug(src_id)}_{slug(macro.name)}"


def _resolve_out(plate_uri: str, src_id: str, macro: Macro, out_uri: Optional[str]) -> str:
    from .backends import PlateURI

    u, default_name = _default_derived_uri(plate_uri, src_id, macro)
    if out_uri is None:
        return str(u.with_plate(default_name))
    o = PlateURI.parse(out_uri)
    if not o.plate:
        return str(o.with_plate(default_name))
    return str(o)


# --------------------------------------------------------------------------- the batch


class _Plates(NamedTuple):
    """The plates of a batch: the source, its units, the derived plate."""

    src_backend: Any
    src_id: str
    structure: Any
    units: list[tuple[str, int]]
    well_order: dict[str, int]
    derived_uri: str
    dst_backend: Any
    dst_id: str
    exists: bool  # the derived plate exists already (resume)
    done_before: set[tuple[str, int]]  # units it has done


def _open_plates(plate_uri: str, m: Macro, wells: Any, out_uri: Optional[str], resume: bool) -> _Plates:
    """The source plate and its units (of ``wells``), the derived plate and
    the units it has done already."""
    from .backends import BackendError, open_plate

    src_backend, src_id = open_plate(plate_uri)
    if not src_id:
        raise BatchError(f"{plate_uri!r} names a store, not a plate")
    try:
        structure = src_backend.plate_structure(src_id)
    except BackendError as e:
        raise BatchError(f"cannot read plate {plate_uri!r}: {e}") from e
    units = structure.units()
    if wells not in (None, "all", "", ["all"]):
        wanted = [normalize_well(w) for w in (wells.split(",") if isinstance(wells, str) else wells) if str(w).strip()]
        unknown = [w for w in wanted if w not in structure.wells]
        if unknown:
            raise BatchError(f"well(s) {', '.join(unknown)} not in plate {src_id!r} (it has {', '.join(structure.wells)})")
        units = [u for u in units if u[0] in set(wanted)]
    if not units:
        raise BatchError(f"plate {src_id!r} has no fields to process")
    well_order = {w: i for i, w in enumerate(structure.wells)}

    derived_uri = _resolve_out(plate_uri, src_id, m, out_uri)
    dst_backend, dst_id = open_plate(derived_uri)
    exists = dst_backend.exists(f"/{dst_backend.scheme}/plate_{dst_id}")
    if exists and not resume:
        raise BatchError(
            f"the derived plate {derived_uri} exists already: use --resume to finish it, "
            f"or --out to write another plate"
        )
    done_before: set[tuple[str, int]] = set()
    if exists:
        for w, s in units:
            marker = read_marker(dst_backend, dst_id, w, s)
            if marker and marker.get("status") == "done":
                done_before.add((w, s))
    return _Plates(src_backend, src_id, structure, units, well_order, derived_uri, dst_backend, dst_id, exists, done_before)


class _Progress:
    """Rich progress on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, skipped: int, enabled: bool, label: str) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.t0 = time.perf_counter()
        self.rich = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.rich = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), transient=False,
            )
            self.rich.start()
            self.task = self.rich.add_task(label, total=total, failed=0, rate="")
        elif enabled:
            print(f"{label}: {total} unit(s) to run" + (f", {skipped} already done" if skipped else ""), file=sys.stderr, flush=True)

    def update(self, o: UnitOutcome) -> None:
        self.done += 1
        self.failed += 0 if o.ok else 1
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        if self.rich is not None:
            self.rich.update(self.task, advance=1, failed=self.failed, rate=f"{rate:.2f} units/s")
        elif self.enabled:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            status = "done" if o.ok else f"FAILED ({o.error.get('kind') if o.error else '?'}: {o.error.get('message') if o.error else ''})"
            print(f"[{self.done}/{self.total}] {o.well} field {o.site}: {status}; {self.failed} failed, {rate:.2f} units/s, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def run_batch(
    plate_uri: str,
    macro: Union[str, Macro],
    args: Optional[Mapping[str, Any]] = None,
    out_uri: Optional[str] = None,
    wells: Optional[Union[str, Sequence[str]]] = None,
    workers: int = 1,
    scheduler: Any = None,
    resume: bool = False,
    timeout: float = 600,
    progress: bool = True,
    *,
    ports: Optional[Sequence[int]] = None,
    spill_dir: Optional[Union[str, os.PathLike]] = None,
    upload_options: Optional[Mapping[str, Any]] = None,
    labels: Any = None,
    labels_to_source: bool = False,
    spawned: Any = None,
) -> BatchReport:
    """Run ``macro`` over every field of the plate ``plate_uri``.

    ``macro``: a library name, a ``.ijm`` path, or a :class:`Macro`; ``args``
    are checked against its ``#@`` header before anything runs.
    ``out_uri``: the derived plate (default ``<source>_<macro>`` in the
    source's store). ``wells``: ``"all"``, ``"A01,B02"`` or a list.
    ``workers``: engine workers of this batch (JVM processes started now and
    stopped at the end, see :mod:`fiji_bridge.batch_engines`), or ``ports``:
    bridges to use (spawned if none answers, left running). ``scheduler``: a Dask scheduler address, Client or cluster.
    ``resume``: skip units already done in an existing derived plate.
    ``spill_dir``: the uploader's folder for a remote derived plate (default
    ``<spill root>/<store>_plate_<id>``, see :func:`fiji_bridge.upload.spill_root`);
    ``upload_options``: more :class:`~fiji_bridge.upload.Uploader` arguments
    (``max_retries``, ``backoff``, ``queue_size``...).
    ``labels``: output images stored as NGFF label images
    (``"mask=nuclei:objects"``, see :func:`fiji_bridge.objects.parse_label_specs`;
    default: the macro's ``// Output labels:`` line); the derived field image
    is then the source field when the macro leaves no other image;
    ``labels_to_source``: write them into the source plate's fields too.
    ``spawned``: this batch's workers, spawned already
    (:func:`~fiji_bridge.batch_engines.spawn_for_batch`, as the command line
    does before its imports); the batch takes them over and closes them.
    """
    from .batch_engines import runs_own_engines, spawn_for_batch

    t_start = time.perf_counter()
    try:
        m = macro if isinstance(macro, Macro) else resolve(macro)
        values = m.check(args)  # MacroArgumentError before anything runs
        code = m.bind(args)
        specs = parse_label_specs(labels) if labels else declared_labels(m.code)
    except BaseException:
        if spawned is not None:
            spawned.close()
        raise
    # this batch's own engine workers start first: their JVMs come up while the plate opens
    own = runs_own_engines(scheduler, ports, resume)
    if spawned is not None and not own:
        spawned.close()
    early = (spawned or spawn_for_batch(workers)).start() if own else None
    try:
        src_backend, src_id, structure, units, well_order, derived_uri, dst_backend, dst_id, exists, done_before = \
            _open_plates(plate_uri, m, wells, out_uri, resume)
    except BaseException:
        if early is not None:
            early.close()
        raise
    pending = [u for u in units if u not in done_before]

    provenance = {
        "source": str(plate_uri),
        "source_plate": src_id,
        "macro": m.name,
        "macro_sha256": m.sha256,
        "macro_path": str(m.path) if m.path else None,
        "arguments": values,
        "fiji_bridge": __version__,
        "imagej": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    state: dict[str, Any] = {"plate": dst_id if exists else None, "uploader": None}
    remote = bool(getattr(dst_backend, "is_remote", False))
    problem = None
    if labels_to_source and (not specs or getattr(src_backend, "is_remote", False)):
        problem = "--labels-to-source needs --labels (or the macro's 'Output labels:') and a local source plate"
    elif specs and remote:
        problem = (f"--labels: label images go to OME-Zarr or OME-TIFF derived plates; "
                   f"{type(dst_backend).__name__} does not store them yet (use --out zarr:///path/plate.zarr)")
    if problem is not None:
        if early is not None:
            early.close()
        raise BatchError(problem)
    failures: list[dict] = []
    counts = {"done": 0, "failed": 0}
    engines = None
    if pending and scheduler is None and not ports:  # this batch's own engine workers
        from .batch_engines import BatchEngines, engines_for

        n_engines = engines_for(int(workers), len(pending))  # no idle JVMs, none beyond the cores
        if n_engines < int(workers):
            log.warning("starting %d engine worker(s) of the %d asked: %s", n_engines, int(workers),
                        "no more than units to run" if n_engines == len(pending) else "no more than the cores left beside the batch's writer")
        engines = early.trim(n_engines) if early is not None else BatchEngines(n_engines, asked=int(workers)).start()
    elif early is not None:
        early.close()
    ngff = _NgffWriting(dst_backend, labels=bool(specs))  # started by the first unit's outcome
    prog = _Progress(len(pending), len(done_before), progress, f"{m.name} on {src_id}")

    def ensure_plate(imagej: str) -> str:
        if state["plate"] is None:
            provenance["imagej"] = imagej or None
            state["plate"] = dst_backend.create_plate(dst_id, structure, provenance=provenance)
        if remote and state["uploader"] is None:
            state["uploader"] = _uploader(dst_backend, state["plate"], spill_dir, upload_options)
        return state["plate"]

    #: units this run wrote to a local store: (marker, {table: CSV text}), for the plate tables
    written_now: dict[tuple[str, int], tuple[dict, dict[str, str]]] = {}

    def emit(o: UnitOutcome) -> None:
        """The single writer: outputs, then the unit's marker."""
        ngff.start()
        pid = ensure_plate(o.imagej)
        up = state["uploader"]
        requires: list[str] = []
        texts: dict[str, str] = {}
        marker: dict[str, Any] = {"well": o.well, "field": o.site, "elapsed": round(o.elapsed, 4),
                                  "worker": o.worker, "imagej": o.imagej,
                                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if o.ok:
            try:
                written = save_result(o.result, derived_uri, well=o.well, site=o.site, source={"plate": src_id},
                                      backend=dst_backend, plate=pid, plate_label=src_id, uploader=up, labels=specs,
                                      labels_also_to=[(src_backend, src_id)] if labels_to_source else (),
                                      input=lambda: _Field(src_backend.load_field(src_id, o.well, o.site),
                                                           structure.channel_names, structure.calibration),
                                      tables_written=texts)
                requires = sorted({key_of(p) for p in written})
                marker.update(status="done", written=written,
                              tables={t: f"/{dst_backend.scheme}/plate_{pid}/{o.well}/{table_file_name(t, o.site)}.csv" for t in o.result.tables},
                              images=list(o.result.images))
            except Exception as e:
                log.exception("saving outputs of %s/%s failed", o.well, o.site)
                o = UnitOutcome(o.well, o.site, False, error={**_error_dict(e), "kind": "save"}, elapsed=o.elapsed, worker=o.worker)
        if not o.ok:
            marker.update(status="failed", error=o.error)
            failures.append({"well": o.well, "field": o.site, **(o.error or {})})
        path = marker_path(dst_backend.scheme, pid, o.well, o.site)
        try:
            if up is not None:  # after the unit's outputs, and only if they arrived
                up.submit(marker, path, key=f"{path}#{marker['status']}", requires=requires)
            else:
                dst_backend.save(marker, path)
                written_now[(o.well, o.site)] = (marker, texts if o.ok else {})
        except Exception as e:  # pragma: no cover - the unit is redone on resume
            log.error("could not write the marker of %s/%s: %s", o.well, o.site, e)
        counts["done" if o.ok else "failed"] += 1
        prog.update(o)

    try:
        if pending:
            if scheduler is not None:
                where = run_dask(pending, plate_uri, code, src_id, timeout, structure, scheduler, emit)
            elif ports:
                where = run_local(pending, lambda w, s: src_backend.load_field(src_id, w, s), code, src_id,
                                   timeout, structure, list(ports), False, emit)
            else:  # engine workers of this batch, no bridge between
                from .batch_dispatch import run_engines

                where = run_engines(pending, lambda w, s: src_backend.load_field(src_id, w, s), code, src_id,
                                    timeout, structure, engines, emit)
        else:
            where = "nothing to run"
    finally:
        prog.close()
        closing = _close_in_background(engines)
    pid = ensure_plate("")
    if pid != dst_id:  # a store that numbers its plates (OMERO): name the plate that was made
        from .backends import PlateURI

        derived_uri = str(PlateURI.parse(derived_uri).with_plate(pid))
    up = state["uploader"]
    if up is None:
        try:
            tables = assemble(dst_backend, pid, units, well_order, failures, known=written_now, ngff_writer=ngff.writer())
        finally:
            ngff.close()
        closing.join()
        report = _report(plate_uri, derived_uri, pid, m, values, units, counts, done_before, failures, tables,
                         t_start, where)
        try:
            dst_backend.save(report.to_dict(), f"/{dst_backend.scheme}/plate_{pid}/batch.json")
        except Exception as e:  # pragma: no cover
            log.error("could not write batch.json: %s", e)
        return report
    closing.join()
    return _finish_remote(up, dst_backend, pid, units, well_order, failures,
                          lambda tables: _report(plate_uri, derived_uri, pid, m, values, units, counts, done_before,
                                                 failures, tables, t_start, where))


class _NgffWriting:
    """Gets ngio ready for the derived plate's NGFF tables and labels, once
    the first unit is done, when they need it (ngio pulls in dask, xarray,
    pandas and anndata: about 2.5 CPU-s; started before, it takes the CPU the
    JVMs start with: measured on 2 cores, the first unit 1.5 s later):

    * a batch that writes label images (per unit, in this process) imports
      ngio in a thread;
    * a batch whose plate tables are AnnData (the store's ``table_backend``)
      starts a :class:`~fiji_bridge.backends.ngff_tables.TableWriterProcess`
      at the lowest priority, which imports ngio on the cores the JVMs leave
      idle; :meth:`writer` gives it to :func:`~fiji_bridge.batch_tables.assemble`
      (which writes them itself when the child has not had the idle cycles to
      get ready: a busy machine makes it wait for nothing);
    * otherwise (parquet and CSV plate tables, the default) the tables are
      written with pyarrow at the end, and ngio is not needed at all; pyarrow
      is imported in a thread as soon as the plates are open, while the JVMs
      start (0.1 s of CPU that would otherwise come after the last unit).

    Stores without NGFF tables (OME-TIFF, OMERO) need none of this."""

    def __init__(self, backend: Any, labels: bool) -> None:
        from .backends.zarr_plate import ZarrPlateStore

        self.ngff = isinstance(backend, ZarrPlateStore)
        self.labels = labels
        self.anndata = self.ngff and getattr(backend, "table_backend", None) == "anndata"
        self._thread: Optional[threading.Thread] = None
        self._writer: Any = None
        self._started = False
        if self.ngff and not labels and not self.anndata:
            threading.Thread(target=_import_pyarrow, daemon=True, name="fiji-bridge-pyarrow").start()

    def start(self) -> None:
        if self._started or not self.ngff:
            return
        self._started = True
        if self.labels:
            self._thread = threading.Thread(target=_import_ngio, daemon=True, name="fiji-bridge-ngio")
            self._thread.start()
            return
        if not self.anndata:
            return
        from .backends.ngff_tables import TableWriterProcess

        try:
            self._writer = TableWriterProcess()
        except OSError as e:  # pragma: no cover - no process to spare: the tables are written here
            log.warning("no table writer process (%s): the NGFF plate tables are written in this one", e)

    def writer(self) -> Any:
        """The writer process for the plate tables (None: write them here)."""
        if self._thread is not None:
            self._thread.join()
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _import_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except Exception:  # pragma: no cover - the write itself reports it
        pass


def _import_ngio() -> None:
    try:
        import ngio.tables  # noqa: F401
    except Exception:  # pragma: no cover - the write itself reports it
        pass


def _close_in_background(engines: Any) -> threading.Thread:
    """Stop the batch's engine workers while the plate tables are assembled."""
    t = threading.Thread(target=engines.close if engines is not None else (lambda: None), daemon=True,
                         name="fiji-bridge-engines-close")
    t.start()
    return t


def _report(plate_uri: str, derived_uri: str, pid: str, m: Macro, values: dict, units: Sequence[Any],
            counts: Mapping[str, int], done_before: set, failures: list[dict], tables: dict[str, str],
            t_start: float, where: str) -> BatchReport:
    return BatchReport(
        source=str(plate_uri), derived=derived_uri, plate=pid, macro=m.name, arguments=values,
        units=len(units), done=counts["done"], skipped=len(done_before), failed=len(failures),
        failures=failures, tables=tables, elapsed=time.perf_counter() - t_start, workers=where,
    )


def _uploader(backend: Any, plate: str, spill_dir: Any, options: Optional[Mapping[str, Any]]) -> Any:
    """The batch's uploader to a remote derived plate, with its spill folder
    and a local fallback store in it."""
    from .backends.zarr_plate import ZarrPlateStore
    from .outputs import fallback_root
    from .upload import Uploader

    d = Path(spill_dir) if spill_dir is not None else fallback_root(backend).parent.parent / (
        f"{fallback_root(backend).name}_plate_{slug(plate)}")
    opts = {"queue_size": 16, **dict(options or {})}
    return Uploader(backend, spill_dir=d, fallback=ZarrPlateStore(d / "fallback"), **opts)


def _finish_remote(up: Any, backend: Any, pid: str, units: Sequence[tuple[str, int]], well_order: Mapping[str, int],
                   failures: list[dict], make_report: Callable[[dict], BatchReport]) -> BatchReport:
    """Wait for the unit outputs, then assemble the plate tables on the
    server (through the uploader), or in the fallback plate when outputs
    went there; the report says which."""
    from .backends import PlateURI

    up.wait()
    fallback = up.fallback
    sent = up.report()
    if sent.fallback or sent.left:
        # the server plate lacks some units: the plate tables are those of the fallback plate
        tables = assemble(fallback, pid, units, well_order, failures)
        fallback.save(make_report(tables).to_dict(), f"/{fallback.scheme}/plate_{pid}/batch.json")
    else:
        def save_table(plate: str, name: str, text: str) -> str:
            up.submit_table(plate, name, text)
            return f"/{backend.scheme}/plate_{plate}/{name}.csv"

        tables = assemble(backend, pid, units, well_order, failures, save_table=save_table)
        up.wait()
        interim = make_report(tables)
        interim.upload = dict(up.counters)
        up.submit(interim.to_dict(), f"/{backend.scheme}/plate_{pid}/batch.json")
    final = up.finalize()
    report = make_report(tables)
    report.upload = dict(final.counters)
    report.spill = str(up.spill_dir or "")
    report.fallback_items = sorted(final.fallback)
    report.upload_left = {k: final.failed.get(k, "spilled: uploaded when the batch runs again") for k in final.left}
    if final.fallback:
        report.fallback = str(PlateURI("zarr", path=str(fallback.root), plate=slug(pid)))
    return report


@dataclass
class _Field:
    """A source field as the input of :func:`save_result`."""

    array: np.ndarray
    channel_names: Sequence[str]
    calibration: Calibration


# --------------------------------------------------------------------------- CLI


def batch_command(
    plate_uri: str,
    macro: str,
    args: Optional[Mapping[str, str]] = None,
    out_uri: Optional[str] = None,
    wells: str = "all",
    workers: int = 1,
    scheduler: Optional[str] = None,
    resume: bool = False,
    timeout: float = 600,
    ports: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[str]] = None,
    labels_to_source: bool = False,
    spawned: Any = None,
) -> int:
    """``fiji-bridge batch``: exit 0 when every unit succeeded, 1 when some
    failed, 2 when the batch could not start."""
    from .backends import BackendError
    from .macros import MacroArgumentError, MacroNotFound, MacroParseError
    from .objects import LabelSpecError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_batch(plate_uri, macro, args=args, out_uri=out_uri, wells=wells, workers=workers,
                           scheduler=scheduler, resume=resume, timeout=timeout, progress=True,
                           ports=list(ports) if ports else None, labels=labels, labels_to_source=labels_to_source,
                           spawned=spawned)
    except (BatchError, BackendError, MacroArgumentError, MacroNotFound, MacroParseError, LabelSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report.ok else 1


def print_report(report: BatchReport) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    say = console.print if console.is_terminal else print
    say(f"batch {report.macro} on {report.source}: {report.done} done, {report.skipped} skipped (already done), "
        f"{report.failed} failed of {report.units} unit(s) in {report.elapsed:.1f} s "
        f"({report.units_per_s:.2f} units/s; {report.workers})")
    say(f"derived plate: {report.derived}")
    for title, path in report.tables.items():
        say(f"  {title}: {path}")
    for f in report.failures:
        say(f"  FAILED {f['well']} field {f['field']}: {f.get('kind', '')}: {f.get('message', '')}")
    if report.upload:
        c = report.upload
        say(f"upload: {c.get('uploaded', 0)} uploaded, {c.get('retried', 0)} retried, {c.get('spilled', 0)} spilled, "
            f"{c.get('fallback', 0)} to the fallback store, {c.get('failed', 0)} failed")
    if report.fallback:
        say(f"SERVER UNAVAILABLE: {len(report.fallback_items)} output(s) went to the local fallback plate "
            f"{report.fallback} (its plate tables are there); run the batch again with --resume "
            f"--out {report.derived} when the server is back")
    for key, why in report.upload_left.items():
        say(f"  NOT UPLOADED {key}: {why} (kept in {report.spill})")
