"""The wire format of OpenHCS's Fiji viewer, read and checked.

OpenHCS streams to its Fiji viewer with PolyStore's ``FijiStreamingBackend``
(over ``zmqruntime``). Facts, read from polystore 0.2.17/0.2.19/0.6.3 and
zmqruntime 0.2.24/0.6.5:

* **Control** (REP on data port + 1000): pickled dicts. We decode them with
  :func:`loads_plain`, an unpickler that refuses every global, so a peer can
  only ever hand us dicts, lists, tuples, strings, bytes, numbers, booleans
  and ``None`` -- never an object whose construction runs code.
* **Data** (REP on the data port): one JSON object per request::

      {"type": "batch", "images": [item, ...], "display_config": {...},
       "timestamp": ..., "component_names_metadata": {...},
       "component_value_domain": {...}, "images_dir": ...}

  An image item names a shared-memory block owned by the sender
  (``shm_name``, ``shape``, ``dtype``) plus ``path``, ``image_id``,
  ``data_type: "image"``, component ``metadata`` and ``producer_identity``;
  0.6.x adds ``return_route`` and ``producer`` (where the per-image ack goes).
  A ROI item has ``data_type: "rois"`` and ``rois``: base64 ImageJ ``.roi``
  files.
* The reply must be ``{"status": "success"}`` (else the sender raises);
  errors are ``{"status": "error", "message": ...}``.

This module turns raw bytes into :class:`Batch` (or raises :class:`WireError`
with a message that says what is wrong and where); it does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

__all__ = [
    "Batch",
    "DisplayConfig",
    "ImageItem",
    "RefusedPickle",
    "RoiItem",
    "WireError",
    "ack_targets",
    "check_plain",
    "dumps_plain",
    "loads_plain",
    "parse_batch",
]

#: a control message larger than this is refused before unpickling
MAX_CONTROL_BYTES = 1 << 20
#: items of one batch
MAX_ITEMS = 100_000
#: ImageJ arrays are indexed by a Java int
MAX_PLANE_ELEMENTS = 2**31 - 1
_SHM_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_ROI_MAGIC = b"Iout"
_DTYPE_KINDS = frozenset("biuf")


class WireError(ValueError):
    """A message from an OpenHCS sender is malformed; the text says what and where."""


class RefusedPickle(WireError):
    """A pickled control message holds something other than plain data."""


# ---------------------------------------------------------------- pickles


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that can build plain containers and scalars only.

    Every class, function or module reference in a pickle goes through
    :meth:`find_class`; refusing all of them leaves the opcodes that build
    dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None.
    """

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        raise pickle.UnpicklingError(
            f"refused {module}.{name}: control messages may hold only plain dicts, "
            "lists, strings and numbers"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id in a control message")


_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))


