"""The wire format of the bridge's two channels, version 1.

Control channel (ZeroMQ ROUTER on the base port; clients use DEALER or REQ):
a request is a multipart message ``[json, *buffers]``; the JSON object is
``{"v": 1, "type": ..., "id": ..., ...}`` and arrays travel as extra frames,
named in the JSON by an *array descriptor* ``{"frame": i, "shape": [...],
"dtype": "uint16"}`` (``i`` counts from 0 after the JSON frame). The reply
has the same shape: ``{"v": 1, "id": ..., "ok": true, ...}`` or
``{"v": 1, "id": ..., "ok": false, "error": {"code": ..., "message": ...}}``.

Data channel (ROUTER on base port + 1000; producers use DEALER): a plane is
``[header json, payload]``; ``header["transport"]`` says whether the payload
is the raw bytes (``"inline"``) or the name of a shared-memory segment the
producer owns (``"shm"``). The bridge answers every plane with an *ack*
after it has copied the pixels (the ack returns the producer's credit and
its ring slot): ``{"type": "ack", "stream", "seq", "ok", "key", "t", "z",
"c"}`` or ``ok: false`` with an ``error``.

Every incoming message is parsed into a dataclass by :func:`parse_request`
or :meth:`PlaneHeader.parse`; anything malformed raises
:class:`ProtocolError` with a machine-readable ``code``. Nothing is ever
unpickled or executed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np

from .components import Calibration, ComponentError, PlaneComponents
from .ports import DATA_PORT_OFFSET, DEFAULT_PORT  # noqa: F401 - the wire constants, here too

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ErrorCode",
    "ArrayDesc",
    "Request",
    "PlaneHeader",
    "Ack",
    "REQUEST_TYPES",
    "parse_request",
    "parse_json",
    "encode",
    "ok_reply",
    "error_reply",
    "encode_macro_result",
    "decode_macro_result",
    "FrameSink",
]

PROTOCOL_VERSION = 1

#: largest JSON frame accepted (a macro source of several MB is still fine)
MAX_JSON_BYTES = 32 << 20
#: largest side of a plane, and largest plane, accepted on the data channel
MAX_PLANE_SIDE = 1 << 17
MAX_PLANE_BYTES = 1 << 31
#: pixel types ImageJ can hold (directly or after a documented conversion)
DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})
# a segment name: letters, digits, _ . - (never only dots: "." and ".." are folders)
_SHM_NAME = re.compile(r"^/?(?!\.+$)[A-Za-z0-9_.\-]{1,200}$")
#: most bytes one array descriptor may describe (guards against shapes whose
#: byte count overflows 64 bits; real limits apply where arrays are used)
MAX_ARRAY_BYTES = 1 << 48
_ENDPOINT = re.compile(r"^(tcp|ipc|inproc)://\S{1,500}$")


class ErrorCode:
    """The ``error.code`` values a reply or an ack may carry."""

    BAD_FRAME = "bad_frame"  # wrong number of frames, empty message
    BAD_JSON = "bad_json"  # not UTF-8 JSON, or not an object
    BAD_VERSION = "bad_version"  # "v" is not a version we speak
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"  # wrong type or value of a field
    BAD_INDEX = "bad_index"  # negative or huge plane indices
    BAD_SHM = "bad_shm"  # a shared-memory segment that does not exist / is too small
    SHAPE_MISMATCH = "shape_mismatch"  # shape/dtype do not match the payload
    REJECTED = "rejected"  # the plane does not fit its stack (dtype, YX shape)
    NOT_FOUND = "not_found"  # no such stack
    MACRO_ERROR = "macro_error"
    MACRO_TIMEOUT = "macro_timeout"
    ENGINE = "engine"  # the engine worker is down / failed to start
    UNAVAILABLE = "unavailable"  # a feature whose module is not installed
    SHUTTING_DOWN = "shutting_down"
    NO_MEMORY = "no_memory"  # no room in shared memory for the request's arrays
    FORBIDDEN = "forbidden"  # outside what this bridge allows (save_to roots)
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """An incoming message is malformed; ``code`` is one of :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


