"""numpy <-> ImageJ 1 pixels, in bulk.

Pixels never cross element by element. Into Java: a direct ``ByteBuffer`` is
laid over the numpy memory (``jpype.nio.convertToDirectBuffer``) and copied
into the Java primitive array with one ``get`` of a typed view
(``asShortBuffer`` ...). Out of Java: one ``put`` into a reused scratch
buffer, then one numpy copy into the result. Building a ``JArray`` from an ndarray is much
slower (see benchmarks/engine_transfer.py).

Axis conventions: arrays here are ``TZCYX``; ImageJ stores a hyperstack's
planes in ``CZT`` order, 1-based (``imp.getStackIndex(c, z, t)``).
Supported ImageJ types: 8-bit (uint8), 16-bit (uint16), 32-bit (float32) and
RGB (comes back as C=3 uint8). Other numpy types are converted on the way in,
and the conversion is stated (:func:`coerce_dtype`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Sequence

import numpy as np

from ..colours import channel_colours
from ..components import Calibration
from .base import DIMS, ImageInfo, MacroError

__all__ = [
    "Hyperstack",
    "coerce_dtype",
    "copy_into_java",
    "copy_from_java",
    "from_imageplus",
    "make_hyperstack",
    "new_image_stack",
    "new_java_array",
    "normalize_image",
    "plane_to_numpy",
    "set_calibration",
    "to_imageplus",
    "to_tzcyx",
    "write_planes",
    "write_stack",
]

#: ImageJ bit depth per numpy dtype, and the JPype primitive type name
_NP_TO_IJ = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(np.float32): 32}
_BUFFER_VIEW = {8: None, 16: "asShortBuffer", 32: "asFloatBuffer", 24: "asIntBuffer"}
_NP_FOR_DEPTH = {8: np.uint8, 16: np.uint16, 32: np.float32, 24: np.uint32}


@lru_cache(maxsize=None)
def J(name: str) -> Any:
    """A Java class by name (the JVM must be running)."""
    from jpype import JClass

    return JClass(name)


@dataclass
class Hyperstack:
    """An image on its way into ImageJ: TZCYX pixels plus metadata."""

    array: np.ndarray  # TZCYX, an ImageJ-native dtype
    channel_names: list[str] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    notes: list[str] = field(default_factory=list)


# -- shapes and dtypes --------------------------------------------------------


def to_tzcyx(array: np.ndarray, dims: str) -> np.ndarray:
    """View ``array`` (axes named by ``dims``: any order, any subset of TZCYX,
    Y and X required) as 5-D TZCYX, inserting singleton axes."""
    dims = dims.upper()
    if len(dims) != array.ndim:
        raise MacroError(
            f"dims={dims!r} names {len(dims)} axes but the image has {array.ndim} (shape {array.shape})",
            kind="argument",
        )
    if len(set(dims)) != len(dims) or not set(dims) <= set(DIMS) or "Y" not in dims or "X" not in dims:
        raise MacroError(
            f"dims={dims!r} must name distinct axes from {DIMS!r}, including Y and X", kind="argument"
        )
    order = [dims.index(d) for d in DIMS if d in dims]
    arr = np.transpose(array, order)
    present = [d for d in DIMS if d in dims]
    shape = [arr.shape[present.index(d)] if d in present else 1 for d in DIMS]
    return arr.reshape(shape)


def coerce_dtype(array: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """An ImageJ-native version of ``array`` and a note when it was converted.

    uint8/uint16/float32 pass unchanged; bool -> uint8 0/255; every other
    real type -> float32 (exact for integers up to 2**24 and for int8/int16/
    uint8/uint16 always; the note says whether this array was exact).
    """
    dt = array.dtype
    if dt in _NP_TO_IJ:
        return array, None
    if dt == np.bool_:
        return array.astype(np.uint8) * np.uint8(255), "converted bool to uint8 (False=0, True=255)"
    if dt.kind not in "iuf":
        raise MacroError(f"ImageJ cannot hold {dt} pixels; give uint8, uint16 or float32", kind="argument")
    out = array.astype(np.float32)
    exact = bool(np.array_equal(out.astype(dt), array, equal_nan=dt.kind == "f")) if array.size else True
    how = "exactly" if exact else "with rounding (values not representable in float32)"
    return out, f"converted {dt} to float32 {how}: ImageJ has no {dt} images"


def normalize_image(
    image: Any,
    dims: str = DIMS,
    channel_names: Optional[Sequence[str]] = None,
    calibration: Optional[Calibration] = None,
) -> Hyperstack:
    """Turn a numpy array (with ``dims``) or a hyperstack object (``.array``
    TZCYX, ``.channel_names``, ``.calibration``) into a :class:`Hyperstack`."""
    if not isinstance(image, np.ndarray) and hasattr(image, "array"):
        array = np.asarray(image.array)
        dims = DIMS if array.ndim == 5 else dims
        channel_names = channel_names or list(getattr(image, "channel_names", None) or [])
        calibration = calibration or getattr(image, "calibration", None)
    else:
        array = np.asarray(image)
    arr5 = to_tzcyx(array, dims)
    arr5, note = coerce_dtype(arr5)
    names = [str(n) for n in (channel_names or [])]
    if names and len(names) != arr5.shape[2]:
        raise MacroError(
            f"{len(names)} channel names for {arr5.shape[2]} channels: {names}", kind="argument"
        )
    return Hyperstack(arr5, names, calibration or Calibration(), [note] if note else [])


# -- bulk copies ----------------------------------------------------------------


def _typed_buffer(plane: np.ndarray, depth: int) -> Any:
    """A typed java.nio buffer over ``plane``'s memory (C-contiguous, writable)."""
    import jpype.nio

    buf = jpype.nio.convertToDirectBuffer(plane)
    view = _BUFFER_VIEW[depth]
    if view is None:
        return buf
    return getattr(buf.order(J("java.nio.ByteOrder").nativeOrder()), view)()


