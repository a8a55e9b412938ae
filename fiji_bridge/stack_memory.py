"""Where assembled stacks keep their pixels: shared memory the engine worker maps.

A :class:`~fiji_bridge.hyperstack.StackStore` asks its ``memory`` for
storage whenever a stack is created or outgrows what it has, and gives it
back with :meth:`free`. :class:`~fiji_bridge.hyperstack.HeapMemory` is plain
numpy. :class:`SharedStackMemory` puts each stack's storage in a POSIX
shared-memory segment owned by the bridge (``fjbs_<bridge pid>_st<n>``), so
the engine worker maps the very memory the planes were assembled in and
copies each plane once, straight into ImageJ's Java arrays; nothing is
staged in between. The stacks stay in the bridge process: a worker that dies
takes none of them along.

Memory is recycled, never given back while it may be needed again: on this
kind of machine a page touched for the first time costs 10-30x a page written
again (0.2-1 GB/s against 5-7 GB/s; the kernel zeroes it, a virtual machine's
host may have to back it), so a freed segment goes to a pool, keeps its
pages and its mappings (the bridge's and the worker's), and the next stack
takes it. A stack grows inside its segment while it fits: along T nothing
moves, along Z or C its planes are moved in place. A recycled segment holds
the old stack's pixels; the stack zeroes a missing plane when it is read,
never the whole segment up front. :meth:`SharedStackMemory.warm` touches a
segment at start-up, so even a fresh bridge's first stack finds warm memory.

A segment a worker job names is pinned (:meth:`pin` / :meth:`unpin`) until
the job is done: it is neither reused nor unlinked while the worker may read
it (a stack re-laid out meanwhile has those planes copied again). Nor is a segment reused while an array of the bridge
still views it (a queued macro's input). Segments the pool cannot keep are
unlinked; :meth:`released` tells the worker which mappings to drop. A segment
that cannot be reserved (a full or small /dev/shm) falls back to process
memory; such a stack is shown through a staging copy. All segments go when
the bridge closes the memory (and are reaped by the worker, or the next
bridge, if it dies).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

from .hyperstack import HeapMemory
from .supervisor import SERVER_PREFIX, SharedArray

__all__ = ["SharedStackMemory", "POOL_BYTES", "WARM_BYTES", "warm_bytes"]

log = logging.getLogger(__name__)

#: segment numbers, one sequence per process (two memories never clash)
_NAMES = itertools.count()
#: most bytes of freed segments kept for reuse (besides the largest one)
POOL_BYTES = 2 << 30
#: warm memory a bridge with a live display prepares at start-up, in its
#: stack memory and in the engine's JVM heap (FIJI_BRIDGE_WARM: "1g", "256m", "0")
WARM_BYTES = 1 << 30


def parse_size(raw: str, name: str) -> int:
    """Bytes from ``raw``: a number with an optional k/m/g/t suffix (the
    JVM's own spelling: ``4g``, ``512m``); ValueError naming ``name`` else."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = raw.strip().lower()
    try:
        return int(float(raw[:-1]) * units[raw[-1]]) if raw and raw[-1] in units else int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a size such as 1g, 256m or 0") from None


def warm_bytes(env: Optional[dict] = None) -> int:
    """The warm-up size: FIJI_BRIDGE_WARM (bytes, or with a k/m/g suffix;
    0 = none), default :data:`WARM_BYTES`, at most 1/8 of the RAM."""
    raw = ((env if env is not None else os.environ).get("FIJI_BRIDGE_WARM") or "").strip()
    n = parse_size(raw, "FIJI_BRIDGE_WARM") if raw else WARM_BYTES
    try:
        n = min(n, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    return max(0, n)


class SharedStackMemory(HeapMemory):
    """Stack storage in shared-memory segments the engine worker can map,
    recycled through a pool of at most ``pool_bytes``."""

    def __init__(self, pool_bytes: int = POOL_BYTES) -> None:
        self.pool_bytes = int(pool_bytes)
        self._live: dict[int, SharedArray] = {}  # id(storage array) -> its segment
        self._pool: list[SharedArray] = []  # free segments, pages and mappings kept
        self._pins: dict[str, int] = {}  # segment name -> worker jobs in flight naming it
        self._retired: dict[str, SharedArray] = {}  # freed while pinned: pooled at the last unpin
        self._released: list[str] = []  # unlinked since the worker last heard
        self._warned = False
        self._lock = threading.Lock()  # stacks may grow on another thread (the OpenHCS receiver)

    # -- the HeapMemory interface ------------------------------------------------

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, bool]:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype), True
        with self._lock:
            seg = self._take(nbytes)
        zeroed = seg is None
        if seg is None:
            try:
                seg = SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_st{next(_NAMES)}", (nbytes,), np.uint8)
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.warning("stack of %d bytes kept in process memory, not shared memory (%s): "
                                "its live window gets a staging copy", nbytes, e)
                return np.zeros(shape, dtype=dtype), True
        arr = seg.view(tuple(shape), dtype)
        with self._lock:
            self._live[id(arr)] = seg
        return arr, zeroed

    def grow(self, array: np.ndarray, cap: tuple[int, int, int], new_cap: tuple[int, int, int]) -> Optional[np.ndarray]:
        """``array``'s storage re-laid out as ``new_cap`` inside its own
        segment when it fits: growing T moves nothing (the old planes keep
        their place; views of them stay valid), growing Z or C moves every
        plane to its new place, last first (never while another array of
        this process views them; a worker job reading them meanwhile may
        copy garbage, so the stack counts the move in
        :attr:`~fiji_bridge.hyperstack.Hyperstack.moves` and the display
        copies those planes again). None when it does not fit (then:
        allocate + copy)."""
        with self._lock:
            seg = self._live.get(id(array))
            if seg is None:
                return None
            yx, dtype = array.shape[3:], array.dtype
            plane = int(np.prod(yx, dtype=np.int64)) * dtype.itemsize
            if int(np.prod(new_cap, dtype=np.int64)) * plane > seg.nbytes:
                return None
            moves = tuple(cap[1:]) != tuple(new_cap[1:])
            if moves and sys.getrefcount(array) > _OWN_REFS:
                return None  # an array of ours views the planes where they are
            if moves:
                _relayout(seg.address, plane, cap, new_cap)
            grown = seg.view(tuple(new_cap) + tuple(yx), dtype)
            del self._live[id(array)]
            self._live[id(grown)] = seg
        return grown

    def free(self, array: np.ndarray) -> None:
        with self._lock:
            seg = self._live.pop(id(array), None)
            if seg is None:
                return
            if self._pins.get(seg.name):
                self._retired[seg.name] = seg
                return
            self._give(seg)

    def desc(self, array: np.ndarray) -> Optional[dict]:
        with self._lock:
            seg = self._live.get(id(array))
        if seg is None:
            return None
        d = seg.desc()
        d["shape"], d["dtype"] = list(array.shape), array.dtype.name
        return d

    def close(self) -> None:
        with self._lock:
            segs = list(self._live.values()) + list(self._retired.values()) + self._pool
            self._live.clear()
            self._retired.clear()
            self._pool = []
            self._pins.clear()
        for seg in segs:
            seg.unlink()

    # -- the worker's side ---------------------------------------------------------

    def pin(self, name: str) -> None:
        """A job naming segment ``name`` was sent: keep it as it is until :meth:`unpin`."""
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
                self._give(seg)

    def released(self) -> list[str]:
        """Names of the segments unlinked since the last call: the worker
        drops its mappings of them."""
        with self._lock:
            out, self._released = self._released, []
        return out

    def warm(self, nbytes: int) -> float:
        """Put a segment of ``nbytes`` with every page touched into the pool
        (start-up: the first stack then finds warm memory). Returns the
        seconds it took."""
        t0 = time.perf_counter()
        if nbytes <= 0:
            return 0.0
        try:
            seg = SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_st{next(_NAMES)}", (int(nbytes),), np.uint8)
        except OSError as e:
            log.warning("no warm stack memory (%s)", e)
            return 0.0
        seg.array = None  # type: ignore[assignment]  # idle: the first stack takes it
        with self._lock:
            self._pool.append(seg)  # kept whatever the pool's size (the largest always is)
        return time.perf_counter() - t0

    def pooled_descs(self) -> list[dict]:
        """Descriptors of the pooled segments, for the worker to map ahead
        (it maps a segment whole, whatever the descriptor's shape)."""
        with self._lock:
            return [{"shm": s.name, "shape": [1], "dtype": "uint8"} for s in self._pool]

    @property
    def segments(self) -> list[str]:
        """Names of the segments that exist (live, retired and pooled)."""
        with self._lock:
            return [s.name for s in self._live.values()] + list(self._retired) + [s.name for s in self._pool]

    @property
    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._pool)

    # -- internals (under the lock) ------------------------------------------------------

    def _take(self, nbytes: int) -> Optional[SharedArray]:
        """The smallest pooled segment of at least ``nbytes`` that no array
        of this process views any more, or None."""
        fits = [s for s in self._pool if s.nbytes >= nbytes and s.idle()]
        if not fits:
            return None
        seg = min(fits, key=lambda s: s.nbytes)
        self._pool.remove(seg)
        return seg

    def _give(self, seg: SharedArray) -> None:
        """Pool a freed segment; unlink the oldest ones beyond ``pool_bytes``
        (the largest segment is always kept)."""
        seg.array = None  # type: ignore[assignment]  # our own view goes; others keep it busy
        self._pool.append(seg)
        biggest = max(self._pool, key=lambda s: s.nbytes)
        while sum(s.nbytes for s in self._pool) > max(self.pool_bytes, biggest.nbytes):
            old = next(s for s in self._pool if s is not biggest)
            self._pool.remove(old)
            self._released.append(old.name)
            old.unlink()


#: references to a storage array while the store grows it (the stack's
#: attribute, the caller's argument, ours, getrefcount's own): more = views
_OWN_REFS = 4


def _relayout(address: int, plane: int, cap: tuple[int, int, int], new_cap: tuple[int, int, int]) -> None:
    """Move the planes of a (T, Z, C) = ``cap`` layout at ``address`` to
    their places in ``new_cap`` (no axis smaller), in place: a plane's new
    offset is never below its old one, so moving the last plane first never
    overwrites one not yet moved (memmove copes with a plane overlapping
    its own old place)."""
    T, Z, C = cap
    _, nZ, nC = new_cap
    for t in range(T - 1, -1, -1):
        for z in range(Z - 1, -1, -1):
            for c in range(C - 1, -1, -1):
                src = ((t * Z + z) * C + c) * plane
                dst = ((t * nZ + z) * nC + c) * plane
                if dst != src:
                    ctypes.memmove(address + dst, address + src, plane)