# --------------------------------------------------------------------------- helpers


def parse_json(frame: Any, what: str = "message") -> dict:
    """Decode one frame as a JSON object; raise :class:`ProtocolError` otherwise."""
    try:
        raw = bytes(frame)
    except TypeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what}: frame is not bytes") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ProtocolError(ErrorCode.BAD_JSON, f"{what}: JSON frame of {len(raw)} bytes is over the {MAX_JSON_BYTES} limit")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"{what}: not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, f"{what}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default, allow_nan=True).encode("utf-8")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def encode(obj: Mapping[str, Any], frames: Sequence[Any] = ()) -> list:
    """``[json bytes, *frames]``, stamping the protocol version."""
    d = dict(obj)
    d.setdefault("v", PROTOCOL_VERSION)
    return [_dumps(d), *frames]


def ok_reply(req_id: Any, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, **fields}


def error_reply(req_id: Any, code: str, message: str, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message, **fields}}


_MISSING = object()


def _get(d: Mapping[str, Any], name: str, types: Any, default: Any = _MISSING, *, where: str = "") -> Any:
    """Field ``name`` of ``d``, checked against ``types`` (bool is never an int)."""
    if name not in d or d[name] is None:
        if default is _MISSING:
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"{where}missing field {name!r}")
        return default
    v = d[name]
    tt = types if isinstance(types, tuple) else (types,)
    if isinstance(v, bool) and bool not in tt:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}field {name!r} must be {_tname(tt)}, got a boolean")
    if not isinstance(v, tt):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}field {name!r} must be {_tname(tt)}, got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}field {name!r} must be finite")
    return v


def _tname(tt: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in tt)


def _check_key(key: Any, where: str = "") -> str:
    if not isinstance(key, str) or not key or len(key) > 512 or any(ord(ch) < 32 for ch in key):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}stack key must be a non-empty printable string of <= 512 chars, got {key!r}")
    return key


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArrayDesc:
    """Where an array travels: in extra frame ``frame`` (control channel) or
    in shared memory segment ``shm`` (bridge <-> engine worker)."""

    shape: tuple[int, ...]
    dtype: str
    frame: Optional[int] = None
    shm: Optional[str] = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        d: dict = {"shape": list(self.shape), "dtype": self.dtype}
        if self.frame is not None:
            d["frame"] = self.frame
        if self.shm is not None:
            d["shm"] = self.shm
        return d

    @classmethod
    def parse(cls, d: Any, nframes: Optional[int] = None, *, where: str = "array: ", any_dtype: bool = False) -> "ArrayDesc":
        if not isinstance(d, dict):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}expected an array descriptor object")
        shape = _parse_shape(_get(d, "shape", list, where=where), where=where, ndim=None)
        dtype = _parse_dtype(_get(d, "dtype", str, where=where), where=where, any_dtype=any_dtype)
        frame = _get(d, "frame", int, None, where=where)
        shm = _get(d, "shm", str, None, where=where)
        if frame is None and shm is None:
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"{where}an array needs 'frame' or 'shm'")
        if frame is not None and nframes is not None and not 0 <= frame < nframes:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{where}names frame {frame} but the message has {nframes} array frames")
        if shm is not None and not _SHM_NAME.match(shm):
            raise ProtocolError(ErrorCode.BAD_SHM, f"{where}bad shared-memory name {shm!r}")
        desc = cls(shape, dtype, frame, shm)
        if desc.nbytes > MAX_ARRAY_BYTES:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}shape {list(shape)} {dtype} would be {desc.nbytes} bytes, more than any array can be")
        return desc

    def from_frame(self, buf: Any) -> np.ndarray:
        """The array in ``buf`` (a zmq frame / bytes), checked against shape and dtype (a view)."""
        mv = memoryview(buf)
        if mv.nbytes != self.nbytes:
            raise ProtocolError(
                ErrorCode.SHAPE_MISMATCH,
                f"array {list(self.shape)} {self.dtype} needs {self.nbytes} bytes, the frame has {mv.nbytes}",
            )
        return np.frombuffer(mv, dtype=self.dtype).reshape(self.shape)


