"""The double's client side: the BlitzGateway surface over a transport to a
:class:`~.server.ServerDouble`, strict about what the real library has.

Strictness: every object the backend can reach here (the gateway, ``conn.c``,
``conn.c.sf``, each service proxy, command callbacks) admits only attribute
names that exist on omero-py's real class — ``omero.gateway.BlitzGateway``,
``omero.clients.BaseClient``, ``omero.api.ServiceFactoryPrx``, the
``omero.api.*Prx`` / ``omero.grid.*Prx`` / ``omero.cmd.HandlePrx`` of the
service (plus ``omero.gateway.ProxyObjectWrapper`` for the gateway's
service getters), ``omero.callbacks.CmdCallbackI``. A name the real library
lacks raises ``AttributeError`` naming the real class, so a backend calling
an invented method fails in CI instead of at the first user. Code of the
double itself and of omero-py (the gateway methods run unchanged here) is
not checked.

Where the gateway's behaviour matters, it follows omero-py 5.23
``omero/gateway/__init__.py`` (BlitzGateway.connect / keepAlive /
deleteObjects) and ``omero/clients.py`` (BaseClient.waitOnCmd):

* ``connect()`` re-raises only ``Ice.SyscallException`` (connection refused);
  every other failure — an unknown host (``Ice.DNSException``), a refused
  login (``Glacier2.PermissionDeniedException``, tried twice as the gateway
  does), a server still starting (``WrappedCreateSessionException`` tried 3
  times by ``BaseClient.createSession``, then ``omero.ClientError("Obtained
  null object prox")``) — returns False and is kept for ``getLastError()``;
* ``group=`` is put into the Ice implicit context, which takes strings only:
  an id makes ``connect()`` return False; a group the user is not in makes
  the server raise ``SecurityViolation``, and the gateway then logs in again
  *without* the group (the default group);
* ``keepAlive()`` returns False (never raises) when the session is gone;
* the session key is ``conn.c.getSessionId()`` (``BlitzGateway`` has only
  the private ``_getSessionId``);
* ``deleteObjects(wait=True)`` waits ``_waitOnCmd`` = 10 polls, then closes
  the handle (cancelling an unfinished delete); ``waitOnCmd`` raises
  ``omero.CmdError`` (a ClientError) for an ERR response and, with
  ``failontimeout=True``, ``omero.LockTimeout``.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import sys
from functools import lru_cache
from typing import Any, Callable, Optional

from ._common import Ice, ServiceOptsDict, _BlitzGateway, omero
from .wire import marshal

try:
    import Glacier2
except ImportError:  # pragma: no cover - comes with zeroc-ice
    Glacier2 = None

__all__ = ["GatewayDouble", "StrictAttributeError", "real_attributes"]

#: packages whose code is not checked: the double's and omero-py's own (the package and its
#: submodules by name, not every module whose name starts with "omero": omero_rois, omero2pandas)
_INSIDE = ("fiji_bridge.testing.omero_double", "omero")


def _inside(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _INSIDE)


class StrictAttributeError(AttributeError):
    """The backend asked for an attribute omero-py's real class does not have."""


def _real_class(path: str) -> type:
    mod, _, name = path.rpartition(".")
    obj: Any = sys.modules.get(mod)
    if obj is None:
        import importlib

        obj = importlib.import_module(mod)
    return getattr(obj, name)


#: names a real class answers through its ``__getattr__`` (omero/clients.py
#: BaseClient.__getattr__: ``ic``, ``sf``, ``adapter``)
_DYNAMIC = {"omero.clients.BaseClient": {"ic", "sf", "adapter"}}


@lru_cache(maxsize=None)
def real_attributes(*paths: str) -> frozenset:
    """Attribute names of real omero-py classes: their class attributes and
    every ``self.<name> = ...`` their source assigns (instance attributes)."""
    names: set[str] = set()
    for path in paths:
        names.update(_DYNAMIC.get(path, ()))
        cls = _real_class(path)
        names.update(dir(cls))
        for klass in inspect.getmro(cls):
            try:
                src = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            names.update(re.findall(r"\bself\.(\w+)\s*=(?!=)", src))
    return frozenset(names)


