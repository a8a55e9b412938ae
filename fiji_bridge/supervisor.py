"""Supervision of the engine worker: the one process of a bridge that holds a JVM.

The bridge process never starts a JVM (and never forks after one): it runs
:mod:`fiji_bridge.engine_worker` as a child process (``subprocess``, a fresh
interpreter) and talks to it over one persistent ZeroMQ PAIR socket on an
ipc endpoint in the bridge's private runtime directory. Requests go one at a
time, in order; each has a deadline. Pixels travel through shared memory:

* bridge -> worker: the bridge creates ``fjbs_<bridge pid>_<n>`` segments,
  the worker maps them (no copy before ImageJ's own). A request's segment is
  reused for a later request of the same size once the reply arrived (or the
  worker died), else unlinked; each live stack keeps one staging segment for
  its display updates (:meth:`EngineSupervisor.staging`). All are unlinked
  when the bridge closes (and reaped by the worker if the bridge dies);
* worker -> bridge: the worker creates ``fjbw_<bridge pid>_<worker pid>_<n>``
  segments for result images, the bridge copies and unlinks them.

A worker that dies (a macro calling ``System.exit``), misses a deadline (a
macro looping forever) or fails to start is killed and restarted; the request
in flight gets a clear error (:class:`MacroTimeout`, or :class:`MacroError`
of kind ``"engine"``). The worker touches a heartbeat file twice a second:
status shows ``"unresponsive"`` once it is :data:`HEARTBEAT_STALE` seconds
old (a SIGSTOPped or wedged worker, even while a macro runs), and a worker
silent for :data:`HEARTBEAT_KILL` seconds is killed and restarted. The worker watches its parent and exits (reaping both
prefixes) when the bridge dies, so no JVM and no segment outlives the bridge.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import zmq

from .protocol import ArrayDesc, encode, parse_json
from .transport import owned_segment
from .worker_spawn import SpawnedWorker, spawn_worker, worker_endpoint, worker_log

try:
    import _posixshmem  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

__all__ = ["EngineSupervisor", "WorkerJob", "SharedArray", "attach_array", "unlink_quietly", "reap_prefix"]

log = logging.getLogger(__name__)

SERVER_PREFIX = "fjbs"
WORKER_PREFIX = "fjbw"
#: seconds a worker may take to start its JVM and ImageJ
START_TIMEOUT = float(os.environ.get("FIJI_BRIDGE_START_TIMEOUT", "180"))
#: grace added to a macro's own timeout before the worker is killed
KILL_GRACE = 2.0
#: a worker whose heartbeat is older than this many seconds shows as "unresponsive" ...
HEARTBEAT_STALE = 3.0
#: ... and is killed and restarted when it stays silent this long (a stopped or wedged process)
HEARTBEAT_KILL = float(os.environ.get("FIJI_BRIDGE_HEARTBEAT_KILL", "60"))
#: seconds more a quitting worker gets while it writes its JVM's class-data
#: archive (:mod:`fiji_bridge.engine.class_archive`: once per setup, ~1 s for ImageJ 1, ~4 s for Fiji)
ARCHIVE_WAIT = 60.0
#: exit code of a worker whose ImageJ a macro quit (``run("Quit")``): restarted at once
EXIT_IMAGEJ_QUIT = 5
#: macro timeout when the request gives none
DEFAULT_MACRO_TIMEOUT = 600.0
#: request segments kept for reuse: how many, and how many bytes at most
POOL_SEGMENTS = 2
POOL_BYTES = 1 << 30
#: a queued request's arrays up to this size are copied to shared memory while the one before runs
#: (bigger ones at their send, so that two big inputs do not hold shared memory at once)
STAGE_AHEAD_BYTES = 256 << 20


# --------------------------------------------------------------------------- shared memory


def _reserve(fd: int, nbytes: int, name: str) -> None:
    """Allocate the segment's pages now: on a full /dev/shm this fails here
    with ENOSPC (a clear error) instead of killing whoever writes the
    mapping later with SIGBUS."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            try:
                free = shutil.disk_usage("/dev/shm").free
            except OSError:
                free = -1
            raise OSError(e.errno, f"no room in shared memory for {nbytes} bytes ({free} free in /dev/shm): close stacks or run the macro on a smaller image") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


