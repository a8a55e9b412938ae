"""OpenHCS 0.8.6's ``run_macro`` on the wire: decoded without running code.

Facts, read from openhcs 0.8.6 (``openhcs/runtime/fiji_macro_runtime.py``,
``viewer_protocol.py``) and zmqruntime 0.2.24 (``viewer_protocol.py``):

* The sender's ``ViewerControlMessageRequest.send`` puts
  ``pickle.dumps({"type": "run_macro", "payload": request})`` (the default
  protocol: 4 on Python 3.11-3.13, 5 on 3.14) on the viewer's control REQ
  socket and ``pickle.loads`` the reply. ``request`` is a frozen, slotted
  dataclass ``openhcs.runtime.fiji_macro_runtime.FijiMacroExecutionRequest``
  with fields ``macro_path`` (a ``pathlib`` path), ``input_filenames``,
  ``output_filenames`` (tuples of str), ``directory_variable`` (str),
  ``macro_variables`` (a dict of str) and ``input_images`` (a tuple of
  C-contiguous numpy arrays). Pickled, a slotted frozen dataclass is
  ``NEWOBJ`` of the class and ``BUILD`` with the list of field values.
* A success reply is ``{"status": "success", "payload":
  FijiMacroExecutionResponse(outputs=(array, ...))}`` (the sender checks the
  payload's class by ``isinstance``); a failure is ``{"status": "error",
  "message": text}`` (the sender raises ``RuntimeError`` with the mapping).

:func:`loads_control` decodes a control message with an unpickler that
resolves only these names, each to a stand-in of ours that runs no code of
the peer's: the two openhcs classes (:class:`MacroRequestState`,
:class:`MacroResponseState`), ``pathlib``'s path classes (a pure path built
from strings), and numpy's array and dtype reconstructors (arrays are
rebuilt by :func:`numpy.frombuffer` from raw bytes, numeric dtypes only).
Anything else is refused. :func:`dumps_reply` writes the reply so that the
sender's plain ``pickle.loads`` builds its own ``FijiMacroExecutionResponse``.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Optional

import numpy as np

from .wire import WireError, check_plain, unpickle_with

__all__ = [
    "MACRO_MODULE",
    "MAX_MACRO_BYTES",
    "MacroRequestState",
    "MacroResponseState",
    "dumps_reply",
    "loads_control",
]

MACRO_MODULE = "openhcs.runtime.fiji_macro_runtime"
REQUEST_CLASS = "FijiMacroExecutionRequest"
RESPONSE_CLASS = "FijiMacroExecutionResponse"
REQUEST_FIELDS = (
    "macro_path",
    "input_filenames",
    "output_filenames",
    "directory_variable",
    "macro_variables",
    "input_images",
)
RESPONSE_FIELDS = ("outputs",)
#: a run_macro message (images included) larger than this is refused
MAX_MACRO_BYTES = 1 << 30
#: what a reply may carry: protocol 3 frames bytes with a 4-byte length
MAX_REPLY_ARRAY_BYTES = (1 << 32) - 1
_DTYPE_CODE = re.compile(r"^(b1|[iu][1248]|f[248])$")


# ---------------------------------------------------------------- stand-ins


class _StandIn:
    """Base of the objects our unpickler builds: state is set only through
    their own checked ``__setstate__``; calling them with arguments fails."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"refused state for {type(self).__name__}")


def _fields_from_state(cls_name: str, names: tuple[str, ...], state: Any) -> dict[str, Any]:
    """A dataclass's pickled state as {field: value}: the list a slotted
    frozen dataclass pickles, a ``__dict__``, or ``(None, slots)``."""
    if isinstance(state, tuple) and len(state) == 2 and state[0] is None and isinstance(state[1], dict):
        state = state[1]
    if isinstance(state, list) and len(state) == len(names):
        return dict(zip(names, state))
    if isinstance(state, dict) and set(state) == set(names):
        return dict(state)
    raise pickle.UnpicklingError(
        f"{cls_name}: expected the fields {', '.join(names)}; got a {type(state).__name__} "
        "(is the sender a newer OpenHCS than 0.8.6?)"
    )


class MacroRequestState(_StandIn):
    """Stand-in for ``FijiMacroExecutionRequest``: its fields, unchecked."""

    __slots__ = ("fields",)

    def __setstate__(self, state: Any) -> None:
        self.fields = _fields_from_state(REQUEST_CLASS, REQUEST_FIELDS, state)


class MacroResponseState(_StandIn):
    """Stand-in for ``FijiMacroExecutionResponse`` (a sender may echo one)."""

    __slots__ = ("fields",)

    def __setstate__(self, state: Any) -> None:
        self.fields = _fields_from_state(RESPONSE_CLASS, RESPONSE_FIELDS, state)


