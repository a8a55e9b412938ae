"""The bridge process: sockets, dispatch, hyperstacks, engine supervision.

One :class:`BridgeServer` owns

* a control ROUTER on the base port (clients use DEALER or REQ): requests are
  answered from a dispatch table; ``ping``/``status`` are answered at once,
  also while a macro runs (macros are queued to the engine worker, one at a
  time, in order);
* a data ROUTER on base port + 1000 (producers use DEALER): each plane is
  validated, put into the :class:`~fiji_bridge.hyperstack.StackStore`
  (:class:`~fiji_bridge.ingest.Ingest`) and acknowledged (the ack is the
  producer's credit back);
* SUB sockets for ``subscribe(endpoint)``: external PUB sources of planes;
* the :class:`~fiji_bridge.supervisor.EngineSupervisor` and its worker (the
  JVM lives there, never here);
* optionally, OpenHCS's viewer protocol (``--openhcs-port``).

Both channels admit only authenticated peers (:mod:`fiji_bridge.security`:
keys derived from the per-user secret on this host, CurveZMQ key files
beyond it); a refused handshake is counted and logged, never read. Peers
that do get in are still validated message by message: bad frames get error
replies, shared-memory names are opened without blocking and only when they
are regular files of the bridge's user, ``save_to`` is held to the allowed
roots, new stacks to the memory cap.

Everything runs in one thread around a ``zmq.Poller``; SIGTERM/SIGINT, the
``shutdown`` request and (``parent_pid``) the death of the owner stop it
cleanly. Live Fiji windows (with a display) are
updated through :class:`~fiji_bridge.live_display.LiveDisplay`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import zmq

from . import __version__
from .components import Calibration
from .hyperstack import AxisMapping, StackError, StackNotFound, StackStore
from .ingest import Ingest
from .live_display import LiveDisplay
from .protocol import (
    DATA_PORT_OFFSET,
    DEFAULT_PORT,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameSink,
    ProtocolError,
    Request,
    decode_macro_result,
    encode,
    encode_macro_result,
    error_reply,
    ok_reply,
    parse_request,
    request_id,
)
from .ring_leases import RingLeases
from .stack_memory import SharedStackMemory, warm_bytes
from .security import HANDSHAKE_FAILED, SaveRoots, SecurityError, ServerAuth, check_bind, ensure_secret, secret_path
from .supervisor import DEFAULT_MACRO_TIMEOUT, SERVER_PREFIX, WORKER_PREFIX, EngineSupervisor, WorkerJob
from .transport import TransportError, read_shm, reap_orphans

__all__ = ["BridgeServer", "serve", "endpoints", "ipc_dir", "DATA_PORT_OFFSET"]

log = logging.getLogger("fiji_bridge.server")

#: seconds between sweeps for shared memory left by dead producers
REAP_INTERVAL = 5.0
_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused key", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "bad handshake", zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed handshake"}
#: seconds between checks that the owner (``--parent-pid``) still lives
PARENT_CHECK_INTERVAL = 0.5
#: messages handled per socket before the loop looks at the others
BATCH = 64
#: ... and seconds spent on one socket before the loop looks at the others
DRAIN_SECONDS = 0.02


def ipc_dir() -> Path:
    """The private folder of ipc:// sockets: ``$XDG_RUNTIME_DIR/fiji-bridge`` or ``~/.cache/fiji-bridge/ipc``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(base) / "fiji-bridge" if base else Path.home() / ".cache" / "fiji-bridge" / "ipc"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def endpoints(port: int, host: str = "127.0.0.1", ipc: bool = False) -> tuple[str, str]:
    """(control, data) endpoints of the bridge on ``port``."""
    if ipc:
        d = ipc_dir()
        return f"ipc://{d}/bridge-{port}.sock", f"ipc://{d}/bridge-{port}-data.sock"
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{h}:{port}", f"tcp://{h}:{port + DATA_PORT_OFFSET}"