class SharedArray:
    """A POSIX shared-memory segment owned by this process, with an array view
    (its pages allocated up front, so writing it cannot raise SIGBUS)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any, *, create: bool = True, reserve: bool = False) -> None:
        """``reserve``: allocate the segment's memory now (``posix_fallocate``):
        a full /dev/shm then fails here with OSError instead of a SIGBUS on a
        later write."""
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize)
        flags = (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR
        fd = _posixshmem.shm_open("/" + name, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
                _reserve(fd, nbytes, name)
            self._mm = _map(fd, nbytes)
        except BaseException:
            os.close(fd)
            if create:
                unlink_quietly(name)
            raise
        os.close(fd)
        self.array = np.ndarray(self.shape, dtype=self.dtype, buffer=self._mm)

    @property
    def nbytes(self) -> int:
        return len(self._mm)

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The segment's first bytes as another array (a reused segment)."""
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.array = np.ndarray(self.shape, dtype=self.dtype, buffer=self._mm)
        return self.array

    @property
    def address(self) -> int:
        """Where the mapping starts in this process's memory."""
        return int(np.frombuffer(self._mm, np.uint8, count=1).ctypes.data)

    def idle(self) -> bool:
        """Whether no array views the mapping any more (``array`` None): each
        array made over it refers to it, each view refers to such an array."""
        return sys.getrefcount(self._mm) <= 2  # self._mm and getrefcount's argument

    def desc(self) -> dict:
        return ArrayDesc(self.shape, self.dtype.str if self.dtype.byteorder == ">" else self.dtype.name, shm=self.name).to_dict()

    def close(self) -> None:
        self.array = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # a view still exists; the mapping goes with it
            pass

    def unlink(self) -> None:
        self.close()
        unlink_quietly(self.name)


