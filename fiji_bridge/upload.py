"""The uploader: every write to a remote store goes through it.

A background thread drains a bounded in-memory queue into a
:class:`~fiji_bridge.backends.base.VirtualBackend`:

* **spill-over**: when the queue is full, items go to ``spill_dir`` (one data
  file per item — ``.npy`` for arrays, ``.txt``/``.bin``/``.json`` otherwise —
  plus a small JSON manifest written last, atomically: the manifest is the
  commit point). With ``durable=True`` every item is written there at
  ``submit`` (a write-ahead journal), so even items still in memory survive a
  crash. Without a ``spill_dir``, ``submit`` blocks while the queue is full.
* **restart**: a new ``Uploader`` over the same ``spill_dir`` picks up every
  spilled item and uploads it;
* **retry**: :class:`~fiji_bridge.backends.base.StoreUnavailable` /
  ``ConnectionError`` / ``TimeoutError`` are retried with exponential backoff
  (``backoff=(base, max)`` seconds) and full jitter, up to ``max_retries``;
* **idempotent keys**: an item's key (its virtual path unless given) is
  uploaded at most once: completed keys are recorded in ``spill_dir/done.log``
  (fsynced) and a key already pending or done is not queued again; the
  stores' ``save`` replaces what is at a path anyway;
* **fallback**: when the store stays away past ``max_retries``, the item is
  written to the ``fallback`` store (a local plate store) and reported;
  without a fallback it stays spilled (retried on the next start) and is
  reported as failed;
* :meth:`Uploader.finalize` waits for everything, or until its timeout, and
  reports exactly which keys are where.
"""

from __future__ import annotations

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
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .backends.base import StoreUnavailable, VirtualBackend

__all__ = ["UploadReport", "Uploader", "UploaderError", "RETRYABLE"]

log = logging.getLogger(__name__)

#: errors that mean "the store is away": retried with backoff
RETRYABLE: tuple[type[BaseException], ...] = (StoreUnavailable, ConnectionError, TimeoutError)


class UploaderError(RuntimeError):
    """The uploader was used wrongly (closed, bad data)."""


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


