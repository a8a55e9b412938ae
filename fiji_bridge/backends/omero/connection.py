"""The OMERO connection: parameters, login or session join, group, keep-alive,
error mapping and waited deletes.

Rules followed (omero-py 5.23 ``omero/gateway/__init__.py`` and
``omero/clients.py``; omero-blitz ``SessionManagerI.java``):

* ``BlitzGateway.connect()`` re-raises only ``Ice.SyscallException``; every
  other failure returns False and ``getLastError()`` says why: an
  ``Ice.LocalException`` (DNS, timeouts), or ``omero.ClientError("Obtained
  null object prox")`` (``BaseClient.createSession`` gave up on a server still
  starting — SessionManagerI's "Server not fully initialized" — or on a
  listener that is not OMERO) is :class:`~fiji_bridge.backends.base.StoreUnavailable`
  (retried by the uploader); ``Glacier2.PermissionDeniedException`` is a
  refused login (:class:`~fiji_bridge.backends.base.BackendError`);
* the session key is ``gw.c.getSessionId()`` (BlitzGateway has no public
  ``getSessionId``);
* the gateway's ``group`` is a group *name*; a name the user is not a member
  of silently logs in to the default group, so the group is verified after
  login; a group id is set with ``setGroupForSession(id)`` and verified;
* ``keepAlive()`` returns False on a dead session: the connection is dropped
  and the next call reconnects;
* a gateway that is dropped is closed (its ``omero.client`` owns an Ice
  communicator), and so is every cached RawPixelsStore;
* ``deleteObjects(wait=True)`` waits only 10 x 500 ms then closes the handle,
  cancelling the delete: deletes are waited with ``c.waitOnCmd(...,
  failontimeout=True, closehandle=True)``, and ``omero.CmdError`` (a
  ClientError, not a ServerError) becomes a BackendError.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from ..base import BackendError, StoreUnavailable

log = logging.getLogger("fiji_bridge.backends.omero")

INSTALL_HINT = "pip install fiji-bridge[omero]"


@dataclass(frozen=True)
class OmeroParams:
    """Where and as whom to connect. ``password`` and ``session`` are
    credentials: hidden from ``repr``; the password is never pickled.
    ``group``: a group name, or a group id (int or digits)."""

    host: str
    port: int = 4064
    user: Optional[str] = None
    group: Optional[Union[int, str]] = None
    secure: bool = True
    session: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(cls, host: Optional[str] = None, port: Optional[int] = None, user: Optional[str] = None,
                 password: Optional[str] = None, session: Optional[str] = None,
                 group: Optional[Union[int, str]] = None, secure: bool = True) -> "OmeroParams":
        host = host or os.environ.get("OMERO_HOST")
        if not host:
            raise BackendError("no OMERO server given: pass host=... or set OMERO_HOST")
        try:
            port = int(port or os.environ.get("OMERO_PORT") or 4064)
        except ValueError:
            raise BackendError(f"OMERO_PORT must be a number, got {os.environ.get('OMERO_PORT')!r}") from None
        group = group if group is not None else (os.environ.get("OMERO_GROUP") or None)
        return cls(host=host, port=port, user=user or os.environ.get("OMERO_USER") or None, group=group,
                   secure=secure, session=session or os.environ.get("OMERO_SESSION") or None,
                   password=password)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def group_id(self) -> Optional[int]:
        """The group as an id, when it was given as one."""
        g = self.group
        if isinstance(g, int) or (isinstance(g, str) and g.strip().isdigit()):
            return int(g)
        return None

    def __repr__(self) -> str:
        return (f"OmeroParams(host={self.host!r}, port={self.port}, user={self.user!r}, group={self.group!r}, "
                f"session={'<set>' if self.session else None}, password={'<set>' if self.password else None})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["password"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _omero() -> Any:
    """Import omero-py or explain how to get it."""
    try:
        import omero  # noqa: F401
        import omero.gateway  # noqa: F401
        return importlib.import_module("omero")
    except ImportError as e:
        raise BackendError(f"the OMERO backend needs omero-py: {INSTALL_HINT} (import failed: {e})") from None


def _default_gateway() -> Any:
    spec = os.environ.get("FIJI_BRIDGE_OMERO_GATEWAY")  # tests/demos: "module:Class"
    if spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)
    _omero()
    from omero.gateway import BlitzGateway

    return BlitzGateway


def _ice_errors() -> tuple[type, ...]:
    try:
        import Ice

        return (Ice.LocalException,)
    except ImportError:
        return (ConnectionError,)


def _msg(e: BaseException) -> str:
    return str(getattr(e, "message", "") or getattr(e, "reason", "") or e).strip()


def _connected(gw: Any, **kw: Any) -> bool:
    """``gw.connect(**kw)``; a gateway whose connect raised (Ice.SyscallException)
    is closed before the error goes on: its omero.client owns an Ice communicator."""
    try:
        return bool(gw.connect(**kw))
    except BaseException:
        _close_quietly(gw)
        raise


def _close_quietly(gw: Any, hard: bool = False) -> None:
    """Close a gateway and its omero.client (the Ice communicator)."""
    try:
        gw.close(hard=hard)
    except Exception as e:  # a dead connection cannot say goodbye
        log.debug("closing an OMERO gateway failed: %s", type(e).__name__)


class OmeroConnection:
    """The connection half of :class:`~fiji_bridge.backends.omero.OmeroBackend` (a mixin)."""

    params: OmeroParams
    keepalive: float
    share_session: bool
    delete_timeout: float
    _gateway_factory: Any

    def _init_connection(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None
        self._session_key: Optional[str] = self.params.session
        self._joined = False
        self._stores: "OrderedDict[int, Any]" = OrderedDict()
        self._last_use = time.monotonic()
        self._ka_stop = threading.Event()
        self._ka_thread: Optional[threading.Thread] = None

    @property
    def conn(self) -> Any:
        """The live BlitzGateway, connecting (or reconnecting) on demand."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            self._last_use = time.monotonic()
            return self._conn

    def _connect(self) -> Any:
        factory = self._gateway_factory or _default_gateway()
        p = self.params
        try:
            if self._session_key:
                gw = factory(host=p.host, port=p.port, secure=p.secure)
                if _connected(gw, sUuid=self._session_key):
                    self._joined = True
                    return self._ready(self._checked_group(gw))
                err = gw.getLastError()
                _close_quietly(gw)
                if err is not None and self._unavailable(err):
                    raise self._unavailable(err)
                log.info("OMERO session at %s is no longer valid; logging in again", p.address)
                self._session_key = None
            password = p.password or os.environ.get("OMERO_PASSWORD")
            if not p.user or not password:
                missing = "OMERO_USER (or user=...)" if not p.user else "OMERO_PASSWORD (or a session key: OMERO_SESSION)"
                raise BackendError(f"cannot log in to OMERO at {p.address}: set {missing}")
            name = p.group if p.group is not None and p.group_id is None else None
            gw = factory(p.user, password, host=p.host, port=p.port, group=name, secure=p.secure)
            if not _connected(gw):
                err = gw.getLastError()
                _close_quietly(gw)
                raise self._unavailable(err) or BackendError(
                    f"login refused for user {p.user!r} at {p.address} (wrong password or unknown user?"
                    + (f" {type(err).__name__}: {_msg(err)}" if err is not None and not _is_denied(err) else "")
                    + ")")
            self._joined = False
            self._session_key = gw.c.getSessionId()
            return self._ready(self._checked_group(gw))
        except _ice_errors() as e:
            raise StoreUnavailable(f"OMERO server at {p.address} is unavailable ({type(e).__name__})") from None

    def _unavailable(self, err: Any) -> Optional[StoreUnavailable]:
        """The StoreUnavailable a failed connect() stands for, if it is one."""
        if isinstance(err, _ice_errors()):
            return StoreUnavailable(f"OMERO server at {self.params.address} is unavailable ({type(err).__name__})")
        omero = _omero()
        if isinstance(err, omero.ClientError) and "null object prox" in str(err):
            # omero/clients.py createSession: refused 3 times for concurrency (a server still
            # starting) or timed out 3 times (something listens, but it is not OMERO)
            return StoreUnavailable(f"OMERO at {self.params.address} creates no sessions (still starting, or "
                                    f"not an OMERO server?): {_msg(err)}")
        try:
            import Glacier2

            if isinstance(err, Glacier2.CannotCreateSessionException) and not _is_denied(err):
                return StoreUnavailable(f"OMERO server at {self.params.address} cannot create sessions yet "
                                        f"(starting?): {_msg(err)}")
        except ImportError:
            pass
        return None

    def _checked_group(self, gw: Any) -> Any:
        """Switch to the configured group and verify the session is in it
        (an unknown group name silently gives the default group)."""
        p = self.params
        if p.group is None:
            return gw
        try:
            gid = p.group_id
            if gid is not None:
                if gw.setGroupForSession(gid) is False:
                    raise BackendError(f"user {p.user!r} is not a member of OMERO group {gid} at {p.address}")
                ok = gw.getEventContext().groupId == gid
            else:
                ok = gw.getEventContext().groupName == str(p.group)
            if not ok:
                ec = gw.getEventContext()
                raise BackendError(f"user {p.user or '(session)'!r} is not a member of OMERO group {p.group!r} at "
                                   f"{p.address} (the session is in group {ec.groupName!r}); use a group name or "
                                   "id the user belongs to")
        except BaseException:
            _close_quietly(gw, hard=not self._joined)  # a session we just made in the wrong group goes
            if not self._joined:
                self._session_key = None
            raise
        return gw

    def _ready(self, gw: Any) -> Any:
        gw.SERVICE_OPTS.setOmeroGroup(-1)  # reads see every group of the user
        if self.keepalive > 0 and (self._ka_thread is None or not self._ka_thread.is_alive()):
            self._ka_stop.clear()
            self._ka_thread = threading.Thread(target=_keepalive_loop, args=(weakref.ref(self), self._ka_stop),
                                               name="omero-keepalive", daemon=True)
            self._ka_thread.start()
        return gw

    def keep_alive(self) -> bool:
        """Ping the session now (the keep-alive thread does this periodically).
        False, and the connection dropped, when the session is gone."""
        with self._lock:
            if self._conn is None:
                return False
            ok = bool(self._conn.keepAlive())
            if not ok:
                log.info("OMERO session at %s is gone; reconnecting on next use", self.params.address)
                self._drop()
            return ok

    def close(self) -> None:
        """Close the open stores and the connection (a joined or shared session stays open)."""
        self._ka_stop.set()
        with self._lock:
            self._close_stores()
            if self._conn is not None:
                _close_quietly(self._conn, hard=not (self._joined or self.share_session))
            self._conn = None

    def _close_stores(self) -> None:
        while self._stores:
            _pid, rps = self._stores.popitem(last=False)
            try:
                rps.close()
            except Exception:  # a lost connection: the server reaps it with the session
                pass

    def _drop(self) -> None:
        """Forget a broken connection, closing what it owns."""
        self._close_stores()
        if self._conn is not None:
            _close_quietly(self._conn)
        self._conn = None

    @contextmanager
    def _call(self, what: str) -> Iterator[Any]:
        """Run server calls; map Ice/OMERO errors to our exceptions."""
        omero = _omero()
        import omero_ServerErrors_ice  # noqa: F401  (MissingPyramidException)

        with self._lock:
            conn = self.conn
            try:
                yield conn
            except _ice_errors() as e:
                self._drop()
                raise StoreUnavailable(
                    f"{what}: connection to OMERO at {self.params.address} lost ({type(e).__name__})") from None
            except omero.SecurityViolation as e:
                raise BackendError(f"{what}: permission denied by OMERO: {_msg(e)}") from None
            except omero.MissingPyramidException as e:  # PixelsService: an imported big image, pyramid pending
                raise StoreUnavailable(
                    f"{what}: OMERO at {self.params.address} is still building the pyramid of pixels "
                    f"{getattr(e, 'pixelsID', '?')}; try again in {max(1, getattr(e, 'backOff', 0) // 1000)} s") from None
            except omero.ServerError as e:
                raise BackendError(f"{what}: OMERO {type(e).__name__}: {_msg(e)}") from None
            except omero.ClientError as e:  # omero-py's client side (CmdError, "No session available", ...)
                raise BackendError(f"{what}: omero-py {type(e).__name__}: {e}") from None
            finally:
                self._last_use = time.monotonic()

    def _ctx(self, group: Optional[int]) -> dict:
        from omero.gateway import ServiceOptsDict

        ctx = ServiceOptsDict()
        ctx.setOmeroGroup(-1 if group is None else group)
        return ctx

    def _delete(self, conn: Any, kind: str, ids: list, delete_anns: bool = False) -> None:
        """Delete2 ``kind`` ``ids`` and wait until it is done (``delete_timeout``)."""
        omero = _omero()
        if not ids:
            return
        handle = conn.deleteObjects(kind, [int(i) for i in ids], deleteAnns=delete_anns, wait=False)
        loops = max(1, int(self.delete_timeout / 0.5))
        try:
            cb = conn.c.waitOnCmd(handle, loops=loops, ms=500, failonerror=True, failontimeout=True,
                                  closehandle=True)
        except omero.CmdError as e:
            err = getattr(e, "err", None)
            detail = getattr(err, "parameters", None) or getattr(err, "name", "") or e
            raise BackendError(f"OMERO refused to delete {kind} {list(ids)}: {detail}") from None
        except omero.LockTimeout:
            raise BackendError(f"deleting {kind} {list(ids)} did not finish within {self.delete_timeout:.0f} s "
                               "(it was cancelled)") from None
        if cb is not None:
            cb.close(True)


def _is_denied(err: Any) -> bool:
    try:
        import Glacier2

        return isinstance(err, Glacier2.PermissionDeniedException)
    except ImportError:  # pragma: no cover
        return False


def _keepalive_loop(ref: "weakref.ref[OmeroConnection]", stop: threading.Event) -> None:
    while True:
        backend = ref()
        if backend is None:
            return
        period = max(0.05, backend.keepalive)
        del backend
        if stop.wait(period):
            return
        backend = ref()
        if backend is None:
            return
        if backend._conn is not None and time.monotonic() - backend._last_use >= period / 2 \
                and backend._lock.acquire(blocking=False):
            try:
                backend.keep_alive()
            except Exception as e:  # the next call reconnects
                log.info("OMERO keep-alive failed (%s); reconnecting on next use", type(e).__name__)
                backend._drop()
            finally:
                backend._lock.release()
        del backend