class _NdarrayClass(_StandIn):
    """What ``numpy.ndarray`` resolves to: only ``_reconstruct`` takes it."""


_NDARRAY = _NdarrayClass()


class _DType(_StandIn):
    """A numeric dtype code (``'u2'``), its byte order set by ``BUILD``."""

    __slots__ = ("code", "order")

    def __init__(self, code: str) -> None:
        self.code = code
        self.order = "="

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if (
            not isinstance(state, tuple)
            or len(state) not in (8, 9)
            or state[0] not in (3, 4)
            or state[1] not in ("<", ">", "|", "=")
            or state[2:5] != (None, None, None)
        ):
            raise pickle.UnpicklingError(f"refused dtype state {state!r:.200}: only plain numeric dtypes")
        self.order = state[1]

    def dtype(self) -> np.dtype:
        dt = np.dtype(self.code)
        return dt.newbyteorder(self.order) if self.order in "<>" and dt.itemsize > 1 else dt


def _make_dtype(code: Any, align: Any = False, copy: Any = True) -> _DType:
    if not isinstance(code, str) or not _DTYPE_CODE.match(code):
        raise pickle.UnpicklingError(f"refused dtype {code!r:.40}: images must be bool, integer or float")
    return _DType(code)


def _shape(shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > 8
        or any(type(n) is not int or n < 0 for n in shape)
    ):
        raise pickle.UnpicklingError(f"refused array shape {shape!r:.80}")
    return shape


