"""Where assembled stacks keep their pixels: process memory or shared memory.

A :class:`~fiji_bridge.hyperstack.StackStore` asks its ``memory`` for zeroed
storage whenever a stack is created or grows, and hands the old storage back
with :meth:`free`. :class:`~fiji_bridge.hyperstack.HeapMemory` is plain numpy. :class:`SharedStackMemory`
puts each stack's storage in a POSIX shared-memory segment owned by the
bridge (``fjbs_<bridge pid>_st<n>``), so the engine worker maps the very
memory the planes were assembled in and copies each plane once, straight into
ImageJ's Java arrays; nothing is staged in between. The stacks stay in the
bridge process: a worker that dies takes none of them along.

A segment is unlinked when its storage is freed, except while a worker job
that names it is in flight (:meth:`pin` / :meth:`unpin`): a worker that has
not mapped it yet must still find it. A segment that cannot be reserved (a
full or small /dev/shm) falls back to process memory; such a stack is shown
through a staging copy as before. All segments go when the bridge closes the
memory (and are reaped by the worker, or the next bridge, if it dies).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, Optional

import numpy as np

from .hyperstack import HeapMemory
from .supervisor import SERVER_PREFIX, SharedArray

try:
    import _posixshmem  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

__all__ = ["SharedStackMemory"]

log = logging.getLogger(__name__)


class SharedStackMemory(HeapMemory):
    """Stack storage in shared-memory segments the engine worker can map."""

    def __init__(self) -> None:
        self._segments: dict[int, SharedArray] = {}  # id(storage array) -> its segment
        self._pins: dict[str, int] = {}  # segment name -> jobs in flight naming it
        self._retired: dict[str, SharedArray] = {}  # freed but pinned: unlinked at the last unpin
        self._names = itertools.count()
        self._warned = False
        self._lock = threading.Lock()  # stacks may grow on another thread (the OpenHCS receiver)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        try:
            seg = SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_st{next(self._names)}", shape, dtype, reserve=True)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("stack of %d bytes kept in process memory, not shared memory (%s): "
                            "its live window gets a staging copy", nbytes, e)
            return np.zeros(shape, dtype=dtype)
        with self._lock:
            self._segments[id(seg.array)] = seg
        return seg.array

    def grow(self, array: np.ndarray, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """``array``'s storage grown in place to ``shape`` when only its first
        axis (T) grows: the segment is extended and mapped anew, the planes
        already in it stay where they are (nothing is copied) and the new
        ones read zero. None when that is not possible (then: zeros + copy)."""
        with self._lock:
            seg = self._segments.get(id(array))
        if seg is None or tuple(shape[1:]) != seg.shape[1:] or shape[0] < seg.shape[0]:
            return None
        itemsize = seg.dtype.itemsize
        old_bytes, new_bytes = seg.nbytes, int(np.prod(shape, dtype=np.int64)) * itemsize
        try:
            fd = _posixshmem.shm_open("/" + seg.name, os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, new_bytes)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, old_bytes, new_bytes - old_bytes)
            finally:
                os.close(fd)
            grown = SharedArray(seg.name, shape, seg.dtype, create=False)
        except OSError as e:
            log.warning("stack segment %s could not grow in place (%s): copying it", seg.name, e)
            return None
        with self._lock:
            self._segments.pop(id(array), None)
            self._segments[id(grown.array)] = grown
        seg.close()  # the old mapping goes with its last view; the segment stays
        return grown.array

    def free(self, array: np.ndarray) -> None:
        with self._lock:
            seg = self._segments.pop(id(array), None)
            if seg is None:
                return
            if self._pins.get(seg.name):
                self._retired[seg.name] = seg
                return
        seg.unlink()

    def desc(self, array: np.ndarray) -> Optional[dict]:
        with self._lock:
            seg = self._segments.get(id(array))
        return seg.desc() if seg is not None else None

    def pin(self, name: str) -> None:
        """A job naming segment ``name`` was sent: keep the name until :meth:`unpin`."""
        with self._lock:
            self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        with self._lock:
            n = self._pins.get(name, 0) - 1
            if n > 0:
                self._pins[name] = n
                return
            self._pins.pop(name, None)
            seg = self._retired.pop(name, None)
        if seg is not None:
            seg.unlink()

    @property
    def segments(self) -> list[str]:
        """Names of the segments that exist (live and retired)."""
        with self._lock:
            return [s.name for s in self._segments.values()] + list(self._retired)

    def close(self) -> None:
        with self._lock:
            segs = list(self._segments.values()) + list(self._retired.values())
            self._segments.clear()
            self._retired.clear()
            self._pins.clear()
        for seg in segs:
            seg.unlink()
