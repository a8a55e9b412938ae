"""BridgeClient: talk to a bridge (or start one), stream planes, run macros.

::

    from fiji_bridge import BridgeClient

    with BridgeClient.connect_or_spawn(port=5570) as bridge:
        for c, plane in enumerate(planes):
            bridge.send_plane(plane, well="D03", channel=c, channel_name=names[c])
        bridge.flush()                                  # all assembled (or PlanesRejected)
        res = bridge.run_macro('run("Measure");', stack="D03/s000")
        print(res.results["Mean"])

Lifetime: a bridge started by :meth:`connect_or_spawn` keeps running after the
client disconnects, so the next run reuses its warm JVM (``fiji-bridge stop``
or :meth:`shutdown` ends it); pass ``own=True`` to shut it down when the
client closes.

Transport: shared memory when the bridge can read this process's
``/dev/shm`` (checked once with a probe segment: tcp to loopback, or ipc),
inline bytes otherwise; the ring's slots are warm segments the bridge lends
where it has them free (:mod:`fiji_bridge.ring_leases`). Delivery is lossless: at most ``credits`` planes per
stream are unacknowledged, then :meth:`send_plane` waits for the bridge. With
``live=True`` a plane that finds no credit is dropped and counted instead
(:attr:`dropped`; the bridge reports it in ``status()``).

Authentication is automatic: on this host the client derives its keys from
the account's secret (:func:`fiji_bridge.security.ensure_secret`), beyond it
it uses ``keys=DIR``; a bridge that refuses them (another user's, or a
stranger on the port) raises :class:`BridgeError` with code ``unauthorized``.

No call hangs: every wait has a deadline, and long waits (macros) ping the
bridge so that a dead bridge is reported within seconds as
:class:`BridgeError`. One client per thread.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import zmq

from .components import Calibration, ComponentError, PlaneComponents
from .lifecycle import SpawnedBridge, SpawnFailed, default_log_dir, free_port_pair, port_open  # noqa: F401  (re-exported)
from .protocol import (
    DATA_PORT_OFFSET,
    DEFAULT_PORT,
    DTYPES,
    Ack,
    ArrayDesc,
    FrameSink,
    PlaneHeader,
    ProtocolError,
    decode_macro_result,
    encode,
    parse_json,
)
from .security import HANDSHAKE_FAILED

__all__ = [
    "BridgeClient",
    "BridgeError",
    "BridgeTimeout",
    "PlanesRejected",
    "DEFAULT_PORT",
    "status_command",
    "stop_command",
    "stream_command",
    "snapshot_command",
    "run_command",
]

#: seconds a macro may run when the caller gives no timeout
DEFAULT_MACRO_TIMEOUT = 600.0
#: a bridge that does not answer a ping within this many seconds is dead
PING_TIMEOUT = 10.0


class BridgeError(RuntimeError):
    """The bridge refused a request, is unreachable, or is not a bridge."""

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code


class BridgeTimeout(BridgeError, TimeoutError):
    """The bridge did not answer in time."""


class PlanesRejected(BridgeError):
    """Some planes were refused by the bridge; ``rejected`` lists them
    (stream, seq, components, stack key, error code and message)."""

    def __init__(self, rejected: list[dict]) -> None:
        self.rejected = rejected
        lines = [f"  {r['where']}: [{r['code']}] {r['message']}" for r in rejected[:10]]
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        super().__init__(f"{len(rejected)} plane(s) rejected by the bridge:\n" + "\n".join(lines) + more, "rejected")


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


class BridgeClient:
    """A connection to one bridge (control + data sockets). See the module doc."""

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        *,
        ipc: bool = False,
        timeout: float = 30.0,
        keys: Optional[Union[str, Path]] = None,
        transport: str = "auto",
        credits: int = 8,
    ) -> None:
        from .server import endpoints  # the one place endpoints are spelled

        if transport not in ("auto", "shm", "inline"):
            raise ValueError(f"transport must be auto, shm or inline, got {transport!r}")
        self.port = int(port)
        self.host = host
        self.ipc = ipc
        self.timeout = float(timeout)
        self.keys = keys
        self.credits = max(1, int(credits))
        self._transport = transport
        self.ctrl_endpoint, self.data_endpoint = endpoints(self.port, host, ipc)
        self._secret: Optional[str] = None
        if keys is None:
            from .security import SecurityError, ensure_secret

            try:
                self._secret = ensure_secret()
            except (SecurityError, OSError) as e:
                raise BridgeError(f"cannot use this user's bridge secret: {e}", "unauthorized") from None
        self._ctx = zmq.Context()
        self._ctrl = self._socket(zmq.DEALER, None)
        # handshake failures (a wrong secret or keys) surface here, not on _ctrl;
        # watched from before the connect (a refused handshake is not retried)
        self._monitor = self._ctrl.get_monitor_socket(HANDSHAKE_FAILED)
        self._ctrl.connect(self.ctrl_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._ctrl, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._data: Optional[zmq.Socket] = None
        self._ids = itertools.count(1)
        self._uid = f"{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}"
        self._streams: dict[bool, _Stream] = {}
        self._by_id: dict[str, _Stream] = {}
        self._shm_ok: Optional[bool] = None
        self._spawned: Optional[SpawnedBridge] = None
        self._own = False
        self._closed = False

    # ------------------------------------------------------------------ connecting

    def _socket(self, kind: int, endpoint: Optional[str]) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.linger = 0
        s.sndhwm = 1000
        if self.keys is not None:
            from .security import apply_client_keys

            apply_client_keys(s, self.keys)
        else:
            from .security import apply_client_secret

            apply_client_secret(s, self._secret or "")
        if endpoint is not None:
            s.connect(endpoint)
        return s

    @classmethod
    def connect(cls, port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, timeout: float = 30.0, ipc: bool = False, keys: Optional[Union[str, Path]] = None, transport: str = "auto", credits: int = 8, check: bool = True) -> "BridgeClient":
        """Connect to the bridge on ``port``; with ``check`` make sure it answers (BridgeError if not)."""
        c = cls(port, host, ipc=ipc, timeout=timeout, keys=keys, transport=transport, credits=credits)
        if check:
            try:
                c.ping(timeout=min(timeout, 10.0))
            except BridgeError as e:
                c.close()
                if e.code == "unauthorized":
                    raise
                raise BridgeError(f"no fiji-bridge answers on {c.ctrl_endpoint}: {e}", e.code) from None
        return c

    @classmethod
    def connect_or_spawn(
        cls,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        timeout: float = 60.0,
        engine: str = "auto",
        display: Optional[bool] = None,
        *,
        ipc: bool = False,
        own: bool = False,
        keys: Optional[Union[str, Path]] = None,
        transport: str = "auto",
        credits: int = 8,
        log_dir: Optional[Union[str, Path]] = None,
    ) -> "BridgeClient":
        """Connect to the bridge on ``port``, starting one (detached) if none answers.

        Raises :class:`BridgeError` when something that is not a bridge holds
        the port, or when the spawned bridge does not come up within
        ``timeout`` (the message names its log file). ``own=True``: the
        spawned bridge is shut down when this client closes.
        """
        c = cls(port, host, ipc=ipc, timeout=max(timeout, 30.0), keys=keys, transport=transport, credits=credits)
        try:
            c.ping(timeout=1.5)
            return c
        except BridgeError as e:
            if e.code == "unauthorized":  # a bridge is there, but not ours to use
                c.close()
                raise
        try:
            if not ipc:
                held = [p for p in (port, port + DATA_PORT_OFFSET) if port_open(host, p)]
                if held:
                    raise BridgeError(
                        f"port {held[0]} on {host} is held by something that does not answer as a fiji-bridge "
                        f"(control {port}, data {port + DATA_PORT_OFFSET}); stop it or choose another --port"
                    )
                from .security import is_loopback

                if not is_loopback(host):
                    raise BridgeError(f"no bridge answers on {host}:{port}, and a bridge can only be spawned on this machine")
            c._spawned = SpawnedBridge.start(port, host, ipc=ipc, engine=engine, display=display, keys=keys, log_dir=log_dir, owned=own)
            try:
                c._spawned.wait_ready(lambda: c.ping(timeout=0.5), timeout, retry=(BridgeError,))
            except SpawnFailed as e:
                raise (BridgeTimeout if e.timed_out else BridgeError)(str(e)) from None
        except BaseException:
            c.close()
            raise
        c._own = own
        return c

    @property
    def pid(self) -> Optional[int]:
        """The pid of the bridge this client spawned, if it spawned one."""
        return self._spawned.pid if self._spawned is not None else None

    @property
    def log_path(self) -> Optional[Path]:
        """The log file of the bridge this client spawned, if it spawned one."""
        return self._spawned.log_path if self._spawned is not None else None

    @property
    def _proc(self) -> Optional[subprocess.Popen]:
        return self._spawned.proc if self._spawned is not None else None

    # ------------------------------------------------------------------ control calls

    def _call(self, type_: str, frames: Sequence[Any] = (), *, wait: Optional[float] = None, long: bool = False, **fields: Any) -> tuple[dict, list]:
        """Send one request and wait for its reply. ``long``: the reply may
        take ``wait`` seconds (a macro), so the bridge is pinged meanwhile and a
        silent bridge fails the call within :data:`PING_TIMEOUT`."""
        if self._closed:
            raise BridgeError("this client is closed")
        rid = next(self._ids)
        try:
            self._ctrl.send_multipart([b""] + encode({"type": type_, "id": rid, **fields}, frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            self._check_handshake()  # no peer left because it refused us? say so
            raise BridgeError(f"cannot send to the bridge at {self.ctrl_endpoint}: {e}") from None
        timeout = self.timeout if wait is None else wait
        start = time.monotonic()
        deadline = start + timeout
        last_heard = start
        ping_id: Optional[str] = None
        ping_sent = 0.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise BridgeTimeout(f"no reply to {type_!r} from the bridge at {self.ctrl_endpoint} within {timeout:g} s")
            if long and ping_id is not None and now - ping_sent > PING_TIMEOUT:
                raise BridgeError(f"the bridge at {self.ctrl_endpoint} stopped answering (no pong in {PING_TIMEOUT:g} s) while waiting for {type_!r}")
            if long and ping_id is None and now - last_heard > 2.0:
                ping_id = f"alive-{rid}-{secrets.token_hex(2)}"
                ping_sent = now
                try:
                    self._ctrl.send_multipart([b""] + encode({"type": "ping", "id": ping_id}), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            wait = min(deadline - now, 0.5 if long else deadline - now)
            ready = dict(self._poller.poll(max(1, int(wait * 1000))))
            if self._monitor in ready:
                self._check_handshake()
            if self._ctrl not in ready:
                continue
            msg = self._ctrl.recv_multipart(copy=False)
            body = msg[1:] if msg and len(msg[0]) == 0 else msg
            if not body:
                continue
            try:
                reply = parse_json(body[0].bytes, "reply")
            except ProtocolError as e:
                raise BridgeError(f"the peer at {self.ctrl_endpoint} is not a fiji-bridge (bad reply: {e})") from None
            got = reply.get("id")
            if got == ping_id and ping_id is not None:
                ping_id = None
                last_heard = time.monotonic()
                continue
            if got != rid:
                continue  # a late reply to an earlier call that timed out
            if not reply.get("ok"):
                err = reply.get("error") or {}
                code = err.get("code", "error")
                if "macro" in err and type_ in ("run_macro", "run_script"):
                    from .engine.base import MacroError

                    raise MacroError.from_dict(err["macro"] or {"message": err.get("message", "")})
                raise BridgeError(f"{type_}: [{code}] {err.get('message', 'failed')}", code)
            return reply, [f.buffer for f in body[1:]]

    def _check_handshake(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor)
            if ev["event"] in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                how = f"the CurveZMQ keys in {self.keys}" if self.keys is not None else "this user's secret"
                raise BridgeError(
                    f"the bridge at {self.ctrl_endpoint} refused {how}, or is not ours: it belongs to another user (a bridge admits only "
                    f"clients that know its user's secret, {_secret_hint()}), or it was started with other keys or an older secret (restart it)",
                    "unauthorized",
                )
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                raise BridgeError(f"the peer at {self.ctrl_endpoint} does not speak fiji-bridge's authenticated protocol (an older bridge, another program, or keys on one side only)", "unauthorized")

    def ping(self, timeout: float = 5.0) -> dict:
        reply, _ = self._call("ping", wait=timeout)
        if reply.get("server") != "fiji-bridge" or reply.get("type") != "pong":
            raise BridgeError(f"the peer at {self.ctrl_endpoint} answered but is not a fiji-bridge: {reply!r}")
        return reply

    def status(self) -> dict:
        """The bridge's status: engine state, stacks, streams (planes, drops), memory."""
        reply, _ = self._call("status")
        for k in ("v", "id", "ok"):
            reply.pop(k, None)
        return reply

    def list_stacks(self) -> list[str]:
        return list(self._call("list_stacks")[0]["stacks"])

    def stack_info(self, key: str) -> Any:
        """A :class:`~fiji_bridge.hyperstack.StackInfo` (shape TZCYX, dtype, missing planes...)."""
        from .hyperstack import StackInfo

        return StackInfo.from_dict(self._call("stack_info", key=key)[0]["info"])

    def get_stack(self, key: str) -> np.ndarray:
        """The assembled stack as a (T, Z, C, Y, X) array (a copy)."""
        reply, frames = self._call("get_stack", key=key, wait=max(self.timeout, 120.0))
        desc = ArrayDesc.parse(reply["array"], len(frames))
        return np.array(desc.from_frame(frames[desc.frame]))

    def close_stack(self, key: str) -> None:
        self._call("close_stack", key=key)

    def clear_state(self) -> list[str]:
        """Forget every stack (and close their windows); returns the keys closed."""
        return list(self._call("clear_state")[0].get("closed", []))

    def subscribe(self, endpoint: str, mapping: Optional[Mapping[str, Any]] = None) -> None:
        """Make the bridge take planes from an external PUB socket (inline data messages)."""
        self._call("subscribe", endpoint=endpoint, mapping=_mapping_dict(mapping))

    def unsubscribe(self, endpoint: str) -> None:
        self._call("unsubscribe", endpoint=endpoint)

    def render(self, key: str, montage: bool = False, timeout: float = 120.0) -> np.ndarray:
        """The stack as Fiji draws it (composite / montage): RGB uint8 (Y, X, 3)."""
        reply, frames = self._call("render", key=key, montage=montage, wait=timeout + 60.0, long=True)
        desc = ArrayDesc.parse(reply["image"], len(frames), any_dtype=True)
        return np.array(desc.from_frame(frames[desc.frame]))

    def shutdown(self, wait: float = 10.0) -> None:
        """Stop the bridge (its engine worker too); waits until it is gone."""
        self._call("shutdown", wait=min(self.timeout, 10.0))
        if self._spawned is not None:
            self._spawned.wait(wait)

    def run_macro(
        self,
        code_or_path: Union[str, os.PathLike],
        stack: Optional[str] = None,
        array: Optional[np.ndarray] = None,
        dims: str = "TZCYX",
        args: Optional[Union[str, Mapping[str, Any]]] = None,
        dialog_options: Optional[str] = None,
        timeout: Optional[float] = None,
        save_to: Optional[str] = None,
        *,
        title: Optional[str] = None,
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
        outputs: Optional[Sequence[str]] = None,
    ) -> Any:
        """Run an ImageJ macro in the bridge, on ``stack`` (a key) or ``array``.

        Returns the engine's :class:`~fiji_bridge.engine.base.MacroResult`;
        raises :class:`~fiji_bridge.engine.base.MacroError` (``MacroTimeout``
        past ``timeout``, kind ``"engine"`` when the JVM died: the bridge
        restarts it and stays up). ``save_to``: the bridge pushes the outputs
        to this plate URI (with the stack's well/site).
        """
        if stack is not None and array is not None:
            raise ValueError("give either stack= or array=, not both")
        code, args = _prepare_macro(code_or_path, args)
        fields: dict[str, Any] = {"code": code, "dims": dims}
        frames: list = []
        if stack is not None:
            fields["stack"] = stack
        if array is not None:
            sink = FrameSink()
            fields["image"] = sink.put(np.asarray(array))
            frames = sink.frames
        for name, value in (("args", dict(args) if isinstance(args, Mapping) else args), ("dialog_options", dialog_options), ("timeout", timeout), ("save_to", save_to), ("title", title), ("outputs", list(outputs) if outputs is not None else None), ("channel_names", list(channel_names) if channel_names else None), ("calibration", calibration.to_dict() if calibration is not None else None)):
            if value is not None:
                fields[name] = value
        wait = (timeout or DEFAULT_MACRO_TIMEOUT) + 300.0  # queue + an engine (re)start
        reply, rframes = self._call("run_macro", frames, wait=wait, long=True, **fields)
        result = decode_macro_result(reply["result"], lambda d: ArrayDesc.parse(d, len(rframes), any_dtype=True).from_frame(rframes[d["frame"]]))
        saved = reply.get("saved")
        if saved:
            result.notes.extend(f"saved {p}" for p in saved)
            result.saved = list(saved)  # type: ignore[attr-defined]
        return result

    def run_script(
        self,
        code_or_path: Union[str, os.PathLike],
        language: Optional[str] = None,
        inputs: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        *,
        stack: Optional[str] = None,
        array: Optional[np.ndarray] = None,
        dims: str = "TZCYX",
        title: Optional[str] = None,
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
    ) -> Any:
        """Run a script in the bridge: a SciJava script on Fiji (language from
        ``language=`` or the file's extension), or an ImageJ macro; ``inputs``
        fill its ``#@`` parameters, a ``#@ ImagePlus``/``Dataset`` input is
        ``stack`` (a key) or ``array``. ``result.outputs`` maps the
        ``#@output`` names to values (numbers, strings, booleans, TZCYX
        arrays, tables as columns). Errors raise :class:`MacroError`."""
        from .engine.scripts import read_script

        if stack is not None and array is not None:
            raise ValueError("give either stack= or array=, not both")
        code, ext = read_script(code_or_path if not isinstance(code_or_path, os.PathLike) else Path(code_or_path))
        given = {"stack": stack, "language": language or ext, "inputs": dict(inputs) if inputs else None, "timeout": timeout,
                 "title": title, "channel_names": list(channel_names) if channel_names else None,
                 "calibration": calibration.to_dict() if calibration is not None else None}
        fields: dict[str, Any] = {"code": code, "dims": dims, **{k: v for k, v in given.items() if v is not None}}
        frames: list = []
        if array is not None:  # the image travels as a frame of the request
            sink = FrameSink()
            fields["image"] = sink.put(np.asarray(array))
            frames = sink.frames
        wait = (timeout or DEFAULT_MACRO_TIMEOUT) + 300.0
        reply, rframes = self._call("run_script", frames, wait=wait, long=True, **fields)
        return decode_macro_result(reply["result"], lambda d: ArrayDesc.parse(d, len(rframes), any_dtype=True).from_frame(rframes[d["frame"]]))

    # ------------------------------------------------------------------ streaming

    def _ensure_data(self) -> zmq.Socket:
        if self._data is None:
            self._data = self._socket(zmq.DEALER, self.data_endpoint)
            self._data.sndhwm = 0
        return self._data

    def _use_shm(self) -> bool:
        if self._shm_ok is None:
            if self._transport == "inline":
                self._shm_ok = False
            else:
                from .security import is_loopback

                self._shm_ok = (self.ipc or is_loopback(self.host)) and self._probe_shm()
                if self._transport == "shm" and not self._shm_ok:
                    raise BridgeError("transport='shm' asked for, but the bridge cannot read this process's shared memory (another host or container?)")
        return self._shm_ok

    def _probe_shm(self) -> bool:
        from .transport import ShmRing

        token = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8)
        try:
            with ShmRing(slots=1, slot_bytes=16, stream="probe") as ring:
                name = ring.put(token)
                reply, _ = self._call("shm_probe", name=name, size=16, wait=min(self.timeout, 10.0))
        except (OSError, ValueError):
            return False
        return bool(reply.get("readable")) and reply.get("data") == token.tobytes().hex()

    def _stream(self, live: bool, nbytes: int) -> _Stream:
        st = self._streams.get(live)
        if st is None:
            st = _Stream(id=f"{self._uid}-{'live' if live else 'main'}", live=live)
            self._streams[live] = st
            self._by_id[st.id] = st
        if self._use_shm() and (st.ring is None or st.ring.slot_bytes < nbytes):
            from .transport import ShmRing

            if st.ring is not None:  # bigger planes than before: a new ring
                self._wait_acks(st, 0, what="resizing the shared-memory ring")
                self._close_ring(st)
            slot_bytes = max(nbytes, 1 << 20)
            st.lease, lent = self._lease_ring(slot_bytes)
            st.ring = ShmRing(slots=self.credits, slot_bytes=slot_bytes, stream=f"{os.getpid() % 1000}{'l' if live else 'm'}{secrets.token_hex(2)}", leased=lent)
        return st

    def _lease_ring(self, slot_bytes: int) -> tuple[Optional[str], list[str]]:
        """Warm segments the bridge lends for a new ring (:mod:`fiji_bridge.ring_leases`):
        its first lap then writes warm pages. None and [] from a bridge that
        has none free, cannot tell this process apart, or predates leases."""
        from .ring_leases import process_start

        start = process_start(os.getpid())
        if start is None:
            return None, []
        try:
            reply, _ = self._call("lease_ring", pid=os.getpid(), start=start, slots=self.credits, slot_bytes=slot_bytes)
        except BridgeError:
            return None, []
        names = reply.get("segments")
        return reply.get("lease"), [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def _close_ring(self, st: _Stream) -> None:
        """Unlink the ring's own segments; give the lent ones back once none
        of its planes is in flight (else the lease stays with this process,
        and the bridge takes it back when the process is gone)."""
        ring, lease, st.ring, st.lease = st.ring, st.lease, None, None
        if ring is None:
            return
        idle = ring.in_flight == 0
        ring.close()
        if lease is not None and idle and not self._closed:
            try:
                self._call("release_ring", lease=lease, wait=min(self.timeout, 1.0))
            except BridgeError:
                pass  # the bridge is gone or slow: it reaps the lease when this process ends

    @property
    def dropped(self) -> int:
        """Planes dropped by ``live=True`` sends for lack of credit."""
        return sum(st.dropped for st in self._streams.values())

    @property
    def in_flight(self) -> int:
        return sum(len(st.inflight) for st in self._streams.values())

    def send_plane(
        self,
        array: np.ndarray,
        stack: Optional[str] = None,
        *,
        plate: str = "",
        well: str = "",
        site: int = 0,
        channel: int = 0,
        z: int = 0,
        t: int = 0,
        channel_name: Optional[str] = None,
        pixel_size: Optional[Union[float, tuple[float, float]]] = None,
        calibration: Optional[Calibration] = None,
        mapping: Optional[Mapping[str, Any]] = None,
        live: bool = False,
    ) -> bool:
        """Send one 2-D plane. The stack key is ``stack`` or plate+well+site
        (or what ``mapping`` makes of the components). Returns False when a
        ``live`` plane was dropped. Rejections are reported by :meth:`flush`."""
        arr = np.asarray(array)
        if arr.ndim != 2 or 0 in arr.shape:
            raise ValueError(f"send_plane takes a non-empty 2-D (Y, X) array, got shape {arr.shape}; use send_stack for more dimensions")
        if arr.dtype.newbyteorder("=").name not in DTYPES:
            raise ValueError(f"dtype {arr.dtype} cannot be sent; use one of {sorted(DTYPES)}")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        try:
            comps = PlaneComponents(plate=plate, well=well, site=site, channel=channel, z=z, t=t, channel_name=channel_name)
        except ComponentError as e:
            raise ValueError(str(e)) from None
        if calibration is None and pixel_size is not None:
            pw, ph = (pixel_size, pixel_size) if np.isscalar(pixel_size) else tuple(pixel_size)  # type: ignore[misc]
            calibration = Calibration(pixel_width=float(pw), pixel_height=float(ph))
        sock = self._ensure_data()
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
            transport="shm" if name else "inline", components=comps, key=stack, calibration=calibration,
            mapping=_mapping_dict(mapping), dropped=st.dropped,
        )
        payload = name.encode("ascii") if name else memoryview(arr).cast("B")
        try:
            sock.send_multipart([b"", header.encode(), payload], copy=True, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if name:
                st.ring.release(name)
            raise BridgeError(f"cannot send to the bridge's data channel {self.data_endpoint}: {e}") from None
        where = f"stack={stack or comps.stack_key} c={channel} z={z} t={t}"
        st.inflight[seq] = (name, where)
        st.sent += 1
        return True

    def _take_credit(self, st: _Stream) -> bool:
        if len(st.inflight) < self.credits:
            return True
        self._read_acks(0)
        if len(st.inflight) < self.credits:
            return True
        if st.live:
            return False
        self._wait_acks(st, self.credits - 1, what="waiting for credit")
        return True

    def _wait_acks(self, st: Optional[_Stream], limit: int, what: str, timeout: Optional[float] = None) -> None:
        """Read acks until ``st`` (or every stream) has at most ``limit`` in
        flight. Fails when the bridge acknowledges nothing for ``self.timeout``
        seconds, or after ``timeout`` seconds in all."""
        end = time.monotonic() + timeout if timeout is not None else None
        last = time.monotonic()
        pending = lambda: len(st.inflight) if st is not None else self.in_flight  # noqa: E731
        while pending() > limit:
            now = time.monotonic()
            if end is not None and now >= end:
                raise BridgeTimeout(f"{pending()} plane(s) still unacknowledged after {timeout:g} s ({what})")
            if now - last > self.timeout:
                raise BridgeTimeout(f"the bridge at {self.data_endpoint} acknowledged nothing for {self.timeout:g} s ({what}); {pending()} plane(s) in flight")
            if self._read_acks(min(0.25, (end - now) if end else 0.25)):
                last = time.monotonic()

    def _read_acks(self, wait: float) -> int:
        if self._data is None:
            return 0
        n = 0
        if wait > 0 and not self._data.poll(int(wait * 1000)):
            return 0
        while True:
            try:
                msg = self._data.recv_multipart(flags=zmq.NOBLOCK)
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

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every plane sent has been assembled by the bridge.

        Raises :class:`PlanesRejected` listing the planes the bridge refused
        (since the last flush), :class:`BridgeTimeout` when it stops acknowledging.
        """
        self._wait_acks(None, 0, what="flush", timeout=timeout)
        rejected = [r for st in self._streams.values() for r in st.rejected]
        for st in self._streams.values():
            st.rejected.clear()
        if rejected:
            raise PlanesRejected(rejected)

    def send_stack(
        self,
        array: np.ndarray,
        stack: str,
        dims: str = "TZCYX",
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
        *,
        flush: bool = True,
    ) -> None:
        """Send a whole stack (any subset/order of T, Z, C plus Y, X) plane by plane, then flush."""
        arr = to_tzcyx(np.asarray(array), dims)
        nt, nz, nc = arr.shape[:3]
        if channel_names is not None and len(channel_names) != nc:
            raise ValueError(f"{len(channel_names)} channel names for {nc} channels")
        for t in range(nt):
            for z in range(nz):
                for c in range(nc):
                    self.send_plane(arr[t, z, c], stack, channel=c, z=z, t=t, channel_name=channel_names[c] if channel_names else None, calibration=calibration)
        if flush:
            self.flush()

    # ------------------------------------------------------------------ closing

    def close(self, flush_timeout: float = 5.0) -> None:
        """Disconnect (waiting briefly for planes in flight); shut the bridge
        down if this client spawned it with ``own=True``."""
        if self._closed:
            return
        try:
            if self.in_flight:
                try:
                    self._wait_acks(None, 0, what="closing", timeout=flush_timeout)
                except BridgeError:
                    pass
            for st in self._streams.values():
                self._close_ring(st)
            if self._own and self._spawned is not None:
                try:
                    self.shutdown()
                except BridgeError:
                    self._spawned.terminate()
        finally:
            self._closed = True
            for st in self._streams.values():
                self._close_ring(st)  # closed: unmapped and unlinked, no lease given back
            try:
                self._ctrl.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._ctrl.close(0)
            if self._data is not None:
                self._data.close(0)
            self._ctx.term()

    def __enter__(self) -> "BridgeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BridgeClient({self.ctrl_endpoint})"


# --------------------------------------------------------------------------- helpers


def _secret_hint() -> str:
    from .security import secret_path

    return f"kept in {secret_path()}"


def to_tzcyx(arr: np.ndarray, dims: str) -> np.ndarray:
    """Reorder an array whose axes ``dims`` names into (T, Z, C, Y, X), adding missing axes."""
    dims = dims.upper()
    if len(dims) != arr.ndim or len(set(dims)) != len(dims) or not set(dims) <= set("TZCYX") or not {"Y", "X"} <= set(dims):
        raise ValueError(f"dims {dims!r} do not describe an array of shape {arr.shape} (letters of TZCYX, Y and X required)")
    for d in "TZCYX":
        if d not in dims:
            arr = arr[np.newaxis]
            dims = d + dims
    return np.transpose(arr, [dims.index(d) for d in "TZCYX"])


def _mapping_dict(mapping: Any) -> Optional[dict]:
    if mapping is None:
        return None
    to_dict = getattr(mapping, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(mapping)


_MACRO_NAME = re.compile(r"^[\w.\-/~]+$")


def _prepare_macro(code_or_path: Union[str, os.PathLike], args: Any) -> tuple[str, Any]:
    """Macro source and the arguments to send for ``code_or_path``: a library
    name (``"nuclei_count"``), a ``.ijm`` path, or macro source.

    When the macro has ``#@`` parameters and ``args`` is a mapping (or None),
    the arguments are checked against the header and bound here, so unknown
    or ill-typed arguments fail before anything reaches the bridge
    (:class:`~fiji_bridge.macros.MacroArgumentError`); an unknown name raises
    :class:`~fiji_bridge.macros.MacroNotFound` listing the library.
    """
    from .macros import load_macro, resolve

    text = os.fspath(code_or_path)
    if isinstance(code_or_path, os.PathLike) or ("\n" not in text and _MACRO_NAME.match(text.strip())):
        if text.strip().endswith(".ijm") and not Path(text.strip()).expanduser().is_file() and "/" in text:
            raise FileNotFoundError(f"macro file {Path(text).expanduser()} does not exist")
        macro = resolve(text.strip())
    else:
        macro = load_macro(text)
    if macro.parameters and (args is None or isinstance(args, Mapping)):
        return macro.bind(args or {}), None
    return macro.code, args


# the command-line bodies moved to fiji_bridge.commands; these names stay importable from here
_COMMANDS = ("status_command", "stop_command", "stream_command", "snapshot_command", "run_command", "write_png")


def __getattr__(name: str) -> Any:
    if name in _COMMANDS:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
