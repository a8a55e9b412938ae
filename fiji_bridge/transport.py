"""Plane payloads between processes: shared memory (same host) and inline bytes.

Shared memory, the rules both sides follow:

* The **producer owns its segments**. A :class:`ShmRing` holds a few reusable
  segments per stream; :meth:`ShmRing.put` copies an array into a free one
  and returns its name, which travels in the message header together with
  the shape and dtype. (A ring may also use warm segments the bridge lent,
  :class:`LeasedSegment`: those are the bridge's, see
  :mod:`fiji_bridge.ring_leases`; the producer only maps them.)
* The **consumer** (the bridge) calls :func:`read_shm`: it opens the segment
  read-only (refusing anything but a regular file of its own user: FIFOs,
  links, other accounts' segments), copies the pixels out once with
  ``preadv`` (a segment the producer shrinks meanwhile is a short read and
  an error, never SIGBUS), closes it and *never unlinks*. Then it
  acknowledges, and the producer calls :meth:`ShmRing.release` so the slot
  can be reused.
* Nothing is left in ``/dev/shm``: the producer unlinks every segment on
  :meth:`ShmRing.close`, at interpreter exit, and, when it is killed (even by
  SIGKILL), Python's resource tracker of the producer unlinks what it
  registered. The consumer holds no segment beyond one ``read_shm`` call, so a
  killed consumer leaks nothing. :func:`reap_orphans` is the safety net for
  the remaining cases (a producer whose resource tracker died with it, or a
  producer that is a ``multiprocessing`` child sharing its parent's tracker):
  it unlinks ``fjb_<pid>_*`` segments whose process is gone, and only its
  own user's (``/dev/shm`` is shared by every account).

Python's resource tracker and the consumer: on Python < 3.13,
``SharedMemory(name)`` registers even a segment it merely *attaches*, so the
consumer's tracker would unlink the producer's segment when the consumer
exits (or, when both share one tracker, unregistering would untrack the
producer's segment). :func:`read_shm` therefore never goes through
``SharedMemory`` on POSIX: it opens the segment read-only with ``shm_open``
and reads its descriptor, so the tracker never hears of it and there is
nothing to unregister.

Segment names are ``fjb_<pid>_<stream>_<slot>_<generation>``, at most 30
characters (macOS allows 31 including the leading slash) for pids up to seven
digits.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Optional, Sequence, Union

import numpy as np

try:  # POSIX shared memory primitives (what SharedMemory itself uses)
    import _posixshmem  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

__all__ = [
    "MAX_NAME_LEN",
    "MAX_PAYLOAD_BYTES",
    "SHM_PREFIX",
    "LeasedSegment",
    "ShmPlane",
    "ShmRing",
    "TransportError",
    "check_dtype",
    "check_shape",
    "payload_nbytes",
    "read_inline",
    "open_segment",
    "owned_segment",
    "read_shm",
    "reap_orphans",
    "SegmentTooShort",
]

log = logging.getLogger(__name__)

#: every segment fiji-bridge creates starts with ``<SHM_PREFIX>_<pid>_``
SHM_PREFIX = "fjb"

#: largest payload accepted in one message (checked before allocating)
MAX_PAYLOAD_BYTES = 4 << 30

#: the longest shared-memory name that works on macOS (31 with the slash)
MAX_NAME_LEN = 30

_SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^/?[A-Za-z0-9_.\-]{1,250}$")
_NUMERIC_KINDS = frozenset("uifc")


class TransportError(ValueError):
    """A payload cannot be read or written: missing segment, size mismatch,
    unsupported dtype or shape."""


# --------------------------------------------------------------------------
# validation shared by both transports


def check_dtype(dtype: Union[str, np.dtype]) -> np.dtype:
    """Parse a dtype name strictly; only plain numeric dtypes are accepted.

    ``"uint16"``, ``"<u2"``, ``">f4"`` and ``np.dtype("int32")`` are fine;
    object, string, bytes, void/structured, datetime and sub-array dtypes are
    refused with :class:`TransportError`.
    """
    if isinstance(dtype, np.dtype):
        dt = dtype
    elif isinstance(dtype, str) and 0 < len(dtype) <= 32:
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError) as exc:
            raise TransportError(f"unknown dtype {dtype!r}: {exc}") from None
    elif isinstance(dtype, type) and issubclass(dtype, np.generic):
        dt = np.dtype(dtype)
    else:
        raise TransportError(
            f"dtype must be a numpy dtype name such as 'uint16', got {dtype!r}"
        )
    if dt.kind not in _NUMERIC_KINDS or dt.subdtype is not None or dt.fields:
        raise TransportError(
            f"dtype {dtype!r} is not a plain numeric dtype "
            "(use e.g. uint8, uint16, int32, float32, float64)"
        )
    return dt


def check_shape(shape: Sequence[int], max_ndim: int = 32) -> tuple[int, ...]:
    """A shape is a non-empty sequence of positive ints (bools refused)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)):
        raise TransportError(f"shape must be a list of positive integers, got {shape!r}")
    if not 1 <= len(shape) <= max_ndim:
        raise TransportError(f"shape must have 1..{max_ndim} dimensions, got {shape!r}")
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise TransportError(
                f"shape entries must be positive integers, got {shape!r}"
            )
        out.append(int(n))
    return tuple(out)