class _Strict:
    """Admits, from code outside the double and omero-py, only attribute
    names of the real classes in ``_real`` (dotted paths)."""

    _real: tuple[str, ...] = ()

    def __getattribute__(self, name: str) -> Any:
        if not (name.startswith("__") and name.endswith("__")):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not _inside(caller):
                real = object.__getattribute__(self, "_real_for")()
                if name not in real_attributes(*real):
                    raise StrictAttributeError(
                        f"{' / '.join(real)} has no attribute {name!r}: the real omero-py would raise "
                        "AttributeError here")
        return object.__getattribute__(self, name)

    def _real_for(self) -> tuple[str, ...]:
        return type(self)._real


# --------------------------------------------------------------------------
# the transport
# --------------------------------------------------------------------------


class _Transport:
    def __init__(self, handle: Callable[[bytes], bytes], generation: int) -> None:
        self._handle = handle
        self.generation = generation

    def call(self, key: Optional[str], service: str, method: str, args: tuple) -> Any:
        try:
            reply = self._handle(pickle.dumps((key, service, method, args, self.generation)))
        except (OSError, EOFError) as e:  # the served manager went away
            raise Ice.ConnectionLostException() from e
        status, *rest = pickle.loads(reply)
        if status == "ok":
            return rest[0]
        *what, same = rest
        if same is not None:
            raise pickle.loads(same)
        raise _rebuild(*what)


def _rebuild(module: str, name: str, message: str) -> BaseException:
    if module == "Ice" and hasattr(Ice, name):
        e = getattr(Ice, name)()
        if hasattr(e, "reason"):
            e.reason = message
        return e
    if module == "Glacier2" and Glacier2 is not None and hasattr(Glacier2, name):
        return getattr(Glacier2, name)(reason=message)
    if module.startswith("omero") and hasattr(omero, name):
        return getattr(omero, name)(serverExceptionClass=name, message=message)
    if name == "NotImplementedError":  # a limit of the double: loud, never disguised
        return NotImplementedError(message)
    # anything else failing inside a server reaches clients as InternalException
    return omero.InternalException(serverExceptionClass=f"{module}.{name}", message=f"{name}: {message}")


def _connect_transport(host: str, port: int) -> _Transport:
    """A server of this process registered at host:port, else one served to
    this process over TCP (``ServerDouble.serve``). A host nobody registered
    and that is not local does not resolve (``Ice.DNSException``); a known
    host with nobody on the port refuses (``Ice.ConnectionRefusedException``)."""
    from .server import _REGISTRY

    server = _REGISTRY.get((host, int(port)))
    if server is not None:
        return _Transport(server.handle, -1)
    known = host in ("127.0.0.1", "localhost") or any(h == host for h, _p in _REGISTRY)
    if not known:
        raise Ice.DNSException(host=host)
    key = os.environ.get("FIJI_BRIDGE_OMERO_DOUBLE_KEY")
    if key:
        from multiprocessing.managers import BaseManager

        class _Manager(BaseManager):
            pass

        _Manager.register("endpoint")
        mgr = _Manager(address=(host, int(port)), authkey=key.encode())
        try:
            mgr.connect()
            return _Transport(mgr.endpoint().handle, -1)
        except (OSError, EOFError):
            pass
    raise Ice.ConnectionRefusedException()


# --------------------------------------------------------------------------
# service proxies
# --------------------------------------------------------------------------

_PRX = {
    "IQuery": "omero.api.IQueryPrx",
    "IUpdate": "omero.api.IUpdatePrx",
    "IPixels": "omero.api.IPixelsPrx",
    "IContainer": "omero.api.IContainerPrx",
    "IMetadata": "omero.api.IMetadataPrx",
    "IAdmin": "omero.api.IAdminPrx",
    "RawPixelsStore": "omero.api.RawPixelsStorePrx",
    "RawFileStore": "omero.api.RawFileStorePrx",
    "SharedResources": "omero.grid.SharedResourcesPrx",
    "Table": "omero.grid.TablePrx",
    "Handle": "omero.cmd.HandlePrx",
}
#: services the gateway hands out through its ProxyObjectWrapper
_WRAPPED = {"IQuery", "IUpdate", "IPixels", "IContainer", "IMetadata", "IAdmin", "RawFileStore"}