@dataclass
class _Item:
    key: str
    path: str
    data: Any = None  # None once only on disk
    manifest: Optional[Path] = None  # set when spilled


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
        self._spilled_only: list[_Item] = []  # on disk, not in the memory queue
        self._done: set[str] = set()
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            (self.spill_dir / "items").mkdir(parents=True, exist_ok=True)
            self._recover()
        self._thread = threading.Thread(target=self._run, name="fiji-bridge-uploader", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------

    def submit(self, data: Any, path: str, key: Optional[str] = None) -> bool:
        """Queue ``data`` for ``store.save(data, path)``. Returns False when
        the key was already uploaded or is pending (idempotent)."""
        if self._closed:
            raise UploaderError("the uploader is finalized; create a new one")
        key = str(key or path)
        _check_data(data, path)
        with self._lock:
            if key in self._done or key in self._pending:
                self.counters["skipped"] += 1
                return False
            item = _Item(key, str(path), data)
            self._pending[key] = item
        if self.durable:
            self._spill(item)
        try:
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

    def finalize(self, timeout: Optional[float] = None) -> UploadReport:
        """Wait for every item (at most ``timeout`` seconds), stop the thread
        and report where each key is."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_work():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(timeout=0.05 if left is None else min(0.05, left))
        self._stop.set()
        self._thread.join(timeout=5)
        self._spill_leftovers()
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
        try:
            return self._q.get(timeout=0.05)
        except queue.Empty:
            pass
        with self._lock:
            if self._spilled_only:
                return self._spilled_only.pop(0)
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._next()
            if item is None:
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
        attempt = 0
        while True:
            try:
                self.store.save(data, item.path)
                self._finish(item, uploaded=True)
                return
            except RETRYABLE as e:
                if attempt >= self.max_retries:
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

    def _give_up(self, item: _Item, data: Any, err: BaseException) -> None:
        if self.fallback is not None:
            try:
                self.fallback.save(data, item.path)
            except Exception as e2:
                self._keep_for_later(item, data, f"store unavailable ({err}); fallback failed: {e2}")
                return
            if self.on_fallback is not None:
                self.on_fallback(item.key, err)
            log.warning("store unavailable after %d retries: %s went to the fallback store", self.max_retries,
                        item.key)
            self._finish(item, fallback=True)
            return
        self._keep_for_later(item, data, f"store unavailable after {self.max_retries} retries: {err}")

    def _keep_for_later(self, item: _Item, data: Any, reason: str) -> None:
        if self.spill_dir is not None and item.manifest is None:
            item.data = data
            self._spill(item)
        self._finish(item, failed=reason, keep=True)

    def _finish(self, item: _Item, *, uploaded: bool = False, fallback: bool = False,
                failed: Optional[str] = None, keep: bool = False) -> None:
        if failed is None:
            self._mark_done(item.key)
            if item.manifest is not None:
                _remove_spill(item.manifest)
        with self._lock:
            if uploaded:
                self._uploaded.append(item.key)
                self.counters["uploaded"] += 1
                self._pending.pop(item.key, None)
            elif fallback:
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
        with open(self.spill_dir / "done.log", "a", encoding="utf-8") as f:
            f.write(json.dumps(key) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _spill(self, item: _Item) -> None:
        assert self.spill_dir is not None
        with self._lock:
            self._seq += 1
            seq = self._seq
        stem = f"{time.time_ns():020d}-{seq:06d}-{hashlib.sha1(item.key.encode()).hexdigest()[:12]}"
        d = self.spill_dir / "items"
        data = item.data
        if isinstance(data, np.ndarray):
            kind, name = "npy", stem + ".npy"
            _atomic(d / name, lambda f: np.save(f, data, allow_pickle=False))
        elif isinstance(data, str):
            kind, name = "text", stem + ".txt"
            _atomic(d / name, lambda f: f.write(data.encode("utf-8")))
        elif isinstance(data, (bytes, bytearray)):
            kind, name = "bytes", stem + ".bin"
            _atomic(d / name, lambda f: f.write(bytes(data)))
        else:
            kind, name = "json", stem + ".data.json"
            _atomic(d / name, lambda f: f.write(json.dumps(data, default=_json_default).encode()))
        manifest = d / (stem + ".json")
        doc = {"key": item.key, "path": item.path, "kind": kind, "file": name}
        _atomic(manifest, lambda f: f.write(json.dumps(doc).encode()))
        item.manifest = manifest

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
        for manifest in sorted((self.spill_dir / "items").glob("*.json")):
            if manifest.name.endswith(".data.json"):
                continue
            try:
                doc = json.loads(manifest.read_text())
            except ValueError:
                continue
            key = doc["key"]
            if key in self._done or key in self._pending:
                _remove_spill(manifest)
                continue
            item = _Item(key, doc["path"], None, manifest)
            self._pending[key] = item
            self._spilled_only.append(item)
            self.counters["recovered"] += 1
            self._seq += 1
        if self.counters["recovered"]:
            log.info("uploader: %d spilled items from a previous run will be uploaded", self.counters["recovered"])


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


def _read_spill(manifest: Optional[Path]) -> Any:
    assert manifest is not None
    doc = json.loads(manifest.read_text())
    f = manifest.with_name(doc["file"])
    if doc["kind"] == "npy":
        return np.load(f, allow_pickle=False)
    if doc["kind"] == "text":
        return f.read_text(encoding="utf-8")
    if doc["kind"] == "bytes":
        return f.read_bytes()
    return json.loads(f.read_text())


def _remove_spill(manifest: Path) -> None:
    try:
        doc = json.loads(manifest.read_text())
        manifest.unlink(missing_ok=True)  # the commit point goes first
        manifest.with_name(doc["file"]).unlink(missing_ok=True)
    except (OSError, ValueError):
        manifest.unlink(missing_ok=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
