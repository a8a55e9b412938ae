"""The errors a client of the bridge sees (:class:`~fiji_bridge.client.BridgeClient`
and its plane streams, :mod:`fiji_bridge.plane_stream`); importable from
:mod:`fiji_bridge.client` too. A macro that fails raises
:class:`~fiji_bridge.engine.base.MacroError` instead."""

from __future__ import annotations

from typing import Optional

__all__ = ["BridgeError", "BridgeTimeout", "PlanesRejected"]


class BridgeError(RuntimeError):
    """The bridge refused a request, is unreachable, or is not a bridge.
    ``code`` is the bridge's error code (:class:`~fiji_bridge.protocol.ErrorCode`:
    ``not_found``, ``bad_field``, ...; ``unauthorized`` for a refused
    handshake, ``rejected`` for refused planes), or None."""

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
