"""A producer's planes on their way to one bridge: the data channel, credits, acks.

:class:`PlaneStreams` is what :meth:`BridgeClient.send_plane
<fiji_bridge.client.BridgeClient.send_plane>` and :meth:`~fiji_bridge.client.BridgeClient.flush`
stand on. It holds a DEALER on the bridge's data port and two streams, the
lossless one and the ``live`` one; a plane travels as a
:class:`~fiji_bridge.protocol.PlaneHeader` and either its bytes (inline) or
the name of a shared-memory slot it was copied into (a
:class:`~fiji_bridge.transport.ShmRing` per stream).

* **Transport**: shared memory when the bridge is on this machine (loopback
  tcp or ipc) and reads a probe segment this process wrote (once, on the
  first plane); inline bytes otherwise, or when asked. A ring's slots are,
  where the bridge has them free, warm segments it lends
  (:mod:`fiji_bridge.ring_leases`): given back when the ring closes with
  nothing in flight.
* **Credits**: at most ``credits`` planes of a stream are unacknowledged (one
  ring slot each). Past that a lossless send waits for an ack, a ``live``
  send drops the plane and counts it (the count travels in the next header).
* **Acks** free the plane's slot; a refused plane's ack is kept for
  :meth:`flush`, which raises :class:`~fiji_bridge.errors.PlanesRejected`.

Control requests (the probe, leases) go through the client's control call,
handed in as ``call``. Not thread-safe: one client per thread.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import zmq

from .components import Calibration, PlaneComponents
from .errors import BridgeError, BridgeTimeout, PlanesRejected
from .protocol import Ack, PlaneHeader, ProtocolError

__all__ = ["PlaneStreams"]

#: a control call: request type and fields -> the reply (raises BridgeError)
ControlCall = Callable[..., dict]


@dataclass
class _Stream:
    id: str
    live: bool
    ring: Any = None  # ShmRing or None (inline)
    lease: Optional[str] = None  # the bridge's lease of warm segments in the ring
    seq: itertools.count = field(default_factory=itertools.count)
    inflight: dict = field(default_factory=dict)  # seq -> (shm name | None, description)
    dropped: int = 0
    sent: int = 0
    rejected: list = field(default_factory=list)


class PlaneStreams:
    """The planes one client sends to one bridge. See the module doc.

    ``socket``: makes the (authenticated, connected) DEALER for the data
    channel, on the first plane. ``local``: the bridge is on this machine, so
    shared memory may work. ``transport``: ``auto``, ``shm`` (fail where it
    does not work) or ``inline``. ``uid``: this client's unique prefix of
    stream ids. ``timeout``: seconds without any ack before a wait fails.
    """

    def __init__(self, *, socket: Callable[[], zmq.Socket], call: ControlCall, endpoint: str, local: bool,
                 transport: str = "auto", credits: int = 8, timeout: float = 30.0, uid: str = "") -> None:
        self._make_socket = socket
        self._call = call
        self.endpoint = endpoint
        self.local = local
        self.transport = transport
        self.credits = max(1, int(credits))
        self.timeout = float(timeout)
        self.uid = uid or f"{os.getpid()}-{secrets.token_hex(3)}"
        self._sock: Optional[zmq.Socket] = None
        self._streams: dict[bool, _Stream] = {}
        self._by_id: dict[str, _Stream] = {}
        self.shm_ok: Optional[bool] = None  # None: not probed yet

    # ------------------------------------------------------------------ sending

    def send(self, arr: np.ndarray, comps: PlaneComponents, *, key: Optional[str] = None, calibration: Optional[Calibration] = None,
             mapping: Optional[dict] = None, live: bool = False) -> bool:
        """Send one C-contiguous little-endian 2-D plane (checked by the
        caller). False when a ``live`` plane was dropped for lack of credit."""
        sock = self._socket()
        st = self._stream(live, arr.nbytes)
        if not self._take_credit(st):
            st.dropped += 1
            return False
        seq = next(st.seq)
        name = None
        if st.ring is not None:
            name = st.ring.try_put(arr)
            if name is None:  # cannot happen with credits == slots; be safe
                st.dropped += live
                if live:
                    return False
                raise BridgeError("internal: no free shared-memory slot despite a credit")
        header = PlaneHeader(
            stream=st.id, seq=seq, shape=(int(arr.shape[0]), int(arr.shape[1])), dtype=arr.dtype.name,
            transport="shm" if name else "inline", components=comps, key=key, calibration=calibration,
            mapping=mapping, dropped=st.dropped,
        )
        payload = name.encode("ascii") if name else memoryview(arr).cast("B")
        try:
            sock.send_multipart([b"", header.encode(), payload], copy=True, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if name:
                st.ring.release(name)
            raise BridgeError(f"cannot send to the bridge's data channel {self.endpoint}: {e}") from None
        st.inflight[seq] = (name, f"stack={key or comps.stack_key} c={comps.channel} z={comps.z} t={comps.t}")
        st.sent += 1
        return True

    @property
    def dropped(self) -> int:
        """Planes dropped by ``live`` sends for lack of credit."""
        return sum(st.dropped for st in self._streams.values())

    @property
    def in_flight(self) -> int:
        """Planes sent and not acknowledged yet."""
        return sum(len(st.inflight) for st in self._streams.values())

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait for every plane's ack; raise :class:`PlanesRejected` for the
        planes refused since the last flush."""
        self.wait_acks(None, 0, what="flush", timeout=timeout)
        rejected = [r for st in self._streams.values() for r in st.rejected]
        for st in self._streams.values():
            st.rejected.clear()
        if rejected:
            raise PlanesRejected(rejected)

    def close(self, release: bool = True) -> None:
        """Close the rings (``release``: give lent segments back, which needs
        a working control channel) and, without ``release``, the data socket
        too. Idempotent."""
        for st in self._streams.values():
            self._close_ring(st, release)
        if not release and self._sock is not None:
            self._sock.close(0)
            self._sock = None

    # ------------------------------------------------------------------ transport

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._make_socket()
            self._sock.sndhwm = 0  # credits bound what is queued
        return self._sock

    def _use_shm(self) -> bool:
        if self.shm_ok is None:
            self.shm_ok = self.transport != "inline" and self.local and self._probe_shm()
            if self.transport == "shm" and not self.shm_ok:
                raise BridgeError("transport='shm' asked for, but the bridge cannot read this process's shared memory (another host or container?)")
        return self.shm_ok

    def _probe_shm(self) -> bool:
        from .transport import ShmRing

        token = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8)
        try:
            with ShmRing(slots=1, slot_bytes=16, stream="probe") as ring:
                name = ring.put(token)
                reply = self._call("shm_probe", name=name, size=16, wait=min(self.timeout, 10.0))
        except (OSError, ValueError):
            return False
        return bool(reply.get("readable")) and reply.get("data") == token.tobytes().hex()

    def _stream(self, live: bool, nbytes: int) -> _Stream:
        st = self._streams.get(live)
        if st is None:
            st = _Stream(id=f"{self.uid}-{'live' if live else 'main'}", live=live)
            self._streams[live] = st
            self._by_id[st.id] = st
        if self._use_shm() and (st.ring is None or st.ring.slot_bytes < nbytes):
            from .transport import ShmRing

            if st.ring is not None:  # bigger planes than before: a new ring
                self.wait_acks(st, 0, what="resizing the shared-memory ring")
                self._close_ring(st, release=True)
            slot_bytes = max(nbytes, 1 << 20)
            st.lease, lent = self._lease_ring(slot_bytes)
            st.ring = ShmRing(slots=self.credits, slot_bytes=slot_bytes, stream=f"{os.getpid() % 1000}{'l' if live else 'm'}{secrets.token_hex(2)}", leased=lent)
        return st

    def _lease_ring(self, slot_bytes: int) -> tuple[Optional[str], list[str]]:
        """Warm segments the bridge lends for a new ring: its first lap then
        writes warm pages. None and [] from a bridge that has none free,
        cannot tell this process apart, or predates leases."""
        from .ring_leases import process_start

        start = process_start(os.getpid())
        if start is None:
            return None, []
        try:
            reply = self._call("lease_ring", pid=os.getpid(), start=start, slots=self.credits, slot_bytes=slot_bytes)
        except BridgeError:
            return None, []
        names = reply.get("segments")
        return reply.get("lease"), [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def _close_ring(self, st: _Stream, release: bool) -> None:
        """Unlink the ring's own segments; give the lent ones back when none
        of its planes is in flight (else the lease stays with this process,
        and the bridge takes it back when the process is gone)."""
        ring, lease, st.ring, st.lease = st.ring, st.lease, None, None
        if ring is None:
            return
        idle = ring.in_flight == 0
        ring.close()
        if lease is not None and idle and release:
            try:
                self._call("release_ring", lease=lease, wait=min(self.timeout, 1.0))
            except BridgeError:
                pass  # the bridge is gone or slow: it reaps the lease when this process ends

    # ------------------------------------------------------------------ credits and acks

    def _take_credit(self, st: _Stream) -> bool:
        if len(st.inflight) < self.credits:
            return True
        self._read_acks(0)
        if len(st.inflight) < self.credits:
            return True
        if st.live:
            return False
        self.wait_acks(st, self.credits - 1, what="waiting for credit")
        return True

    def wait_acks(self, st: Optional[_Stream], limit: int, what: str, timeout: Optional[float] = None) -> None:
        """Read acks until ``st`` (or every stream) has at most ``limit`` in
        flight. Fails when the bridge acknowledges nothing for ``timeout``
        seconds of the streams' own, or after ``timeout`` seconds in all."""
        end = time.monotonic() + timeout if timeout is not None else None
        last = time.monotonic()
        pending = lambda: len(st.inflight) if st is not None else self.in_flight  # noqa: E731
        while pending() > limit:
            now = time.monotonic()
            if end is not None and now >= end:
                raise BridgeTimeout(f"{pending()} plane(s) still unacknowledged after {timeout:g} s ({what})")
            if now - last > self.timeout:
                raise BridgeTimeout(f"the bridge at {self.endpoint} acknowledged nothing for {self.timeout:g} s ({what}); {pending()} plane(s) in flight")
            if self._read_acks(min(0.25, (end - now) if end else 0.25)):
                last = time.monotonic()

    def _read_acks(self, wait: float) -> int:
        if self._sock is None:
            return 0
        n = 0
        if wait > 0 and not self._sock.poll(int(wait * 1000)):
            return 0
        while True:
            try:
                msg = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return n
            body = msg[1:] if msg and not msg[0] else msg
            try:
                ack = Ack.parse(body[0])
            except (ProtocolError, IndexError, ValueError, TypeError):
                continue
            st = self._by_id.get(ack.stream)
            if st is None:
                continue
            entry = st.inflight.pop(ack.seq, None)
            if entry is None:
                continue
            n += 1
            name, where = entry
            if name and st.ring is not None:
                st.ring.release(name)
            if not ack.ok:
                err = ack.error or {}
                st.rejected.append({"stream": ack.stream, "seq": ack.seq, "where": where, "code": err.get("code", "error"), "message": err.get("message", "")})