def _parse_shape(v: list, *, where: str, ndim: Optional[int]) -> tuple[int, ...]:
    if ndim is not None and len(v) != ndim:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}shape must have {ndim} dimensions, got {v!r}")
    if len(v) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}shape must be a list of at most 8 integers, got {v!r}")
    if any(s < 0 or s > MAX_PLANE_SIDE * 64 for s in v):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}shape {v!r} has a negative or huge size")
    return tuple(v)


def _parse_dtype(s: str, *, where: str, any_dtype: bool = False) -> str:
    try:
        dt = np.dtype(s)
    except TypeError:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}unknown dtype {s!r}") from None
    if dt.hasobject:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}object dtype is refused")
    name = dt.newbyteorder("=").name if dt.byteorder not in ("=", "|") else dt.name
    if not any_dtype and name not in DTYPES:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}dtype {s!r} is not one of {sorted(DTYPES)}")
    if dt.byteorder not in ("=", "|", "<"):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{where}dtype {s!r}: only little-endian data is accepted")
    return dt.name if dt.byteorder in ("=", "|") else dt.str


class FrameSink:
    """Collects arrays as extra frames of one outgoing message."""

    def __init__(self) -> None:
        self.frames: list = []

    def put(self, arr: np.ndarray) -> dict:
        a = np.ascontiguousarray(arr)
        self.frames.append(memoryview(a).cast("B") if a.size else b"")
        return ArrayDesc(tuple(a.shape), a.dtype.str if a.dtype.byteorder == ">" else a.dtype.name, frame=len(self.frames) - 1).to_dict()


# --------------------------------------------------------------------------- control requests


@dataclass
class Request:
    """A control request; subclasses add their fields and a ``_parse``."""

    TYPE: ClassVar[str] = ""
    id: Any = None
    frames: list = field(default_factory=list, repr=False)

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        return {}


def _request(type_name: str):
    def deco(klass):
        klass.TYPE = type_name
        REQUEST_TYPES[type_name] = klass
        return klass

    return deco


REQUEST_TYPES: dict[str, type[Request]] = {}


@_request("ping")
@dataclass
class Ping(Request):
    pass


@_request("status")
@dataclass
class Status(Request):
    pass


@_request("list_stacks")
@dataclass
class ListStacks(Request):
    pass


@_request("clear_state")
@dataclass
class ClearState(Request):
    pass


@_request("shutdown")
@dataclass
class Shutdown(Request):
    pass


@dataclass
class _KeyRequest(Request):
    key: str = ""

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        return {"key": _check_key(_get(d, "key", str))}


@_request("stack_info")
@dataclass
class StackInfoRequest(_KeyRequest):
    pass


@_request("get_stack")
@dataclass
class GetStack(_KeyRequest):
    pass


@_request("close_stack")
@dataclass
class CloseStack(_KeyRequest):
    pass


@_request("render")
@dataclass
class Render(_KeyRequest):
    montage: bool = False

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        out = super()._parse(d, frames)
        out["montage"] = _get(d, "montage", bool, False)
        return out


@_request("subscribe")
@dataclass
class Subscribe(Request):
    endpoint: str = ""
    mapping: Optional[dict] = None

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        ep = _get(d, "endpoint", str)
        if not _ENDPOINT.match(ep):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"endpoint must look like tcp://host:port or ipc://path, got {ep!r}")
        return {"endpoint": ep, "mapping": _get(d, "mapping", dict, None)}


@_request("unsubscribe")
@dataclass
class Unsubscribe(Subscribe):
    pass


@_request("shm_probe")
@dataclass
class ShmProbe(Request):
    """Can the bridge read this client's shared memory? (same host, same /dev/shm)"""

    name: str = ""
    size: int = 0

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        name = _get(d, "name", str)
        if not _SHM_NAME.match(name):
            raise ProtocolError(ErrorCode.BAD_SHM, f"bad shared-memory name {name!r}")
        size = _get(d, "size", int)
        if not 0 < size <= 4096:
            raise ProtocolError(ErrorCode.BAD_FIELD, "size must be 1..4096")
        return {"name": name, "size": size}


