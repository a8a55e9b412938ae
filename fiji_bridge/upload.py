"""The uploader: every write to a remote store goes through it.

A background thread drains a bounded in-memory queue into a
:class:`~fiji_bridge.backends.base.VirtualBackend`:

* **spill-over**: when the queue is full, items go to ``spill_dir``: one
  file per item, ``items/<time>-<seq>-<key hash>.item``, holding a JSON
  header line (key, path, operation, arguments, kind) and then the payload
  (``.npy`` bytes for arrays, UTF-8 text, raw bytes or JSON), written to a
  temporary name, fsynced and renamed: the rename is the commit point, so a
  kill leaves either the whole item or nothing. (Spill folders of the
  earlier two-file layout, a data file plus a ``.json`` manifest, are still
  read.) With ``durable=True`` every item is written there at
  ``submit`` (a write-ahead journal), so even items still in memory survive a
  crash. Without a ``spill_dir``, ``submit`` blocks while the queue is full.
* **items**: a path-level write (:meth:`Uploader.submit`: ``store.save``), a
  whole field (:meth:`Uploader.submit_field`: ``store.save_field``, one
  transaction per field on OMERO) or a table (:meth:`Uploader.submit_table`:
  ``store.save_table``); the manifest carries the operation and its
  arguments, so all three spill, retry and fall back alike;
* **order**: items are written in the order they were submitted (once an
  item spilled, later ones spill behind it), so an item submitted last for a
  group of items (a batch unit's marker) is written after them; ``requires``
  makes that explicit: such an item is written only when the keys it
  requires were uploaded (to the fallback store when one of them went there;
  not at all, reported failed, when one of them failed);
* **restart**: a new ``Uploader`` over the same ``spill_dir`` picks up every
  spilled item and uploads it;
* **retry**: :class:`~fiji_bridge.backends.base.StoreUnavailable` /
  ``ConnectionError`` / ``TimeoutError`` are retried with exponential backoff
  (``backoff=(base, max)`` seconds) and full jitter, up to ``max_retries``;
* **idempotent keys**: an item's key (the virtual path it lands at unless
  given) is uploaded at most once: keys written to the store are recorded in
  ``spill_dir/done.log`` (each line flushed at once, so a killed process
  loses none; fsynced in groups, so a power cut may forget the last few,
  which are then written once more -- the stores' ``save`` replaces what is
  at a path) and a key already pending or done is not queued again;
* **fallback**: when the store stays away past ``max_retries``, the item is
  written to the ``fallback`` store (a local plate store; paths are moved to
  its scheme) and reported; later items then get a single attempt each until
  a write succeeds again, so a dead server costs one backoff, not one per
  item. Without a fallback the item stays spilled (retried on the next start)
  and is reported as failed;
* :meth:`Uploader.finalize` waits for everything, or until its timeout, and
  reports exactly which keys are where.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .backends.base import StoreUnavailable, VirtualBackend, columns_to_csv, json_default
from .components import Calibration, normalize_well

__all__ = ["UploadReport", "Uploader", "UploaderError", "RETRYABLE", "field_key", "key_of", "spill_root"]

log = logging.getLogger(__name__)

#: errors that mean "the store is away": retried with backoff
RETRYABLE: tuple[type[BaseException], ...] = (StoreUnavailable, ConnectionError, TimeoutError)


class UploaderError(RuntimeError):
    """The uploader was used wrongly (closed, bad data)."""


def spill_root() -> Path:
    """Where uploaders keep spilled items by default:
    ``$FIJI_BRIDGE_SPILL_DIR``, else ``$XDG_CACHE_HOME/fiji-bridge/spill``
    (``~/.cache/fiji-bridge/spill``)."""
    env = os.environ.get("FIJI_BRIDGE_SPILL_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fiji-bridge" / "spill"


@dataclass
class UploadReport:
    """What :meth:`Uploader.finalize` found. Every submitted key is in exactly
    one of ``uploaded``, ``fallback``, ``failed`` (key -> reason), ``queued``
    (still in memory) or ``spilled`` (on disk, uploaded on the next start)."""

    uploaded: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    queued: list[str] = field(default_factory=list)
    spilled: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every item reached the store (or the fallback)."""
        return not (self.failed or self.queued or self.spilled)

    @property
    def left(self) -> list[str]:
        return sorted(set(self.queued) | set(self.spilled) | set(self.failed))


#: done.log lines per fsync at most (a line is flushed to the OS at once)
DONE_LOG_GROUP = 64

#: what an item does: "save" -> store.save(data, path); "field" ->
#: store.save_field(plate, well, site, data, ...); "table" -> store.save_table(plate, name, data, ...)
OPS = ("save", "field", "table")