class _Service(_Strict):
    """A service proxy: every public method is a remote call; only methods
    the real ``*Prx`` class has exist."""

    def __init__(self, conn: "GatewayDouble", name: str, sid: Optional[int] = None, wrapped: bool = False) -> None:
        self._conn, self._name, self._sid, self._wrapped = conn, name, sid, wrapped

    def _real_for(self) -> tuple[str, ...]:
        name = object.__getattribute__(self, "_name")
        real = (_PRX[name],)
        if object.__getattribute__(self, "_wrapped"):
            real += ("omero.gateway.ProxyObjectWrapper",)
        return real

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        if method not in real_attributes(*self._real_for()):
            raise StrictAttributeError(f"{_PRX[self._name]} has no method {method!r}")
        return lambda *args: self._remote(method, args)

    def _remote(self, method: str, args: tuple) -> Any:
        marshal(_PRX[self._name], method, args)
        pre = () if self._sid is None else (self._sid,)
        return self._conn._call(self._name, method, pre + args)

    def _getObj(self) -> "_Service":  # ProxyObjectWrapper._getObj
        return self

    def getResponse(self, ctx: Any = None) -> Any:
        marshal(_PRX[self._name], "getResponse", () if ctx is None else (ctx,))
        return self._conn._call(self._name, "getResponse", (self._sid,))


class _SharedResources(_Service):
    def newTable(self, repo_id: int, name: str, ctx: Any = None) -> _Service:
        marshal(_PRX["SharedResources"], "newTable", (repo_id, name, ctx))
        sid = self._conn._call("SharedResources", "newTable", (repo_id, name, ctx))
        return _Service(self._conn, "Table", sid)

    def openTable(self, original_file: Any, ctx: Any = None) -> _Service:
        marshal(_PRX["SharedResources"], "openTable", (original_file, ctx))
        sid = self._conn._call("SharedResources", "openTable", (original_file, ctx))
        return _Service(self._conn, "Table", sid)


class _SessionFactory(_Strict):
    """``conn.c.sf``: the session's ``omero.api.ServiceFactoryPrx``."""

    _real = ("omero.api.ServiceFactoryPrx",)

    def __init__(self, conn: "GatewayDouble") -> None:
        self._conn = conn

    def _stateful(self, name: str, ctx: Any) -> _Service:
        marshal(self._real[0], f"create{name}", (ctx,))
        svc = _Service(self._conn, name, self._conn._call("sf", f"create{name}", ()))
        self._conn._stateful.append(svc)
        return svc

    def createRawPixelsStore(self, ctx: Any = None) -> _Service:
        return self._stateful("RawPixelsStore", ctx)

    def createRawFileStore(self, ctx: Any = None) -> _Service:
        return self._stateful("RawFileStore", ctx)

    def sharedResources(self, ctx: Any = None) -> _SharedResources:
        marshal(self._real[0], "sharedResources", (ctx,))
        return _SharedResources(self._conn, "SharedResources")

    def keepAlive(self, proxy: Any, ctx: Any = None) -> bool:
        marshal(self._real[0], "keepAlive", (proxy, ctx))
        return self._conn._call("sf", "keepAlive", ())

    def setSecurityContext(self, group: Any, ctx: Any = None) -> None:
        marshal(self._real[0], "setSecurityContext", (group, ctx))
        self._conn._call("sf", "setSecurityContext", (group.id.val,))

    def submit(self, request: Any, ctx: Any = None) -> _Service:
        marshal(self._real[0], "submit", (request, ctx))
        return _Service(self._conn, "Handle", self._conn._call("sf", "submit", (request, dict(ctx or {}))))


class _CmdCallback(_Strict):
    """What ``waitOnCmd`` returns: an ``omero.callbacks.CmdCallbackI``."""

    _real = ("omero.callbacks.CmdCallbackI",)

    def __init__(self, handle: _Service, response: Any) -> None:
        self._handle, self._response = handle, response

    def getResponse(self) -> Any:
        return self._response

    def close(self, closehandle: bool = False) -> None:
        if closehandle:
            self._handle.close()