@_request("lease_ring")
@dataclass
class LeaseRing(Request):
    """Lend me warm segments for my plane ring (:mod:`fiji_bridge.ring_leases`):
    ``slots`` of at least ``slot_bytes``, for process ``pid`` started at ``start``."""

    pid: int = 0
    start: int = 0
    slots: int = 0
    slot_bytes: int = 0

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        out = {k: _get(d, k, int) for k in ("pid", "start", "slots", "slot_bytes")}
        if not 0 < out["pid"] < 1 << 31 or out["start"] < 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, "pid must be 1..2^31-1 and start >= 0")
        if not 1 <= out["slots"] <= 999 or not 1 <= out["slot_bytes"] <= 1 << 40:
            raise ProtocolError(ErrorCode.BAD_FIELD, "slots must be 1..999 and slot_bytes 1..2^40")
        return out


@_request("release_ring")
@dataclass
class ReleaseRing(Request):
    """Take my leased ring segments back: every plane in them is acknowledged."""

    lease: str = ""

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        lease = _get(d, "lease", str)
        if not 0 < len(lease) <= 64:
            raise ProtocolError(ErrorCode.BAD_FIELD, "lease must be a non-empty string of <= 64 chars")
        return {"lease": lease}


@_request("run_macro")
@dataclass
class RunMacro(Request):
    code: str = ""
    stack: Optional[str] = None
    image: Optional[ArrayDesc] = None
    dims: str = "TZCYX"
    args: Any = None
    dialog_options: Optional[str] = None
    timeout: Optional[float] = None
    title: Optional[str] = None
    channel_names: Optional[list] = None
    calibration: Optional[dict] = None
    outputs: Optional[list] = None
    save_to: Optional[str] = None

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        code = _get(d, "code", str)
        if not code.strip():
            raise ProtocolError(ErrorCode.BAD_FIELD, "macro code is empty")
        stack = _get(d, "stack", str, None)
        if stack is not None:
            _check_key(stack)
        image = d.get("image")
        desc = ArrayDesc.parse(image, len(frames), where="image: ") if image is not None else None
        if desc is not None and desc.frame is None:
            raise ProtocolError(ErrorCode.BAD_FIELD, "image: must travel as a frame on the control channel")
        if desc is not None and stack is not None:
            raise ProtocolError(ErrorCode.BAD_FIELD, "give either 'stack' or 'image', not both")
        dims = _get(d, "dims", str, "TZCYX").upper()
        if desc is not None:
            if len(dims) != len(desc.shape) or len(set(dims)) != len(dims) or not set(dims) <= set("TZCYX") or not {"Y", "X"} <= set(dims):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"dims {dims!r} do not name the {len(desc.shape)} axes of the image (letters of TZCYX, Y and X required)")
        args = d.get("args")
        if args is not None and not isinstance(args, (str, dict)):
            raise ProtocolError(ErrorCode.BAD_FIELD, "args must be a string or an object")
        if isinstance(args, dict) and not all(isinstance(v, (str, int, float, bool)) for v in args.values()):
            raise ProtocolError(ErrorCode.BAD_FIELD, "args values must be strings, numbers or booleans")
        timeout = _get(d, "timeout", (int, float), None)
        if timeout is not None and not 0 < timeout <= 7 * 86400:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"timeout must be > 0 s and at most a week, got {timeout}")
        names = _get(d, "channel_names", list, None)
        if names is not None and not all(isinstance(n, str) for n in names):
            raise ProtocolError(ErrorCode.BAD_FIELD, "channel_names must be strings")
        outputs = _get(d, "outputs", list, None)
        if outputs is not None and not all(isinstance(n, str) for n in outputs):
            raise ProtocolError(ErrorCode.BAD_FIELD, "outputs must be image titles (strings)")
        cal = _get(d, "calibration", dict, None)
        if cal is not None:
            _parse_calibration(cal)
        return {
            "code": code,
            "stack": stack,
            "image": desc,
            "dims": dims,
            "args": args,
            "dialog_options": _get(d, "dialog_options", str, None),
            "timeout": float(timeout) if timeout is not None else None,
            "title": _get(d, "title", str, None),
            "channel_names": names,
            "calibration": cal,
            "outputs": outputs,
            "save_to": _get(d, "save_to", str, None),
        }

    def image_array(self) -> Optional[np.ndarray]:
        if self.image is None:
            return None
        return self.image.from_frame(self.frames[self.image.frame])