def new_java_array(depth: int, n: int) -> Any:
    from jpype import JArray, JByte, JFloat, JInt, JShort

    prim = {8: JByte, 16: JShort, 32: JFloat, 24: JInt}[depth]
    return JArray(prim)(n)


def copy_into_java(plane: np.ndarray, jarr: Any, depth: int) -> None:
    """Copy a YX numpy plane into an existing Java primitive array."""
    src = plane if plane.flags.c_contiguous and plane.flags.writeable else np.ascontiguousarray(plane).copy()
    _typed_buffer(src, depth).get(jarr)


class _Scratch:
    """Reusable numpy buffers with a Java typed view over each, for copies out
    of Java. A direct buffer over a *result* array would keep that array's
    memory referenced from Java until the next GC, so freed results could not
    be recycled and every call would pay for fresh pages (slow: ~0.5 GB/s
    here); a few long-lived scratch buffers avoid that."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._bufs: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}
        self._lock = threading.Lock()

    def copy(self, jarr: Any, out: np.ndarray, depth: int) -> None:
        key = (depth, out.size)
        with self._lock:
            entry = self._bufs.pop(key, None)
            if entry is None:
                arr = np.empty(out.size, dtype=_NP_FOR_DEPTH[depth] if depth != 8 else np.uint8)
                entry = (arr, _typed_buffer(arr, depth))
            self._bufs[key] = entry  # most recent last
            while len(self._bufs) > self.keep:
                self._bufs.pop(next(iter(self._bufs)))
            arr, typed = entry
            typed.rewind()
            typed.put(jarr)
            np.copyto(out, arr.view(out.dtype).reshape(out.shape))


_scratch = _Scratch()


def copy_from_java(jarr: Any, out: np.ndarray, depth: int) -> None:
    """Copy a Java primitive array into ``out`` (its dtype matching ``depth``):
    one bulk ``put`` into a scratch buffer, one numpy copy."""
    _scratch.copy(jarr, out, depth)


def plane_to_numpy(jarr: Any, depth: int, height: int, width: int) -> np.ndarray:
    out = np.empty((height, width), dtype=_NP_FOR_DEPTH[depth])
    copy_from_java(jarr, out, depth)
    return out


# -- ImagePlus --------------------------------------------------------------------

def set_calibration(imp: Any, cal: Calibration) -> None:
    c = imp.getCalibration()
    if cal.pixel_width is not None:
        c.pixelWidth = float(cal.pixel_width)
    if cal.pixel_height is not None:
        c.pixelHeight = float(cal.pixel_height)
    elif cal.pixel_width is not None:
        c.pixelHeight = float(cal.pixel_width)
    if cal.pixel_depth is not None:
        c.pixelDepth = float(cal.pixel_depth)
    if cal.is_set or cal.pixel_depth is not None:
        c.setUnit(cal.unit or "micron")
    if cal.frame_interval is not None:
        c.frameInterval = float(cal.frame_interval)
        c.setTimeUnit(cal.time_unit or "s")


def read_calibration(imp: Any) -> Calibration:
    c = imp.getCalibration()
    kw: dict = {"time_unit": str(c.getTimeUnit())}
    if c.scaled():
        kw.update(pixel_width=float(c.pixelWidth), pixel_height=float(c.pixelHeight),
                  pixel_depth=float(c.pixelDepth), unit=str(c.getUnit()))
    if c.frameInterval:
        kw["frame_interval"] = float(c.frameInterval)
    return Calibration(**kw)  # frozen: built in one go


def write_stack(stack: Any, arr5: np.ndarray, depth: int) -> None:
    """Copy every plane of ``arr5`` (TZCYX) into an existing ImageStack of the same shape."""
    T, Z, C = arr5.shape[:3]
    for t in range(T):
        for z in range(Z):
            for c in range(C):
                copy_into_java(arr5[t, z, c], stack.getPixels(1 + c + z * C + t * Z * C), depth)


def write_planes(
    stack: Any, Z: int, C: int, positions: Sequence[tuple[int, int, int]], planes: np.ndarray, depth: int
) -> None:
    """Copy ``planes[i]`` (YX) into the existing pixel array of the stack slice
    at ``positions[i]`` = (t, z, c): one bulk copy each, nothing allocated."""
    for (t, z, c), plane in zip(positions, planes):
        copy_into_java(plane, stack.getPixels(1 + c + z * C + t * Z * C), depth)


def new_image_stack(
    width: int,
    height: int,
    depth: int,
    arrays: Sequence[Optional[Any]],
    labels: Sequence[Optional[str]] = (),
) -> Any:
    """An ImageStack of ``len(arrays)`` slices: each given Java pixel array is
    used as is (no copy: moving planes between stacks costs nothing), a new
    zeroed one is allocated where ``None``."""
    stack = J("ij.ImageStack")(int(width), int(height))
    labels = list(labels)
    for i, jarr in enumerate(arrays):
        if jarr is None:
            jarr = new_java_array(depth, int(width) * int(height))
        stack.addSlice(labels[i] if i < len(labels) else None, jarr)
    return stack


def make_hyperstack(
    stack: Any,
    title: str,
    C: int,
    Z: int,
    T: int,
    channel_names: Sequence[str] = (),
    calibration: Optional[Calibration] = None,
) -> Any:
    """An ImagePlus over ``stack`` (CZT order): a real hyperstack, a
    CompositeImage (composite mode, a LUT colour per channel) when C > 1,
    calibration applied. Display ranges are left to the caller."""
    imp = J("ij.ImagePlus")(title, stack)
    imp.setDimensions(int(C), int(Z), int(T))
    if C * Z * T > 1:
        imp.setOpenAsHyperStack(True)
    if calibration is not None:
        set_calibration(imp, calibration)
    if C > 1:
        CI = J("ij.CompositeImage")
        imp = CI(imp, CI.COMPOSITE)
        Color, LUT = J("java.awt.Color"), J("ij.process.LUT")
        for c, colour in enumerate(channel_colours(list(channel_names), C)):
            imp.setPositionWithoutUpdate(c + 1, 1, 1)
            lut = LUT.createLutFromColor(getattr(Color, colour))
            imp.setChannelLut(lut, c + 1)
        # without update: setPosition would render the RGB composite (~3 ms
        # for 2 x 512^2), which a window draws anyway when it shows
        imp.setPositionWithoutUpdate(1, 1, 1)
        imp.setOpenAsHyperStack(True)
    return imp


def slice_labels(channel_names: Sequence[str], C: int, n: int) -> list[Optional[str]]:
    """The label of each of ``n`` slices in CZT order: its channel's name."""
    names = list(channel_names)
    return [names[i % C] if i % C < len(names) else None for i in range(n)]