def _array(buf: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("refused an array whose dtype is not a plain numeric dtype")
    if not isinstance(buf, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refused array data of type {type(buf).__name__} (object arrays are not images)")
    dt, shape = dtype.dtype(), _shape(shape)
    count = math.prod(shape)
    if count * dt.itemsize != len(buf):
        raise pickle.UnpicklingError(f"array data has {len(buf)} bytes, shape {list(shape)} of {dt} needs {count * dt.itemsize}")
    flat = np.frombuffer(buf, dtype=dt, count=count)
    return flat.reshape(shape, order="F" if fortran else "C")


class _ArrayState(_StandIn):
    """What ``_reconstruct(ndarray, (0,), b'b')`` returns; ``BUILD`` fills it."""

    __slots__ = ("array",)

    def __setstate__(self, state: Any) -> None:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata)
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1 or type(state[3]) is not bool:
            raise pickle.UnpicklingError("refused array state: expected (1, shape, dtype, is_fortran, data)")
        self.array = _array(state[4], state[2], state[1], state[3])


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayState:
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise pickle.UnpicklingError("refused numpy _reconstruct of anything but a plain ndarray")
    return _ArrayState()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused array order {order!r:.20}")
    return _array(buf, dtype, shape, order == "F")


def _path(flavour: type[PurePath]):
    def make(*parts: Any) -> PurePath:
        if not all(isinstance(p, str) for p in parts) or len(parts) > 256:
            raise pickle.UnpicklingError("refused a path built from anything but strings")
        return flavour(*parts)

    return make


_POSIX, _WINDOWS = _path(PurePosixPath), _path(PureWindowsPath)
_ALLOWED: dict[tuple[str, str], Any] = {
    (MACRO_MODULE, REQUEST_CLASS): MacroRequestState,
    (MACRO_MODULE, RESPONSE_CLASS): MacroResponseState,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _make_dtype,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
for _mod in ("pathlib", "pathlib._local"):
    for _name, _make in (("PosixPath", _POSIX), ("PurePosixPath", _POSIX), ("WindowsPath", _WINDOWS), ("PureWindowsPath", _WINDOWS)):
        _ALLOWED[(_mod, _name)] = _make


class _ControlUnpickler(pickle.Unpickler):
    """Resolves exactly the names of :data:`_ALLOWED`, to our stand-ins."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: control messages may hold only plain data, and "
                f"run_macro only {MACRO_MODULE}.{REQUEST_CLASS} with numpy images"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id in a control message")


# ---------------------------------------------------------------- decoded request


@dataclass(frozen=True)
class MacroRequest:
    """A checked ``FijiMacroExecutionRequest``."""

    macro_path: PurePath
    input_filenames: tuple[str, ...]
    output_filenames: tuple[str, ...]
    directory_variable: str
    macro_variables: dict[str, str]
    input_images: tuple[np.ndarray, ...]


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)) or not value or len(value) > 1000:
        raise WireError(f"run_macro: {what} must be a non-empty tuple of file names")
    out = []
    for name in value:
        if (
            not isinstance(name, str)
            or not name.strip()
            or len(name) > 255
            or name in (".", "..")
            or any(sep in name for sep in ("/", "\\", "\0"))
        ):
            raise WireError(f"run_macro: {what} entry {name!r:.80} must be a plain file name (no folders)")
        out.append(name)
    if len(set(out)) != len(out):
        raise WireError(f"run_macro: {what} names a file twice")
    return tuple(out)


def _request(state: Any) -> MacroRequest:
    if not isinstance(state, MacroRequestState) or not hasattr(state, "fields"):
        raise WireError(f"run_macro: 'payload' must be a {MACRO_MODULE}.{REQUEST_CLASS}")
    f = state.fields
    path = f["macro_path"]
    if isinstance(path, str):
        path = PurePosixPath(path) if "/" in path else PureWindowsPath(path)
    if not isinstance(path, PurePath):
        raise WireError("run_macro: macro_path must be a path")
    inputs = _names(f["input_filenames"], "input_filenames")
    outputs = _names(f["output_filenames"], "output_filenames")
    images = f["input_images"]
    if not isinstance(images, (tuple, list)) or not all(isinstance(a, (np.ndarray, _ArrayState)) for a in images):
        raise WireError("run_macro: input_images must be a tuple of numpy arrays")
    images = tuple(a.array if isinstance(a, _ArrayState) else a for a in images)
    if len(images) != len(inputs):
        raise WireError(
            f"run_macro: {len(inputs)} input file name(s) but {len(images)} image(s); "
            "they must have identical cardinality"
        )
    var = f["directory_variable"]
    if not isinstance(var, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", var):
        raise WireError(f"run_macro: directory_variable {var!r:.80} must be a macro variable name")
    variables = f["macro_variables"]
    if not isinstance(variables, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in variables.items()):
        raise WireError("run_macro: macro_variables must map variable names to strings")
    return MacroRequest(path, inputs, outputs, var, dict(variables), images)


def loads_control(data: bytes, *, max_bytes: int = MAX_MACRO_BYTES) -> tuple[dict, Optional[MacroRequest]]:
    """Decode one control message: ``(message, run_macro request or None)``.

    Raises :class:`RefusedPickle` for anything our stand-ins do not cover
    (and for stand-ins outside a ``run_macro`` payload), :class:`WireError`
    for a malformed request.
    """
    msg = unpickle_with(_ControlUnpickler, data, max_bytes)
    if not isinstance(msg, dict):
        raise WireError(f"control message must be a dict, got {type(msg).__name__}")
    if msg.get("type") != "run_macro":
        check_plain(msg)
        return msg, None
    rest = {k: v for k, v in msg.items() if k != "payload"}
    check_plain(rest)
    return msg, _request(msg.get("payload"))


# ---------------------------------------------------------------- the reply


def _op_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _op_array(a: np.ndarray) -> bytes:
    """An array as numpy's own reducer pickles it, protocol 3 (unframed), no
    PROTO/STOP: a piece to splice. Its memo slots are written before they are
    read, so pieces may reuse slot numbers."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind not in "biuf" or a.nbytes > MAX_REPLY_ARRAY_BYTES:
        raise ValueError(f"cannot return a {a.dtype} output of {a.nbytes} bytes")
    body = pickle.dumps(a, protocol=3)
    assert body[:2] == b"\x80\x03" and body[-1:] == b"."
    return body[2:-1]


def _op_value(v: Any) -> bytes:
    if v is None:
        return b"N"
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, str):
        return _op_str(v)
    if isinstance(v, int) and -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)  # BININT
    if isinstance(v, float):
        return b"G" + struct.pack(">d", v)  # BINFLOAT
    raise TypeError(f"reply value {v!r:.40} is not a string, number, boolean or None")


def dumps_reply(fields: Mapping[str, Any], outputs: Optional[tuple[np.ndarray, ...]] = None) -> bytes:
    """A reply mapping; with ``outputs``, ``payload`` is a
    ``FijiMacroExecutionResponse(outputs)`` for the sender's ``pickle.loads``."""
    parts = [b"\x80\x03", b"}", b"("]  # PROTO 3, EMPTY_DICT, MARK
    for k, v in fields.items():
        parts += [_op_str(k), _op_value(v)]
    if outputs is not None:
        parts += [
            _op_str("payload"),
            b"c" + f"{MACRO_MODULE}\n{RESPONSE_CLASS}\n".encode(),  # GLOBAL
            b")",  # EMPTY_TUPLE
            b"\x81",  # NEWOBJ: cls.__new__(cls)
            b"(",  # MARK: state = [outputs]
            b"(",  # MARK: outputs tuple
            *(_op_array(a) for a in outputs),
            b"t",  # TUPLE
            b"l",  # LIST
            b"b",  # BUILD: __setstate__([outputs])
        ]
    parts += [b"u", b"."]  # SETITEMS, STOP
    return b"".join(parts)