def parse_request(frames: Sequence[Any]) -> Request:
    """Parse ``[json, *buffers]`` into a :class:`Request` subclass."""
    if not frames:
        raise ProtocolError(ErrorCode.BAD_FRAME, "empty message")
    d = parse_json(frames[0], "request")
    v = d.get("v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {v!r} is not supported (this bridge speaks v{PROTOCOL_VERSION})")
    t = d.get("type")
    if not isinstance(t, str):
        raise ProtocolError(ErrorCode.MISSING_FIELD, "request has no string 'type'")
    klass = REQUEST_TYPES.get(t)
    if klass is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown request type {t!r}; known: {sorted(REQUEST_TYPES)}")
    rid = d.get("id")
    if rid is not None and not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ProtocolError(ErrorCode.BAD_FIELD, "field 'id' must be a string or an integer")
    rest = list(frames[1:])
    try:
        fields = klass._parse(d, rest)
    except ProtocolError as e:
        e.args = (f"{t}: {e.message}",)
        e.message = f"{t}: {e.message}"
        raise
    return klass(id=rid, frames=rest, **fields)


def request_id(frame: Any) -> Any:
    """Best-effort id of a request that failed to parse (for the error reply)."""
    try:
        rid = json.loads(bytes(frame)).get("id")
        return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    except Exception:  # RecursionError included
        return None


# --------------------------------------------------------------------------- data channel


def _parse_calibration(d: Any) -> Calibration:
    if not isinstance(d, dict):
        raise ProtocolError(ErrorCode.BAD_FIELD, "calibration must be an object")
    unknown = set(d) - set(Calibration.__dataclass_fields__)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"calibration: unknown fields {sorted(unknown)}")
    for k in ("pixel_width", "pixel_height", "pixel_depth", "frame_interval"):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"calibration.{k} must be a positive number, got {v!r}")
    for k in ("unit", "time_unit"):
        if k in d and not isinstance(d[k], str):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"calibration.{k} must be a string")
    return Calibration.from_dict(d)


