"""Planes into stacks: the bridge's data path.

:class:`Ingest` takes one data message (``[header, payload]``: a JSON
:class:`~fiji_bridge.protocol.PlaneHeader` and the pixels inline, or the name
of the producer's shared-memory segment), checks it, puts the plane at its
(t, z, c) in the :class:`~fiji_bridge.hyperstack.StackStore`, tells the live
display, and returns the :class:`~fiji_bridge.protocol.Ack` for the sender.
Every refusal is an Ack with an error code, never an exception: the stack
already there is left as it was. It keeps the per-stream statistics, the
stacks' origins (plate, well, site) and the memory cap of new stacks
(:data:`STACK_OVERHEAD` each beyond their pixels).

A producer's segment is read with ``preadv`` on its descriptor, never
mapped (:class:`SegmentReader`): no peer can turn a read into SIGBUS. The
segment is opened and checked first, then read straight into the plane's
place in its stack (no copy in between).

It owns no socket: the bridge's loop (:mod:`fiji_bridge.server`) receives
the messages and sends the acks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .components import ComponentError
from .hyperstack import AxisMapping, PlaneReader, StackError, StackStore
from .live_display import LiveDisplay
from .protocol import Ack, ErrorCode, PlaneHeader, ProtocolError, parse_json
from .transport import SegmentTooShort, ShmPlane, TransportError, read_inline, read_shm

__all__ = ["Ingest", "SegmentReader", "StreamStats", "STACK_OVERHEAD"]

log = logging.getLogger("fiji_bridge.server")

#: bytes a stack costs the bridge beyond its pixels (the stack object, its
#: plane index, names, origin, window state: ~2 KB measured, 20,000 stacks of
#: one 4x4 plane grew the bridge by 38 MB), counted against the memory cap
STACK_OVERHEAD = 4096


@dataclass
class StreamStats:
    planes: int = 0
    bytes: int = 0
    dropped: int = 0  # reported by the producer (live mode)
    rejected: int = 0
    transport: str = ""
    last: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"planes": self.planes, "bytes": self.bytes, "dropped": self.dropped, "rejected": self.rejected, "transport": self.transport, "last": self.last}


class Ingest:
    """The data path of one bridge: planes into ``store``, changes to ``live``."""

    def __init__(self, store: StackStore, live: LiveDisplay) -> None:
        self.store = store
        self.live = live
        self.streams: dict[str, StreamStats] = {}
        self.origins: dict[str, dict] = {}  # stack key -> plate/well/site of its planes
        self.errors = 0
        self.segments = SegmentReader()

    def plane(self, body: list, default_mapping: Optional[AxisMapping] = None, published: bool = False) -> Ack:
        """Put the plane of one data message (``[header, payload]`` frames)
        into its stack; the :class:`~fiji_bridge.protocol.Ack` for its
        sender. ``published``: from a subscription (inline only, nobody
        acknowledges it); ``default_mapping``: the subscription's."""
        stream, seq = "", -1
        stats: Optional[StreamStats] = None
        opened: list = []  # a producer's segment, open until the plane is in
        try:
            if len(body) != 2:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"a plane is 2 frames [header, payload], got {len(body)}")
            head, payload = body[0].bytes, body[1].buffer
            stream, seq = _stream_seq(head)
            h = PlaneHeader.parse(head, payload)
            stream, seq = h.stream, h.seq
            stats = self.stream(h.stream)
            stats.dropped = max(stats.dropped, h.dropped)
            stats.transport = h.transport
            if h.transport == "shm":
                if published:
                    raise ProtocolError(ErrorCode.BAD_FIELD, "published planes must be inline (nobody could acknowledge a shm segment)")
                plane = self.segments.reader(PlaneHeader.shm_name(payload), h.shape, h.dtype, h.offset)
                if isinstance(plane, PlaneReader):
                    opened.append(plane)
            else:
                plane = read_inline(payload, h.shape, h.dtype)
            try:
                mapping = AxisMapping.from_dict(h.mapping) if h.mapping else default_mapping
            except StackError as e:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"mapping: {e}") from None
            self.check_room(h.key if h.key is not None else (mapping or AxisMapping()).window_key(h.components), h.nbytes)
            try:
                key, t, z, c = self.store.add_plane(plane, h.components, key=h.key, mapping=mapping, calibration=h.calibration)
            except (StackError, ComponentError) as e:
                raise ProtocolError(ErrorCode.REJECTED, str(e)) from None
            stats.planes += 1
            stats.bytes += h.nbytes
            stats.last = time.time()
            comps = h.components
            self.origins[key] = {"plate": comps.plate, "well": comps.well, "site": comps.site}
            self.live.mark(key, (t, z, c))
            return Ack(stream, seq, True, key, t, z, c)
        except ProtocolError as e:
            self.errors += 1
            if stats is not None:
                stats.rejected += 1
            return Ack(stream, seq, False, error=e.to_dict())
        except Exception as e:
            self.errors += 1
            log.exception("plane ingest failed")
            return Ack(stream, seq, False, error={"code": ErrorCode.INTERNAL, "message": f"{type(e).__name__}: {e}"})
        finally:
            for p in opened:
                p.close()

    def memory_used(self) -> int:
        """What the stacks cost: their pixels plus :data:`STACK_OVERHEAD` each."""
        return self.store.nbytes + len(self.store) * STACK_OVERHEAD

    def check_room(self, key: str, plane_bytes: int) -> None:
        """Refuse a plane that would open a new stack beyond the memory cap
        (the store itself counts only the pixels of stacks that exist)."""
        if key in self.store:
            return
        need = self.memory_used() + STACK_OVERHEAD + plane_bytes
        if need > self.store.max_bytes:
            raise ProtocolError(
                ErrorCode.REJECTED,
                f"a new stack {key!r} would bring the bridge to {need} bytes ({len(self.store)} stacks, "
                f"{STACK_OVERHEAD} bytes of bookkeeping each plus pixels), over the memory cap of "
                f"{self.store.max_bytes}: close stacks you no longer need (close_stack, clear_state) or raise "
                "the cap (FIJI_BRIDGE_MAX_STACK_BYTES)",
            )

    def stream(self, sid: str) -> StreamStats:
        """The statistics of stream ``sid`` (the 1,000 oldest of over 2,000 are forgotten)."""
        st = self.streams.get(sid)
        if st is None:
            if len(self.streams) > 2000:  # forget the oldest
                for k in sorted(self.streams, key=lambda k: self.streams[k].last)[:1000]:
                    del self.streams[k]
            st = self.streams[sid] = StreamStats()
        return st