def to_imageplus(
    arr5: np.ndarray,
    title: str,
    channel_names: Sequence[str] = (),
    calibration: Optional[Calibration] = None,
) -> Any:
    """A new ImagePlus for TZCYX ``arr5`` (an ImageJ-native dtype): a real
    hyperstack, a CompositeImage (composite mode) when C > 1, channel names as
    slice labels, calibration applied, display ranges set to the data."""
    depth = _NP_TO_IJ.get(arr5.dtype)
    if depth is None:
        raise MacroError(f"not an ImageJ pixel type: {arr5.dtype}", kind="argument")
    T, Z, C, Y, X = arr5.shape
    n = T * Z * C
    stack = new_image_stack(X, Y, depth, [None] * n, slice_labels(channel_names, C, n))
    write_stack(stack, arr5, depth)
    imp = make_hyperstack(stack, title, C, Z, T, channel_names, calibration)
    reset_display_ranges(imp, array_min_max(arr5))
    return imp


def array_min_max(arr5: np.ndarray) -> list[tuple[float, float]]:
    """Per-channel (min, max) of a TZCYX array, ignoring NaN/inf."""
    out = []
    for c in range(arr5.shape[2]):
        ch = arr5[:, :, c]
        if ch.dtype.kind == "f":
            ch = ch[np.isfinite(ch)]
        out.append((float(ch.min()), float(ch.max())) if ch.size else (0.0, 1.0))
    return out