@dataclass
class PlaneHeader:
    """The header of one plane on the data channel."""

    stream: str
    seq: int
    shape: tuple[int, int]
    dtype: str
    transport: str  # "shm" | "inline"
    components: PlaneComponents
    key: Optional[str] = None
    calibration: Optional[Calibration] = None
    mapping: Optional[dict] = None
    offset: int = 0
    #: planes the producer dropped so far on this stream (live mode)
    dropped: int = 0

    TRANSPORTS: ClassVar[tuple[str, ...]] = ("shm", "inline")

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        d = {
            "type": "plane",
            "v": PROTOCOL_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "transport": self.transport,
            "components": self.components.to_dict(),
        }
        if self.key is not None:
            d["key"] = self.key
        if self.calibration is not None:
            d["calibration"] = self.calibration.to_dict()
        if self.mapping is not None:
            d["mapping"] = self.mapping
        if self.offset:
            d["offset"] = self.offset
        if self.dropped:
            d["dropped"] = self.dropped
        return d

    def encode(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def parse(cls, header: Any, payload: Any) -> "PlaneHeader":
        """Validate a header and its payload frame (size for inline, name for shm)."""
        d = parse_json(header, "plane header")
        v = d.get("v", PROTOCOL_VERSION)
        if v != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"plane header version {v!r} is not supported (v{PROTOCOL_VERSION})")
        if d.get("type", "plane") != "plane":
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"data channel message type {d.get('type')!r}: only 'plane' is accepted")
        w = "plane header: "
        stream = _get(d, "stream", str, where=w)
        if not stream or len(stream) > 256:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}stream id must be 1..256 characters")
        seq = _get(d, "seq", int, where=w)
        if seq < 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}seq must be >= 0")
        shape = _parse_shape(_get(d, "shape", list, where=w), where=w, ndim=2)
        if not all(0 < s <= MAX_PLANE_SIDE for s in shape):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}plane shape {list(shape)} must be two sizes in 1..{MAX_PLANE_SIDE}")
        dtype = _parse_dtype(_get(d, "dtype", str, where=w), where=w)
        transport = _get(d, "transport", str, where=w)
        if transport not in cls.TRANSPORTS:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}transport must be 'shm' or 'inline', got {transport!r}")
        comps = _get(d, "components", dict, where=w)
        try:
            components = PlaneComponents.from_dict(comps)
        except ComponentError as e:
            code = ErrorCode.BAD_INDEX if "out of range" in str(e) else ErrorCode.BAD_FIELD
            raise ProtocolError(code, f"{w}components: {e}") from None
        except TypeError as e:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}components: {e}") from None
        if components.channel_name is not None and not isinstance(components.channel_name, str):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}channel_name must be a string")
        key = _get(d, "key", str, None, where=w)
        if key is not None:
            _check_key(key, w)
        cal = d.get("calibration")
        calibration = _parse_calibration(cal) if cal is not None else None
        mapping = _get(d, "mapping", dict, None, where=w)
        offset = _get(d, "offset", int, 0, where=w)
        dropped = _get(d, "dropped", int, 0, where=w)
        if offset < 0 or dropped < 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}offset and dropped must be >= 0")
        h = cls(stream, seq, shape, dtype, transport, components, key, calibration, mapping, offset, dropped)
        if h.nbytes > MAX_PLANE_BYTES:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{w}plane of {h.nbytes} bytes is over the {MAX_PLANE_BYTES} limit")
        try:
            n = memoryview(payload).nbytes
        except TypeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{w}payload frame is not bytes") from None
        if transport == "inline":
            if n != h.nbytes:
                raise ProtocolError(
                    ErrorCode.SHAPE_MISMATCH,
                    f"{w}shape {list(shape)} {dtype} needs {h.nbytes} bytes, the payload has {n}",
                )
        else:
            name = h.shm_name(payload)
            if name is None:
                raise ProtocolError(ErrorCode.BAD_SHM, f"{w}payload is not a shared-memory segment name")
        return h

    @staticmethod
    def shm_name(payload: Any) -> Optional[str]:
        try:
            name = bytes(payload).decode("ascii")
        except (UnicodeDecodeError, TypeError):
            return None
        return name if _SHM_NAME.match(name) else None


@dataclass
class Ack:
    """The bridge's answer to one plane."""

    stream: str
    seq: int
    ok: bool
    key: Optional[str] = None
    t: int = -1
    z: int = -1
    c: int = -1
    error: Optional[dict] = None

    def encode(self) -> bytes:
        d: dict = {"v": PROTOCOL_VERSION, "type": "ack", "stream": self.stream, "seq": self.seq, "ok": self.ok}
        if self.ok:
            d.update(key=self.key, t=self.t, z=self.z, c=self.c)
        else:
            d["error"] = self.error or {"code": ErrorCode.INTERNAL, "message": "unknown"}
            if self.key is not None:
                d["key"] = self.key
        return _dumps(d)

    @classmethod
    def parse(cls, frame: Any) -> "Ack":
        d = parse_json(frame, "ack")
        if d.get("type") != "ack":
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"expected an ack, got {d.get('type')!r}")
        return cls(
            stream=str(d.get("stream", "")),
            seq=int(d.get("seq", -1)),
            ok=bool(d.get("ok")),
            key=d.get("key"),
            t=int(d.get("t", -1) if d.get("t") is not None else -1),
            z=int(d.get("z", -1) if d.get("z") is not None else -1),
            c=int(d.get("c", -1) if d.get("c") is not None else -1),
            error=d.get("error"),
        )


# --------------------------------------------------------------------------- macro results