def payload_nbytes(shape: Sequence[int], dtype: Union[str, np.dtype]) -> int:
    """Validate ``shape`` and ``dtype`` and return the payload size in bytes;
    refuse payloads over :data:`MAX_PAYLOAD_BYTES` before anything is allocated."""
    shp, dt = check_shape(shape), check_dtype(dtype)
    nbytes = math.prod(shp) * dt.itemsize
    if nbytes > MAX_PAYLOAD_BYTES:
        raise TransportError(
            f"payload of shape {shp} {dt.name} is {nbytes / 2**30:.1f} GiB, over the "
            f"{MAX_PAYLOAD_BYTES / 2**30:.0f} GiB limit of one message: send it in planes"
        )
    return nbytes


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.strip("/.") == "" or "/" in name.lstrip("/"):
        raise TransportError(
            f"bad shared-memory name {name!r}: expected letters, digits, '_', '.', '-'"
        )
    return name.lstrip("/")


# --------------------------------------------------------------------------
# consumer side


def read_inline(
    payload: Union[bytes, bytearray, memoryview],
    shape: Sequence[int],
    dtype: Union[str, np.dtype],
    *,
    copy: bool = False,
) -> np.ndarray:
    """An array over the bytes of an inline payload, after checking its size.

    Zero-copy by default: the result is a view sharing memory with
    ``payload`` (read-only when ``payload`` is ``bytes`` or a zmq frame), so it
    stays valid as long as the caller keeps it; pass ``copy=True`` for an
    independent, writable array. Any object with the buffer protocol works
    (``bytes``, ``memoryview``, ``zmq.Frame``).
    """
    nbytes = payload_nbytes(shape, dtype)
    try:
        view = memoryview(payload)
    except TypeError:
        raise TransportError(
            f"inline payload must be bytes-like, got {type(payload).__name__}"
        ) from None
    if not view.contiguous:
        raise TransportError("inline payload must be a contiguous buffer")
    if view.nbytes != nbytes:
        raise TransportError(
            f"inline payload has {view.nbytes} bytes but shape {tuple(shape)} of "
            f"{check_dtype(dtype).name} needs {nbytes}"
        )
    arr = np.frombuffer(view.cast("B"), dtype=check_dtype(dtype)).reshape(tuple(shape))
    return arr.copy() if copy else arr


class SegmentTooShort(TransportError):
    """The segment is smaller than the shape and dtype the message announced."""