class _ClientDouble(_Strict):
    """``conn.c``: the gateway's ``omero.client``."""

    _real = ("omero.clients.BaseClient",)

    def __init__(self, conn: "GatewayDouble") -> None:
        self._conn = conn
        self.sf: Optional[_SessionFactory] = None
        self.closed = False

    def getSessionId(self) -> str:
        if self._conn._key is None:
            raise omero.ClientError("No session available")
        return self._conn._key

    def getStatefulServices(self) -> list:
        return [s for s in self._conn._stateful if s._sid in self._conn._open_services()]

    def waitOnCmd(self, handle: Any, loops: int = 10, ms: int = 500, failonerror: bool = True,
                  failontimeout: bool = False, closehandle: bool = False) -> Optional[_CmdCallback]:
        """omero/clients.py BaseClient.waitOnCmd, over the double's handle
        (a poll stands for ``ms`` of waiting; the double does not sleep)."""
        rsp = None
        for _ in range(int(loops)):
            rsp = handle.getResponse()
            if rsp is not None:
                break
        cb = _CmdCallback(handle, rsp)
        if rsp is None:  # CmdCallbackI.loop raised LockTimeout
            if failontimeout:
                cb.close(closehandle)
                raise omero.LockTimeout(None, None, "Command unfinished.", 5000, int(loops))
            return cb
        if isinstance(rsp, omero.cmd.ERR) and failonerror:
            cb.close(closehandle)
            raise omero.CmdError(rsp)
        return cb

    def __del__(self) -> None:  # BaseClient.__del__ closes the communicator
        self.closed = True