@dataclass
class _Item:
    key: str
    path: str
    data: Any = None  # None once only on disk
    manifest: Optional[Path] = None  # set when spilled
    op: str = "save"
    args: dict = field(default_factory=dict)  # JSON-able arguments of the op
    requires: tuple[str, ...] = ()


class Uploader:
    """Upload items to ``store`` in the background; see the module doc."""

    def __init__(
        self,
        store: VirtualBackend,
        *,
        queue_size: int = 64,
        spill_dir: Optional[os.PathLike | str] = None,
        fallback: Optional[VirtualBackend] = None,
        max_retries: int = 8,
        backoff: tuple[float, float] = (0.1, 30.0),
        jitter: bool = True,
        durable: bool = False,
        on_fallback: Optional[Callable[[str, BaseException], None]] = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.store, self.fallback = store, fallback
        self.max_retries, self.backoff, self.jitter = int(max_retries), backoff, jitter
        self.durable = durable and spill_dir is not None
        self.on_fallback = on_fallback
        self._q: "queue.Queue[_Item]" = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._closed = False
        self._busy: Optional[str] = None
        self._seq = 0
        self.counters: dict[str, int] = {k: 0 for k in
                                         ("queued", "spilled", "uploaded", "retried", "failed", "fallback",
                                          "recovered", "skipped")}
        self._uploaded: list[str] = []
        self._fallback: list[str] = []
        self._failed: dict[str, str] = {}
        self._pending: dict[str, _Item] = {}  # key -> item not yet done
        self._spilled_only: collections.deque[_Item] = collections.deque()  # on disk, not in the memory queue
        self._done: set[str] = set()
        self._fell_back: set[str] = set()
        self._done_log: Optional[Any] = None
        self._unsynced = 0
        self._away = False  # the store gave up on an item: one attempt per item until a write succeeds
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            (self.spill_dir / "items").mkdir(parents=True, exist_ok=True)
            self._recover()
        self._thread = threading.Thread(target=self._run, name="fiji-bridge-uploader", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------

    def submit(self, data: Any, path: str, key: Optional[str] = None, *, requires: Sequence[str] = ()) -> bool:
        """Queue ``data`` for ``store.save(data, path)``. Returns False when
        the key was already uploaded or is pending (idempotent). ``requires``:
        keys that must have been uploaded before this item is written."""
        _check_data(data, path)
        return self._submit(_Item(str(key or path), str(path), data, requires=tuple(requires)))

    def submit_field(
        self,
        plate: str,
        well: str,
        site: int,
        array: np.ndarray,
        *,
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
        name: Optional[str] = None,
        key: Optional[str] = None,
    ) -> bool:
        """Queue a whole field (TZCYX) for ``store.save_field`` (one
        transaction per field). Default key: ``/<scheme>/plate_<plate>/<well>/<well>_s<site>``."""
        well, site = normalize_well(well), int(site)
        path = field_key(self.store.scheme, str(plate), well, site)
        arr = np.asarray(array)
        if arr.ndim != 5 or arr.dtype == object:
            raise UploaderError(f"{path}: a field is a 5-D (T, Z, C, Y, X) array, got {arr.dtype} {arr.shape}")
        args = {"plate": str(plate), "well": well, "site": site,
                "channel_names": list(channel_names) if channel_names else None,
                "calibration": calibration.to_dict() if calibration is not None else None,
                "name": None if name is None else str(name)}
        return self._submit(_Item(str(key or path), path, arr, op="field", args=args))

    def submit_table(
        self,
        plate: str,
        name: str,
        table: Union[str, Mapping[str, Sequence[Any]]],
        *,
        well: Optional[str] = None,
        site: Optional[int] = None,
        key: Optional[str] = None,
        requires: Sequence[str] = (),
    ) -> bool:
        """Queue a table (CSV text, or columns) for ``store.save_table``.
        Default key: ``/<scheme>/plate_<plate>/[<well>/]<name>[_s<site>].csv``."""
        text = table if isinstance(table, str) else columns_to_csv(table)
        well = normalize_well(well) if well else None
        site = None if site is None else int(site)
        path = (f"/{self.store.scheme}/plate_{plate}/" + (f"{well}/" if well else "") + str(name)
                + (f"_s{site:03d}" if site is not None else "") + ".csv")
        args = {"plate": str(plate), "name": str(name), "well": well, "site": site}
        return self._submit(_Item(str(key or path), path, text, op="table", args=args, requires=tuple(requires)))

    def _submit(self, item: _Item) -> bool:
        if self._closed:
            raise UploaderError("the uploader is finalized; create a new one")
        with self._lock:
            if item.key in self._done or item.key in self._pending:
                self.counters["skipped"] += 1
                return False
            self._pending[item.key] = item
            behind_spill = bool(self._spilled_only) and self.spill_dir is not None  # keep the order
        if self.durable:
            self._spill(item)
        try:
            if behind_spill:
                raise queue.Full
            self._q.put_nowait(item)
        except queue.Full:
            if self.spill_dir is None:
                self._q.put(item)  # back-pressure: lossless
            else:
                if item.manifest is None:
                    self._spill(item)
                item.data = None  # the disk copy is the item now
                with self._lock:
                    self._spilled_only.append(item)
                    self.counters["spilled"] += 1
                return True
        with self._lock:
            self.counters["queued"] += 1
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted item is done (uploaded, fallen back or
        failed), at most ``timeout`` seconds; the uploader stays open.
        Returns True when nothing is left to do."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_work():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(timeout=0.05 if left is None else min(0.05, left))
        return True

    def finalize(self, timeout: Optional[float] = None) -> UploadReport:
        """Wait for every item (at most ``timeout`` seconds), stop the thread
        and report where each key is."""
        self._closed = True
        self.wait(timeout)
        self._stop.set()
        self._thread.join(timeout=5)
        self._spill_leftovers()
        if self._done_log is not None and not self._thread.is_alive():
            self._sync_done_log()
            self._done_log.close()
            self._done_log = None
        return self.report()

    def _spill_leftovers(self) -> None:
        """Items still in memory at the end go to disk (uploaded next start)."""
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if self.spill_dir is not None and item.manifest is None:
                self._spill(item)
                item.data = None
            with self._lock:
                if item.manifest is not None:
                    self._spilled_only.append(item)

    def report(self) -> UploadReport:
        with self._lock:
            spilled = {i.key for i in self._spilled_only}
            spilled |= {k for k, i in self._pending.items() if i.manifest is not None and k not in self._failed}
            queued = [k for k, i in self._pending.items() if k not in spilled and k not in self._failed]
            return UploadReport(
                uploaded=list(self._uploaded), fallback=list(self._fallback), failed=dict(self._failed),
                queued=sorted(queued), spilled=sorted(spilled), counters=dict(self.counters))

    def close(self) -> UploadReport:
        return self.finalize(timeout=0)

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()

    # -- the worker -----------------------------------------------------------------

    def _pending_work(self) -> bool:
        return any(k not in self._failed for k in self._pending)

    def _next(self) -> Optional[_Item]:
        """The oldest item: the memory queue first (everything in it was
        submitted before anything that spilled behind it), then the spill;
        waits (briefly) only when both are empty."""
        try:
            return self._q.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._spilled_only:
                return self._spilled_only.popleft()
        try:
            return self._q.get(timeout=0.05)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._next()
            if item is None:
                self._sync_done_log()
                with self._idle:
                    self._idle.notify_all()
                continue
            self._upload(item)
            with self._idle:
                self._idle.notify_all()

    def _upload(self, item: _Item) -> None:
        try:
            data = item.data if item.data is not None else _read_spill(item.manifest)
        except Exception as e:  # a damaged spill file: report, never crash the thread
            self._finish(item, failed=f"cannot read spilled item: {e}")
            return
        needs = self._requirements(item)
        if needs == "fallback":
            self._to_fallback(item, data, StoreUnavailable("an item it requires went to the fallback store"))
            return
        if needs:
            self._finish(item, failed=needs)
            return
        attempt = 0
        while True:
            try:
                self._apply(self.store, item, data)
                self._away = False
                self._finish(item, uploaded=True)
                return
            except RETRYABLE as e:
                if attempt >= (0 if self._away else self.max_retries):
                    self._give_up(item, data, e)
                    return
                with self._lock:
                    self.counters["retried"] += 1
                delay = min(self.backoff[1], self.backoff[0] * (2 ** attempt))
                if self.jitter:
                    delay = random.uniform(0, delay)
                attempt += 1
                log.info("upload of %s failed (%s); retry %d in %.2fs", item.key, e, attempt, delay)
                if self._stop.wait(delay):
                    self._keep_for_later(item, data, f"stopped while retrying: {e}")
                    return
            except Exception as e:  # bad data or a refusal: retrying would not help
                self._finish(item, failed=f"{type(e).__name__}: {e}")
                return

    def _requirements(self, item: _Item) -> str:
        """"" when every required key was uploaded, "fallback" when one went
        to the fallback store, else why the item cannot be written."""
        fell_back = False
        with self._lock:
            for k in item.requires:
                if k in self._done:
                    continue
                if k in self._fell_back:
                    fell_back = True
                elif k in self._failed:
                    return f"not written: it requires {k}, which failed ({self._failed[k]})"
                else:
                    return f"not written: it requires {k}, which was not uploaded before it"
        return "fallback" if fell_back else ""

    def _apply(self, store: VirtualBackend, item: _Item, data: Any) -> None:
        """Perform the item's operation on ``store``."""
        a = item.args
        if item.op == "field":
            cal = a.get("calibration")
            store.save_field(a["plate"], a["well"], int(a["site"]), data, name=a.get("name"),
                             channel_names=a.get("channel_names"),
                             calibration=Calibration.from_dict(cal) if cal else None)
        elif item.op == "table":
            store.save_table(a["plate"], a["name"], data, well=a.get("well"), site=a.get("site"))
        elif item.op == "save":
            path = item.path
            if store is not self.store and store.scheme != self.store.scheme:
                prefix = f"/{self.store.scheme}/"
                if path.startswith(prefix):  # the same place in the fallback store
                    path = f"/{store.scheme}/" + path[len(prefix):]
            store.save(data, path)
        else:
            raise UploaderError(f"{item.key}: unknown operation {item.op!r} (expected one of {OPS})")

    def _give_up(self, item: _Item, data: Any, err: BaseException) -> None:
        self._away = True
        if self.fallback is not None:
            self._to_fallback(item, data, err)
            return
        self._keep_for_later(item, data, f"store unavailable after {self.max_retries} retries: {err}")

    def _to_fallback(self, item: _Item, data: Any, err: BaseException) -> None:
        if self.fallback is None:
            self._finish(item, failed=f"not written: {err} and there is no fallback store")
            return
        try:
            self._apply(self.fallback, item, data)
        except Exception as e2:
            self._keep_for_later(item, data, f"store unavailable ({err}); fallback failed: {e2}")
            return
        if self.on_fallback is not None:
            self.on_fallback(item.key, err)
        log.warning("store unavailable (%s): %s went to the fallback store", err, item.key)
        self._finish(item, fallback=True)

    def _keep_for_later(self, item: _Item, data: Any, reason: str) -> None:
        if self.spill_dir is not None and item.manifest is None:
            item.data = data
            self._spill(item)
        self._finish(item, failed=reason, keep=True)

    def _finish(self, item: _Item, *, uploaded: bool = False, fallback: bool = False,
                failed: Optional[str] = None, keep: bool = False) -> None:
        if failed is None:
            if uploaded:  # only what reached the store is never written again
                self._mark_done(item.key)
            if item.manifest is not None:
                _remove_spill(item.manifest)
        with self._lock:
            if uploaded:
                self._uploaded.append(item.key)
                self.counters["uploaded"] += 1
                self._pending.pop(item.key, None)
            elif fallback:
                self._fell_back.add(item.key)
                self._fallback.append(item.key)
                self.counters["fallback"] += 1
                self._pending.pop(item.key, None)
            else:
                self._failed[item.key] = str(failed)
                self.counters["failed"] += 1
                if not keep:
                    self._pending.pop(item.key, None)

    # -- the spill directory ---------------------------------------------------------------

    def _mark_done(self, key: str) -> None:
        with self._lock:
            self._done.add(key)
        if self.spill_dir is None:
            return
        if self._done_log is None:  # opened once: the worker thread is its only writer
            self._done_log = open(self.spill_dir / "done.log", "a", encoding="utf-8")
        self._done_log.write(json.dumps(key) + "\n")
        self._done_log.flush()  # in the OS now: survives a kill of this process
        self._unsynced += 1
        if self._unsynced >= DONE_LOG_GROUP:
            self._sync_done_log()

    def _sync_done_log(self) -> None:
        """fsync the lines written since the last time (group commit: when
        the worker runs out of work, every DONE_LOG_GROUP lines, at the end)."""
        if self._done_log is not None and self._unsynced:
            os.fsync(self._done_log.fileno())
            self._unsynced = 0

    def _spill(self, item: _Item) -> None:
        assert self.spill_dir is not None
        with self._lock:
            self._seq += 1
            seq = self._seq
        stem = f"{time.time_ns():020d}-{seq:06d}-{hashlib.sha1(item.key.encode()).hexdigest()[:12]}"
        data = item.data
        if isinstance(data, np.ndarray):
            kind = "npy"
            payload: Callable[[Any], None] = lambda f: np.save(f, data, allow_pickle=False)  # noqa: E731
        elif isinstance(data, str):
            kind, raw = "text", data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray)):
            kind, raw = "bytes", bytes(data)
        else:
            kind, raw = "json", json.dumps(data, default=json_default).encode()
        if kind != "npy":
            payload = lambda f: f.write(raw)  # noqa: E731
        head = {"key": item.key, "path": item.path, "kind": kind, "op": item.op, "args": item.args,
                "requires": list(item.requires)}
        path = self.spill_dir / "items" / (stem + SPILL_SUFFIX)

        def write(f: Any) -> None:
            f.write(json.dumps(head).encode() + b"\n")
            payload(f)

        _atomic(path, write)
        item.manifest = path

    def _recover(self) -> None:
        assert self.spill_dir is not None
        log_path = self.spill_dir / "done.log"
        if log_path.exists():
            for line in log_path.read_text(encoding="utf-8").splitlines():
                try:
                    self._done.add(json.loads(line))
                except ValueError:
                    continue  # a torn last line after a crash
        for tmp in (self.spill_dir / "items").glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # never committed
        items = self.spill_dir / "items"
        spilled = [p for p in items.glob("*.json") if not p.name.endswith(".data.json")]  # the old layout
        for manifest in sorted(spilled + list(items.glob("*" + SPILL_SUFFIX)), key=lambda p: p.name):
            try:
                doc = _spill_header(manifest)
            except (OSError, ValueError):
                continue
            key = doc["key"]
            if key in self._done or key in self._pending:
                _remove_spill(manifest)
                continue
            item = _Item(key, doc["path"], None, manifest, op=doc.get("op", "save"), args=doc.get("args") or {},
                         requires=tuple(doc.get("requires") or ()))
            self._pending[key] = item
            self._spilled_only.append(item)
            self.counters["recovered"] += 1
            self._seq += 1
        if self.counters["recovered"]:
            log.info("uploader: %d spilled items from a previous run will be uploaded", self.counters["recovered"])