def check_plain(obj: Any, *, max_depth: int = 64, max_nodes: int = 200_000) -> None:
    """Raise :class:`RefusedPickle` unless ``obj`` is plain data (dict keys: str)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise RefusedPickle(f"control message has more than {max_nodes} values")
        if depth > max_depth:
            raise RefusedPickle(f"control message is nested deeper than {max_depth}")
        if type(node) not in _PLAIN:
            raise RefusedPickle(
                f"control message holds a {type(node).__name__}; only dicts, lists, "
                "tuples, strings, bytes, numbers, booleans and None are accepted"
            )
        if type(node) is dict:
            for k, v in node.items():
                if type(k) is not str:
                    raise RefusedPickle(f"control message has a non-string key {k!r}")
                stack.append((v, depth + 1))
        elif type(node) in (list, tuple):
            stack.extend((v, depth + 1) for v in node)


def unpickle_with(unpickler: type[pickle.Unpickler], data: bytes, max_bytes: int) -> Any:
    """``unpickler(data).load()``, any failure (and a size over ``max_bytes``) a :class:`RefusedPickle`."""
    if len(data) > max_bytes:
        raise RefusedPickle(f"control message of {len(data)} bytes is larger than {max_bytes}")
    try:
        return unpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's
        raise RefusedPickle(f"cannot decode control message: {exc}") from None


def loads_plain(data: bytes) -> Any:
    """Unpickle ``data`` without ever importing or calling anything."""
    obj = unpickle_with(_PlainUnpickler, data, MAX_CONTROL_BYTES)
    check_plain(obj)
    return obj


def dumps_plain(obj: Mapping[str, Any]) -> bytes:
    """Pickle a reply (plain data only, protocol 4: any Python 3.4+ reads it)."""
    check_plain(obj)
    return pickle.dumps(obj, protocol=4)


# ---------------------------------------------------------------- batches

Scalar = Union[str, int, float, bool, None, tuple]


@dataclass(frozen=True)
class AckRoute:
    """Where the per-image ack of one item goes.

    0.6.x senders name it (``return_route`` + ``producer``, echoed back
    exactly); 0.2.x senders listen on a fixed shared port instead
    (``return_route`` is None then).
    """

    image_id: str
    return_route: Optional[dict] = None
    producer: Optional[dict] = None


@dataclass(frozen=True)
class ImageItem:
    """One image item: a plane (or a stack of planes) in a sender-owned shm block."""

    index: int
    path: str
    shm_name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    metadata: dict[str, Scalar]
    ack: Optional[AckRoute] = None
    producer_identity: Optional[dict] = None
    #: {component: [values]} for a 3-D item whose leading axis walks one component
    plane_values: Optional[tuple[str, tuple[Scalar, ...]]] = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def where(self) -> str:
        return f"item {self.index} ({self.path})"


@dataclass(frozen=True)
class RoiItem:
    """One ROI item: ImageJ ``.roi`` files (decoded from base64)."""

    index: int
    path: str
    rois: tuple[bytes, ...]
    metadata: dict[str, Scalar]
    ack: Optional[AckRoute] = None
    producer_identity: Optional[dict] = None

    def where(self) -> str:
        return f"item {self.index} ({self.path})"


Item = Union[ImageItem, RoiItem]


@dataclass(frozen=True)
class DisplayConfig:
    """``display_config`` of a batch: component -> mode, plus display extras."""

    #: component -> "window" | "channel" | "slice" | "frame", in the sender's order
    component_modes: Optional[dict[str, str]] = None
    component_order: tuple[str, ...] = ()
    #: everything else (``lut``, ``auto_contrast``, ...), passed on untouched
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    items: tuple[Item, ...]
    display: DisplayConfig
    #: {component: {str(value): display name}}
    component_names: dict[str, dict[str, str]]
    images_dir: Optional[str] = None
    timestamp: Optional[float] = None

    @property
    def images(self) -> list[ImageItem]:
        return [i for i in self.items if isinstance(i, ImageItem)]


MODES = ("window", "channel", "slice", "frame")


def _is_loopback_url(url: str) -> bool:
    if url.startswith("ipc://"):
        return len(url) > len("ipc://")
    m = re.match(r"^tcp://(\[[0-9a-fA-F:]+\]|[^:/]+):(\d{1,5})$", url)
    if not m:
        return False
    host = m.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _scalar(v: Any, where: str) -> Scalar:
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise WireError(f"{where}: component value {v!r} is not finite")
        return v
    if isinstance(v, list) and len(v) <= 16:
        return tuple(_scalar(x, where) for x in v)
    raise WireError(f"{where}: component value {v!r} must be a string, a number or a short list")


def _mapping(d: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> Optional[dict]:
    v = d.get(key)
    if v is None:
        if required:
            raise WireError(f"{where}: missing {key!r}")
        return None
    if not isinstance(v, dict):
        raise WireError(f"{where}: {key!r} must be an object, got {type(v).__name__}")
    return v


def _text(d: Mapping[str, Any], key: str, where: str, *, required: bool = True, limit: int = 4096) -> Optional[str]:
    v = d.get(key)
    if v is None:
        if required:
            raise WireError(f"{where}: missing {key!r}")
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise WireError(f"{where}: {key!r} must be a string of at most {limit} characters")
    return v


def _ack_route(item: Mapping[str, Any], where: str) -> Optional[AckRoute]:
    image_id = item.get("image_id")
    if image_id is None:
        return None
    if not isinstance(image_id, str) or not image_id or len(image_id) > 200:
        raise WireError(f"{where}: 'image_id' must be a non-empty string")
    route = _mapping(item, "return_route", where, required=False)
    producer = _mapping(item, "producer", where, required=False)
    if route is None:
        return AckRoute(image_id)
    url = route.get("url")
    if not isinstance(url, str) or not _is_loopback_url(url):
        raise WireError(
            f"{where}: return_route url {url!r} must be a loopback tcp:// or an ipc:// address"
        )
    if not isinstance(route.get("incarnation"), str) or not isinstance(route.get("owner"), dict):
        raise WireError(f"{where}: return_route needs 'incarnation' and 'owner'")
    if producer is None:
        producer = route["owner"]
    return AckRoute(image_id, route, producer)


def _metadata(item: Mapping[str, Any], where: str) -> dict[str, Scalar]:
    md = _mapping(item, "metadata", where, required=False) or {}
    if len(md) > 64:
        raise WireError(f"{where}: 'metadata' has {len(md)} components (at most 64)")
    return {str(k): _scalar(v, f"{where} metadata[{k!r}]") for k, v in md.items()}


def _dtype(v: Any, where: str) -> np.dtype:
    if not isinstance(v, str) or len(v) > 32:
        raise WireError(f"{where}: 'dtype' must be a dtype name such as 'uint16'")
    try:
        dt = np.dtype(v)
    except (TypeError, ValueError):
        raise WireError(f"{where}: unknown dtype {v!r}") from None
    if dt.kind not in _DTYPE_KINDS or dt.fields or dt.subdtype or dt.itemsize > 8:
        raise WireError(f"{where}: dtype {v!r} is not a numeric pixel type")
    return dt


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) not in (2, 3):
        raise WireError(f"{where}: 'shape' must be [Y, X] or [N, Y, X], got {v!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v):
        raise WireError(f"{where}: 'shape' {v!r} must hold positive integers")
    if math.prod(v[-2:]) > MAX_PLANE_ELEMENTS or math.prod(v) > 1 << 34:
        raise WireError(f"{where}: shape {v!r} is too large for an ImageJ plane")
    return tuple(v)


def _image_item(index: int, item: Mapping[str, Any]) -> ImageItem:
    path = _text(item, "path", f"item {index}", required=False) or f"<item {index}>"
    where = f"item {index} ({path})"
    if "shm_name" not in item:
        if "data" in item:
            raise WireError(f"{where}: inline 'data' is not supported; send planes in shared memory")
        raise WireError(f"{where}: missing 'shm_name'")
    shm_name = item["shm_name"]
    if not isinstance(shm_name, str) or not _SHM_NAME.match(shm_name):
        raise WireError(f"{where}: 'shm_name' {shm_name!r} is not a shared-memory block name")
    shape = _shape(item.get("shape"), where)
    dtype = _dtype(item.get("dtype"), where)
    plane_values = None
    raw = item.get("plane_component_values")
    if raw is not None:
        if not isinstance(raw, dict) or len(raw) != 1:
            raise WireError(f"{where}: 'plane_component_values' must name exactly one component")
        ((comp, values),) = raw.items()
        if not isinstance(values, list) or len(shape) != 3 or len(values) != shape[0]:
            raise WireError(
                f"{where}: 'plane_component_values' needs one {comp!r} value per plane "
                f"of the leading axis of shape {list(shape)}"
            )
        plane_values = (str(comp), tuple(_scalar(v, where) for v in values))
    elif len(shape) == 3 and shape[0] != 1:
        raise WireError(
            f"{where}: a 3-D item of shape {list(shape)} needs 'plane_component_values' "
            "to say which component its leading axis walks; send 2-D planes otherwise"
        )
    pid = _mapping(item, "producer_identity", where, required=False)
    return ImageItem(
        index=index,
        path=path,
        shm_name=shm_name,
        shape=shape,
        dtype=dtype,
        metadata=_metadata(item, where),
        ack=_ack_route(item, where),
        producer_identity=pid,
        plane_values=plane_values,
    )


def _roi_item(index: int, item: Mapping[str, Any]) -> RoiItem:
    path = _text(item, "path", f"item {index}", required=False) or f"<item {index}>"
    where = f"item {index} ({path})"
    raw = item.get("rois")
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise WireError(f"{where}: 'rois' must be a list of base64 ImageJ .roi files")
    rois = []
    for k, text in enumerate(raw):
        try:
            data = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None or not data.startswith(_ROI_MAGIC):
            raise WireError(f"{where}: rois[{k}] is not a base64 ImageJ .roi file (no 'Iout' header)")
        rois.append(data)
    return RoiItem(
        index=index,
        path=path,
        rois=tuple(rois),
        metadata=_metadata(item, where),
        ack=_ack_route(item, where),
        producer_identity=_mapping(item, "producer_identity", where, required=False),
    )


def _display(msg: Mapping[str, Any]) -> DisplayConfig:
    dc = _mapping(msg, "display_config", "batch", required=False) or {}
    modes = dc.get("component_modes")
    order = dc.get("component_order") or []
    if not isinstance(order, list) or not all(isinstance(c, str) for c in order):
        raise WireError("batch: display_config.component_order must be a list of component names")
    if modes is not None:
        if not isinstance(modes, dict):
            raise WireError("batch: display_config.component_modes must be an object")
        bad = {k: v for k, v in modes.items() if v not in MODES}
        if bad:
            raise WireError(
                f"batch: display_config.component_modes {bad} -- each mode must be one of {', '.join(MODES)}"
            )
        modes = {str(k): str(v) for k, v in modes.items()}
    extras = {k: v for k, v in dc.items() if k not in ("component_modes", "component_order")}
    return DisplayConfig(component_modes=modes, component_order=tuple(order), extras=extras)


def _names(msg: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    raw = _mapping(msg, "component_names_metadata", "batch", required=False) or {}
    out: dict[str, dict[str, str]] = {}
    for comp, names in raw.items():
        if names is None:
            continue
        if not isinstance(names, dict):
            raise WireError(f"batch: component_names_metadata[{comp!r}] must be an object")
        out[str(comp)] = {str(k): str(v) for k, v in names.items() if v is not None}
    return out


def parse_batch(raw: bytes) -> Batch:
    """Decode and check one data-channel message (raises :class:`WireError`)."""
    try:
        msg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WireError("batch is not UTF-8 text (expected one JSON object)") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"batch is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise WireError(f"batch must be a JSON object, got {type(msg).__name__}")
    if msg.get("type") != "batch":
        raise WireError(f"unknown message type {msg.get('type')!r}; the data channel takes type 'batch'")
    images = msg.get("images")
    if not isinstance(images, list):
        raise WireError("batch: missing 'images' list")
    if len(images) > MAX_ITEMS:
        raise WireError(f"batch: {len(images)} items is more than {MAX_ITEMS}")
    items: list[Item] = []
    for i, item in enumerate(images):
        if not isinstance(item, dict):
            raise WireError(f"item {i}: must be an object, got {type(item).__name__}")
        kind = item.get("data_type", "image")
        if kind == "image":
            items.append(_image_item(i, item))
        elif kind == "rois":
            items.append(_roi_item(i, item))
        else:
            raise WireError(f"item {i}: unsupported data_type {kind!r} (expected 'image' or 'rois')")
    ts = msg.get("timestamp")
    return Batch(
        items=tuple(items),
        display=_display(msg),
        component_names=_names(msg),
        images_dir=_text(msg, "images_dir", "batch", required=False),
        timestamp=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
    )


def ack_targets(raw: bytes) -> list[AckRoute]:
    """Best effort: the ack routes of a batch that failed :func:`parse_batch`,
    so that its sender still hears about every image it tracks."""
    try:
        msg = json.loads(raw.decode("utf-8"))
        images = msg.get("images") if isinstance(msg, dict) else None
    except Exception:  # noqa: BLE001 - undecodable: nobody to answer
        return []
    out = []
    for i, item in enumerate(images if isinstance(images, list) else []):
        if not isinstance(item, dict):
            continue
        try:
            route = _ack_route(item, f"item {i}")
        except WireError:
            continue
        if route is not None:
            out.append(route)
    return out