def reap_runtime_dirs(tmp: Optional[str] = None) -> list[Path]:
    """Remove the runtime folders (worker socket, logs) of bridges that died
    without cleaning up (SIGKILL). A folder is reaped only when the pid in
    its ``owner.pid`` is gone; folders of live bridges are left alone."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob("fiji-bridge-*-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class BridgeServer:
    """The bridge. ``run()`` blocks until shutdown; returns an exit code."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        ipc: bool = False,
        engine: str = "auto",
        display: Optional[bool] = None,
        openhcs_port: Optional[int] = None,
        keys_dir: Optional[str] = None,
        max_bytes: Optional[int] = None,
        parent_pid: Optional[int] = None,
        allow_save_to: Optional[list[str]] = None,
        openhcs_macros: str = "ipc",
    ) -> None:
        check_bind(host, keys_dir, ipc=ipc)
        self.save_roots = SaveRoots(allow_save_to)
        self.parent_pid = parent_pid
        self.port = int(port)
        self.host = host
        self.ipc = ipc
        self.display = bool(os.environ.get("DISPLAY")) if display is None else bool(display)
        self.openhcs_port = openhcs_port
        self.openhcs_macros = openhcs_macros
        self.keys_dir = keys_dir
        # with a live display, stacks live in shared memory the engine worker maps
        self.store = StackStore(max_bytes=max_bytes, memory=SharedStackMemory() if self.display else None)
        self.warmed: Optional[dict] = None  # the warm-up of the stack memory, once done
        self.leases = RingLeases()  # warm ring segments lent to producers
        self._warm_done: Optional[dict] = None  # ... touched, not yet mapped by the worker
        self.started = time.time()
        self.ctx = zmq.Context()
        reap_runtime_dirs()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"fiji-bridge-{self.port}-"))
        (self.runtime_dir / "owner.pid").write_text(str(os.getpid()))
        self.ctrl_endpoint, self.data_endpoint = endpoints(self.port, host, ipc)
        try:
            self.auth = ServerAuth(self.ctx, keys_dir) if keys_dir else ServerAuth(self.ctx, secret=ensure_secret())
        except BaseException:
            self.ctx.term()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise
        self.ctrl = self._bind(zmq.ROUTER, self.ctrl_endpoint)
        try:
            self.data = self._bind(zmq.ROUTER, self.data_endpoint)
        except BaseException:
            self.ctrl.close(0)
            raise
        self.data.rcvhwm = 10000
        self.data.sndhwm = 100000
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl, zmq.POLLIN)
        self.poller.register(self.data, zmq.POLLIN)
        # peers that fail the handshake (no secret, wrong keys) are counted and logged
        self.refused = 0
        self._monitors = [s.get_monitor_socket(HANDSHAKE_FAILED) for s in (self.ctrl, self.data)]
        for m in self._monitors:
            self.poller.register(m, zmq.POLLIN)
        self.subs: dict[str, tuple[zmq.Socket, Optional[AxisMapping]]] = {}
        self.errors = 0  # bad control messages (the data path counts its own)
        self.sup = EngineSupervisor(self.ctx, self.runtime_dir, engine=engine, display=self.display, on_ready=lambda: self.live.engine_ready())
        self.sup.set_socket_listener(self._swap_worker_socket)
        self.live = LiveDisplay(self.store, self.sup, self.display)
        self.ingest = Ingest(self.store, self.live)
        self.streams, self.origins = self.ingest.streams, self.ingest.origins
        # saves to a plate store run off the loop
        self._saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="save")
        self._saves: list[tuple[concurrent.futures.Future, list, Any, dict, list]] = []
        # OpenHCS receiver delivers planes from its own thread(s)
        self._inbox: list[tuple[str, int, int, int, np.ndarray, dict]] = []
        self._inbox_lock = threading.Lock()
        self.openhcs: Any = None
        self._openhcs_jobs: Any = None
        self._stop = False
        self._last_reap = 0.0
        self._last_parent_check = 0.0
        self.handlers: dict[str, Callable[[list, Request], None]] = {
            "ping": self._ping,
            "status": self._status,
            "list_stacks": self._list_stacks,
            "stack_info": self._stack_info,
            "get_stack": self._get_stack,
            "close_stack": self._close_stack,
            "clear_state": self._clear_state,
            "run_macro": self._run_macro,
            "run_script": self._run_script,
            "render": self._render,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "shm_probe": self._shm_probe,
            "lease_ring": self._lease_ring,
            "release_ring": self._release_ring,
            "shutdown": self._shutdown,
        }

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self.auth.apply(s)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            s.close(0)
            if e.errno == zmq.EADDRINUSE:
                raise OSError(f"{endpoint} is already in use: another bridge (try `fiji-bridge status --port {self.port}`) or another program holds it") from None
            raise OSError(f"cannot bind {endpoint}: {e}") from None
        return s

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        self._install_signals()
        reap_orphans()
        for prefix in (SERVER_PREFIX, WORKER_PREFIX):
            reap_orphans(prefix)
        self.sup.start()
        threading.Thread(target=self._warm, name="fiji-bridge-warm", daemon=True).start()
        if self.openhcs_port is not None:
            try:
                self._start_openhcs()
            except Exception as e:
                print(f"error: cannot act as OpenHCS's viewer on port {self.openhcs_port}: {e}", file=sys.stderr, flush=True)
                self.close()
                return 2
        log.info("fiji-bridge %s listening: control %s, data %s (display: %s)", __version__, self.ctrl_endpoint, self.data_endpoint, self.display)
        print(f"fiji-bridge listening on {self.ctrl_endpoint} (data {self.data_endpoint}), pid {os.getpid()}", flush=True)
        try:
            while not self._stop:
                events = dict(self.poller.poll(self.live.poll_ms()))
                if self.ctrl in events:
                    self._drain(self.ctrl, self._on_control)
                if self.data in events:
                    self._drain(self.data, self._on_data)
                for ep, (sock, mapping) in list(self.subs.items()):
                    if sock in events:
                        self._drain(sock, lambda fr, m=mapping: self._on_published(fr, m))
                if self.sup.sock is not None and self.sup.sock in events:
                    self.sup.on_readable()
                for m in self._monitors:
                    if m in events:
                        self._on_refused(m)
                self._housekeeping()
        finally:
            self.close()
        return 0

    def _drain(self, sock: zmq.Socket, handler: Callable[[list], None]) -> None:
        # bounded in count and time: a steady stream must not starve the
        # control channel nor the display pushes (which overlap with ingest)
        deadline = time.monotonic() + DRAIN_SECONDS
        for _ in range(BATCH):
            if time.monotonic() > deadline:
                return
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # never let one message take the bridge down
                self.errors += 1
                log.exception("unexpected error handling a message")

    def _housekeeping(self) -> None:
        self.sup.tick()
        self._take_inbox()
        if self._openhcs_jobs:  # OpenHCS run_macro requests, from the receiver's thread
            self._openhcs_jobs.drain(lambda body, done: self.sup.submit(WorkerJob("run_macro", body, timeout=body["timeout"], done=lambda r, _: done(r), kind="macro")))
        if self._warm_done is not None and self.sup.ready:
            self._map_warm()
        self.live.flush()
        if self._saves:
            self._finish_saves()
        now = time.monotonic()
        if self.parent_pid is not None and now - self._last_parent_check > PARENT_CHECK_INTERVAL:
            self._last_parent_check = now
            if not _owner_alive(self.parent_pid):
                log.warning("the owner (pid %s) is gone: shutting down", self.parent_pid)
                self._stop = True
        if now - self._last_reap > REAP_INTERVAL:
            self._last_reap = now
            self.ingest.segments.clear()
            self.leases.reap()
            try:
                reap_orphans()
            except Exception:
                log.exception("reap_orphans failed")

    def _warm(self) -> None:
        """Touch the ring segments lent to producers and, with a live
        display, the warm-up stack memory (while the engine starts): a fresh
        bridge's first stack finds warm pages, as every later one does."""
        try:
            nbytes = warm_bytes()
        except ValueError as e:
            log.warning("%s: no warm-up", e)
            nbytes = 0
        if nbytes:
            log.info("warm ring segments to lend: %.2f s", self.leases.warm())
        if not isinstance(self.store.memory, SharedStackMemory):
            return
        secs = self.store.memory.warm(nbytes)
        self._warm_done = {"bytes": nbytes, "seconds": round(secs, 3)}  # the loop has the worker map it
        log.info("warm stack memory: %d MiB in %.2f s", nbytes >> 20, secs)

    def _map_warm(self) -> None:
        """Once warm (and the engine ready): the worker maps the warm memory
        now, not during the first stack (page tables of 1 GiB: ~0.1-0.2 s);
        status then reports the warm-up as done."""
        done, self._warm_done = self._warm_done, None
        segments = self.store.memory.pooled_descs() if isinstance(self.store.memory, SharedStackMemory) else []

        def mapped(reply: dict, get: Any) -> None:
            self.warmed = dict(done or {}, mapped=bool(reply.get("ok")))
            if not reply.get("ok"):
                log.warning("the worker did not map the warm memory: %s", reply.get("error"))

        self.sup.submit(WorkerJob("map_segments", {"segments": segments}, timeout=60.0, done=mapped, kind="display"))

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: Any) -> None:
            log.info("signal %s: shutting down", signum)
            self._stop = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        """Stop the worker, close sockets, remove the runtime folder."""
        if self.ctx.closed:
            return
        if self.openhcs is not None:
            try:
                self.openhcs.stop()
            except Exception:
                log.exception("closing the OpenHCS receiver failed")
        self.sup.close()
        self.store.memory.close()
        self.leases.close()
        self.ingest.segments.clear()
        self._saver.shutdown(wait=False, cancel_futures=True)
        for sock, _ in self.subs.values():
            sock.close(0)
        self.subs.clear()
        for sock, m in zip((self.ctrl, self.data), self._monitors):
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            m.close(0)
        self.ctrl.close(0)
        self.data.close(0)
        self.auth.stop()
        self.ctx.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.ipc:
            for ep in (self.ctrl_endpoint, self.data_endpoint):
                try:
                    os.unlink(ep[len("ipc://"):])
                except OSError:
                    pass

    def _on_refused(self, monitor: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            ev = recv_monitor_message(monitor)
            self.refused += 1
            if self.refused <= 10 or self.refused % 1000 == 0:
                log.warning("refused a peer that failed the handshake (%s from %s; %d so far): no secret, or other keys",
                            _EVENT_NAMES.get(ev["event"], ev["event"]), ev.get("endpoint", b"?").decode("utf-8", "replace"), self.refused)

    def _swap_worker_socket(self, old: Optional[zmq.Socket], new: Optional[zmq.Socket]) -> None:
        if old is not None:
            try:
                self.poller.unregister(old)
            except KeyError:
                pass
        if new is not None:
            self.poller.register(new, zmq.POLLIN)

    # ------------------------------------------------------------------ control

    def _on_control(self, frames: list) -> None:
        env, body = _envelope(frames)
        if not body:
            self._reply(env, error_reply(None, ErrorCode.BAD_FRAME, "empty request: expected [json, *array frames]"))
            return
        try:
            req = parse_request([body[0].bytes] + [f.buffer for f in body[1:]])
        except ProtocolError as e:
            self.errors += 1
            self._reply(env, error_reply(request_id(body[0].bytes), e.code, e.message))
            return
        try:
            self.handlers[req.TYPE](env, req)
        except ProtocolError as e:
            self._reply(env, error_reply(req.id, e.code, e.message))
        except StackNotFound as e:
            self._reply(env, error_reply(req.id, ErrorCode.NOT_FOUND, str(e)))
        except Exception as e:
            self.errors += 1
            log.exception("request %s failed", req.TYPE)
            self._reply(env, error_reply(req.id, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def _reply(self, env: list, reply: dict, frames: list = ()) -> None:
        try:
            self.ctrl.send_multipart(env + encode(reply, frames), copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the client is gone or not reading
            log.warning("could not reply: %s", e)

    def _ping(self, env: list, req: Request) -> None:
        self._reply(env, ok_reply(req.id, type="pong", server="fiji-bridge", version=__version__, protocol=PROTOCOL_VERSION, pid=os.getpid(), engine=self.sup.status()["state"]))

    def status_dict(self) -> dict:
        stacks = []
        for info in self.store.infos():
            stacks.append({"key": info.key, "shape": list(info.shape), "dtype": info.dtype, "planes": info.planes, "missing": len(info.missing), "channel_names": info.channel_names, "version": info.version})
        return {
            "server": "fiji-bridge",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "control": self.ctrl_endpoint,
            "data": self.data_endpoint,
            "port": self.port,
            "uptime": time.time() - self.started,
            "engine": self.sup.status(),
            "display": self.display,
            "display_error": self.live.error,
            "windows": self.live.windows,
            "display_pending": self.live.pending,
            "stacks": stacks,
            "memory": {"used": self.ingest.memory_used(), "data": self.store.nbytes, "max": self.store.max_bytes, "shm_free": _shm_free(),
                       "warm": self.warmed, "pooled": self.store.memory.pooled_bytes, "ring_leases": self.leases.status()},
            "streams": {k: v.to_dict() for k, v in self.streams.items()},
            "dropped": sum(v.dropped for v in self.streams.values()),
            "subscriptions": list(self.subs),
            "openhcs": ({"port": self.openhcs_port, **_safe_stats(self.openhcs)} if self.openhcs is not None else None),
            "errors": self.errors + self.ingest.errors,
            "secure": True,
            "save_to_roots": self.save_roots.describe(),
            "auth": {"mode": self.auth.mode, "refused": self.refused + self.auth.refused, **({"secret_file": str(secret_path())} if self.auth.mode == "secret" else {})},
        }

    def _status(self, env: list, req: Request) -> None:
        self._reply(env, ok_reply(req.id, **self.status_dict()))

    def _list_stacks(self, env: list, req: Request) -> None:
        self._reply(env, ok_reply(req.id, stacks=self.store.keys()))

    def _stack_info(self, env: list, req: Any) -> None:
        self._reply(env, ok_reply(req.id, info=self.store.info(req.key).to_dict()))

    def _get_stack(self, env: list, req: Any) -> None:
        arr, info = self.store.snapshot(req.key)
        sink = FrameSink()
        desc = sink.put(arr)
        self._reply(env, ok_reply(req.id, info=info.to_dict(), array=desc), sink.frames)

    def _close_stack(self, env: list, req: Any) -> None:
        self.store.close(req.key)
        self.live.forget(req.key)
        self.origins.pop(req.key, None)
        self._reply(env, ok_reply(req.id, closed=req.key))

    def _clear_state(self, env: list, req: Request) -> None:
        keys = self.store.keys()
        self.store.clear()
        for k in keys:
            self.live.forget(k)
        self.origins.clear()
        self.streams.clear()
        self._reply(env, ok_reply(req.id, closed=keys))

    def _shutdown(self, env: list, req: Request) -> None:
        self._reply(env, ok_reply(req.id, stopping=True))
        self._stop = True

    def _shm_probe(self, env: list, req: Any) -> None:
        try:
            data = read_shm(req.name, (req.size,), "uint8")
        except TransportError as e:
            self._reply(env, ok_reply(req.id, readable=False, reason=str(e)))
            return
        self._reply(env, ok_reply(req.id, readable=True, data=data.tobytes().hex()))

    def _lease_ring(self, env: list, req: Any) -> None:
        lease, names = self.leases.lease(req.pid, req.start, req.slots, req.slot_bytes)
        self._reply(env, ok_reply(req.id, lease=lease, segments=names))

    def _release_ring(self, env: list, req: Any) -> None:
        self._reply(env, ok_reply(req.id, released=self.leases.release(req.lease)))

    def _subscribe(self, env: list, req: Any) -> None:
        if req.endpoint in self.subs:
            self._reply(env, ok_reply(req.id, endpoint=req.endpoint, already=True))
            return
        try:
            mapping = AxisMapping.from_dict(req.mapping) if req.mapping else None
        except StackError as e:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"subscribe: {e}") from None
        s = self.ctx.socket(zmq.SUB)
        s.linger = 0
        s.rcvhwm = 1000
        try:
            s.connect(req.endpoint)
        except zmq.ZMQError as e:
            s.close(0)
            raise ProtocolError(ErrorCode.BAD_FIELD, f"subscribe: cannot connect to {req.endpoint}: {e}") from None
        s.setsockopt(zmq.SUBSCRIBE, b"")
        self.subs[req.endpoint] = (s, mapping)
        self.poller.register(s, zmq.POLLIN)
        self._reply(env, ok_reply(req.id, endpoint=req.endpoint))

    def _unsubscribe(self, env: list, req: Any) -> None:
        entry = self.subs.pop(req.endpoint, None)
        if entry is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"not subscribed to {req.endpoint}; subscriptions: {list(self.subs)}")
        self.poller.unregister(entry[0])
        entry[0].close(0)
        self._reply(env, ok_reply(req.id, endpoint=req.endpoint))

    # ------------------------------------------------------------------ macros

    def _run_script(self, env: list, req: Any) -> None:
        """A script (SciJava language or ImageJ macro with #@output): as a macro, plus language and inputs."""
        self._run_macro(env, req, op="run_script")

    def _run_macro(self, env: list, req: Any, op: str = "run_macro") -> None:
        if req.save_to:
            try:
                self.save_roots.check(req.save_to)
            except SecurityError as e:
                raise ProtocolError(ErrorCode.FORBIDDEN, str(e)) from None
        body: dict = {
            "code": req.code,
            "dims": req.dims,
            "args": req.args,
            "dialog_options": req.dialog_options,
            "timeout": req.timeout or DEFAULT_MACRO_TIMEOUT,
            "title": req.title,
            "channel_names": req.channel_names,
            "calibration": req.calibration,
            "outputs": req.outputs,
        }
        if op == "run_script":
            body.update(language=req.language, inputs=req.inputs)
        arrays: dict[str, np.ndarray] = {}
        if req.stack is not None:
            stack = self.store.get(req.stack)
            info = self.store.info(req.stack)
            arrays["image"] = stack.array  # copied once, into the worker's segment
            body["dims"] = "TZCYX"
            if body["channel_names"] is None and any(info.channel_names):
                body["channel_names"] = [n or f"C{i + 1}" for i, n in enumerate(info.channel_names)]
            if body["calibration"] is None and info.calibration.is_set:
                body["calibration"] = info.calibration.to_dict()
            body["title"] = body["title"] or req.stack
        elif req.image is not None:
            arrays["image"] = req.image_array()

        def done(reply: dict, get: Callable[[dict], np.ndarray]) -> None:
            if not reply.get("ok"):
                err = dict(reply.get("error") or {})
                code = err.pop("code", ErrorCode.ENGINE)
                message = err.pop("message", "the macro failed")
                macro = err.pop("macro", None) or {"message": message, "kind": err.get("kind", "engine" if code == ErrorCode.ENGINE else "exception")}
                err.pop("trace", None)
                self._reply(env, error_reply(req.id, code, message, macro=macro))
                return
            try:
                result = decode_macro_result(reply["result"], get)
            except Exception as e:
                log.exception("bad macro result from the worker")
                self._reply(env, error_reply(req.id, ErrorCode.INTERNAL, f"could not read the macro result: {e}"))
                return
            if req.save_to:
                origin = self.origins.get(req.stack or "", {})
                fut = self._saver.submit(_save, result, req.save_to, origin, req.stack)
                self._saves.append((fut, env, req.id, {}, [result]))
                return
            self._reply_result(env, req.id, result)

        self.sup.submit(WorkerJob(op, body, arrays, timeout=float(body["timeout"]), done=done, kind="macro"))

    def _reply_result(self, env: list, rid: Any, result: Any, **extra: Any) -> None:
        sink = FrameSink()
        enc = encode_macro_result(result, sink.put)
        self._reply(env, ok_reply(rid, result=enc, **extra), sink.frames)

    def _finish_saves(self) -> None:
        pending = []
        for fut, env, rid, extra, holder in self._saves:
            if not fut.done():
                pending.append((fut, env, rid, extra, holder))
                continue
            try:
                saved = fut.result()
            except Exception as e:
                log.exception("save_to failed")
                self._reply(env, error_reply(rid, ErrorCode.INTERNAL, f"the macro ran but saving its outputs failed: {type(e).__name__}: {e}"))
                continue
            self._reply_result(env, rid, holder[0], saved=saved)
        self._saves = pending

    def _render(self, env: list, req: Any) -> None:
        body: dict = {"montage": req.montage}
        arrays: dict[str, np.ndarray] = {}
        if self.live.is_current(req.key):
            body["key"] = req.key
        else:
            arr, info = self.store.snapshot(req.key)
            arrays["image"] = arr
            body["channel_names"] = [n or f"C{i + 1}" for i, n in enumerate(info.channel_names)]

        def done(reply: dict, get: Callable[[dict], np.ndarray]) -> None:
            if not reply.get("ok"):
                err = reply.get("error") or {}
                self._reply(env, error_reply(req.id, err.get("code", ErrorCode.ENGINE), err.get("message", "render failed")))
                return
            sink = FrameSink()
            desc = sink.put(get(reply["image"]))
            self._reply(env, ok_reply(req.id, image=desc), sink.frames)

        self.sup.submit(WorkerJob("render", body, arrays, timeout=120.0, done=done, kind="render"))

    # ------------------------------------------------------------------ data

    def _on_data(self, frames: list) -> None:
        env, body = _envelope(frames)
        ack = self.ingest.plane(body, None)
        try:
            self.data.send_multipart(env + [ack.encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not ack plane: %s", e)

    def _on_published(self, frames: list, mapping: Optional[AxisMapping]) -> None:
        if frames and len(frames) == 3 and len(frames[0]) < 256 and not frames[0].bytes.lstrip().startswith(b"{"):
            frames = frames[1:]  # a topic frame
        ack = self.ingest.plane(frames, mapping, published=True)
        if not ack.ok:
            log.warning("rejected a published plane: %s", ack.error)

    # ------------------------------------------------------------------ OpenHCS

    def _start_openhcs(self) -> None:
        try:
            from .openhcs import OpenHCSReceiver
            from .openhcs.macro import LoopMacros
        except ImportError as e:
            log.error("--openhcs-port needs fiji_bridge.openhcs: %s", e)
            print(f"warning: OpenHCS compatibility unavailable: {e}", file=sys.stderr, flush=True)
            return
        self._openhcs_jobs = LoopMacros()
        # tcp and ipc both: OpenHCS on its defaults looks for the viewer over ipc
        # (~/.openhcs/ipc/openhcs-zmq-<port>.sock). An OpenHCS "shutdown" stops
        # only the viewer stand-in; the bridge keeps serving its other clients.
        self.openhcs = OpenHCSReceiver(
            port=self.openhcs_port,
            sink=self._openhcs_sink,
            context=self.ctx,
            status=self._openhcs_status,
            transport="both",
            macro_runner=self._openhcs_jobs.run,  # drained into the engine by _housekeeping
            macros=self.openhcs_macros,
        )
        self.openhcs.start()

    def _openhcs_status(self) -> dict:
        return {"server": "fiji-bridge", "version": __version__, "stacks": self.store.keys(), "engine": self.sup.state}

    def _openhcs_sink(self, key: str, t: int, z: int, c: int, plane: np.ndarray, meta: dict) -> None:
        """Called by the OpenHCS receiver (from its thread): place a plane now
        (the store is thread-safe, so the sender hears of a rejection) and
        let the loop update the display."""
        self.ingest.check_room(key, plane.nbytes)
        calibration = meta.get("calibration") if isinstance(meta, dict) else None
        if isinstance(calibration, dict):
            calibration = Calibration.from_dict(calibration)
        self.store.add_at(key, t, z, c, plane, channel_name=(meta or {}).get("channel_name"), calibration=calibration)
        with self._inbox_lock:
            self._inbox.append((key, t, z, c, None, meta))  # type: ignore[arg-type]

    def _take_inbox(self) -> None:
        if not self._inbox:
            return
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for key, t, z, c, _, meta in items:
            st = self.ingest.stream("openhcs")
            st.planes += 1
            st.transport = "openhcs"
            self.live.mark(key, (t, z, c))

# --------------------------------------------------------------------------- helpers


def _shm_free() -> Optional[int]:
    """Bytes free in /dev/shm (None where there is none)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def _owner_alive(pid: int) -> bool:
    """Whether the owner ``pid`` lives and is still our parent (a reused pid
    is not our parent: orphans are re-parented to init or a subreaper)."""
    if os.getppid() != pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _envelope(frames: list) -> tuple[list, list]:
    """Split a ROUTER message into (routing envelope, body); REQ peers add an empty delimiter."""
    env = [frames[0].bytes]
    body = frames[1:]
    if body and len(body[0]) == 0:
        env.append(b"")
        body = body[1:]
    return env, body


def _safe_stats(receiver: Any) -> dict:
    try:
        return dict(receiver.stats())
    except Exception:
        return {}


def _save(result: Any, uri: str, origin: dict, stack: Optional[str]) -> list[str]:
    from .outputs import save_result

    return list(save_result(result, uri, well=origin.get("well", ""), site=int(origin.get("site", 0) or 0), source={"stack": stack, **origin}))


def serve(
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    ipc: bool = False,
    engine: str = "auto",
    display: Optional[bool] = None,
    openhcs_port: Optional[int] = None,
    keys_dir: Optional[str] = None,
    parent_pid: Optional[int] = None,
    allow_save_to: Optional[list[str]] = None,
    openhcs_macros: str = "ipc",
) -> int:
    """``fiji-bridge serve``: run a bridge until shutdown; returns an exit code."""
    logging.basicConfig(level=os.environ.get("FIJI_BRIDGE_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        server = BridgeServer(port, host, ipc=ipc, engine=engine, display=display, openhcs_port=openhcs_port, keys_dir=keys_dir, parent_pid=parent_pid, allow_save_to=allow_save_to, openhcs_macros=openhcs_macros)
    except SecurityError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except OSError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return server.run()