def field_key(scheme: str, plate: str, well: str, site: int) -> str:
    """The key of a whole-field item: ``/<scheme>/plate_<plate>/<well>/<well>_s<site>``."""
    well = normalize_well(well)
    return f"/{scheme}/plate_{plate}/{well}/{well}_s{int(site):03d}"


def key_of(path: str) -> str:
    """The default key of the item that writes ``path``: a plane's path ->
    its field's key (fields are written whole); any other path -> itself."""
    from .components import VirtualPath

    try:
        vp = VirtualPath.parse(path)
    except Exception:
        return str(path)
    if vp.is_plane and vp.components is not None:
        c = vp.components
        return field_key(vp.scheme, vp.plate, c.well, c.site)
    return str(path)


def _check_data(data: Any, path: str) -> None:
    if isinstance(data, np.ndarray):
        if data.dtype == object:
            raise UploaderError(f"{path}: object arrays cannot be uploaded")
        return
    if isinstance(data, (str, bytes, bytearray, Mapping, list)):
        return
    raise UploaderError(f"{path}: cannot upload a {type(data).__name__} (arrays, text, bytes or JSON)")


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: a spilled item: a JSON header line, then its payload
SPILL_SUFFIX = ".item"


def _spill_header(path: Path) -> dict:
    """The header of a spilled item (the whole manifest, in the old layout)."""
    if path.suffix == SPILL_SUFFIX:
        with open(path, "rb") as f:
            return json.loads(f.readline())
    return json.loads(path.read_text())


def _decode(kind: str, f: Any) -> Any:
    if kind == "npy":
        return np.load(f, allow_pickle=False)
    raw = f.read()
    if kind == "text":
        return raw.decode("utf-8")
    if kind == "bytes":
        return raw
    return json.loads(raw)


def _read_spill(manifest: Optional[Path]) -> Any:
    assert manifest is not None
    if manifest.suffix == SPILL_SUFFIX:
        with open(manifest, "rb") as f:
            doc = json.loads(f.readline())
            return _decode(doc["kind"], f)
    doc = json.loads(manifest.read_text())  # the old layout: a manifest naming a data file
    with open(manifest.with_name(doc["file"]), "rb") as f:
        return _decode(doc["kind"], f)


def _remove_spill(manifest: Path) -> None:
    if manifest.suffix == SPILL_SUFFIX:
        manifest.unlink(missing_ok=True)
        return
    try:
        doc = json.loads(manifest.read_text())
        manifest.unlink(missing_ok=True)  # the commit point goes first
        manifest.with_name(doc["file"]).unlink(missing_ok=True)
    except (OSError, ValueError):
        manifest.unlink(missing_ok=True)


