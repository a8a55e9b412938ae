"""The double's IPixels and RawPixelsStore: what OMERO 5.6 does with pixels.

Rules, each from the server's source (omero-server RawPixelsBean.java,
omero-romio PixelsService.java / RomioPixelBuffer.java /
BfPyramidPixelBuffer.java / ConfiguredTileSizes.java):

* pixels are write-once: ``setPixelsId`` opens a read-only buffer when the
  pixels file exists already (a plane was written through any earlier store,
  or the image was imported) and every write then raises
  ``ApiUsageException("Write-method not permitted.")`` (ROMIO) or
  ``"In read-only mode!"`` (pyramid);
* a Pixels set needs a pyramid when sizeX*sizeY > 3192*3192
  (``requiresPixelsPyramid``), float and double pixels never by default
  (omero.pixeldata.max_plane_float_override=true, omero-model.properties). Below it (ROMIO) ``setTile`` takes only
  full-width strips (``x == 0``, ``w == sizeX``; anything else is an
  UnsupportedOperationException, an ``InternalException`` to the client) and
  ``getTileSize`` is ``[sizeX, min(sizeY, 1 MiB / byteWidth / sizeX)]``. On a
  pyramid ``setPlane`` raises "Non-tile based writing unsupported.", the tile
  size is 256x256, and tiles go to a sequential TIFF writer: planes in XYZCT
  order (z fastest, then c, then t), tiles row-major, every tile of the size
  the first one had (smaller only at the right and bottom edges):
  ``getIFD`` starts the writer with the first tile's size and a new IFD at
  each plane change;
* a buffer whose length is not the plane's is a ``ResourceError``
  (BufferUnderflow/OverflowException, RawPixelsBean.handleException);
  coordinates out of range are an ``ApiUsageException``
  (DimensionsOutOfBoundsException);
* an imported big image has no pyramid until the server built it:
  ``setPixelsId`` raises ``MissingPyramidException`` (PixelsService
  handleMissingPyramid) meanwhile;
* ``getPlane``/``setPlane`` have no plane-size limit of their own; what
  limits them is Ice's message size (omero.constants.MESSAGESIZEMAX);
* a read ends a pyramid's writing: ``BfPyramidPixelBuffer.delegate()`` calls
  ``closeWriter()`` while writing, so ``getPlane``, ``getTile`` and
  ``getByteWidth`` finalize the pyramid and every later ``setTile`` is "In
  read-only mode!" (only ``getTileSize`` and ``requiresPixelsPyramid`` are
  safe);
* any access to a ROMIO buffer creates its file
  (``RomioPixelBuffer.getFileChannel`` opens ``RandomAccessFile(path,
  "rw")``), so after one read the pixels are read-only for every later
  store; reading beyond the end of what was written reads past the end of
  the file, an IOException that reaches the client as ``ResourceError``;
* the tile size of a pyramid being written is always 256x256
  (``PixelsService.createPyramidPixelBuffer`` -> ``new
  BfPyramidPixelBuffer(pixels, path, write)`` -> ``new
  ConfiguredTileSizes()``, whatever omero.pixeldata.tile_width says): the
  double's ``tile_size`` is a test knob that stands for that fixed size on
  small images, not a server setting.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._common import (
    ROMIO_MAXIMUM_BUFFER_SIZE,
    _PIXELS_TYPES,
    _Session,
    omero,
    rint,
    rlong,
    rstring,
    unwrap,
)


class PixelsServices:
    """IPixels and RawPixelsStore of :class:`~.server.ServerDouble` (a mixin)."""

    _pixels: dict
    _written: set
    _pyramid_pending: set
    max_plane_size: int
    max_plane_float_override: bool
    tile_size: int

    # -- IPixels ------------------------------------------------------------------

    def _create_image(self, s: _Session, gid: int, sx: int, sy: int, sz: int, st: int,
                      channels: list, ptype: str, name: str, description: Optional[str]) -> int:
        for n, v in (("sizeX", sx), ("sizeY", sy), ("sizeZ", sz), ("sizeT", st), ("sizeC", len(channels))):
            if int(v) < 1:
                raise omero.ValidationException(message=f"createImage: {n} must be >= 1, got {v}")
        img = omero.model.ImageI()
        img.name = rstring(name)
        if description is not None:
            img.description = rstring(description)
        pix = omero.model.PixelsI()
        pix.sizeX, pix.sizeY, pix.sizeZ, pix.sizeT = rint(sx), rint(sy), rint(sz), rint(st)
        pix.sizeC = rint(len(channels))
        pix.sha1 = rstring("")
        pix.significantBits = rint(8 * np.dtype(_PIXELS_TYPES[ptype]).itemsize)
        pix.pixelsType = omero.model.PixelsTypeI(self._enum_ids[("PixelsType", ptype)], False)
        pix.dimensionOrder = omero.model.DimensionOrderI(self._enum_ids[("DimensionOrder", "XYZCT")], False)
        img.addPixels(pix)
        for _ in channels:
            ch = omero.model.ChannelI()
            ch.logicalChannel = omero.model.LogicalChannelI()
            pix.addChannel(ch)
        iid = self._save(s, img, gid)
        pid = self._children("Image", "pixels", iid)[0]
        self._pixels[pid] = np.zeros((st, len(channels), sz, sy, sx), dtype=_PIXELS_TYPES[ptype])
        return iid

    def _rpc_IPixels_createImage(self, s: _Session, sizeX: int, sizeY: int, sizeZ: int, sizeT: int,
                                 channelList: list, pixelsType: Any, name: str,
                                 description: Optional[str] = None, ctx: Any = None) -> Any:
        self.counters["pixels.createImage"] += 1
        gid = self._write_group(s, ctx)
        ptype = unwrap(pixelsType._value) if pixelsType.isLoaded() else \
            unwrap(self._rows[pixelsType.id.val]._value)
        return rlong(self._create_image(s, gid, sizeX, sizeY, sizeZ, sizeT, list(channelList), ptype,
                                        name, description))

    def _rpc_IPixels_setChannelGlobalMinMax(self, s: _Session, pid: int, c: int, lo: float, hi: float,
                                            ctx: Any = None) -> None:
        self.counters["pixels.setChannelGlobalMinMax"] += 1
        ch_id = self._children("Pixels", "channels", pid)[c]
        si = omero.model.StatsInfoI()
        si.globalMin, si.globalMax = omero.rtypes.rdouble(lo), omero.rtypes.rdouble(hi)
        row = self._rows[ch_id]
        row._statsInfo = omero.model.StatsInfoI(self._save(s, si, self._group_of(ch_id)), False)

    def _rpc_sf_createRawPixelsStore(self, s: _Session) -> int:
        return self._open(s, "rps", pixels=None)

    def requires_pyramid(self, pixels_id: int) -> bool:
        """PixelsService.requiresPixelsPyramid: sizeX*sizeY > max_plane_width*max_plane_height,
        never for float/double pixels while omero.pixeldata.max_plane_float_override is true
        (its default, omero-model omero-model.properties)."""
        buf = self._pixels[pixels_id]
        if self.max_plane_float_override and buf.dtype.kind == "f":
            return False
        return buf.shape[3] * buf.shape[4] > self.max_plane_size * self.max_plane_size

    def _rps(self, s: _Session, sid: int) -> tuple[dict, np.ndarray]:
        st = self._svc(s, sid, "rps")
        if st["pixels"] is None:
            # RawPixelsBean.errorIfNotLoaded
            raise omero.ApiUsageException(message="RawPixelsStore not loaded: call setPixelsId() first")
        return st, self._pixels[st["pixels"]]

    def _rpc_RawPixelsStore_setPixelsId(self, s: _Session, sid: int, pid: int, bypass: bool,
                                        ctx: Any = None) -> None:
        self.counters["rps.setPixelsId"] += 1
        st = self._svc(s, sid, "rps")
        if pid not in self._pixels or not self._visible(s, pid, ctx):
            # RawPixelsBean.setPixelsId: "Cannot read pixels id=..."
            raise omero.ValidationException(message=f"Cannot read pixels id={pid}")
        if pid in self._pyramid_pending:
            # PixelsService._getPixelBuffer -> handleMissingPyramid: an imported big image's
            # pyramid is still being built (RawPixelsBean.setPixelsId lets the caller retry)
            import omero_ServerErrors_ice  # noqa: F401

            raise omero.MissingPyramidException(message=f"Missing pyramid: pixels {pid}", pixelsID=pid,
                                                backOff=15000)
        st["pixels"] = pid
        # PixelsService._getPixelBuffer: an existing pixels (or pyramid) file
        # gives a read-only buffer, whatever the caller asks for
        st["write"] = pid not in self._written
        st["pyramid"] = self.requires_pyramid(pid)
        st["next_tile"] = None  # the pyramid writer's sequence
        st["tile"] = None

    def _plane_index(self, buf: np.ndarray, z: int, c: int, t: int) -> tuple:
        st_, sc, sz = buf.shape[:3]
        if not (0 <= z < sz and 0 <= c < sc and 0 <= t < st_):
            # RomioPixelBuffer.checkBounds -> DimensionsOutOfBoundsException -> ApiUsageException
            raise omero.ApiUsageException(message=f"plane z={z} c={c} t={t} out of range (Z={sz}, C={sc}, T={st_})")
        return (t, c, z)

    def _writable(self, st: dict) -> None:
        if not st["write"]:
            if st["pyramid"]:  # BfPyramidPixelBuffer.setTile
                raise omero.ApiUsageException(message="In read-only mode!")
            raise omero.ApiUsageException(message="Write-method not permitted.")  # RomioPixelBuffer.throwIfReadOnly
        self._written.add(st["pixels"])  # the pixels file exists from the first write on
        st["modified"] = True

    def _read_access(self, st: dict, buf: np.ndarray, z: int, c: int, t: int, y: int = 0,
                     h: Optional[int] = None) -> None:
        """What a read does to the store's buffer (see the module doc): it ends a
        pyramid's writing; on ROMIO it creates the pixels file, and reading
        past the end of what was written is an IOException (a ResourceError)."""
        self._end_pyramid_writing(st)
        pid = st["pixels"]
        if st["pyramid"]:
            return
        self._written.add(pid)  # RomioPixelBuffer.getFileChannel: RandomAccessFile(path, "rw")
        size_t, size_c, size_z, size_y, size_x = buf.shape
        row = size_x * buf.dtype.itemsize
        end = (((t * size_c + c) * size_z + z) * size_y + y + (size_y - y if h is None else h)) * row
        if end > self._extent.get(pid, 0):
            raise omero.ResourceError(message=f"IOException: read past the end of the pixels file of pixels {pid} "
                                      f"(plane z={z} c={c} t={t} was never written)")

    def _end_pyramid_writing(self, st: dict) -> None:
        """BfPyramidPixelBuffer.delegate(): closeWriter() when writing; then read-only."""
        if st["pyramid"] and st["write"]:
            st["write"] = False
            self._written.add(st["pixels"])

    def _wrote(self, st: dict, buf: np.ndarray, z: int, c: int, t: int, y: int, h: int) -> None:
        """The ROMIO pixels file now reaches the end of what was written (XYZCT plane order)."""
        size_t, size_c, size_z, size_y, size_x = buf.shape
        end = (((t * size_c + c) * size_z + z) * size_y + y + h) * size_x * buf.dtype.itemsize
        pid = st["pixels"]
        self._extent[pid] = max(self._extent.get(pid, 0), end)

    def _rpc_RawPixelsStore_getPlane(self, s: _Session, sid: int, z: int, c: int, t: int,
                                     ctx: Any = None) -> bytes:
        self.counters["rps.getPlane"] += 1
        st, buf = self._rps(s, sid)
        idx = self._plane_index(buf, z, c, t)
        self._read_access(st, buf, z, c, t)
        return buf[idx].tobytes()

    def _rpc_RawPixelsStore_setPlane(self, s: _Session, sid: int, data: bytes, z: int, c: int, t: int,
                                     ctx: Any = None) -> None:
        self.counters["rps.setPlane"] += 1
        st, buf = self._rps(s, sid)
        if st["pyramid"]:  # BfPyramidPixelBuffer.setPlane: UnsupportedOperationException -> InternalException
            raise omero.InternalException(message="Non-tile based writing unsupported.")
        if not st["write"]:
            self._writable(st)
        plane = buf[self._plane_index(buf, z, c, t)]
        if len(data) != plane.nbytes:  # RomioPixelBuffer.setPlane -> RawPixelsBean.handleException
            kind = "BufferUnderflowException" if len(data) < plane.nbytes else "BufferOverflowException"
            raise omero.ResourceError(message=f"{kind}: {len(data)} bytes for a {plane.nbytes}-byte plane")
        self._writable(st)
        plane[...] = np.frombuffer(data, dtype=buf.dtype).reshape(plane.shape)
        self._wrote(st, buf, z, c, t, 0, plane.shape[0])

    def _tile(self, buf: np.ndarray, x: int, y: int, w: int, h: int) -> tuple:
        sy, sx = buf.shape[3:]
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > sx or y + h > sy:
            # checkBounds(x, y, ...) and checkBounds(x+w-1, y+h-1, ...)
            raise omero.ApiUsageException(message=f"tile x={x} y={y} w={w} h={h} outside {sx}x{sy}")
        return (slice(y, y + h), slice(x, x + w))

    def _rpc_RawPixelsStore_getTile(self, s: _Session, sid: int, z: int, c: int, t: int, x: int, y: int,
                                    w: int, h: int, ctx: Any = None) -> bytes:
        self.counters["rps.getTile"] += 1
        st, buf = self._rps(s, sid)
        idx, tile = self._plane_index(buf, z, c, t), self._tile(buf, x, y, w, h)
        self._read_access(st, buf, z, c, t, y, h)
        return np.ascontiguousarray(buf[idx][tile]).tobytes()

    def _rpc_RawPixelsStore_setTile(self, s: _Session, sid: int, data: bytes, z: int, c: int, t: int,
                                    x: int, y: int, w: int, h: int, ctx: Any = None) -> None:
        self.counters["rps.setTile"] += 1
        st, buf = self._rps(s, sid)
        self._plane_index(buf, z, c, t)
        self._tile(buf, x, y, w, h)
        if not st["write"]:
            self._writable(st)
        sizes = buf.shape
        if st["pyramid"]:
            self._pyramid_sequence(st, sizes, z, c, t, x, y, w, h)
        else:  # RomioPixelBuffer.setTile
            if x != 0:
                raise omero.InternalException(message="ROMIO pixel buffer only supports 0 offseted tile writes.")
            if w != sizes[4]:
                raise omero.InternalException(message="ROMIO pixel buffer only supports full row writes.")
        view = buf[self._plane_index(buf, z, c, t)][self._tile(buf, x, y, w, h)]
        if len(data) != view.nbytes:
            kind = "BufferUnderflowException" if len(data) < view.nbytes else "BufferOverflowException"
            raise omero.ResourceError(message=f"{kind}: {len(data)} bytes for a {view.nbytes}-byte tile")
        self._writable(st)
        view[...] = np.frombuffer(data, dtype=buf.dtype).reshape(view.shape)
        if not st["pyramid"]:
            self._wrote(st, buf, z, c, t, y, h)

    def _pyramid_sequence(self, st: dict, sizes: tuple, z: int, c: int, t: int, x: int, y: int, w: int,
                          h: int) -> None:
        """The pyramid's TIFF writer takes tiles in sequence (BfPyramidPixelBuffer.setTile:
        plane number = FormatTools.getIndex("XYZCT", ...); tiles of one IFD tile size)."""
        size_t, size_c, size_z, size_y, size_x = sizes
        if st["tile"] is None:
            st["tile"] = (w, h)  # the first tile fixes the IFD's tile size
            st["next_tile"] = (0, 0, 0, 0, 0)
        tw, th = st["tile"]
        want = st["next_tile"]
        if want is None:
            raise omero.InternalException(message="pyramid writer: every tile was written already")
        wt, wc, wz, wy, wx = want
        if (t, c, z, y, x) != want or w != min(tw, size_x - x) or h != min(th, size_y - y):
            raise omero.InternalException(
                message=f"pyramid writer expects tile z={wz} c={wc} t={wt} x={wx} y={wy} "
                f"w={min(tw, size_x - wx)} h={min(th, size_y - wy)} next (XYZCT planes, row-major tiles "
                f"of {tw}x{th}); got z={z} c={c} t={t} x={x} y={y} w={w} h={h}")
        nx, ny = x + tw, y
        if nx >= size_x:
            nx, ny = 0, y + th
        nz, nc, nt = z, c, t
        if ny >= size_y:
            ny = 0
            nz += 1
            if nz >= size_z:
                nz, nc = 0, c + 1
                if nc >= size_c:
                    nc, nt = 0, t + 1
        st["next_tile"] = None if nt >= size_t else (nt, nc, nz, ny, nx)

    def _rpc_RawPixelsStore_getTileSize(self, s: _Session, sid: int, ctx: Any = None) -> list:
        st, buf = self._rps(s, sid)
        if st["pyramid"]:  # BfPyramidPixelBuffer.getTileSize (write mode): the configured tile size
            return [self.tile_size, self.tile_size]
        # RomioPixelBuffer.getTileSize: full-width strips of at most 1 MiB
        sx, sy = buf.shape[4], buf.shape[3]
        return [sx, min(sy, max(1, (ROMIO_MAXIMUM_BUFFER_SIZE // buf.dtype.itemsize) // sx))]

    def _rpc_RawPixelsStore_requiresPixelsPyramid(self, s: _Session, sid: int, ctx: Any = None) -> bool:
        st, _buf = self._rps(s, sid)
        return st["pyramid"]

    def _rpc_RawPixelsStore_getByteWidth(self, s: _Session, sid: int, ctx: Any = None) -> int:
        st, buf = self._rps(s, sid)
        self._end_pyramid_writing(st)  # BfPyramidPixelBuffer.getByteWidth goes through delegate()
        return buf.dtype.itemsize

    def _rpc_RawPixelsStore_save(self, s: _Session, sid: int, ctx: Any = None) -> Any:
        """RawPixelsBean.save: null unless this store wrote something; else the
        buffer's message digest (a read: it ends a pyramid's writing) becomes
        Pixels.sha1."""
        st, buf = self._rps(s, sid)
        if not st.get("modified"):
            return None
        self._end_pyramid_writing(st)
        import hashlib

        self._rows[st["pixels"]].sha1 = rstring(hashlib.sha1(buf.tobytes()).hexdigest())
        st["modified"] = False
        return self._load(st["pixels"], set())

    def _rpc_RawPixelsStore_close(self, s: _Session, sid: int, ctx: Any = None) -> None:
        self._services.pop(sid, None)