def open_segment(name: str, writable: bool = False) -> tuple[int, int]:
    """Open a producer's segment read-only for copying (``writable``: read/write,
    for a producer mapping a segment the bridge lent it); ``(fd, size)``.

    ``/dev/shm`` is writable by every local account, so a name is only
    trusted once the file behind it is what it claims: the open never
    blocks (``O_NONBLOCK``: a FIFO would otherwise hang the caller until
    someone writes to it) and never follows a symbolic link (glibc's
    ``shm_open`` adds ``O_NOFOLLOW``), and :func:`os.fstat` must show a
    regular file owned by this process's user (another account's segment
    is refused, not read). The caller closes ``fd``.
    """
    shm_name = _check_name(name)
    try:
        fd = _posixshmem.shm_open("/" + shm_name, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK, 0o600)
    except FileNotFoundError:
        raise TransportError(
            f"shared-memory segment {shm_name!r} does not exist "
            "(the producer closed it or died before the bridge read it)"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot open shared-memory segment {shm_name!r}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransportError(f"{shm_name!r} is not a shared-memory segment (not a regular file)")
        if st.st_uid != os.geteuid():
            raise TransportError(
                f"shared-memory segment {shm_name!r} belongs to uid {st.st_uid}, not to the bridge's "
                f"user (uid {os.geteuid()}): the bridge reads only its own user's segments"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_shm(
    name: str,
    shape: Sequence[int],
    dtype: Union[str, np.dtype],
    offset: int = 0,
    *,
    into: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Copy an array out of a producer's shared-memory segment.

    Opens the segment with :func:`open_segment`'s checks and copies
    ``prod(shape) * itemsize`` bytes from ``offset`` with ``preadv`` on its
    descriptor, never through a mapping: a producer that shrinks the segment
    meanwhile (``ftruncate``) causes a short read, reported as
    :class:`TransportError`, where reading a mapping would kill the reader
    with SIGBUS. ``into``: a C-contiguous array of that many bytes to fill
    (reused scratch space); else a new array is returned. Never unlinks and
    never registers the segment with the resource tracker.

    Raises :class:`TransportError` for a bad name, a missing, foreign or
    non-regular segment, a segment shorter than announced
    (:class:`SegmentTooShort`) or shrunk while read, a bad shape/dtype/offset.
    """
    if _posixshmem is None:  # pragma: no cover - Windows: no tracker involved
        dt, shp = check_dtype(dtype), check_shape(shape)
        return _read_shm_windows(_check_name(name), shp, dt, _check_offset(offset), payload_nbytes(shp, dt))
    seg = ShmPlane.open(name, shape, dtype, offset)
    try:
        if into is not None and into.nbytes == seg.nbytes and into.flags.c_contiguous and into.flags.writeable:
            out = into.view(seg.dtype).reshape(seg.shape)
        else:
            out = np.empty(seg.shape, dtype=seg.dtype)
        seg.read_into(out)
        return out
    finally:
        seg.close()


def _check_offset(offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not 0 <= offset <= MAX_PAYLOAD_BYTES:
        raise TransportError(f"offset must be a non-negative integer, got {offset!r}")
    return int(offset)


#: bytes read per ``preadv`` when the range is taken on the way (fits the L2 cache)
RANGE_CHUNK = 512 << 10


class ShmPlane:
    """An array in a producer's segment, opened and checked (:meth:`open`:
    every check of :func:`read_shm`, nothing read yet) and then copied with
    ``preadv`` (:meth:`read_into`): a caller can let every refusal happen
    before it hands over the place the plane goes to."""

    def __init__(self, fd: int, name: str, shape: tuple, dtype: np.dtype, offset: int) -> None:
        self.fd, self.name, self.shape, self.dtype, self.offset = fd, name, shape, dtype, offset
        self.nbytes = payload_nbytes(shape, dtype)

    @classmethod
    def open(cls, name: str, shape: Sequence[int], dtype: Union[str, np.dtype], offset: int = 0) -> "ShmPlane":
        dt = check_dtype(dtype)
        shp = check_shape(shape)
        nbytes = payload_nbytes(shp, dt)
        offset = _check_offset(offset)
        fd, size = open_segment(name)
        if offset + nbytes > size:
            os.close(fd)
            raise SegmentTooShort(
                f"shared-memory segment {name!r} has {size} bytes, too short for "
                f"shape {shp} of {dt.name} ({nbytes} bytes) at offset {offset}"
            )
        return cls(fd, name, shp, dt, offset)

    def read_into(self, out: np.ndarray, with_range: bool = False) -> Optional[tuple[float, float]]:
        """Copy the array into ``out`` (C-contiguous, ``nbytes``). Raises
        :class:`TransportError` when the segment shrank meanwhile (``out``
        then holds part of the plane). ``with_range`` (integer pixels): read
        in cache-sized chunks and return the (min, max) of the pixels, taken
        from each chunk while it is still in the cache (~1.4x cheaper than a
        pass of its own over memory); else None."""
        flat = out.reshape(-1)
        view = memoryview(flat.view(np.uint8))
        if view.nbytes != self.nbytes:
            raise TransportError(f"{self.nbytes} bytes to read into a buffer of {view.nbytes}")
        ranged = with_range and out.dtype.kind in "ui" and out.size > 0
        chunk = RANGE_CHUNK if ranged else self.nbytes
        item = out.dtype.itemsize
        lo, hi, seen, done = None, None, 0, 0  # seen: elements already in the range
        while done < self.nbytes:
            n = os.preadv(self.fd, [view[done : done + chunk]], self.offset + done)
            if n <= 0:
                raise TransportError(
                    f"shared-memory segment {self.name!r} shrank to {self.offset + done} bytes while the bridge "
                    f"read it (the producer truncated it): plane refused"
                )
            done += n
            if ranged and done // item > seen:
                part = flat[seen : done // item]
                a, b = part.min(), part.max()
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
                seen = done // item
        return (float(lo), float(hi)) if ranged and lo is not None else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_shm_windows(name, shp, dt, offset, nbytes):  # pragma: no cover
    try:
        seg = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        raise TransportError(f"shared-memory segment {name!r} does not exist") from None
    try:
        if offset + nbytes > seg.size:
            raise TransportError(
                f"shared-memory segment {name!r} has {seg.size} bytes, too short for "
                f"shape {shp} of {dt.name} at offset {offset}"
            )
        src = np.frombuffer(seg.buf, dtype=dt, count=math.prod(shp), offset=offset)
        out = src.reshape(shp).copy()
        del src
        return out
    finally:
        seg.close()


# --------------------------------------------------------------------------
# producer side


class LeasedSegment:
    """A segment the consumer lent this producer (:mod:`fiji_bridge.ring_leases`),
    mapped read/write with its page tables filled: used as a slot like one
    of ours, except that it is never unlinked (its owner does that) and
    never goes through Python's resource tracker (which would unlink it)."""

    def __init__(self, name: str) -> None:
        if _posixshmem is None:  # pragma: no cover - Windows
            raise OSError("no POSIX shared memory here")
        self.name = _check_name(name)
        fd, self.size = open_segment(self.name, writable=True)  # a regular file of this user, or TransportError
        try:
            if self.size <= 0:
                raise TransportError(f"lent segment {self.name!r} is empty")
            self._mm = _map_populated(fd, self.size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mm)

    def close(self) -> None:
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:  # a view is still alive; the mapping dies with it
            pass

    def unlink(self) -> None:
        """Never: the segment is its lender's."""


def _map_populated(fd: int, nbytes: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    try:
        return mmap.mmap(fd, nbytes, flags=flags)
    except OSError:  # pragma: no cover - MAP_POPULATE refused
        return mmap.mmap(fd, nbytes)


@dataclass
class _Slot:
    index: int
    shm: Any = None  # SharedMemory (ours) or LeasedSegment (lent)
    generation: int = -1
    busy: bool = False

    @property
    def name(self) -> Optional[str]:
        return self.shm.name.lstrip("/") if self.shm is not None else None

    @property
    def size(self) -> int:
        return self.shm.size if self.shm is not None else 0

    def drop(self) -> None:
        """Close and unlink this slot's segment (idempotent)."""
        shm, self.shm = self.shm, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:  # a view is still alive; the mapping dies with it
            pass
        try:
            shm.unlink()  # also unregisters it from the resource tracker
        except FileNotFoundError:
            pass


def _unlink_slots(slots: list[_Slot], owner_pid: int) -> None:
    # a forked child inherits the ring object but does not own the segments
    if os.getpid() != owner_pid:
        return
    for slot in slots:
        slot.drop()


def _stream_token(stream: Optional[str]) -> str:
    """A short, underscore-free token naming the stream inside segment names."""
    if stream is None:
        return secrets.token_hex(3)
    clean = re.sub(r"[^A-Za-z0-9]", "", str(stream))
    if clean and len(clean) <= 8 and clean == str(stream):
        return clean
    digest = hashlib.blake2b(str(stream).encode(), digest_size=3).hexdigest()
    return (clean[:2] + digest) if clean else digest


class ShmRing:
    """Producer side: ``slots`` reusable shared-memory segments for one stream.

    ``put`` copies an array into a free slot (creating it on first use, and
    re-creating it under a new generation when the array is larger than the
    slot) and returns the segment name; the slot stays *in flight* until
    ``release(name)`` is called with the consumer's acknowledgement. When every
    slot is in flight ``put`` blocks (``timeout`` seconds, then ``None``) and
    ``try_put`` returns ``None`` at once (live mode: drop the plane).

    ``leased``: names of warm segments the consumer lent for this ring
    (:mod:`fiji_bridge.ring_leases`); the first slots use them (a plane
    larger than one is put in a segment of our own instead), the rest are
    created on first use. A name that cannot be mapped is skipped.

    Thread-safe. Our segments are unlinked by ``close()`` (idempotent), at
    interpreter exit, and by the resource tracker if the process is killed;
    lent ones are only unmapped. Usable as a context manager.
    """

    def __init__(
        self, slots: int = 8, slot_bytes: int = 8 << 20, stream: Optional[str] = None, leased: Sequence[str] = ()
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 999:
            raise ValueError(f"slots must be an integer in 1..999, got {slots!r}")
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
            raise ValueError(f"slot_bytes must be a positive integer, got {slot_bytes!r}")
        self.slot_bytes = min(slot_bytes, MAX_PAYLOAD_BYTES)
        self.stream = _stream_token(stream)
        self._pid = os.getpid()
        self._slots = [_Slot(i) for i in range(slots)]
        self._by_name: dict[str, _Slot] = {}
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._finalizer = weakref.finalize(self, _unlink_slots, self._slots, self._pid)
        self.leased = 0  # slots in lent segments
        for name in leased:
            if self.leased == slots:
                break
            try:
                seg = LeasedSegment(name)
            except (OSError, TransportError) as e:
                log.debug("lent segment %r not used: %s", name, e)
                continue
            slot = self._slots[self.leased]
            slot.shm, slot.generation = seg, 0
            self._by_name[seg.name] = slot
            self.leased += 1

    # -- public API ---------------------------------------------------------

    def put(self, array: np.ndarray, timeout: Optional[float] = None) -> Optional[str]:
        """Copy ``array`` into a free slot and return the segment name.

        Blocks while every slot is in flight; ``timeout`` (seconds, ``None`` =
        forever) bounds the wait, after which ``None`` is returned.
        """
        arr = np.asarray(array)
        dt = check_dtype(arr.dtype)
        if arr.ndim == 0 or arr.size == 0:
            raise TransportError(f"cannot send an empty or 0-d array (shape {arr.shape})")
        if arr.nbytes > MAX_PAYLOAD_BYTES:
            raise TransportError(
                f"array of {arr.nbytes / 2**30:.1f} GiB is over the "
                f"{MAX_PAYLOAD_BYTES / 2**30:.0f} GiB limit of one message: send it in planes"
            )
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                self._check_open()
                slot = self._pick(arr.nbytes)
                if slot is not None:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if slot.size < arr.nbytes:
                self._recreate(slot, max(arr.nbytes, self.slot_bytes))
            slot.busy = True
            shm = slot.shm
        # copy outside the lock: other threads may use other slots meanwhile
        try:
            dst = np.ndarray(arr.shape, dtype=dt, buffer=shm.buf)
            np.copyto(dst, arr, casting="no")
            del dst
        except BaseException:
            self.release(slot.name)
            raise
        return slot.name

    def try_put(self, array: np.ndarray) -> Optional[str]:
        """Non-blocking ``put``: ``None`` when every slot is in flight."""
        return self.put(array, timeout=0)

    def release(self, name: str) -> None:
        """The consumer acknowledged ``name``: its slot may be reused.

        Unknown names and repeated releases are ignored (a duplicated or late
        ack, e.g. for a segment replaced since), so acks are idempotent.
        """
        with self._cond:
            slot = self._by_name.get(str(name).lstrip("/"))
            if slot is None or not slot.busy:
                log.debug("release of %r ignored (unknown or not in flight)", name)
                return
            slot.busy = False
            self._cond.notify()

    def release_all(self) -> None:
        """Mark every slot free (e.g. after the consumer restarted)."""
        with self._cond:
            for slot in self._slots:
                slot.busy = False
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Number of slots written and not yet acknowledged."""
        with self._cond:
            return sum(s.busy for s in self._slots)

    @property
    def names(self) -> list[str]:
        """Names of the segments that currently exist."""
        with self._cond:
            return [s.name for s in self._slots if s.shm is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unlink every segment. Idempotent; later ``put`` calls raise."""
        with self._cond:
            self._closed = True
            self._by_name.clear()
            self._finalizer()
            self._cond.notify_all()

    def __enter__(self) -> "ShmRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShmRing(stream={self.stream!r}, slots={len(self._slots)}, "
            f"in_flight={self.in_flight}, closed={self._closed})"
        )

    # -- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("this ShmRing is closed")

    def _pick(self, nbytes: int) -> Optional[_Slot]:
        """A free slot: one big enough, else an existing too-small one, else a new one."""
        free = [s for s in self._slots if not s.busy]
        if not free:
            return None
        for s in free:
            if s.shm is not None and s.size >= nbytes:
                return s
        for s in free:
            if s.shm is not None:
                return s
        return free[0]

    def _recreate(self, slot: _Slot, size: int) -> None:
        if slot.name is not None:
            self._by_name.pop(slot.name, None)
        slot.drop()
        while True:
            slot.generation += 1
            name = f"{SHM_PREFIX}_{self._pid}_{self.stream}_{slot.index}_{slot.generation}"
            try:
                slot.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
                break
            except FileExistsError:  # a name clash (same stream name, reused pid)
                continue
        self._by_name[slot.name] = slot


# --------------------------------------------------------------------------
# safety net


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owned_segment(name: str) -> bool:
    """Whether ``/dev/shm/<name>`` is a regular file of this process's user
    (not a link, FIFO or folder, not another account's): the only kind a
    reaper may unlink."""
    try:
        st = os.lstat(os.path.join(_SHM_DIR, name))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def reap_orphans(prefix: str = SHM_PREFIX) -> list[str]:
    """Unlink ``/dev/shm/<prefix>_<pid>_*`` segments whose process is dead.

    Returns the names removed. Linux only (elsewhere the segments cannot be
    listed; returns ``[]``). A pid reused by another process keeps its
    segments alive until that process ends too: the reaper errs on the side
    of never touching a live producer's memory. Only meaningful among
    processes that share one pid namespace and one ``/dev/shm``.
    """
    if _posixshmem is None or not os.path.isdir(_SHM_DIR):
        return []
    if not re.fullmatch(r"[A-Za-z0-9]+", prefix):
        raise ValueError(f"bad prefix {prefix!r}: letters and digits only")
    pattern = re.compile(rf"^{prefix}_(\d+)_")
    removed = []
    alive: dict[int, bool] = {}
    try:
        entries = os.listdir(_SHM_DIR)
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry)
        if not m:
            continue
        if not owned_segment(entry):
            continue  # another account's (or not a segment at all): never ours to remove
        pid = int(m.group(1))
        if pid not in alive:
            alive[pid] = pid == os.getpid() or _pid_alive(pid)
        if alive[pid]:
            continue
        try:
            _posixshmem.shm_unlink("/" + entry)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not unlink orphaned segment %s: %s", entry, exc)
            continue
        removed.append(entry)
    if removed:
        log.info("reaped %d orphaned shared-memory segments: %s", len(removed), removed)
    return removed