@_request("run_script")
@dataclass
class RunScript(RunMacro):
    """A SciJava script (Fiji) or an ImageJ macro with ``#@output`` outputs;
    ``language`` an extension or name (None: ImageJ macro), ``inputs`` its ``#@`` values."""

    language: Optional[str] = None
    inputs: Optional[dict] = None

    @classmethod
    def _parse(cls, d: dict, frames: list) -> dict:
        inputs = _get(d, "inputs", dict, None)
        if inputs is not None and not all(isinstance(v, (str, int, float, bool)) for v in inputs.values()):
            raise ProtocolError(ErrorCode.BAD_FIELD, "inputs values must be strings, numbers or booleans")
        language = _get(d, "language", str, None)
        if language is not None and not re.fullmatch(r"[\w .+-]{1,40}", language):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"bad script language {language!r}")
        return {**RunMacro._parse(d, frames), "language": language, "inputs": inputs}

ArrayPut = Callable[[np.ndarray], dict]
ArrayGet = Callable[[dict], np.ndarray]


def encode_macro_result(result: Any, put: ArrayPut) -> dict:
    """A MacroResult as JSON; arrays go through ``put`` (a frame or a shm segment)."""
    tables: dict = {}
    for title, cols in result.tables.items():
        enc: dict = {}
        for name, col in cols.items():
            col = np.asarray(col)
            if col.dtype.kind in "biuf":
                enc[name] = {"array": put(col)}
            else:
                enc[name] = {"text": [None if v is None else (v if isinstance(v, (int, float)) else str(v)) for v in col.tolist()]}
        tables[title] = enc
    return {
        "images": {title: put(np.asarray(arr)) for title, arr in result.images.items()},
        "image_info": {title: info.to_dict() for title, info in result.image_info.items()},
        "tables": tables,
        "log": result.log,
        "rois": [r.to_dict() for r in result.rois],
        "elapsed": float(result.elapsed),
        "notes": list(result.notes),
        "outputs": {name: _encode_output(v, put) for name, v in getattr(result, "outputs", {}).items()},
    }


def _encode_column(col: Any, put: ArrayPut) -> dict:
    col = np.asarray(col)
    if col.dtype.kind in "biuf":
        return {"array": put(col)}
    return {"text": [None if v is None else (v if isinstance(v, (int, float)) else str(v)) for v in col.tolist()]}


def _encode_output(value: Any, put: ArrayPut) -> dict:
    """A script output: a JSON value, an array, or a table of columns."""
    if isinstance(value, np.ndarray):
        return {"array": put(value)}
    if isinstance(value, dict):
        return {"table": {str(k): _encode_column(c, put) for k, c in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        return {"value": [v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for v in value]}
    return {"value": str(value)}


def _decode_output(d: Mapping[str, Any], get: ArrayGet) -> Any:
    if "array" in d:
        return np.array(get(d["array"]))
    if "table" in d:
        return {k: (np.array(get(c["array"])) if "array" in c else np.array(c.get("text", []), dtype=object))
                for k, c in d["table"].items()}
    return d.get("value")


def decode_macro_result(d: Mapping[str, Any], get: ArrayGet) -> Any:
    """Rebuild a MacroResult (arrays are copies owned by the caller)."""
    from .engine.base import ImageInfo, MacroResult, Roi

    images = {title: np.array(get(desc)) for title, desc in d.get("images", {}).items()}
    tables: dict = {}
    for title, cols in d.get("tables", {}).items():
        tables[title] = {
            name: (np.array(get(c["array"])) if "array" in c else np.array(c.get("text", []), dtype=object))
            for name, c in cols.items()
        }
    return MacroResult(
        images=images,
        image_info={t: ImageInfo.from_dict(i) for t, i in d.get("image_info", {}).items()},
        tables=tables,
        log=d.get("log", ""),
        rois=[Roi.from_dict(r) for r in d.get("rois", [])],
        elapsed=float(d.get("elapsed", 0.0)),
        notes=list(d.get("notes", [])),
        outputs={k: _decode_output(v, get) for k, v in d.get("outputs", {}).items()},
    )
