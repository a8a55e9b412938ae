"""Live hyperstack windows (one per stack key) and rendering to RGB.

A window is a real ImageJ hyperstack (CompositeImage when C > 1) titled by
its key. When the shape is unchanged the ImagePlus is reused and its pixel
arrays overwritten in place, so sliders, zoom and LUTs stay as the user left
them. Rendering goes through ImageJ's own drawing (``ImagePlus.flatten``), so
a snapshot looks as the window does.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..components import Calibration
from .base import DIMS, MacroError
from .transfer import (
    J,
    array_min_max,
    copy_into_java,
    from_imageplus,
    normalize_image,
    reset_display_ranges,
    set_calibration,
    to_imageplus,
    write_stack,
)

__all__ = ["LiveDisplay"]

_DEPTH = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(np.float32): 32}


def _shape(imp: Any) -> tuple[int, ...]:
    return (
        int(imp.getNFrames()), int(imp.getNSlices()), int(imp.getNChannels()),
        int(imp.getHeight()), int(imp.getWidth()),
    )


def _depth_dtype(imp: Any) -> Optional[np.dtype]:
    return {8: np.dtype(np.uint8), 16: np.dtype(np.uint16), 32: np.dtype(np.float32)}.get(int(imp.getBitDepth()))


class LiveDisplay:
    """The live stacks of an engine. ``show_windows`` = put them on the screen."""

    def __init__(self, show_windows: bool, protected_ids: set[int]) -> None:
        self.show_windows = show_windows
        self.stacks: dict[str, Any] = {}
        self._protected = protected_ids

    def _register(self, key: str, imp: Any) -> None:
        self.stacks[key] = imp
        self._protected.add(int(imp.getID()))

    def show_stack(
        self,
        key: str,
        array: np.ndarray,
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        hs = normalize_image(array, DIMS, channel_names, calibration)
        arr5 = hs.array
        imp = self.stacks.get(key)
        if imp is not None and _shape(imp) == arr5.shape and _depth_dtype(imp) == arr5.dtype and imp.getStack():
            write_stack(imp.getStack(), arr5, _DEPTH[arr5.dtype])
            stack = imp.getStack()
            for i in range(int(stack.getSize())):
                c = i % arr5.shape[2]
                if hs.channel_names:
                    stack.setSliceLabel(hs.channel_names[c], i + 1)
            if calibration is not None:
                set_calibration(imp, calibration)
            reset_display_ranges(imp, array_min_max(arr5))
            self._redraw(imp)
        else:
            if imp is not None:
                self.close_stack(key)
            imp = to_imageplus(arr5, key, hs.channel_names, hs.calibration)
            self._register(key, imp)
        if self.show_windows and imp.getWindow() is None:
            imp.show()

    @staticmethod
    def _redraw(imp: Any) -> None:
        if imp.isComposite():
            imp.updateAllChannelsAndDraw()
        else:
            imp.updateAndDraw()

    def update_plane(self, key: str, t: int, z: int, c: int, plane: np.ndarray) -> None:
        imp = self.stacks.get(key)
        if imp is None:
            raise KeyError(f"no live stack {key!r}; show_stack() it first")
        T, Z, C, Y, X = _shape(imp)
        if not (0 <= t < T and 0 <= z < Z and 0 <= c < C):
            raise IndexError(f"plane (t={t}, z={z}, c={c}) outside stack {key!r} of T={T} Z={Z} C={C}")
        plane = np.asarray(plane)
        if plane.shape != (Y, X):
            raise ValueError(f"plane shape {plane.shape} != stack {key!r} YX {(Y, X)}")
        dtype = _depth_dtype(imp)
        if plane.dtype != dtype:
            raise ValueError(f"plane dtype {plane.dtype} != stack {key!r} dtype {dtype}")
        stack = imp.getStack()
        copy_into_java(plane, stack.getPixels(1 + c + z * C + t * Z * C), _DEPTH[plane.dtype])
        if imp.getT() == t + 1 and imp.getZ() == z + 1:
            self._redraw(imp)

    def close_stack(self, key: str) -> None:
        imp = self.stacks.pop(key, None)
        if imp is None:
            return
        self._protected.discard(int(imp.getID()))
        imp.changes = False
        if imp.getWindow() is not None:
            imp.close()
        else:
            imp.flush()

    def close_all(self) -> None:
        for key in list(self.stacks):
            self.close_stack(key)

    # -- rendering ----------------------------------------------------------------

    def render(
        self,
        key_or_array: Union[str, np.ndarray],
        montage: bool = False,
        t: Optional[int] = None,
        z: Optional[int] = None,
        channel_names: Optional[Sequence[str]] = None,
    ) -> np.ndarray:
        """RGB uint8 (Y, X, 3) as ImageJ draws the stack at (t, z) (0-based;
        default: the window's current position). ``montage=True`` tiles each
        channel with its LUT plus the composite (C > 1), or every z (C == 1)."""
        temp = None
        if isinstance(key_or_array, str):
            imp = self.stacks.get(key_or_array)
            if imp is None:
                raise KeyError(f"no live stack {key_or_array!r}")
        else:
            hs = normalize_image(np.asarray(key_or_array), DIMS, channel_names)
            imp = temp = to_imageplus(hs.array, "render", hs.channel_names, hs.calibration)
        try:
            T, Z, C = _shape(imp)[:3]
            tt = int(imp.getT()) if t is None else t + 1
            zz = int(imp.getZ()) if z is None else z + 1
            if not (1 <= tt <= T and 1 <= zz <= Z):
                raise MacroError(f"render position t={tt - 1} z={zz - 1} outside T={T} Z={Z}", kind="argument")
            old = (int(imp.getC()), int(imp.getZ()), int(imp.getT()))
            try:
                if not montage:
                    return self._flat(imp, 1, zz, tt)
                if C > 1:
                    tiles = [self._channel(imp, c, zz, tt) for c in range(1, C + 1)]
                    tiles.append(self._flat(imp, 1, zz, tt))
                else:
                    tiles = [self._channel(imp, 1, k, tt) for k in range(1, Z + 1)]
                return _tile(tiles)
            finally:
                imp.setPositionWithoutUpdate(*old)
        finally:
            if temp is not None:
                temp.flush()

    @classmethod
    def _flat(cls, imp: Any, c: int, z: int, t: int) -> np.ndarray:
        if not imp.isComposite():
            return cls._channel(imp, c, z, t)
        imp.setPosition(c, z, t)
        if imp.isComposite():
            imp.updateImage()
        flat = imp.flatten()
        try:
            arr, _ = from_imageplus(flat)
        finally:
            flat.flush()
        return np.moveaxis(arr[0, 0], 0, -1).copy()

    @staticmethod
    def _channel(imp: Any, c: int, z: int, t: int) -> np.ndarray:
        """One plane drawn alone with its channel's LUT and display range."""
        ip = imp.getStack().getProcessor(imp.getStackIndex(c, z, t)).duplicate()
        if imp.isComposite():
            lut = imp.getChannelLut(c)
            ip.setColorModel(lut)
            ip.setMinAndMax(lut.min, lut.max)
        else:
            ip.setColorModel(imp.getProcessor().getColorModel())
            ip.setMinAndMax(imp.getDisplayRangeMin(), imp.getDisplayRangeMax())
        single = J("ij.ImagePlus")("channel", ip)
        try:
            arr, _ = from_imageplus(single.flatten())
        finally:
            single.flush()
        return np.moveaxis(arr[0, 0], 0, -1).copy()


def _tile(tiles: list[np.ndarray]) -> np.ndarray:
    n = len(tiles)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = tiles[0].shape[:2]
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return out
