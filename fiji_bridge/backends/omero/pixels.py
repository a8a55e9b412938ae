"""OMERO pixels: pixel types, reading planes, and writing a new image's planes
the way the server takes them.

Rules followed (omero-romio ``PixelsService.java``, ``RomioPixelBuffer.java``,
``BfPyramidPixelBuffer.java``; omero-server ``RawPixelsBean.java``):

* pixels are write-once: only a new image's pixels are written, through one
  RawPixelsStore, and never again (a changed field is a new image);
* ``rps.requiresPixelsPyramid()`` (sizeX*sizeY > 3192^2) decides: below it
  (ROMIO) a plane goes by ``setPlane``, or as full-width strips
  (``setTile(x=0, w=sizeX)``) when it is larger than ``plane_bytes``; on a
  pyramid, ``setPlane`` is refused and tiles of ``rps.getTileSize()`` go in
  sequence: planes in XYZCT order (z fastest, then c, then t), tiles
  row-major;
* planes travel big-endian and are decoded with ``np.frombuffer`` (omero-py's
  own struct-based decoding is ~200x slower); reads of planes larger than
  ``plane_bytes`` go in full-width strips (``getTile`` takes any region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..base import NotFound

# OMERO pixel types <-> numpy (OMERO planes travel big-endian)
_NP_OF = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4",
          "uint32": "u4", "float": "f4", "double": "f8"}
_OMERO_OF = {np.dtype(v).name: k for k, v in _NP_OF.items()}
#: omero.pixeldata.max_plane_width/height (server defaults): a bigger area needs a pyramid
MAX_PLANE_SIZE = 3192


@dataclass
class _FieldRef:
    image: int
    pixels: int
    shape: tuple[int, int, int, int, int]  # T, Z, C, Y, X
    dtype: str


def _strips(sy: int, rows: int) -> Iterator[tuple[int, int]]:
    for y in range(0, sy, rows):
        yield y, min(rows, sy - y)


class OmeroPixels:
    """Plane I/O of :class:`~fiji_bridge.backends.omero.OmeroBackend` (a mixin)."""

    plane_bytes: int
    store_cache: int
    _stores: Any

    def _store(self, conn: Any, pixels_id: int) -> Any:
        """The cached read store of ``pixels_id`` (at most ``store_cache`` open)."""
        rps = self._stores.get(pixels_id)
        if rps is None:
            rps = conn.c.sf.createRawPixelsStore()
            try:
                rps.setPixelsId(pixels_id, True, self._ctx(None))
            except BaseException:
                rps.close()
                raise
            self._stores[pixels_id] = rps
            while len(self._stores) > self.store_cache:
                _pid, old = self._stores.popitem(last=False)
                try:
                    old.close()
                except Exception:
                    pass
        else:
            self._stores.move_to_end(pixels_id)
        return rps

    def _read_plane(self, ref: _FieldRef, z: int, c: int, t: int) -> np.ndarray:
        st, sz, sc, sy, sx = ref.shape
        if not (0 <= z < sz and 0 <= c < sc and 0 <= t < st):
            raise NotFound(f"image {ref.image}: no plane z={z} c={c} t={t} (Z={sz}, C={sc}, T={st})")
        be = np.dtype(ref.dtype).newbyteorder(">")
        ctx = self._ctx(None)
        with self._call(f"reading image {ref.image}") as conn:
            rps = self._store(conn, ref.pixels)
            if sy * sx * be.itemsize <= self.plane_bytes:
                return np.frombuffer(rps.getPlane(z, c, t, ctx), dtype=be).reshape(sy, sx).astype(ref.dtype)
            out = np.empty((sy, sx), dtype=ref.dtype)
            for y, h in _strips(sy, max(1, self.plane_bytes // (sx * be.itemsize))):
                raw = rps.getTile(z, c, t, 0, y, sx, h, ctx)
                out[y:y + h] = np.frombuffer(raw, dtype=be).reshape(h, sx)
            return out

    def load_field(self, plate: str, well: str, site: int) -> np.ndarray:
        ref = self._field(plate, well, site)
        out = np.empty(ref.shape, dtype=ref.dtype)
        for t in range(ref.shape[0]):
            for z in range(ref.shape[1]):
                for c in range(ref.shape[2]):
                    out[t, z, c] = self._read_plane(ref, z, c, t)
        return out

    def _write_pixels(self, conn: Any, pixels_id: int, arr: np.ndarray, ctx: Any) -> None:
        """Write every plane of a NEW image (TZCYX ``arr``) through one store."""
        st, sz, sc, sy, sx = arr.shape
        be = arr.dtype.newbyteorder(">")
        rps = conn.c.sf.createRawPixelsStore()
        try:
            rps.setPixelsId(pixels_id, True, ctx)
            pyramid = bool(rps.requiresPixelsPyramid(ctx))
            tw, th = (int(v) for v in rps.getTileSize(ctx))
            rows = max(1, self.plane_bytes // (sx * be.itemsize))
            for t in range(st):  # XYZCT: z fastest, then c, then t (the pyramid writer's sequence)
                for c in range(sc):
                    for z in range(sz):
                        plane = np.ascontiguousarray(arr[t, z, c], dtype=be)
                        if pyramid:
                            for y in range(0, sy, th):
                                for x in range(0, sx, tw):
                                    w, h = min(tw, sx - x), min(th, sy - y)
                                    rps.setTile(np.ascontiguousarray(plane[y:y + h, x:x + w]).tobytes(),
                                                z, c, t, x, y, w, h, ctx)
                        elif plane.nbytes <= self.plane_bytes:
                            rps.setPlane(plane.tobytes(), z, c, t, ctx)
                        else:  # ROMIO takes full-width strips only
                            for y, h in _strips(sy, rows):
                                rps.setTile(plane[y:y + h].tobytes(), z, c, t, 0, y, sx, h, ctx)
            rps.save(ctx)
        finally:
            try:
                rps.close(ctx)
            except Exception:
                pass

    def _pixels_type(self, conn: Any, value: str) -> Any:
        from ..base import BackendError

        pt = self._ptypes.get(value)
        if pt is None:
            pt = conn.getQueryService().findByQuery(f"from PixelsType as p where p.value='{value}'", None)
            if pt is None:
                raise BackendError(f"the OMERO server has no pixel type {value!r}")
            self._ptypes[value] = pt
        return pt