class SegmentReader:
    """Copies planes out of producers' shared-memory segments (see
    :func:`~fiji_bridge.transport.read_shm`: descriptor reads, no mapping, so
    no peer can turn a read into SIGBUS; FIFOs, links and other users'
    segments refused). The scratch buffers are reused across planes of the
    same size (the plane is copied once more, into its stack). Never
    unlinks, never registers with Python's resource tracker."""

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self._scratch: dict[int, np.ndarray] = {}

    def read(self, name: Optional[str], shape: tuple, dtype: str, offset: int = 0) -> np.ndarray:
        if name is None:
            raise ProtocolError(ErrorCode.BAD_SHM, "payload is not a shared-memory segment name")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        buf = self._scratch.pop(nbytes, None)
        if buf is None:
            buf = np.empty(nbytes, np.uint8)
        try:
            out = read_shm(name, shape, dtype, offset, into=buf)
        except SegmentTooShort as e:
            raise ProtocolError(ErrorCode.SHAPE_MISMATCH, str(e)) from None
        except TransportError as e:
            raise ProtocolError(ErrorCode.BAD_SHM, str(e)) from None
        finally:
            self._scratch[nbytes] = buf  # most recently used last
            while len(self._scratch) > self.max_buffers:
                del self._scratch[next(iter(self._scratch))]
        return out

    def reader(self, name: Optional[str], shape: tuple, dtype: str, offset: int = 0) -> Any:
        """The plane as a :class:`~fiji_bridge.hyperstack.PlaneReader` that
        its stack reads straight into the plane's place (no copy between the
        producer's segment and the stack): the segment is opened and checked
        here, so a bad one is refused before any plane is touched; only a
        producer that truncates its segment during the read loses the plane
        at that place. Call ``close()`` when done. A plain array
        (:meth:`read`) for byte orders the stack must convert."""
        dt = np.dtype(dtype)
        if name is None or len(shape) != 2 or not dt.isnative:
            return self.read(name, shape, dtype, offset)
        try:
            seg = ShmPlane.open(name, shape, dt, offset)
        except SegmentTooShort as e:
            raise ProtocolError(ErrorCode.SHAPE_MISMATCH, str(e)) from None
        except TransportError as e:
            raise ProtocolError(ErrorCode.BAD_SHM, str(e)) from None

        def read(out: np.ndarray) -> Optional[tuple[float, float]]:
            if not (out.flags.c_contiguous and out.flags.writeable):
                out[...] = read_shm(name, shape, dt, offset)
                return None
            try:
                return seg.read_into(out, with_range=True)  # the live display needs it: taken on the way
            except TransportError as e:
                raise ProtocolError(ErrorCode.BAD_SHM, str(e)) from None

        return PlaneReader(seg.shape, seg.dtype, read, close=seg.close)

    def clear(self) -> None:
        self._scratch.clear()


def _stream_seq(head: bytes) -> tuple[str, int]:
    try:
        d = parse_json(head)
        s, q = d.get("stream", ""), d.get("seq", -1)
        return (s if isinstance(s, str) else "", q if isinstance(q, int) and not isinstance(q, bool) else -1)
    except ProtocolError:
        return "", -1