class GatewayDouble(_Strict):
    """The surface of ``omero.gateway.BlitzGateway`` that fiji-bridge uses,
    talking to a :class:`~.server.ServerDouble` found by host and port."""

    _real = ("omero.gateway.BlitzGateway",)
    #: every omero.client this process made and did not close (tests count leaks)
    open_clients: list = []

    def __init__(self, username: Optional[str] = None, passwd: Optional[str] = None, client_obj: Any = None,
                 group: Any = None, clone: bool = False, try_super: bool = False, host: Optional[str] = None,
                 port: Optional[int] = None, extra_config: Any = None, secure: Any = None,
                 anonymous: bool = True, useragent: Optional[str] = None, userip: Optional[str] = None) -> None:
        self._username, self._passwd, self.group = username, passwd, group
        self.host, self.port = host or "localhost", int(port or 4064)
        self.secure = secure
        self.SERVICE_OPTS = ServiceOptsDict()
        self._key: Optional[str] = None
        self._sessionUuid: Optional[str] = None
        self._transport: Optional[_Transport] = None
        self._ctx: Any = None
        self._connected = False
        self._was_join = False
        self._last_error: Any = None
        self._lastGroupId: Optional[int] = None
        self._stateful: list[_Service] = []
        self._session_cb = None
        self.c: Optional[_ClientDouble] = _ClientDouble(self)  # BlitzGateway._resetOmeroClient
        GatewayDouble.open_clients.append(self.c)
        self._proxies: dict = {}

    # BlitzGateway's own client-side code, run unchanged against the double
    getObject = _BlitzGateway.getObject
    getObjects = _BlitzGateway.getObjects
    buildQuery = _BlitzGateway.buildQuery
    createOriginalFileFromFileObj = _BlitzGateway.createOriginalFileFromFileObj
    setGroupForSession = _BlitzGateway.setGroupForSession
    createImageFromNumpySeq = _BlitzGateway.createImageFromNumpySeq
    keepAlive = _BlitzGateway.keepAlive
    getLastError = _BlitzGateway.getLastError
    isConnected = _BlitzGateway.isConnected
    getEventContext = _BlitzGateway.getEventContext
    _getSessionId = _BlitzGateway._getSessionId
    deleteObjects = _BlitzGateway.deleteObjects
    _waitOnCmd = _BlitzGateway._waitOnCmd
    getQueryService = _BlitzGateway.getQueryService
    getUpdateService = _BlitzGateway.getUpdateService
    getPixelsService = _BlitzGateway.getPixelsService
    getContainerService = _BlitzGateway.getContainerService
    getMetadataService = _BlitzGateway.getMetadataService
    getAdminService = _BlitzGateway.getAdminService
    createRawFileStore = _BlitzGateway.createRawFileStore

    def __repr__(self) -> str:  # never the password
        return f"<GatewayDouble {self._username}@{self.host}:{self.port} connected={self._connected}>"

    def connect(self, sUuid: Optional[str] = None) -> bool:
        """BlitzGateway.connect's outcomes (see the module doc)."""
        if self.c is None:  # closed: BlitzGateway.connect returns False without a client
            self._connected = False
            return False
        try:
            transport = _connect_transport(self.host, self.port)
            if sUuid:
                try:
                    got = transport.call(None, "Session", "join", (sUuid,))
                except Ice.SyscallException:
                    raise
                except Exception:  # the join failed: False, the session key forgotten
                    self._sessionUuid = None
                    return False
                self._was_join = True
            else:
                if self.group is not None and not isinstance(self.group, str):
                    # ImplicitContext.put(omero.constants.GROUP, self.group) takes strings only
                    raise TypeError(f"implicit context values must be strings, got {type(self.group).__name__}")
                try:
                    try:
                        got = self._create_session(transport)
                    except omero.SecurityViolation:
                        raise
                    except Ice.SyscallException:
                        raise
                    except Exception:  # BlitzGateway.connect: "Failed to create session." - once more
                        got = self._create_session(transport)
                except omero.SecurityViolation:
                    if self.group is None:
                        raise
                    self.group = None  # "User not in group": log in to the default group instead
                    return self.connect()
                self._was_join = False
            self._key, transport.generation = got
            self._sessionUuid = self._key
            self._transport = transport
            self._ctx = None
            self.SERVICE_OPTS = ServiceOptsDict()
            self.c.sf = _SessionFactory(self)
            self._proxies = {name: _Service(self, svc, wrapped=True) for name, svc in (
                ("admin", "IAdmin"), ("query", "IQuery"), ("update", "IUpdate"), ("pixel", "IPixels"),
                ("container", "IContainer"), ("metadata", "IMetadata"), ("rawfile", "RawFileStore"))}
            self._proxies["rawfile"] = _LazyStateful(self, "RawFileStore")
            self._last_error = None
            self._connected = True
            return True
        except Ice.SyscallException:
            raise
        except Exception as x:  # Ice.LocalException and everything else: False
            self._last_error = x
            self._connected = False
            return False

    def _create_session(self, transport: _Transport) -> tuple:
        """omero/clients.py BaseClient.createSession: concurrency refusals
        (a server still starting) are tried 3 times, then "Obtained null
        object prox"."""
        for _ in range(3):
            try:
                return transport.call(None, "Session", "login", (self._username, self._passwd, self.group))
            except Glacier2.CannotCreateSessionException as wrapped:
                if not getattr(wrapped, "concurrency", False):
                    raise
        raise omero.ClientError("Obtained null object prox")

    def _call(self, service: str, method: str, args: tuple) -> Any:
        if self._transport is None:
            raise omero.ClientError("not connected: call connect() first")
        return self._transport.call(self._key, service, method, args)

    def _open_services(self) -> set:
        try:
            return set(self._call("sf", "activeServices", ()))
        except Exception:
            return set()

    def close(self, hard: bool = True) -> None:
        """BlitzGateway.close: closes the proxies, kills the session when
        ``hard``, and always closes the client (its Ice communicator)."""
        self._connected = False
        if self.c is not None:
            try:
                if hard and self._transport is not None:
                    self._transport.call(None, "Session", "close", (self._key,))
            except Exception:
                pass
            finally:
                self.c.__del__()
                if self.c in GatewayDouble.open_clients:
                    GatewayDouble.open_clients.remove(self.c)
                self.c = None
        self._transport = None
        self._proxies = {}


class _LazyStateful(_Service):
    """The gateway's ``_proxies['rawfile']``: a ProxyObjectWrapper that creates
    its RawFileStore on first use and again after ``close()``."""

    def __init__(self, conn: "GatewayDouble", name: str) -> None:
        super().__init__(conn, name, None, wrapped=True)

    def _remote(self, method: str, args: tuple) -> Any:
        marshal(_PRX[self._name], method, args)
        if self._sid is None:
            self._sid = self._conn._call("sf", f"create{self._name}", ())
        out = self._conn._call(self._name, method, (self._sid,) + args)
        if method == "close":
            self._sid = None
        return out
