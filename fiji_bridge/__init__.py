"""fiji-bridge: Fiji/ImageJ as a service for Python imaging pipelines and OMERO.

Public entry points::

    from fiji_bridge import BridgeClient          # talk to (or spawn) a bridge
    from fiji_bridge.engine import open_engine    # ImageJ in this process
    from fiji_bridge.backends import open_plate   # plate stores (OME-Zarr, OME-TIFF, OMERO)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["BridgeClient", "MacroError", "MacroResult", "PlaneComponents", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .client import BridgeClient
    from .components import PlaneComponents
    from .engine.base import MacroError, MacroResult


def __getattr__(name: str) -> Any:
    # lazy, so that `import fiji_bridge` costs nothing (no zmq, no JVM)
    if name == "BridgeClient":
        from .client import BridgeClient

        return BridgeClient
    if name in ("MacroError", "MacroResult"):
        from .engine import base

        return getattr(base, name)
    if name == "PlaneComponents":
        from .components import PlaneComponents

        return PlaneComponents
    raise AttributeError(f"module 'fiji_bridge' has no attribute {name!r}")
