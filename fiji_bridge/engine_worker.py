"""The engine worker: the process that holds the JVM and ImageJ for a bridge.

Run by :class:`fiji_bridge.supervisor.EngineSupervisor` as
``python -m fiji_bridge.engine_worker --endpoint ipc://... --parent PID``.
It connects a PAIR socket to the bridge, starts the engine, says
``{"op": "ready"}`` and then serves one request at a time:
``run_macro``, ``run_script``, ``show_stack``, ``update_plane``, ``update_planes``,
``close_stack``, ``map_segments``, ``render``, ``ping``, ``quit``. Input pixels are mapped from
the bridge's shared memory (no copy before ImageJ's own: one bulk copy from
the mapping into the Java arrays); a live stack's shared storage (or its
staging segment) stays mapped between its updates. Result pixels are written into segments this
worker creates (``fjbw_<bridge pid>_<worker pid>_<n>``), which the bridge
copies and unlinks. When the bridge dies, the worker reaps the segments of
both prefixes and exits.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np
import zmq

from .components import Calibration
from .protocol import FrameSink, encode, encode_macro_result, parse_json
from .supervisor import EXIT_IMAGEJ_QUIT, SERVER_PREFIX, WORKER_PREFIX, SharedArray, attach_array, reap_prefix

#: result arrays up to this size travel in the reply's frames, not in shared memory
INLINE_BYTES = 64 << 10
#: live windows are shown, rebuilt and redrawn once no request came for this
#: long (while planes stream in, the worker's time goes to the pixels) ...
WINDOW_IDLE_MS = 250
#: ... or once they have been due this long, and four times as long as the
#: last window took (a window keeps up with a long stream, and drawing one
#: takes at most ~1/5 of a busy worker's time: 0.1-0.3 s for 2048^2 here)
WINDOW_LATE_S = 0.5


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            reap_prefix(f"{SERVER_PREFIX}_{parent}_")
            reap_prefix(f"{WORKER_PREFIX}_{parent}_")
            os._exit(3)


def _heartbeat(path: str) -> None:
    """Touch ``path`` twice a second: the supervisor tells a live worker (even
    one busy in a long macro) from a stopped or wedged one by its age."""
    while True:
        try:
            with open(path, "a"):
                os.utime(path)
        except OSError:
            pass
        time.sleep(0.5)


def _imagej_quit() -> Optional[bool]:
    """Whether ImageJ was quit (a macro's ``run("Quit")``): its instance is
    gone or quitting, and with it the Log (``IJ.getLog()`` answers null
    from then on, so every later macro would report an empty log). None
    when this engine has no ImageJ 1 instance to check."""
    try:
        from .engine.transfer import J

        inst = J("ij.IJ").getInstance()
        return inst is None or bool(inst.quitting())
    except Exception:  # no JVM, no ij.jar: nothing to check
        return None


def _open_engine(kind: str, display: bool) -> Any:
    factory = os.environ.get("FIJI_BRIDGE_ENGINE_FACTORY")  # "module:callable", for custom engines
    if factory:
        mod, _, fn = factory.partition(":")
        return getattr(importlib.import_module(mod), fn)(kind=kind, display=display)
    from .engine import open_engine

    return open_engine(kind, display=display, java_options=initial_heap_options(display))


def initial_heap_options(display: bool) -> list[str]:
    """The worker's JVM heap at start: with a live display, ``-Xms`` of twice
    the warm-up size (:func:`~fiji_bridge.stack_memory.warm_bytes`) with
    every page touched (``-XX:+AlwaysPreTouch``): a page the JVM touches for
    the first time costs 10-30x one it writes again, so the first stack's
    Java arrays land in warm memory instead (and a heap that starts at 1/64
    of the RAM would grow, collecting each time, while they arrive). 64 x
    8 MB arrays here: 0.07 s in a 2 GiB pretouched heap, 0.2 s in a 1 GiB
    one, 0.6 s in the default heap. Never above FIJI_BRIDGE_JVM_HEAP."""
    if not display:
        return []
    from .stack_memory import parse_size, warm_bytes

    try:
        mib = 2 * warm_bytes() >> 20  # the warm stack's arrays and as much again: G1 grows a fuller heap
        heap = os.environ.get("FIJI_BRIDGE_JVM_HEAP", "").strip()
        if heap:
            mib = min(mib, parse_size(heap, "FIJI_BRIDGE_JVM_HEAP") >> 20)
    except ValueError:
        return []  # the bridge (warm-up) or the JVM (heap) says what is wrong with it
    return [f"-Xms{mib}m", "-XX:+AlwaysPreTouch"] if mib >= 64 else []


def _write_class_archive(heartbeat: Optional[str]) -> None:
    """Write this JVM's class-data archive if it started without one
    (:mod:`fiji_bridge.engine.class_archive`), saying so beside the
    heartbeat meanwhile: the supervisor waits for a worker that does."""
    from .engine.class_archive import dump
    from .engine.java import class_archive_to_write

    archive = class_archive_to_write()
    if archive is None:
        return
    flag = f"{heartbeat}.archiving" if heartbeat else None
    t0 = time.monotonic()
    try:
        if flag:
            open(flag, "w").close()
        ok = dump(archive)
    finally:
        if flag:
            try:
                os.unlink(flag)
            except OSError:
                pass
    print(f"class-data archive {archive.path}: {'written' if ok else 'not written'} in {time.monotonic() - t0:.1f} s",
          file=sys.stderr, flush=True)


def _warm_display(engine: Any) -> None:
    """Run the live display's data path once on a small stack that grows
    (new stack, composite, re-layout, close; its window too where the
    screen is the engine's private Xvfb) before saying ready: the JVM loads
    and compiles it now, not on a user's first planes (0.1-0.3 s)."""
    update = getattr(engine, "update_planes", None)
    if update is None:
        return
    key = "fiji-bridge warm-up"
    planes = np.arange(3 * 64 * 64, dtype=np.uint16).reshape(3, 64, 64)
    try:
        update(key, (1, 1, 1, 64, 64), [(0, 0, 0)], planes[:1], None, None, True)
        update(key, (1, 1, 2, 64, 64), [(0, 0, 1)], planes[1:2], None, None, False)
        update(key, (2, 1, 2, 64, 64), [(1, 0, 0)], planes[2:3], None, None, False)
        if getattr(engine, "_xvfb", None) is not None and hasattr(engine, "sync_windows"):
            engine.sync_windows()  # its window too, on the engine's private screen (nobody sees it)
    except Exception:  # a warm-up that fails costs only time
        traceback.print_exc()
    finally:
        try:
            engine.close_stack(key)
        except Exception:
            traceback.print_exc()


class Worker:
    def __init__(self, sock: zmq.Socket, engine: Any, parent: int) -> None:
        self.sock = sock
        self.engine = engine
        self.parent = parent
        self._watch_quit = _imagej_quit() is False  # an ImageJ instance is up: watch it
        self._seg = itertools.count()
        self._mapped: list = []
        self._staging: dict[str, tuple[str, np.ndarray, Any]] = {}  # key -> (segment, array, mapping)
        self._maps: dict[str, Any] = {}  # stack segment name -> its mapping
        self._frames = FrameSink()  # small result arrays of the current reply
        self.served = 0  # macros, scripts and stacks served: whether this JVM is worth archiving

    def _put(self, arr: np.ndarray) -> dict:
        """Hand a result array to the bridge: small ones (table columns) as
        extra frames of the reply, big ones (images) in a shared-memory
        segment. A segment costs two syscalls and a mapping on each side,
        which for a table of 20 columns was more than the macro's own
        collection."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_BYTES:
            return self._frames.put(arr)
        seg = SharedArray(f"{WORKER_PREFIX}_{self.parent}_{os.getpid()}_{next(self._seg)}", arr.shape, arr.dtype)
        np.copyto(seg.array, arr, casting="no")
        desc = seg.desc()
        seg.close()  # the bridge copies and unlinks it
        return desc

    def _get(self, desc: dict) -> np.ndarray:
        arr, mm = attach_array(desc)
        self._mapped.append(mm)
        return arr

    def _release(self) -> None:
        for mm in self._mapped:
            try:
                mm.close()
            except BufferError:
                pass
        self._mapped.clear()

    # -- ops ------------------------------------------------------------------

    def run_macro(self, m: dict) -> dict:
        image = self._get(m["image"]) if m.get("image") else None
        cal = m.get("calibration")
        return self._macro_reply(lambda: self.engine.run_macro(
                m["code"],
                image=image,
                dims=m.get("dims") or "TZCYX",
                args=m.get("args"),
                dialog_options=m.get("dialog_options"),
                timeout=m.get("timeout"),
                title=m.get("title"),
                channel_names=m.get("channel_names"),
                calibration=Calibration.from_dict(cal) if cal else None,
                outputs=m.get("outputs"),
            ))

    def run_script(self, m: dict) -> dict:
        image = self._get(m["image"]) if m.get("image") else None
        cal = m.get("calibration")
        return self._macro_reply(lambda: self.engine.run_script(
                m["code"],
                language=m.get("language"),
                inputs=m.get("inputs"),
                timeout=m.get("timeout"),
                image=image,
                dims=m.get("dims") or "TZCYX",
                title=m.get("title"),
                channel_names=m.get("channel_names"),
                calibration=Calibration.from_dict(cal) if cal else None,
                dialog_options=m.get("dialog_options"),
            ))

    def _macro_reply(self, run: Callable[[], Any]) -> dict:
        """The reply for one macro or script run: its result, or its MacroError as data."""
        from .engine.base import MacroError

        try:
            result = run()
        except MacroError as e:
            return {"ok": False, "error": {"code": "macro_timeout" if e.kind == "timeout" else "macro_error", "message": str(e), "kind": e.kind, "macro": e.to_dict()}}
        return {"ok": True, "result": encode_macro_result(result, self._put)}

    def show_stack(self, m: dict) -> dict:
        arr = self._get(m["image"])
        cal = m.get("calibration")
        self.engine.show_stack(m["key"], arr, m.get("channel_names"), Calibration.from_dict(cal) if cal else None)
        return {"ok": True}

    def update_plane(self, m: dict) -> dict:
        self.engine.update_plane(m["key"], int(m["t"]), int(m["z"]), int(m["c"]), self._get(m["plane"]))
        return {"ok": True}

    def _staged(self, key: str, desc: dict) -> np.ndarray:
        """The staging segment of live stack ``key`` (a stack not in shared
        memory), mapped once and kept while the bridge keeps sending the same one."""
        name = desc.get("shm")
        held = self._staging.get(key)
        if held is None or held[0] != name:
            self._drop_staging(key)
            arr, mm = attach_array(desc, whole=True)
            held = self._staging[key] = (name, arr, mm)
        arr = held[1]
        shape, dtype = tuple(int(v) for v in desc["shape"]), np.dtype(desc["dtype"])
        if arr.shape != shape or arr.dtype != dtype:  # the same segment, another view
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if n > len(held[2]):
                raise ValueError(f"staging segment {name} has {len(held[2])} bytes, {n} needed")
            arr = np.ndarray(shape, dtype=dtype, buffer=held[2])
            self._staging[key] = (name, arr, held[2])
        return arr

    def _drop_staging(self, key: str) -> None:
        held = self._staging.pop(key, None)
        if held is not None:
            try:
                held[2].close()
            except BufferError:  # Java may still hold a view until its GC
                pass

    def update_planes(self, m: dict) -> dict:
        fn = getattr(self.engine, "update_planes", None)
        if fn is None:
            raise NotImplementedError(f"the {getattr(self.engine, 'name', '?')} engine has no streaming display updates")
        key = m["key"]
        self._unmap(m.get("released") or ())
        if m.get("storage"):  # the stack's own shared storage: read each plane where it was assembled
            storage = self._storage(m["storage"])
            planes: Any = [storage[int(t), int(z), int(c)] for t, z, c in m["positions"]]
        else:
            planes = self._staged(key, m["staging"])
        cal = m.get("calibration")
        fn(key, m["shape"], m["positions"], planes, m.get("channel_names"), Calibration.from_dict(cal) if cal else None, bool(m.get("fresh")),
           ranges=m.get("ranges"))
        return {"ok": True}

    def _storage(self, desc: dict) -> np.ndarray:
        """A stack's shared storage as ``desc`` lays it out. Each segment is
        mapped once (its page tables filled) and kept, whichever stack the
        bridge gives it to next, until the bridge says it is gone."""
        name = desc["shm"]
        shape, dtype = tuple(int(v) for v in desc["shape"]), np.dtype(desc["dtype"])
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        mm = self._maps.get(name)
        if mm is None or len(mm) < need:
            self._unmap([name])
            _, mm = attach_array(desc, whole=True)
            self._maps[name] = mm
        return np.ndarray(shape, dtype=dtype, buffer=mm)

    def map_segments(self, m: dict) -> dict:
        """Map the bridge's (warm) stack segments now, ahead of the stacks that will use them."""
        for desc in m.get("segments") or ():
            self._storage(desc)
        return {"ok": True}

    def _unmap(self, names: Any) -> None:
        for name in names:
            mm = self._maps.pop(name, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # Java may still hold a view until its GC
                    pass

    def close_stack(self, m: dict) -> dict:
        self._unmap(m.get("released") or ())
        self._drop_staging(m["key"])
        self.engine.close_stack(m["key"])
        return {"ok": True}

    def render(self, m: dict) -> dict:
        target = self._get(m["image"]) if m.get("image") else m["key"]
        kw = {"montage": bool(m.get("montage"))}
        if m.get("channel_names") and not isinstance(target, str):
            kw["channel_names"] = m["channel_names"]
        rgb = self.engine.render(target, **kw)
        return {"ok": True, "image": self._put(np.asarray(rgb))}

    def ping(self, m: dict) -> dict:
        return {"ok": True}

    def serve(self) -> None:
        ops: dict[str, Callable[[dict], dict]] = {
            "run_macro": self.run_macro,
            "run_script": self.run_script,
            "show_stack": self.show_stack,
            "update_plane": self.update_plane,
            "update_planes": self.update_planes,
            "close_stack": self.close_stack,
            "map_segments": self.map_segments,
            "render": self.render,
            "ping": self.ping,
        }
        due_since = 0.0  # when a window last became due
        window_cost = 0.0  # seconds the last window took
        while True:
            due = getattr(self.engine, "windows_due", False)
            if due and not due_since:
                due_since = time.monotonic()
            elif not due:
                due_since = 0.0
            late = time.monotonic() - due_since > max(WINDOW_LATE_S, 4 * window_cost)
            if due and (late or not self.sock.poll(WINDOW_IDLE_MS)):
                # nothing asked for a while (a stream paused or ended), or a
                # window is late: the time goes to the live windows, one at a time
                due_since = 0.0
                t0 = time.monotonic()
                try:
                    self.engine.sync_windows(1)
                except Exception:  # a window that cannot be drawn must not stop the worker
                    traceback.print_exc()
                window_cost = time.monotonic() - t0
                continue
            frames = self.sock.recv_multipart()
            try:
                m = parse_json(frames[0])
            except ValueError:
                continue
            op = m.get("op")
            if op == "quit":
                return
            if op in ("run_macro", "run_script", "show_stack", "update_planes"):
                self.served += 1
            fn = ops.get(op)
            try:
                if op in ("run_macro", "run_script", "render") and getattr(self.engine, "windows_due", False):
                    self.engine.sync_windows()  # a macro finds every window as it should be
                if fn is None:
                    reply = {"ok": False, "error": {"code": "unknown_type", "message": f"unknown worker op {op!r}"}}
                else:
                    reply = fn(m)
            except NotImplementedError as e:
                reply = {"ok": False, "error": {"code": "unavailable", "message": str(e) or f"{op} is not supported by this engine"}}
            except Exception as e:  # the error goes back, the worker goes on
                if type(e).__name__ == "JVMNotRunning":  # the JVM is gone (System.exit): so are we
                    sys.stdout.flush()
                    os._exit(4)  # the supervisor reports the engine's death and restarts it
                reply = {"ok": False, "error": {"code": "engine", "message": f"{type(e).__name__}: {e}", "kind": "exception", "trace": traceback.format_exc(limit=5)}}
            finally:
                self._release()
            frames, self._frames = self._frames.frames, FrameSink()
            self.sock.send_multipart(encode({"op": "reply", "id": m.get("id"), **reply}, frames))
            if self._watch_quit and _imagej_quit():
                print(f"ImageJ was quit during {op!r}: leaving, so that the supervisor starts a fresh one", file=sys.stderr, flush=True)
                sys.stdout.flush()
                time.sleep(0.2)  # let the reply leave (linger)
                os._exit(EXIT_IMAGEJ_QUIT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fiji_bridge.engine_worker")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--display", action="store_true")
    ap.add_argument("--heartbeat", default=None, help="file to touch twice a second")
    a = ap.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(a.parent,), daemon=True, name="parent-watch").start()
    if a.heartbeat:
        threading.Thread(target=_heartbeat, args=(a.heartbeat,), daemon=True, name="heartbeat").start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 1000
    sock.connect(a.endpoint)
    try:
        engine = _open_engine(a.engine, a.display)
        engine.start()
    except BaseException as e:  # report, then exit: the supervisor decides
        traceback.print_exc()
        sock.send_multipart(encode({"op": "failed", "error": f"{type(e).__name__}: {e}"}))
        sock.close()
        ctx.term()
        return 2
    if a.display:
        _warm_display(engine)
    status = engine.status() if callable(getattr(engine, "status", None)) else {}
    sock.send_multipart(encode({"op": "ready", "version": str(getattr(engine, "version", "?")), "engine": getattr(engine, "name", a.engine), "pid": os.getpid(), "status": status}))
    worker = Worker(sock, engine, a.parent)
    try:
        worker.serve()
        if worker.served:  # a clean quit after real work: the classes it loaded, for the next JVM
            _write_class_archive(a.heartbeat)
    finally:
        try:
            engine.close()
        except Exception:
            pass
        sock.close()
        ctx.term()
    # the JVM may keep non-daemon threads alive: leave now
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