def reset_display_ranges(imp: Any, ranges: Optional[list[tuple[float, float]]] = None) -> None:
    """Each channel's display range = its min..max over the whole stack
    (``ranges`` when the caller knows them; 8-bit: 0..255)."""
    depth = int(imp.getBitDepth())
    if depth in (8, 24):
        if depth == 8 and imp.isComposite():
            for c in range(1, imp.getNChannels() + 1):
                imp.setPositionWithoutUpdate(c, imp.getZ(), imp.getT())
                imp.setDisplayRange(0, 255)
        return
    C = int(imp.getNChannels())
    stats = ranges if ranges is not None else array_min_max(from_imageplus(imp)[0])
    c0 = int(imp.getC())

    def span(c: int) -> tuple[float, float]:
        lo, hi = stats[c]
        return float(lo), float(hi) if hi > lo else float(lo) + 1

    if not imp.isComposite():
        imp.setDisplayRange(*span(0))
        return
    # a composite: each channel's LUT carries its range, and setChannelLut
    # hands it to that channel's processor too (setDisplayRange reaches only
    # the shown channel's once a window exists; updateAllChannelsAndDraw
    # would then give every channel the shown one's range)
    for c in range(C):
        lut = imp.getChannelLut(c + 1)
        lut.min, lut.max = span(c)
        imp.setChannelLut(lut, c + 1)
    imp.getProcessor().setMinAndMax(*span(c0 - 1))


def from_imageplus(imp: Any, title: Optional[str] = None) -> tuple[np.ndarray, ImageInfo]:
    """The pixels of ``imp`` as TZCYX numpy (RGB -> C*3 uint8) and its metadata."""
    stack = imp.getStack()
    n = int(stack.getSize())
    C, Z, T = int(imp.getNChannels()), int(imp.getNSlices()), int(imp.getNFrames())
    if C * Z * T != n:  # inconsistent dimensions: read it as a plain z-stack
        C, Z, T = 1, n, 1
    Y, X = int(imp.getHeight()), int(imp.getWidth())
    depth = int(imp.getBitDepth())
    rgb = depth == 24
    out = np.empty((T, Z, C * 3 if rgb else C, Y, X), dtype=np.uint8 if rgb else _NP_FOR_DEPTH[depth])
    scratch = np.empty((Y, X), dtype=np.uint32) if rgb else None
    for t in range(T):
        for z in range(Z):
            for c in range(C):
                jarr = stack.getPixels(1 + c + z * C + t * Z * C)
                if rgb:
                    assert scratch is not None
                    copy_from_java(jarr, scratch, 24)
                    bgra = scratch.view(np.uint8).reshape(Y, X, 4)  # little-endian ARGB ints
                    out[t, z, 3 * c : 3 * c + 3] = np.moveaxis(bgra[..., 2::-1], -1, 0)
                else:
                    copy_from_java(jarr, out[t, z, c], depth)
    names = []
    for c in range(C):
        label = stack.getSliceLabel(1 + c)
        names.append(str(label).split("\n")[0] if label is not None else "")
    if rgb:
        names = [f"{n} {k}".strip() for n in names for k in ("red", "green", "blue")]
    elif not any(names):
        names = []
    info = ImageInfo(
        title=title or str(imp.getTitle()),
        shape=out.shape,
        dtype=str(out.dtype),
        calibration=read_calibration(imp),
        channel_names=names,
        converted_from="RGB" if rgb else None,
    )
    return out, info
