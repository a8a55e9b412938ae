"""What every part of the OMERO double shares: omero-py's own modules, the
server's configuration defaults, enumerations and the model-graph helpers.

Nothing here is a rule of its own; the rules live beside the services that
enforce them (:mod:`.pixels`, :mod:`.files`, :mod:`.server`, :mod:`.client`),
each with the server or omero-py source file it was read from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

try:
    import Ice
    import omero
    import omero.gateway  # noqa: F401  (loads the model, NamedValue, wrappers)
    import omero_Tables_ice  # noqa: F401  (omero.grid)
    import omero.grid
    from omero.gateway import BlitzGateway as _BlitzGateway
    from omero.gateway import OriginalFileWrapper, ServiceOptsDict
    from omero.rtypes import rint, rlong, rstring, unwrap
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fiji_bridge.testing.omero_double needs omero-py: pip install fiji-bridge[omero] "
        f"({_e})"
    ) from _e

__all__ = ["Ice", "omero", "_BlitzGateway", "OriginalFileWrapper", "ServiceOptsDict", "rint", "rlong", "rstring",
           "unwrap"]  # re-exported to the double's services (and more, below, by name)


#: omero.pixeldata.max_plane_width / max_plane_height (server defaults, omero-romio
#: ConfiguredTileSizes.java ``this(256, 256, 3192, 3192)``): a Pixels set needs a
#: pyramid when sizeX*sizeY exceeds their product (PixelsService.requiresPixelsPyramid)
MAX_PLANE_SIZE = 3192
#: omero.pixeldata.tile_width / tile_height (ConfiguredTileSizes.java): the tile
#: size a pyramid's writer hands out (BfPyramidPixelBuffer.getTileSize)
PYRAMID_TILE_SIZE = 256
#: RomioPixelBuffer.MAXIMUM_BUFFER_SIZE (omero-romio RomioPixelBuffer.java): the
#: strip height of a ROMIO buffer's getTileSize() is this many bytes of rows
ROMIO_MAXIMUM_BUFFER_SIZE = 1048576
#: omero.constants.MESSAGESIZEMAX is in KiB (Ice.MessageSizeMax of omero.client)
MESSAGE_SIZE_MAX = int(omero.constants.MESSAGESIZEMAX) * 1024

_PIXELS_TYPES = {
    "int8": "i1", "uint8": "u1", "int16": ">i2", "uint16": ">u2",
    "int32": ">i4", "uint32": ">u4", "float": ">f4", "double": ">f8",
    "bit": "u1", "complex": ">c8", "double-complex": ">c16",
}
_ENUMS = {
    "PixelsType": list(_PIXELS_TYPES),
    "DimensionOrder": ["XYZCT", "XYZTC", "XYCTZ", "XYCZT", "XYTCZ", "XYTZC"],
    "ChecksumAlgorithm": ["Adler-32", "CRC-32", "MD5-128", "Murmur3-32", "Murmur3-128",
                          "SHA1-160", "File-Size-64"],
    "Format": ["text/csv", "application/json", "text/plain", "OMERO.tables"],
}
_GROUPLESS = set(_ENUMS) | {"Experimenter", "ExperimenterGroup"}

# collection (parent class, field) -> (child class, child's field pointing back, ordered)
_INVERSE = {
    ("Screen", "plateLinks"): ("ScreenPlateLink", "parent", False),
    ("Plate", "screenLinks"): ("ScreenPlateLink", "child", False),
    ("Plate", "wells"): ("Well", "plate", False),
    ("Well", "wellSamples"): ("WellSample", "well", True),
    ("Image", "wellSamples"): ("WellSample", "image", False),
    ("Image", "pixels"): ("Pixels", "image", True),
    ("Pixels", "channels"): ("Channel", "pixels", True),
    ("LogicalChannel", "channels"): ("Channel", "logicalChannel", False),
}
# omero-model roi.ome.xml: Roi.shapes (ordered, inverse Shape.roi), Image.rois (inverse Roi.image)
_INVERSE[("Roi", "shapes")] = ("Shape", "roi", True)
_INVERSE[("Image", "rois")] = ("Roi", "image", False)
for _k in ("Screen", "Plate", "Well", "Image", "Roi"):
    _INVERSE[(_k, "annotationLinks")] = (f"{_k}AnnotationLink", "parent", False)


def _is_a(obj: Any, kind: str) -> bool:
    """``obj`` is a ``kind`` (an abstract class such as ``Shape`` included)."""
    base = getattr(omero.model, kind, None)
    return isinstance(obj, base) if isinstance(base, type) else _cls(obj) == kind


def _cls(obj: Any) -> str:
    name = type(obj).__name__
    return name[:-1] if name.endswith("I") else name


def _model(name: str) -> type:
    return getattr(omero.model, name + "I")


def _fields(obj: Any) -> tuple[str, ...]:
    return tuple(f for f in type(obj)._field_info._fields if f != "details")


def _is_coll(obj: Any, f: str) -> bool:
    return hasattr(obj, f"_{f}Seq")


def _is_entity(v: Any) -> bool:
    return isinstance(v, omero.model.IObject)


def _ctx_group(ctx: Any) -> Optional[int]:
    if not ctx:
        return None
    g = dict(ctx).get("omero.group")
    return None if g is None else int(g)


# --------------------------------------------------------------------------
# the server side
# --------------------------------------------------------------------------


@dataclass
class _Session:
    key: str
    user: str
    uid: int
    group: int
    last: float = field(default_factory=time.monotonic)
    closed: bool = False


@dataclass
class _User:
    name: str
    password: str
    uid: int
    groups: list[int]


def _paths(obj: Any, path: tuple = (), on_path: Optional[set] = None) -> set:
    """The fetch paths an object graph has loaded (for saveAndReturnObject)."""
    on_path = set() if on_path is None else on_path
    out: set = set()
    on_path = on_path | {id(obj)}
    for f in _fields(obj):
        if _is_coll(obj, f):
            if getattr(obj, f"_{f}Loaded") and getattr(obj, f"_{f}Seq"):
                out.add(path + (f,))
                for kid in getattr(obj, f"_{f}Seq"):
                    if id(kid) not in on_path:
                        out |= _paths(kid, path + (f,), on_path)
            continue
        v = getattr(obj, "_" + f)
        if _is_entity(v) and v.isLoaded() and id(v) not in on_path:
            out.add(path + (f,))
            out |= _paths(v, path + (f,), on_path)
    return out


def _message(e: BaseException) -> str:
    msg = getattr(e, "message", None) or getattr(e, "reason", None)
    return str(msg) if msg else str(e)

