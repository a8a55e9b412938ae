"""The double's wire check: every call is marshalled by the real Ice runtime
before the double answers it.

The double's transport is pickle, which carries anything; a real client
marshals each argument with the Slice types of omero-py's generated
``omero.api`` / ``omero.grid`` / ``omero.cmd`` proxies first, and refuses
what does not fit before a byte is sent (IcePy): a plain ``int`` where the
model has an ``RInt`` (``RectangleI.theZ = 3``), an ``rdouble`` where it has
an ``RInt``, a string for a long, a missing positional argument
(``findAllByQuery(q)`` without ``params``) are ``ValueError`` /
``TypeError`` / ``Ice.MarshalException`` in the caller.

So :func:`marshal` invokes the same operation, with the same arguments, on
the real ``*Prx`` class, bound to an endpoint that refuses connections
(``127.0.0.1:1``, ``Ice.RetryIntervals=-1``: no retry). IcePy marshals the
request, then fails to connect: ``Ice.ConnectionRefusedException`` means the
call would have gone out as given, and the double answers it; any marshalling
error is raised to the caller, as the real client would raise it. About
0.06 ms a call.

The double's own proxy objects passed as arguments (``keepAlive(prx)``) go
as null proxies: a proxy's identity is not what is checked.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, Optional

from ._common import Ice

#: the endpoint nobody listens on: connecting is refused at once
REFUSED_ENDPOINT = "tcp -h 127.0.0.1 -p 1"

_lock = threading.Lock()
_communicator: Optional[Any] = None
_proxies: dict[str, Any] = {}


def _communicator_once() -> Any:
    global _communicator
    if _communicator is None:
        _communicator = Ice.initialize(["--Ice.RetryIntervals=-1", "--Ice.Warn.Connections=0"])
        atexit.register(_destroy)
    return _communicator


def _destroy() -> None:
    global _communicator
    with _lock:
        if _communicator is not None:
            _communicator.destroy()
            _communicator = None
            _proxies.clear()


def _proxy(prx_path: str) -> Any:
    with _lock:
        prx = _proxies.get(prx_path)
        if prx is None:
            from .client import _real_class

            ic = _communicator_once()
            name = prx_path.rsplit(".", 1)[-1]
            prx = _real_class(prx_path).uncheckedCast(ic.stringToProxy(f"{name}:{REFUSED_ENDPOINT}"))
            _proxies[prx_path] = prx
        return prx


def _as_sent(arg: Any) -> Any:
    from .client import _Service

    return None if isinstance(arg, _Service) else arg


def marshal(prx_path: str, method: str, args: tuple) -> None:
    """Marshal ``method(*args)`` of the real proxy class ``prx_path`` (e.g.
    ``"omero.api.IQueryPrx"``); raise what the real client would raise
    before sending it."""
    op = getattr(_proxy(prx_path), method, None)
    if op is None:  # a method of the gateway's ProxyObjectWrapper, not a remote operation
        return
    try:
        op(*(_as_sent(a) for a in args))
    except Ice.ConnectionRefusedException:
        return  # marshalled and sent off: the double answers it
    except (ValueError, TypeError, Ice.MarshalException):
        raise
    except Ice.LocalException:
        return  # a transport failure of the refused endpoint, not of the arguments
