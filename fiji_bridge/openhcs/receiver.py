"""A stand-in for OpenHCS's Fiji viewer inside the bridge.

:class:`OpenHCSReceiver` binds the two sockets OpenHCS's viewer binds --
data REP on ``port``, control REP on ``port + 1000`` -- and runs one thread
that serves both:

* data: each batch is checked (:mod:`.wire`), every plane is copied out of
  the sender's shared memory (:mod:`.shm`), given a window key and
  (t, z, c) (:mod:`.placement`) and handed to ``sink``; then the sender gets
  ``{"status": "success"}``, or ``{"status": "error", "message": ...}`` if
  anything was malformed or refused. Per-image acks follow: to each item's
  ``return_route`` (0.6.x senders) or to the shared ack port (0.2.x).
* control: pickled dicts through a refusing unpickler; ``ping`` (pong with
  the fields zmqruntime's ``PongResponse`` reads), ``clear_state``,
  ``settle``, ``status``, ``shutdown``/``force_shutdown`` (stops this
  receiver and frees its ports, then calls ``on_shutdown``), and OpenHCS
  0.8.6's ``run_macro`` (:mod:`.macro_wire`, :mod:`.macro`), run on a worker
  thread while the loop goes on serving data and the other control socket.

``run_macro`` runs code, and an OpenHCS sender has no credential to show,
so who may send it is decided by where it arrives (``macros``): ``"ipc"``
(the default) serves it only on the ipc control socket, and only while the
socket's folder is owned by this user and closed to everyone else (mode
0700: fiji-bridge creates ``~/.openhcs/ipc`` so); ``"any"`` also on loopback
tcp, where every local account can reach it (the user's explicit choice);
``"off"`` never. Each transport has its own control socket so the receiver
knows which one a request came in on.

Whatever a peer sends, the receiver replies and goes on serving.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket as pysocket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import zmq

from .macro import MacroRunError, MacroRunner, execute
from .macro_wire import MAX_MACRO_BYTES, MacroRequest, dumps_reply, loads_control
from .placement import Placement, Placer, PlacementError, producer_label
from .shm import ReleasedBlocks, copy_block
from .wire import (
    AckRoute,
    Batch,
    ImageItem,
    RoiItem,
    WireError,
    ack_targets,
    check_plain,
    dumps_plain,
    parse_batch,
)

__all__ = ["OpenHCSReceiver", "PlaneSink", "RoiSink"]

log = logging.getLogger(__name__)

PlaneSink = Callable[[str, int, int, int, np.ndarray, dict], None]
RoiSink = Callable[[str, "list[bytes]", dict], None]

#: OpenHCS's IPC naming: ~/.openhcs/ipc/openhcs-zmq-<port>.sock
DEFAULT_IPC_DIR = Path.home() / ".openhcs" / "ipc"
DEFAULT_IPC_PREFIX = "openhcs-zmq"
#: zmqruntime 0.2.x viewers push acks to this fixed port
LEGACY_ACK_PORT = 7555
MAX_DATA_BYTES = 64 << 20
_TRANSPORTS = {"tcp": ("tcp",), "ipc": ("ipc",), "both": ("tcp", "ipc")}
#: OpenHCS's default Fiji viewer port
DEFAULT_PORT = 5565
_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "[::1]", "[::1]": "[::1]"}
#: who may send run_macro: see the module doc
MACRO_POLICIES = ("ipc", "any", "off")
#: a macro's time limit: under OpenHCS's own wait for the reply (300 s,
#: FijiMacroExecutionRequest.send), so that the sender hears of a timeout
MACRO_TIMEOUT_S = 280.0


@dataclass
class _Stats:
    batches: int = 0
    planes: int = 0
    rois: int = 0
    errors: int = 0
    acks: int = 0
    macros: int = 0
    last_error: Optional[str] = None


class OpenHCSReceiver:
    """Receive what OpenHCS's ``FijiStreamingBackend`` sends, as its Fiji viewer would.

    ``sink(key, t, z, c, plane, meta)`` stores one 2-D plane; raising
    ``ValueError`` refuses it (the sender then gets an error reply and an
    error ack for that image). ``meta`` holds ``channel_name`` (from the
    batch's ``component_names_metadata``, or None), ``components`` (the
    item's OpenHCS metadata), ``path``, ``image_id``, ``producer``,
    ``display`` (``lut``, ``auto_contrast``, ...) and ``images_dir``.
    ``rois_sink(key, roi_files, meta)`` gets ImageJ ``.roi`` bytes.

    ``transport``: ``"tcp"`` (loopback ``host``), ``"ipc"`` (OpenHCS's
    default on Unix: ``<ipc_dir>/<ipc_prefix>-<port>.sock``, by default
    ``~/.openhcs/ipc/openhcs-zmq-<port>.sock``) or ``"both"``, so that
    OpenHCS finds the viewer whichever transport it is configured for.
    ``status()`` (called on the receiver thread) is added to each pong as
    ``bridge``. ``on_shutdown`` runs after an OpenHCS ``shutdown`` request
    stopped this receiver.

    Blocks named in batches belong to their sender, which unlinks them
    (:mod:`.shm`); ``orphan_grace_s`` opts in to unlinking, that long after
    the reply, the ones a sender left behind -- only ``fiji_`` blocks of
    this user's.

    ``macro_runner(code, args, timeout)`` runs OpenHCS's ``run_macro``
    requests in the bridge's engine (none: they are refused); ``macros``
    says on which transports (module doc).
    """

    def __init__(
        self,
        port: int,
        sink: PlaneSink,
        *,
        host: str = "127.0.0.1",
        transport: str = "tcp",
        ipc_dir: Optional[os.PathLike | str] = None,
        ipc_prefix: str = DEFAULT_IPC_PREFIX,
        rois_sink: Optional[RoiSink] = None,
        context: Optional[zmq.Context] = None,
        status: Optional[Callable[[], dict]] = None,
        control_offset: int = 1000,
        legacy_ack_port: Optional[int] = LEGACY_ACK_PORT,
        key_prefix: str = "openhcs",
        orphan_grace_s: Optional[float] = None,
        on_shutdown: Optional[Callable[[], None]] = None,
        macro_runner: Optional[MacroRunner] = None,
        macros: str = "ipc",
        macro_timeout: float = MACRO_TIMEOUT_S,
    ) -> None:
        if not isinstance(port, int) or not 1 <= port <= 65535 - control_offset:
            raise ValueError(f"OpenHCS port must be 1..{65535 - control_offset}, got {port!r}")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be 'tcp', 'ipc' or 'both', got {transport!r}")
        if macros not in MACRO_POLICIES:
            raise ValueError(f"macros must be one of {', '.join(MACRO_POLICIES)}, got {macros!r}")
        if transport != "ipc" and host not in _LOOPBACK:
            raise ValueError(
                f"the OpenHCS receiver binds loopback only (got host {host!r}): OpenHCS's sender "
                "passes planes in shared memory, so it must run on this machine"
            )
        self.port = port
        self.control_port = port + control_offset
        self.transport = transport
        self._kinds = _TRANSPORTS[transport]
        self.host = _LOOPBACK.get(host, host)
        self.ipc_dir = Path(ipc_dir) if ipc_dir is not None else DEFAULT_IPC_DIR
        self.ipc_prefix = ipc_prefix
        self.legacy_ack_port = legacy_ack_port
        self._sink = sink
        self._rois_sink = rois_sink
        self._status = status
        self._on_shutdown = on_shutdown
        self._macro_runner = macro_runner
        self.macros = macros
        self.macro_timeout = float(macro_timeout)
        self._macro_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # control socket -> the run_macro reply it owes (a REP answers before it reads again)
        self._owed: dict[zmq.Socket, concurrent.futures.Future] = {}
        self._own_context = context is None
        self._context = context
        self._placer = Placer(key_prefix)
        self._released = ReleasedBlocks(orphan_grace_s)
        self._stats = _Stats()
        self._stop = threading.Event()
        self._ipc_files: list[tuple[Path, int]] = []  # (path, inode) we bound
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._started = time.time()

    # ------------------------------------------------------------ addresses

    def urls(self, port: int) -> list[str]:
        """Every address of ``port`` (tcp first when both are bound)."""
        return [self._url(kind, port) for kind in self._kinds]

    def url(self, port: int) -> str:
        return self.urls(port)[0]

    def _url(self, kind: str, port: int) -> str:
        if kind == "ipc":
            return f"ipc://{self.ipc_dir / f'{self.ipc_prefix}-{port}.sock'}"
        return f"tcp://{self.host}:{port}"

    @property
    def data_url(self) -> str:
        return self.url(self.port)

    @property
    def control_url(self) -> str:
        return self.url(self.control_port)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        s = self._stats
        return {
            "port": self.port,
            "control_port": self.control_port,
            "transport": self.transport,
            "running": self.running,
            "batches": s.batches,
            "planes": s.planes,
            "rois": s.rois,
            "errors": s.errors,
            "acks": s.acks,
            "macros": s.macros,
            "run_macro": self.macro_transports(),
            "last_error": s.last_error,
        }

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind both sockets (raises if either address is taken) and serve."""
        with self._lock:
            if self.running:
                return
            if self._context is None or self._context.closed:
                self._context = zmq.Context()
                self._own_context = True
            data = None
            controls: dict[zmq.Socket, str] = {}
            try:
                data = self._bind(zmq.REP, self.port, MAX_DATA_BYTES)
                for kind in self._kinds:  # one per transport: run_macro depends on which
                    cap = MAX_MACRO_BYTES if self._may_run_macros(kind) else MAX_DATA_BYTES
                    controls[self._bind(zmq.REP, self.control_port, cap, kinds=(kind,))] = kind
            except BaseException:
                for s in (data, *controls):
                    if s is not None:
                        s.close(linger=0)
                self._remove_ipc_files()
                raise
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._serve, args=(data, controls), name=f"openhcs-receiver-{self.port}", daemon=True
            )
            self._thread.start()
            log.info(
                "OpenHCS receiver: data %s, control %s",
                " ".join(self.urls(self.port)),
                " ".join(self.urls(self.control_port)),
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close the sockets (and, opted in, unlink left blocks); idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - a sink that never returns
                log.error("OpenHCS receiver thread did not stop within %.0f s", timeout)
                return
        if thread is threading.current_thread():
            return  # the thread closes its sockets on its way out
        self._thread = None
        if self._own_context and self._context is not None and not self._context.closed:
            self._context.term()

    def __enter__(self) -> "OpenHCSReceiver":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _bind(self, kind: int, port: int, max_bytes: int, kinds: Optional[tuple[str, ...]] = None) -> zmq.Socket:
        assert self._context is not None
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        try:
            for url in [self._url(k, port) for k in kinds or self._kinds]:
                path = Path(url[len("ipc://") :]) if url.startswith("ipc://") else None
                if path is not None:
                    _make_private_dirs(path.parent)
                    if _unix_socket_alive(path):
                        raise OSError(f"{url} is in use by another process (an OpenHCS viewer or another bridge?)")
                try:
                    sock.bind(url)
                except zmq.ZMQError as exc:
                    raise OSError(f"cannot bind the OpenHCS receiver to {url}: {exc}") from None
                if path is not None:
                    self._ipc_files.append((path, path.stat().st_ino))
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _remove_ipc_files(self) -> None:
        """Remove the socket files this receiver bound (not a newer binder's)."""
        for path, ino in self._ipc_files:
            try:
                if path.stat().st_ino == ino:
                    path.unlink()
            except OSError:
                pass
        self._ipc_files.clear()

    # ------------------------------------------------------------ the loop

    def _serve(self, data: zmq.Socket, controls: dict[zmq.Socket, str]) -> None:
        poller = zmq.Poller()
        poller.register(data, zmq.POLLIN)
        for control in controls:
            poller.register(control, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(20 if self._owed else 100))
                for control, kind in controls.items():
                    if control in self._owed:
                        self._pay_owed(control, poller)
                    elif control in events and not self._stop.is_set():
                        self._serve_control(control, kind, poller)
                if data in events and not self._stop.is_set():
                    self._serve_data(data)
                self._released.sweep()
        except Exception:  # pragma: no cover - a bug here must not hang senders silently
            log.exception("OpenHCS receiver loop failed")
        finally:
            data.close(linger=0)
            for control in controls:
                control.close(linger=0)
            if self._macro_pool is not None:
                self._macro_pool.shutdown(wait=False, cancel_futures=True)
                self._macro_pool = None
            self._owed.clear()
            if self._own_context and self._context is not None and not self._context.closed:
                # ZeroMQ closes sockets in its own threads: once term returns their ports are
                # free, so an OpenHCS viewer started when the socket files are gone can bind them
                self._context.term()
            self._remove_ipc_files()
            self._released.sweep(everything=True)
            log.info("OpenHCS receiver on port %d stopped", self.port)

    # ------------------------------------------------------------ control

    def _serve_control(self, sock: zmq.Socket, kind: str, poller: zmq.Poller) -> None:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        shutdown = False
        try:
            if len(frames) != 1:
                raise WireError(f"control message has {len(frames)} frames, expected 1")
            cap = MAX_MACRO_BYTES if self._may_run_macros(kind) else MAX_DATA_BYTES
            msg, request = loads_control(frames[0], max_bytes=cap)
            if request is not None:
                self._start_macro(sock, kind, request, poller)
                return
            reply, shutdown = self._control_reply(msg)
        except WireError as exc:
            self._note_error(f"control: {exc}")
            reply = _control_error(str(exc))
        except Exception as exc:  # noqa: BLE001 - reply, keep serving
            log.exception("OpenHCS control handler failed")
            reply = _control_error(f"{type(exc).__name__}: {exc}")
        try:
            payload = dumps_plain(reply)
        except WireError:
            payload = dumps_plain(_control_error("internal error: reply is not plain data"))
        sock.send(payload)
        if shutdown:
            self._stop.set()
            if self._on_shutdown is not None:
                threading.Thread(target=self._on_shutdown, name="openhcs-on-shutdown", daemon=True).start()

    # ------------------------------------------------------------ run_macro

    def macro_transports(self) -> list[str]:
        """The transports on which ``run_macro`` is served right now."""
        return [k for k in self._kinds if self._may_run_macros(k)]

    def _may_run_macros(self, kind: str) -> bool:
        if self._macro_runner is None or self.macros == "off":
            return False
        if self.macros == "any":
            return True
        return kind == "ipc" and _private_dir(self.ipc_dir)

    def _macro_refusal(self, kind: str) -> str:
        if self._macro_runner is None:
            return "this fiji-bridge receiver has no engine to run macros on"
        if self.macros == "off":
            return "run_macro is switched off on this bridge (--openhcs-macros off)"
        if kind != "ipc" and self.macros == "ipc":
            return (
                "run_macro runs code and OpenHCS senders cannot authenticate, so fiji-bridge serves it "
                "only over ipc (OpenHCS's default transport on Linux and macOS). To allow it on loopback "
                "tcp, where every local account can reach it, start the bridge with --openhcs-macros any"
            )
        return (
            f"run_macro is served over ipc only while {self.ipc_dir} is owned by you and closed to "
            f"others (chmod 700 {self.ipc_dir}), or with --openhcs-macros any"
        )

    def _start_macro(self, sock: zmq.Socket, kind: str, request: MacroRequest, poller: zmq.Poller) -> None:
        """Run ``request`` off the loop; the reply is sent by :meth:`_pay_owed`."""
        if not self._may_run_macros(kind):
            msg = self._macro_refusal(kind)
            self._note_error(f"run_macro refused: {msg}")
            sock.send(dumps_reply({"status": "error", "message": msg}))
            return
        if self._macro_pool is None:
            self._macro_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openhcs-macro")
        poller.unregister(sock)  # nothing more is read from it until it has answered
        self._owed[sock] = self._macro_pool.submit(self._run_macro, request)

    def _run_macro(self, request: MacroRequest) -> bytes:
        assert self._macro_runner is not None
        try:
            outputs = execute(request, self._macro_runner, timeout=self.macro_timeout)
            reply = dumps_reply({"status": "success"}, outputs)
        except (MacroRunError, ValueError) as exc:
            self._note_error(f"run_macro {request.macro_path}: {exc}")
            return dumps_reply({"status": "error", "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the sender hears of it
            log.exception("OpenHCS run_macro failed")
            return dumps_reply({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
        self._stats.macros += 1
        return reply

    def _pay_owed(self, sock: zmq.Socket, poller: zmq.Poller) -> None:
        fut = self._owed[sock]
        if not fut.done():
            return
        del self._owed[sock]
        try:
            payload = fut.result()
        except BaseException as exc:  # noqa: BLE001 - cancelled or a bug: still answer
            payload = dumps_reply({"status": "error", "message": f"run_macro failed: {exc!r}"})
        sock.send(payload)
        poller.register(sock, zmq.POLLIN)

    def _control_reply(self, msg: Mapping[str, Any]) -> tuple[dict, bool]:
        kind = msg.get("type")
        if kind == "ping":
            return self._pong(), False
        if kind == "clear_state":
            self._placer.clear()
            return _ok("clear_state_ack", "Dimension values cleared"), False
        if kind == "settle":
            n = self._stats.planes + self._stats.rois
            reply = _ok("settle_ack", f"Fiji viewer settlement progress: {n}/{n}.")
            reply.update(
                phase="complete",
                completed_update_count=n,
                total_update_count=n,
                active_route=None,
                active_route_work_unit_count=0,
            )
            return reply, False
        if kind == "status":
            reply = _ok("status_ack")
            reply["receiver"] = self.stats()
            return reply, False
        if kind in ("shutdown", "force_shutdown"):
            return _ok("shutdown_ack", "fiji-bridge: the OpenHCS viewer endpoint is stopping"), True
        raise WireError(
            f"unsupported control message type {kind!r}; this Fiji viewer (fiji-bridge) answers "
            "ping, clear_state, settle, status, shutdown, force_shutdown, run_macro"
        )

    def _pong(self) -> dict:
        pong: dict[str, Any] = {
            "type": "pong",
            "status": "success",
            "port": self.port,
            "control_port": self.control_port,
            "ready": True,
            "server": "fiji-bridge",
            "server_type": "fiji",
            "server_role": "viewer",
            # zmqruntime's PongResponse knows only these capabilities (run_macro is not one)
            "control_capabilities": ["force_shutdown", "ping", "shutdown"],
            "uptime": time.time() - self._started,
        }
        ident = _process_identity()
        if ident is not None:
            pong["process_identity"] = ident
        if self._status is not None:
            try:
                bridge = self._status()
                check_plain(bridge)
                pong["bridge"] = bridge
            except Exception as exc:  # noqa: BLE001 - a pong must never fail
                log.warning("bridge status unavailable for the OpenHCS pong: %s", exc)
        return pong

    # ------------------------------------------------------------ data

    def _serve_data(self, sock: zmq.Socket) -> None:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        raw = frames[0] if len(frames) == 1 else b""
        acks: list[tuple[AckRoute, str, Optional[str]]] = []
        blocks: list[str] = []
        try:
            if len(frames) != 1:
                raise WireError(f"batch has {len(frames)} frames, expected one JSON frame")
            batch = parse_batch(raw)
            blocks = [i.shm_name for i in batch.images]
            failures = self._ingest(batch, acks)
        except (WireError, PlacementError) as exc:
            self._note_error(f"batch refused: {exc}")
            acks = [(route, "error", str(exc)) for route in ack_targets(raw)]
            reply = {"status": "error", "message": f"fiji-bridge refused the batch: {exc}"}
        except Exception as exc:  # noqa: BLE001 - reply, keep serving
            log.exception("OpenHCS batch handling failed")
            self._note_error(f"batch failed: {exc}")
            acks = [(route, "error", str(exc)) for route in ack_targets(raw)]
            reply = {"status": "error", "message": f"fiji-bridge failed on the batch: {type(exc).__name__}: {exc}"}
        else:
            self._stats.batches += 1
            if failures:
                shown = "; ".join(failures[:5]) + (f"; ... ({len(failures) - 5} more)" if len(failures) > 5 else "")
                reply = {"status": "error", "message": f"fiji-bridge refused {len(failures)} item(s): {shown}"}
            else:
                reply = {"status": "success"}
        sock.send_json(reply)
        self._released.note(blocks)
        self._send_acks(acks)

    def _ingest(self, batch: Batch, acks: list) -> list[str]:
        """Copy every plane, then store each; returns the per-item refusals."""
        copies = {id(item): copy_block(item.shm_name, item.shape, item.dtype) for item in batch.images}
        placements = self._placer.place(batch)
        failed: dict[int, str] = {}
        for p in placements:
            if p.item.index in failed:
                continue
            try:
                if isinstance(p.item, ImageItem):
                    data = copies[id(p.item)]
                    plane = data[p.plane] if data.ndim == 3 else data
                    self._sink(p.key, p.t, p.z, p.c, plane, self._meta(p, batch))
                    self._stats.planes += 1
                else:
                    self._store_rois(p, batch)
            except ValueError as exc:
                failed[p.item.index] = f"{p.item.where()}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a sink bug is this item's error
                log.exception("OpenHCS sink failed on %s", p.item.where())
                failed[p.item.index] = f"{p.item.where()}: {type(exc).__name__}: {exc}"
        for item in batch.items:
            if item.ack is not None:
                err = failed.get(item.index)
                acks.append((item.ack, "error" if err else "success", err))
        for msg in failed.values():
            self._note_error(msg)
        return list(failed.values())

    def _store_rois(self, p: Placement, batch: Batch) -> None:
        item = p.item
        assert isinstance(item, RoiItem)
        if self._rois_sink is None:
            raise ValueError("this bridge does not take ROIs (no ROI sink)")
        self._rois_sink(p.key, list(item.rois), self._meta(p, batch))
        self._stats.rois += len(item.rois)

    def _meta(self, p: Placement, batch: Batch) -> dict:
        item = p.item
        return {
            "source": "openhcs",
            "channel_name": p.channel_name,
            "components": dict(p.metadata or item.metadata),
            "path": item.path,
            "image_id": item.ack.image_id if item.ack else None,
            "producer": producer_label(item.producer_identity),
            "display": dict(batch.display.extras),
            "images_dir": batch.images_dir,
        }

    # ------------------------------------------------------------ acks

    def _send_acks(self, acks: list[tuple[AckRoute, str, Optional[str]]]) -> None:
        """PUSH one ``image_ack`` per tracked image, without ever blocking the loop."""
        by_url: dict[str, list[dict]] = {}
        now = time.time()
        for route, status, error in acks:
            msg: dict[str, Any] = {
                "type": "image_ack",
                "image_id": route.image_id,
                "viewer_port": self.port,
                "viewer_type": "fiji",
                "status": status,
                "timestamp": now,
            }
            if route.return_route is not None:  # 0.6.x: exactly ImageAck's fields
                msg.update(error=error, return_route=route.return_route, producer=route.producer)
                url = route.return_route["url"]
            elif self.legacy_ack_port is not None:  # 0.2.x: the shared ack port
                if error is not None:
                    msg["error"] = error
                # on the sender's transport, which a REP cannot tell: all of ours
                for url in self.urls(self.legacy_ack_port):
                    by_url.setdefault(url, []).append(msg)
                continue
            else:
                continue
            by_url.setdefault(url, []).append(msg)
        assert self._context is not None
        for url, msgs in by_url.items():
            sock = self._context.socket(zmq.PUSH)
            try:
                sock.setsockopt(zmq.LINGER, 2000)  # the io thread delivers after close()
                sock.setsockopt(zmq.SNDHWM, len(msgs) + 16)
                sock.connect(url)
                for m in msgs:
                    sock.send_json(m, zmq.NOBLOCK)
                    self._stats.acks += 1
            except zmq.ZMQError as exc:
                log.warning("OpenHCS acks to %s not sent: %s", url, exc)
            finally:
                sock.close()

    def _note_error(self, msg: str) -> None:
        self._stats.errors += 1
        self._stats.last_error = msg[:2000]
        log.warning("OpenHCS receiver: %s", msg)


def _ok(kind: str, message: Optional[str] = None) -> dict:
    reply: dict[str, Any] = {"status": "success", "type": kind}
    if message is not None:
        reply["message"] = message
    return reply


def _control_error(message: str) -> dict:
    return {"type": "error", "status": "error", "message": message}


def _process_identity() -> Optional[dict]:
    """``{pid, create_time}`` as zmqruntime's ProcessIdentity (psutil) states it."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        p = psutil.Process()
        return {"pid": p.pid, "create_time": p.create_time()}
    except Exception:  # noqa: BLE001
        return None


def _private_dir(path: Path) -> bool:
    """Owned by this user and closed to group and others (what run_macro over ipc needs)."""
    try:
        st = path.stat()
    except OSError:
        return False
    getuid = getattr(os, "getuid", None)  # no ipc (and no uid) on Windows
    return getuid is not None and st.st_uid == getuid() and not st.st_mode & 0o077


def _make_private_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders are 0700 (existing ones are left as they are)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass


def _unix_socket_alive(path: Path) -> bool:
    if not path.exists():
        return False
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False  # a stale file; zmq replaces it
    finally:
        s.close()