def attach_array(desc: dict, whole: bool = False) -> tuple[np.ndarray, mmap.mmap]:
    """Map the segment an :class:`ArrayDesc` names (read/write, no copy, never
    unlinks): the bytes the array needs, or the ``whole`` segment (to view
    more of it later)."""
    d = ArrayDesc.parse(desc, any_dtype=True)
    fd = _posixshmem.shm_open("/" + d.shm.lstrip("/"), os.O_RDWR, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size < d.nbytes:
            raise ValueError(f"segment {d.shm} has {size} bytes, {d.nbytes} needed")
        mm = _map(fd, max(1, size if whole else d.nbytes))
    finally:
        os.close(fd)
    return np.ndarray(d.shape, dtype=d.dtype, buffer=mm), mm


def _map(fd: int, nbytes: int) -> mmap.mmap:
    """A shared read/write mapping, its page tables filled at once where the
    OS can (``MAP_POPULATE``): a multi-MB plane then costs no page fault per
    4 KiB on first touch."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        try:
            return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | populate)
        except OSError:  # pragma: no cover - refused: map plainly
            pass
    return mmap.mmap(fd, nbytes)


def unlink_quietly(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name.lstrip("/"))
    except (FileNotFoundError, OSError):
        pass


def reap_prefix(prefix: str) -> list[str]:
    """Unlink every ``/dev/shm/<prefix>*`` segment of this user (ours: a known, dead owner)."""
    out = []
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return out
    for e in entries:
        if e.startswith(prefix) and owned_segment(e):
            unlink_quietly(e)
            out.append(e)
    return out


# --------------------------------------------------------------------------- jobs


@dataclass
class WorkerJob:
    """One request to the worker.

    ``done(reply, get_array)`` is called exactly once: with the worker's reply
    dict, or with ``{"ok": False, "error": {...}}`` when the worker died or
    the deadline passed. ``get_array(desc)`` copies a result array out.
    """

    op: str
    body: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # body field -> array
    timeout: float = 60.0
    done: Callable[[dict, Callable[[dict], np.ndarray]], None] = lambda r, g: None
    kind: str = "macro"  # "macro" | "display" | "render"
    id: int = 0
    sent_at: float = 0.0
    segments: list[SharedArray] = field(default_factory=list)
    #: body field -> descriptor of its array in ``segments``, once copied there (:meth:`EngineSupervisor._stage`)
    staged: dict[str, dict] = field(default_factory=dict)


class EngineSupervisor:
    """Runs, watches and restarts the engine worker; queues jobs to it."""

    def __init__(
        self,
        ctx: zmq.Context,
        runtime_dir: Path,
        *,
        engine: str = "auto",
        display: bool = False,
        on_ready: Optional[Callable[[], None]] = None,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.ctx = ctx
        #: the worker's environment (None: this process's)
        self.env = env
        self.runtime_dir = Path(runtime_dir)
        self.engine = engine
        self.display = display
        self.on_ready = on_ready
        self.state = "stopped"
        self.version: Optional[str] = None
        self.restarts = 0
        self.last_error: Optional[str] = None
        self.sock: Optional[zmq.Socket] = None
        self.proc: Optional[subprocess.Popen] = None
        self.queue: collections.deque[WorkerJob] = collections.deque()
        self.current: Optional[WorkerJob] = None
        self._gen = 0
        self._ids = itertools.count(1)
        self._seg = itertools.count()
        self._start_deadline = 0.0
        self._failed_at = 0.0
        self.heartbeat_path: Optional[Path] = None
        #: seconds since the worker's last heartbeat, once it is over HEARTBEAT_STALE
        self.silent: Optional[float] = None
        self._on_socket_change: Optional[Callable[[Optional[zmq.Socket], Optional[zmq.Socket]], None]] = None
        self.log_path = worker_log(self.runtime_dir)
        #: request segments kept for reuse once their job is done (warm pages)
        self._pool: list[SharedArray] = []
        #: per live stack, the segment its display updates travel through
        self._staging: dict[str, SharedArray] = {}

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Spawn a worker (eagerly: the JVM takes seconds to start)."""
        self._gen += 1
        self._bind(worker_endpoint(self.runtime_dir, self._gen))
        self._took(spawn_worker(self.runtime_dir, self._gen, engine=self.engine, display=self.display, env=self.env))

    def adopt(self, spawned: SpawnedWorker) -> None:
        """Supervise a worker started by :func:`~fiji_bridge.worker_spawn.spawn_worker`
        for this supervisor's ``runtime_dir`` (before this process's own imports),
        as if :meth:`start` had started it."""
        if self.proc is not None:
            raise RuntimeError("this supervisor has a worker already")
        self._gen = spawned.generation
        self._bind(spawned.endpoint)
        self._took(spawned)

    def _bind(self, endpoint: str) -> None:
        old = self.sock
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        if self._on_socket_change:
            self._on_socket_change(old, self.sock)
        if old is not None:
            old.close(0)

    def _took(self, spawned: SpawnedWorker) -> None:
        self.silent = None
        self.heartbeat_path = spawned.heartbeat_path
        self.proc = spawned.proc
        self.state = "starting" if self.restarts == 0 and self.version is None else "restarting"
        self._start_deadline = time.monotonic() + START_TIMEOUT
        log.info("engine worker pid %s starting (%s)", self.proc.pid, spawned.endpoint)

    def set_socket_listener(self, fn: Callable[[Optional[zmq.Socket], Optional[zmq.Socket]], None]) -> None:
        """``fn(old, new)`` is called when the worker socket changes (for the poller)."""
        self._on_socket_change = fn

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def busy(self) -> bool:
        return self.current is not None

    def _archiving(self) -> bool:
        """Whether the quitting worker says it writes its JVM's class-data
        archive (a file beside its heartbeat) and is alive doing so."""
        if self.heartbeat_path is None or not self.heartbeat_path.with_name(self.heartbeat_path.name + ".archiving").exists():
            return False
        age = self.heartbeat_age()
        return age is not None and age < HEARTBEAT_STALE

    def heartbeat_age(self) -> Optional[float]:
        """Seconds since the worker last showed it is alive (None: no heartbeat yet)."""
        if self.heartbeat_path is None:
            return None
        try:
            return max(0.0, time.time() - os.stat(self.heartbeat_path).st_mtime)
        except OSError:
            return None

    def status(self) -> dict:
        state = self.state if not self.state.startswith("failed") else f"failed: {self.last_error}"
        age = self.heartbeat_age() if self.state == "ready" else None
        if age is not None and age > HEARTBEAT_STALE:
            state = "unresponsive"
        return {
            "state": state,
            "heartbeat_age": age,
            "kind": self.engine,
            "version": self.version,
            **{k: v for k, v in getattr(self, "engine_status", {}).items() if k in ("engine", "imagej1", "imagej2", "start", "headless", "fiji")},
            "pid": self.pid,
            "restarts": self.restarts,
            "queued": len(self.queue) + (1 if self.current else 0),
            "running": self.current.op if self.current else None,
            "display": self.display,
            "log": str(self.log_path),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to quit, kill it if it does not, fail queued jobs."""
        for job in ([self.current] if self.current else []) + list(self.queue):
            self._finish(job, _err("shutting_down", "the bridge is shutting down"))
        self.current = None
        self.queue.clear()
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.sock is not None:
                    self.sock.send_multipart(encode({"op": "quit"}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self._archiving():  # a clean quit, writing its class-data archive (Fiji: ~4 s)
                    try:
                        self.proc.wait(ARCHIVE_WAIT)
                    except subprocess.TimeoutExpired:
                        pass
                if self.proc.poll() is None:
                    self._kill()
        if self.sock is not None:
            if self._on_socket_change:
                self._on_socket_change(self.sock, None)
            self.sock.close(0)
            self.sock = None
        self.state = "stopped"
        reap_prefix(f"{WORKER_PREFIX}_{os.getpid()}_")
        for seg in self._pool + list(self._staging.values()):
            seg.unlink()
        self._pool.clear()
        self._staging.clear()

    # -- shared memory for requests --------------------------------------------

    def staging(self, key: str, planes: int, yx: tuple[int, int], dtype: Any, reserve: int = 0) -> SharedArray:
        """The segment that carries display updates of live stack ``key`` to the
        worker: at least ``planes`` planes of ``yx``/``dtype``, kept (and its
        pages warm) from one update to the next; replaced by a larger one
        when needed, then sized for ``reserve`` planes if that is more (the
        most a push of this stack can carry). Only written while no job using
        it is in flight."""
        dtype = np.dtype(dtype)
        per_plane = yx[0] * yx[1] * dtype.itemsize
        seg = self._staging.get(key)
        if seg is None or seg.nbytes < planes * per_plane:
            if seg is not None:
                seg.unlink()
            size = max(1, planes, reserve)
            seg = SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_{next(self._seg)}", (size,) + tuple(yx), dtype)
            self._staging[key] = seg
        seg.view((planes,) + tuple(yx), dtype)
        return seg

    def drop_staging(self, key: Optional[str] = None) -> None:
        """Unlink the staging segment of ``key`` (of every stack: None)."""
        for k in [key] if key is not None else list(self._staging):
            seg = self._staging.pop(k, None)
            if seg is not None:
                seg.unlink()

    def _segment(self, shape: tuple[int, ...], dtype: Any) -> SharedArray:
        """A segment for a request array: a pooled one of the same size, else new."""
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        for i, seg in enumerate(self._pool):
            if seg.nbytes == nbytes:
                del self._pool[i]
                seg.view(shape, dtype)
                return seg
        return SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_{next(self._seg)}", shape, dtype)

    def _recycle(self, seg: SharedArray) -> None:
        """Keep a finished request's segment for the next request of that size
        (the last few, up to POOL_BYTES), unlink the rest."""
        if seg.nbytes > POOL_BYTES or self.state == "stopped":
            seg.unlink()
            return
        self._pool.append(seg)
        while len(self._pool) > POOL_SEGMENTS or sum(s.nbytes for s in self._pool) > POOL_BYTES:
            self._pool.pop(0).unlink()

    def _kill(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            log.error("engine worker %s does not die", self.proc.pid)

    def _restart(self, reason: str) -> None:
        log.warning("restarting the engine worker: %s", reason)
        self._kill()
        reap_prefix(f"{WORKER_PREFIX}_{os.getpid()}_{self.pid}_")
        self.restarts += 1
        self.last_error = reason
        self.start()

    # -- jobs ----------------------------------------------------------------

    def submit(self, job: WorkerJob) -> None:
        job.id = next(self._ids)
        self.queue.append(job)
        if self.state.startswith("failed") and time.monotonic() - self._failed_at > 5.0:
            self.restarts += 1
            self.start()
        self._pump()
        self._stage_next()

    def _stage(self, job: WorkerJob) -> dict[str, dict]:
        """Copy ``job``'s arrays into request segments, once; their descriptors."""
        if job.arrays and not job.staged:
            try:
                for fname, arr in job.arrays.items():
                    seg = self._segment(arr.shape, arr.dtype)
                    job.segments.append(seg)
                    np.copyto(seg.array, arr, casting="no")
                    job.staged[fname] = seg.desc()
            except BaseException:
                self._free_segments(job)
                raise
        return job.staged

    def _stage_next(self) -> None:
        """While the worker runs a request, copy the next one's pixels into
        shared memory: it goes out as soon as the reply comes. A copy that
        fails here is tried again (and its error reported) when it is sent."""
        if self.current is not None and self.queue and self.state == "ready":
            job = self.queue[0]
            if sum(a.nbytes for a in job.arrays.values()) > STAGE_AHEAD_BYTES:
                return
            try:
                self._stage(job)
            except (OSError, ValueError):
                pass

    def _free_segments(self, job: WorkerJob) -> None:
        """Give ``job``'s request segments back (to the pool, or unlinked)."""
        for seg in job.segments:
            self._recycle(seg)
        job.segments.clear()
        job.staged.clear()

    def drop_display_jobs(self, key: Optional[str] = None) -> None:
        keep = [j for j in self.queue if not (j.kind == "display" and (key is None or j.body.get("key") == key))]
        for j in self.queue:
            if j not in keep:
                self._finish(j, _err("cancelled", "superseded"))
        self.queue = collections.deque(keep)

    def _pump(self) -> None:
        if self.current is not None or not self.queue:
            return
        if self.state.startswith("failed"):
            while self.queue:
                self._finish(self.queue.popleft(), _err("engine", f"the ImageJ engine failed to start: {self.last_error} (see {self.log_path})"))
            return
        if self.state != "ready":
            return
        job = self.queue.popleft()
        body = dict(job.body, op=job.op, id=job.id)
        try:
            body.update(self._stage(job))
            self.sock.send_multipart(encode(body), flags=zmq.NOBLOCK)
        except (OSError, zmq.ZMQError, ValueError) as e:
            code = "no_memory" if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM) else "engine"
            self._finish(job, _err(code, f"could not hand the request to the engine worker: {e}"))
            self._pump()
            return
        job.sent_at = time.monotonic()
        self.current = job
        self._stage_next()

    def on_readable(self) -> None:
        """Read what the worker sent (readiness, replies)."""
        while self.sock is not None:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = parse_json(frames[0], "worker message")
            except ValueError as e:
                log.error("bad message from the engine worker: %s", e)
                continue
            op = msg.get("op")
            if op == "ready":
                self.state = "ready"
                self.version = msg.get("version")
                self.engine_status = dict(msg.get("status") or {})  # engine kind, ImageJ2 and ImageJ 1 versions
                self.last_error = None
                log.info("engine ready: %s %s (worker pid %s)", msg.get("engine"), self.version, self.pid)
                if self.on_ready:
                    self.on_ready()
                self._pump()
            elif op == "failed":
                self._fail(str(msg.get("error", "unknown error")))
            elif op == "reply":
                job = self.current
                if job is None or msg.get("id") != job.id:
                    log.warning("stale reply from the engine worker: %s", msg.get("id"))
                    self._unlink_results(msg)
                    continue
                self.current = None
                err = msg.get("error") or {}
                if not msg.get("ok") and (err.get("kind") in ("timeout", "engine")):
                    self._finish(job, msg, frames[1:])
                    # a stopped macro may leave a runaway Java thread: start clean
                    self._restart(f"after a macro {err.get('kind')}")
                else:
                    # the next request goes out before this reply is read (its
                    # results copied, its callback run): the worker starts on it
                    # meanwhile instead of waiting; this one's segments are free again
                    self._free_segments(job)
                    self._pump()
                    self._finish(job, msg, frames[1:])

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.last_error = reason
        self._failed_at = time.monotonic()
        log.error("engine failed: %s", reason)
        self._kill()
        if self.current is not None:
            job, self.current = self.current, None
            self._finish(job, _err("engine", f"the ImageJ engine failed: {reason}"))
        self._pump()

    def tick(self) -> None:
        """Check deadlines and the worker's health; call often (every ~50 ms)."""
        now = time.monotonic()
        if self.proc is None or self.state == "stopped":
            return
        code = self.proc.poll()
        if self.state in ("starting", "restarting"):
            if code is not None:
                self._fail(f"the engine worker exited with code {code} while starting (log: {self.log_path}: {_tail(self.log_path)})")
            elif now > self._start_deadline:
                self._fail(f"the engine did not start within {START_TIMEOUT:.0f} s")
            return
        if self.state != "ready":
            return
        job = self.current
        age = self.heartbeat_age()
        if code is None and age is not None and age > HEARTBEAT_STALE:
            if self.silent is None:
                log.warning("the engine worker (pid %s) stopped answering (no heartbeat for %.0f s)", self.pid, age)
            self.silent = age
            if age > HEARTBEAT_KILL:
                self._lost(f"the engine worker showed no sign of life for {age:.0f} s (stopped or wedged)")
                return
        elif self.silent is not None:
            log.info("the engine worker answers again")
            self.silent = None
        if code == EXIT_IMAGEJ_QUIT:
            # the worker left right after replying, before reading anything
            # else: a job sent meanwhile never ran, so it goes first to the next worker
            if job is not None:
                self.current = None
                self._free_segments(job)
                self.queue.appendleft(job)
            self._restart('a macro quit ImageJ (run("Quit")), which loses its Log and windows: a fresh ImageJ was started')
            return
        if code is not None:
            self._lost(f"the ImageJ engine died (exit code {code})")
            return
        if job is not None and now - job.sent_at > job.timeout + KILL_GRACE:
            self.current = None
            what = "the macro" if job.kind == "macro" else f"the {job.op} request"
            msg = f"{what} ran longer than its timeout of {job.timeout:g} s and was stopped; the engine was restarted, stacks are intact"
            self._finish(job, _err("macro_timeout", msg, kind="timeout"))
            self._restart("a request exceeded its deadline")

    def _lost(self, reason: str) -> None:
        """The worker is dead or gone silent: fail its job, start a new one."""
        job, self.current = self.current, None
        if job is not None:
            what = "the macro" if job.kind == "macro" else f"the {job.op} request"
            self._finish(job, _err("engine", f"{reason} while running {what}; the engine was restarted, stacks are intact", kind="engine"))
        self._restart(reason)

    # -- helpers -------------------------------------------------------------

    def _finish(self, job: WorkerJob, reply: dict, frames: Sequence[Any] = ()) -> None:
        """Hand ``reply`` to the job; its arrays are in shared memory or, small
        ones, in the reply's extra ``frames``."""
        self._free_segments(job)

        def get(desc: dict) -> np.ndarray:
            if desc.get("frame") is not None:
                return np.array(ArrayDesc.parse(desc, len(frames), any_dtype=True).from_frame(frames[desc["frame"]]))
            return _copy_out(desc)

        try:
            job.done(reply, get)
        except Exception:  # a callback bug must not kill the loop
            log.exception("engine job callback failed")
        finally:
            self._unlink_results(reply)

    @staticmethod
    def _unlink_results(msg: dict) -> None:
        for name in _shm_names(msg):
            unlink_quietly(name)


def _copy_out(desc: dict) -> np.ndarray:
    arr, mm = attach_array(desc)
    try:
        return np.array(arr)
    finally:
        del arr
        mm.close()


def _shm_names(obj: Any) -> list[str]:
    out: list[str] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("shm"), str) and "shape" in obj:
            out.append(obj["shm"])
        for v in obj.values():
            out.extend(_shm_names(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(_shm_names(v))
    return out


def _err(code: str, message: str, **extra: Any) -> dict:
    return {"op": "reply", "ok": False, "error": {"code": code, "message": message, **extra}}


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace").strip()
    except OSError:
        return ""
