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

Planes (:mod:`fiji_bridge.plane_stream`): shared memory when the bridge can
read this process's ``/dev/shm`` (checked once with a probe segment: tcp to
loopback, or ipc), inline bytes otherwise; the rings' slots are warm
segments the bridge lends where it has them free
(:mod:`fiji_bridge.ring_leases`). Delivery is lossless: at most ``credits``
planes per stream are unacknowledged, then :meth:`send_plane` waits for the
bridge. With ``live=True`` a plane that finds no credit is dropped and
counted instead (:attr:`dropped`; the bridge reports it in ``status()``).

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
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import zmq

from .components import Calibration, ComponentError, PlaneComponents
from .errors import BridgeError, BridgeTimeout, PlanesRejected
from .lifecycle import SpawnedBridge, SpawnFailed, default_log_dir, free_port_pair, port_open  # noqa: F401  (re-exported)
from .plane_stream import PlaneStreams
from .protocol import (
    DATA_PORT_OFFSET,
    DEFAULT_PORT,
    DTYPES,
    ArrayDesc,
    FrameSink,
    ProtocolError,
    decode_macro_result,
    encode,
    parse_json,
)
from .security import HANDSHAKE_FAILED, is_loopback

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
        self._ids = itertools.count(1)
        self._planes = PlaneStreams(
            socket=lambda: self._socket(zmq.DEALER, self.data_endpoint), call=lambda type_, **f: self._call(type_, **f)[0],
            endpoint=self.data_endpoint, local=ipc or is_loopback(host), transport=transport, credits=self.credits,
            timeout=self.timeout, uid=f"{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}",
        )
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

    # ------------------------------------------------------------------ streaming (fiji_bridge.plane_stream)

    @property
    def dropped(self) -> int:
        """Planes dropped by ``live=True`` sends for lack of credit."""
        return self._planes.dropped

    @property
    def in_flight(self) -> int:
        """Planes sent and not acknowledged yet."""
        return self._planes.in_flight

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
        return self._planes.send(arr, comps, key=stack, calibration=calibration, mapping=_mapping_dict(mapping), live=live)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every plane sent has been assembled by the bridge.

        Raises :class:`PlanesRejected` listing the planes the bridge refused
        (since the last flush), :class:`BridgeTimeout` when it stops acknowledging.
        """
        self._planes.flush(timeout)

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
                    self._planes.wait_acks(None, 0, what="closing", timeout=flush_timeout)
                except BridgeError:
                    pass
            self._planes.close(release=True)  # lent ring segments go back while the bridge listens
            if self._own and self._spawned is not None:
                try:
                    self.shutdown()
                except BridgeError:
                    self._spawned.terminate()
        finally:
            self._closed = True
            self._planes.close(release=False)  # what is left: unmapped and unlinked, no lease given back
            try:
                self._ctrl.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._ctrl.close(0)
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
