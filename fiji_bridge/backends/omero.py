"""OMERO as a plate store, through omero-py's BlitzGateway (optional extra).

``pip install fiji-bridge[omero]``. omero-py is imported lazily: this module
imports without it, and using the backend without it raises a
:class:`~fiji_bridge.backends.base.BackendError` that says what to install.

Mapping (as omero-cli-zarr maps plates): a virtual path
``/omero/plate_<plate id>/<well>/<well>_s<site>_z<z>_c<c>_t<t>.tif`` is plane
(z, c, t) of the image of well sample ``site`` (its index in the well) of the
well at 0-based ``(row, column)``. Tables (``.csv`` / ``.json``) are
FileAnnotations in namespace :data:`NS_RESULTS` linked to the plate, the well
(or, with ``site``, the field's image); a CSV is also stored as an OMERO.table
(namespace :data:`NS_TABLE`) when the server runs the tables service.
Provenance of a derived plate is a MapAnnotation in :data:`NS_PROVENANCE`.

Connection: host/port/user from the arguments or ``OMERO_HOST`` /
``OMERO_PORT`` (4064) / ``OMERO_USER``; the password from the argument or
``OMERO_PASSWORD``, or a session key (``session=`` / ``OMERO_SESSION``).
There is no default password, and the password is never logged, shown in
``repr`` or pickled: a pickled backend carries host, port, user, group and
the session key, and a worker process reconnects lazily by joining that
session (``BlitzGateway(host, port).connect(sUuid=key)``), falling back to
``OMERO_PASSWORD`` in its own environment. A daemon thread calls
``keepAlive()`` every ``keepalive`` seconds while connected.

Reading a plate costs two queries (the plate, then every well with its well
samples, images, pixels and channels in ONE ``getObjects('Well', ...)``),
cached per plate; planes come from one RawPixelsStore per image (reused),
decoded from OMERO's big-endian bytes with ``np.frombuffer``; planes larger
than the server's plane limit (3192 px) or ``tile_bytes`` are read/written in
tiles. A field is written as one image (``IPixels.createImage``, then its
channel names and pixel sizes in one save, then its planes through a
RawPixelsStore), linked to its well sample only once its pixels are written:
no orphan or black placeholder images; saving a field again replaces it.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ..components import Calibration, ComponentError, PlaneComponents, format_well, normalize_well, parse_well
from .base import BackendError, NotFound, PlateStructure, StoreUnavailable, VirtualBackend, columns_to_csv, json_default

__all__ = ["NS_PROVENANCE", "NS_RESULTS", "NS_TABLE", "OmeroBackend", "OmeroParams"]

log = logging.getLogger(__name__)

#: namespace of fiji-bridge's .csv/.json FileAnnotations
NS_RESULTS = "fiji-bridge/results"
#: namespace of the FileAnnotation on the OMERO.table made from a CSV
NS_TABLE = "fiji-bridge/results-table"
#: namespace of the provenance MapAnnotation of a derived plate
NS_PROVENANCE = "fiji-bridge/provenance"

INSTALL_HINT = "pip install fiji-bridge[omero]"
#: omero.pixeldata.max_plane_width/height: getPlane/setPlane refuse bigger planes
MAX_PLANE_SIZE = 3192

# OMERO pixel types <-> numpy (OMERO planes travel big-endian)
_NP_OF = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4",
          "uint32": "u4", "float": "f4", "double": "f8"}
_OMERO_OF = {np.dtype(v).name: k for k, v in _NP_OF.items()}


@dataclass(frozen=True)
class OmeroParams:
    """Where and as whom to connect. ``password`` and ``session`` are
    credentials: hidden from ``repr``; the password is never pickled."""

    host: str
    port: int = 4064
    user: Optional[str] = None
    group: Optional[Union[int, str]] = None
    secure: bool = True
    session: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(cls, host: Optional[str] = None, port: Optional[int] = None, user: Optional[str] = None,
                 password: Optional[str] = None, session: Optional[str] = None,
                 group: Optional[Union[int, str]] = None, secure: bool = True) -> "OmeroParams":
        host = host or os.environ.get("OMERO_HOST")
        if not host:
            raise BackendError("no OMERO server given: pass host=... or set OMERO_HOST")
        try:
            port = int(port or os.environ.get("OMERO_PORT") or 4064)
        except ValueError:
            raise BackendError(f"OMERO_PORT must be a number, got {os.environ.get('OMERO_PORT')!r}") from None
        return cls(host=host, port=port, user=user or os.environ.get("OMERO_USER") or None, group=group,
                   secure=secure, session=session or os.environ.get("OMERO_SESSION") or None,
                   password=password)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return (f"OmeroParams(host={self.host!r}, port={self.port}, user={self.user!r}, group={self.group!r}, "
                f"session={'<set>' if self.session else None}, password={'<set>' if self.password else None})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["password"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class _FieldRef:
    image: int
    pixels: int
    shape: tuple[int, int, int, int, int]  # T, Z, C, Y, X
    dtype: str


@dataclass
class _PlateIndex:
    """What a plate's one structure query told us, plus its write state."""

    structure: PlateStructure
    group: Optional[int]
    wells: dict[str, int]  # name -> Well id
    fields: dict[tuple[str, int], _FieldRef]
    samples: dict[str, list[tuple[int, int]]]  # well -> [(WellSample id, Image id)] in index order


def _omero() -> Any:
    """Import omero-py or explain how to get it."""
    try:
        import omero  # noqa: F401
        import omero.gateway  # noqa: F401
        return importlib.import_module("omero")
    except ImportError as e:
        raise BackendError(f"the OMERO backend needs omero-py: {INSTALL_HINT} (import failed: {e})") from None


def _default_gateway() -> Any:
    spec = os.environ.get("FIJI_BRIDGE_OMERO_GATEWAY")  # tests/demos: "module:Class"
    if spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)
    _omero()
    from omero.gateway import BlitzGateway

    return BlitzGateway


class OmeroBackend(VirtualBackend):
    """An OMERO server as a :class:`VirtualBackend` (scheme ``omero``)."""

    scheme = "omero"
    is_remote = True

    def __init__(
        self,
        host: Optional[str] = None,
        port: Optional[int] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        *,
        session: Optional[str] = None,
        group: Optional[Union[int, str]] = None,
        secure: bool = True,
        gateway: Any = None,
        keepalive: float = 60.0,
        tile_bytes: int = 16 * 2**20,
        tile_size: int = 1024,
        max_plane_size: int = MAX_PLANE_SIZE,
        share_session: bool = True,
    ) -> None:
        self.params = OmeroParams.from_env(host, port, user, password, session, group, secure)
        self._gateway_factory = gateway
        self.keepalive = float(keepalive)
        self.tile_bytes = int(tile_bytes)
        self.tile_size = int(tile_size)
        self.max_plane_size = int(max_plane_size)
        self.share_session = share_session
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None
        self._session_key: Optional[str] = self.params.session
        self._joined = False
        self._plates: dict[str, _PlateIndex] = {}
        self._stores: "OrderedDict[int, Any]" = OrderedDict()
        self._ptypes: dict[str, Any] = {}
        self._last_use = time.monotonic()
        self._ka_stop = threading.Event()
        self._ka_thread: Optional[threading.Thread] = None
        self.metadata_reads = 0

    @classmethod
    def from_uri(cls, uri: Any, **kwargs: Any) -> "OmeroBackend":
        """A backend for ``omero://[user@]host[:port]/plate/<id>`` (a string or
        a parsed :class:`~fiji_bridge.backends.uri.PlateURI`)."""
        if isinstance(uri, str):
            from .uri import PlateURI

            uri = PlateURI.parse(uri)
        if getattr(uri, "scheme", "omero") != "omero":
            raise BackendError(f"{uri} is not an omero:// URI")
        return cls(host=uri.host or None, port=uri.port, user=uri.user or None, **kwargs)

    # -- pickling: parameters, never the connection -------------------------------

    def __getstate__(self) -> dict:
        key = self._session_key if self.share_session else self.params.session
        return {
            "params": replace(self.params, session=key, password=None),
            "gateway": self._gateway_factory,
            "options": (self.keepalive, self.tile_bytes, self.tile_size, self.max_plane_size, self.share_session),
        }

    def __setstate__(self, state: dict) -> None:
        self.params = state["params"]
        self._gateway_factory = state["gateway"]
        (self.keepalive, self.tile_bytes, self.tile_size, self.max_plane_size, self.share_session) = state["options"]
        self._init_runtime()

    def __repr__(self) -> str:
        return f"OmeroBackend({self.params.user or '?'}@{self.params.address}, connected={self._conn is not None})"

    __str__ = __repr__

    # -- connection ---------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """The live BlitzGateway, connecting (or reconnecting) on demand."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            self._last_use = time.monotonic()
            return self._conn

    def _connect(self) -> Any:
        factory = self._gateway_factory or _default_gateway()
        p = self.params
        ice_errors = _ice_errors()
        try:
            if self._session_key:
                gw = factory(host=p.host, port=p.port, secure=p.secure)
                if gw.connect(sUuid=self._session_key):
                    self._joined = True
                    return self._ready(gw)
                log.info("OMERO session at %s is no longer valid; logging in again", p.address)
                self._session_key = None
            password = p.password or os.environ.get("OMERO_PASSWORD")
            if not p.user or not password:
                missing = "OMERO_USER (or user=...)" if not p.user else "OMERO_PASSWORD (or a session key: OMERO_SESSION)"
                raise BackendError(f"cannot log in to OMERO at {p.address}: set {missing}")
            gw = factory(p.user, password, host=p.host, port=p.port, group=p.group, secure=p.secure)
            if not gw.connect():
                raise BackendError(f"login refused for user {p.user!r} at {p.address} (wrong password, "
                                   "unknown user or group?)")
            self._joined = False
            self._session_key = gw.getSessionId()
            return self._ready(gw)
        except ice_errors as e:
            raise StoreUnavailable(f"OMERO server at {p.address} is unavailable ({type(e).__name__})") from None

    def _ready(self, gw: Any) -> Any:
        gw.SERVICE_OPTS.setOmeroGroup(-1)  # reads see every group of the user
        if self.keepalive > 0 and (self._ka_thread is None or not self._ka_thread.is_alive()):
            self._ka_stop.clear()
            self._ka_thread = threading.Thread(target=_keepalive_loop, args=(weakref.ref(self), self._ka_stop),
                                               name="omero-keepalive", daemon=True)
            self._ka_thread.start()
        return gw

    def keep_alive(self) -> bool:
        """Ping the session now (the keep-alive thread does this periodically)."""
        with self._call("keepAlive") as conn:
            return bool(conn.keepAlive())

    def close(self) -> None:
        """Close the open stores and the connection (a joined session stays open)."""
        self._ka_stop.set()
        with self._lock:
            for rps in self._stores.values():
                try:
                    rps.close()
                except Exception:
                    pass
            self._stores.clear()
            if self._conn is not None:
                try:
                    self._conn.close(hard=not (self._joined or self.share_session))
                except Exception:
                    pass
            self._conn = None

    def _drop(self) -> None:
        self._stores.clear()
        self._conn = None

    @contextmanager
    def _call(self, what: str) -> Iterator[Any]:
        """Run server calls; map Ice/OMERO errors to our exceptions."""
        omero = _omero()
        ice_errors = _ice_errors()
        with self._lock:
            conn = self.conn
            try:
                yield conn
            except ice_errors as e:
                self._drop()
                raise StoreUnavailable(
                    f"{what}: connection to OMERO at {self.params.address} lost ({type(e).__name__})") from None
            except omero.SecurityViolation as e:
                raise BackendError(f"{what}: permission denied by OMERO: {_msg(e)}") from None
            except omero.ServerError as e:
                raise BackendError(f"{what}: OMERO {type(e).__name__}: {_msg(e)}") from None
            finally:
                self._last_use = time.monotonic()

    def _ctx(self, group: Optional[int]) -> dict:
        from omero.gateway import ServiceOptsDict

        ctx = ServiceOptsDict()
        ctx.setOmeroGroup(-1 if group is None else group)
        return ctx

    # -- plates: the one structure query ----------------------------------------------

    def _plate_id(self, plate: str) -> int:
        try:
            return int(str(plate))
        except ValueError:
            raise NotFound(f"OMERO plate {plate!r} not found: OMERO plate ids are numbers") from None

    def _index(self, plate: str) -> _PlateIndex:
        plate = str(plate)
        idx = self._plates.get(plate)
        if idx is None:
            idx = self._plates[plate] = self._load_index(plate)
        return idx

    def _load_index(self, plate: str) -> _PlateIndex:
        pid = self._plate_id(plate)
        with self._call(f"reading plate {pid}") as conn:
            p = conn.getObject("Plate", pid)
            self.metadata_reads += 1
            if p is None:
                raise NotFound(f"OMERO plate {pid} not found at {self.params.address} "
                               f"(or not visible to {self.params.user or 'this session'})")
            # ONE query for every well, well sample, image and pixels of the plate
            wells = list(conn.getObjects("Well", opts={"plate": pid, "load_pixels": True}))
            self.metadata_reads += 1
            channels = None
            first = next((ws.getImage().id.val for w in wells if w._obj.isWellSamplesLoaded()
                          for ws in w._obj.copyWellSamples() if ws.getImage() is not None), None)
            if first is not None:  # channel names: every field of a plate shares them
                img = conn.getObject("Image", first, opts={"load_channels": True})
                self.metadata_reads += 1
                channels = img._obj.getPrimaryPixels().copyChannels() if img is not None else None
        return self._build_index(plate, p, wells, channels)

    def _build_index(self, plate: str, p: Any, wells: list, channels: Optional[list]) -> _PlateIndex:
        from omero.model import LengthI
        from omero.model.enums import UnitsLength

        by_name: dict[str, int] = {}
        fields: dict[tuple[str, int], _FieldRef] = {}
        samples: dict[str, list[tuple[int, int]]] = {}
        first: Optional[Any] = None
        max_r = max_c = -1
        for w in sorted(wells, key=lambda w: (w.row, w.column)):
            name = format_well(int(w.row), int(w.column))
            max_r, max_c = max(max_r, int(w.row)), max(max_c, int(w.column))
            by_name[name] = w.getId()
            wss = w._obj.copyWellSamples() if w._obj.isWellSamplesLoaded() else []
            samples[name] = []
            for site, ws in enumerate(wss):
                img = ws.getImage()
                if img is None or not img.isLoaded() or not img.isPixelsLoaded() or not img.sizeOfPixels():
                    continue
                pix = img.getPrimaryPixels()
                if not pix.isLoaded():
                    continue
                ptype = pix.getPixelsType().getValue().getValue()
                if ptype not in _NP_OF:
                    raise BackendError(f"image {img.id.val} of plate {plate}: pixel type {ptype!r} is not supported")
                shape = (pix.getSizeT().val, pix.getSizeZ().val, pix.getSizeC().val, pix.getSizeY().val,
                         pix.getSizeX().val)
                fields[(name, site)] = _FieldRef(img.id.val, pix.id.val, shape, np.dtype(_NP_OF[ptype]).name)
                samples[name].append((ws.id.val, img.id.val))
                if first is None:
                    first = pix
        names = tuple(n for n in by_name if any(k[0] == n for k in fields))
        nfields = {n: sum(1 for k in fields if k[0] == n) for n in names}
        if first is not None:
            ref = next(iter(fields.values()))
            t, z, c, y, x = ref.shape
            dtype = ref.dtype
            chans = []
            if channels:
                for i, ch in enumerate(channels):
                    lc = ch.getLogicalChannel()
                    nm = lc.getName() if lc is not None and lc.isLoaded() else None
                    chans.append(nm.val if nm is not None and nm.val else f"C{i}")

            def um(v: Any) -> Optional[float]:
                return None if v is None else float(LengthI(v, UnitsLength.MICROMETER).getValue())

            cal = Calibration(pixel_width=um(first.getPhysicalSizeX()), pixel_height=um(first.getPhysicalSizeY()),
                              pixel_depth=um(first.getPhysicalSizeZ()), unit="micron")
        else:
            t = z = c = y = x = 0
            dtype, chans, cal = "uint16", [], Calibration()
        rows = p._obj.rows.val if p._obj.rows is not None else max_r + 1
        cols = p._obj.columns.val if p._obj.columns is not None else max_c + 1
        structure = PlateStructure(
            plate=str(plate), name=p.getName() or str(plate), wells=names, fields=nfields,
            size_t=t, size_z=z, size_c=c, size_y=y, size_x=x, dtype=dtype, channel_names=tuple(chans),
            calibration=cal, rows=max(rows, max_r + 1), columns=max(cols, max_c + 1))
        d = p._obj.getDetails()
        group = d.getGroup().getId().getValue() if d is not None and d.getGroup() is not None else None
        return _PlateIndex(structure, group, by_name, fields, samples)

    def plate_structure(self, plate: str) -> PlateStructure:
        return self._index(plate).structure

    def _field(self, plate: str, well: str, site: int) -> _FieldRef:
        idx = self._index(plate)
        ref = idx.fields.get((normalize_well(well), int(site)))
        if ref is None:
            raise NotFound(f"OMERO plate {plate}: no field {site} in well {well}")
        return ref

    # -- pixels -----------------------------------------------------------------------

    def _store(self, conn: Any, pixels_id: int) -> Any:
        rps = self._stores.get(pixels_id)
        if rps is None:
            rps = conn.c.sf.createRawPixelsStore()
            rps.setPixelsId(pixels_id, True, self._ctx(None))
            self._stores[pixels_id] = rps
            while len(self._stores) > 8:
                _pid, old = self._stores.popitem(last=False)
                try:
                    old.close()
                except Exception:
                    pass
        else:
            self._stores.move_to_end(pixels_id)
        return rps

    def _tiled(self, sy: int, sx: int, itemsize: int) -> bool:
        return sx > self.max_plane_size or sy > self.max_plane_size or sy * sx * itemsize > self.tile_bytes

    def _tiles(self, sy: int, sx: int) -> Iterator[tuple[int, int, int, int]]:
        ts = self.tile_size
        for y in range(0, sy, ts):
            for x in range(0, sx, ts):
                yield x, y, min(ts, sx - x), min(ts, sy - y)

    def _read_plane(self, ref: _FieldRef, z: int, c: int, t: int) -> np.ndarray:
        st, sz, sc, sy, sx = ref.shape
        if not (0 <= z < sz and 0 <= c < sc and 0 <= t < st):
            raise NotFound(f"image {ref.image}: no plane z={z} c={c} t={t} (Z={sz}, C={sc}, T={st})")
        be = np.dtype(ref.dtype).newbyteorder(">")
        ctx = self._ctx(None)
        with self._call(f"reading image {ref.image}") as conn:
            rps = self._store(conn, ref.pixels)
            if not self._tiled(sy, sx, be.itemsize):
                return np.frombuffer(rps.getPlane(z, c, t, ctx), dtype=be).reshape(sy, sx).astype(ref.dtype)
            out = np.empty((sy, sx), dtype=ref.dtype)
            for x, y, w, h in self._tiles(sy, sx):
                raw = rps.getTile(z, c, t, x, y, w, h, ctx)
                out[y:y + h, x:x + w] = np.frombuffer(raw, dtype=be).reshape(h, w)
            return out

    def load_field(self, plate: str, well: str, site: int) -> np.ndarray:
        ref = self._field(plate, well, site)
        out = np.empty(ref.shape, dtype=ref.dtype)
        for t in range(ref.shape[0]):
            for z in range(ref.shape[1]):
                for c in range(ref.shape[2]):
                    out[t, z, c] = self._read_plane(ref, z, c, t)
        return out

    def _write_planes(self, conn: Any, pixels_id: int, planes: Mapping[tuple[int, int, int], np.ndarray],
                      ctx: Any) -> None:
        rps = conn.c.sf.createRawPixelsStore()
        try:
            rps.setPixelsId(pixels_id, True, ctx)
            for (t, z, c), plane in planes.items():
                be = np.ascontiguousarray(plane, dtype=plane.dtype.newbyteorder(">"))
                sy, sx = be.shape
                if not self._tiled(sy, sx, be.itemsize):
                    rps.setPlane(be.tobytes(), z, c, t, ctx)
                else:
                    for x, y, w, h in self._tiles(sy, sx):
                        rps.setTile(np.ascontiguousarray(be[y:y + h, x:x + w]).tobytes(), z, c, t, x, y, w, h, ctx)
            rps.save(ctx)
        finally:
            try:
                rps.close(ctx)
            except Exception:
                pass
        self._stores.pop(pixels_id, None)

    # -- file-like primitives ------------------------------------------------------------

    def list_files(self, directory: str) -> list[str]:
        parts = [p for p in str(directory).split("/") if p]
        if parts == [self.scheme]:
            with self._call("listing plates") as conn:
                plates = [p.getId() for p in conn.getObjects("Plate")]
            self.metadata_reads += 1
            return sorted(f"/{self.scheme}/plate_{i}" for i in plates)
        vp = self.parse(directory)
        if vp.name is not None:
            raise BackendError(f"{directory!r} is a file, not a directory")
        idx = self._index(vp.plate)
        base = f"/{self.scheme}/plate_{vp.plate}"
        if vp.well is None:
            files = [f"{base}/{w}" for w in idx.structure.wells]
            files += [f"{base}/{n}" for n in self._tables(vp.plate, None)]
            return sorted(files)
        if vp.well not in idx.structure.wells and vp.well not in idx.wells:
            raise NotFound(f"OMERO plate {vp.plate} has no well {vp.well}")
        out = []
        for (w, site), ref in idx.fields.items():
            if w != vp.well:
                continue
            st, sz, sc = ref.shape[:3]
            out += [self.path(PlaneComponents(vp.plate, w, site, c, z, t))
                    for t in range(st) for z in range(sz) for c in range(sc)]
        out += [f"{base}/{vp.well}/{n}" for n in self._tables(vp.plate, vp.well)]
        return sorted(out)

    def load(self, path: str) -> Any:
        vp = self.parse(path)
        if vp.is_plane:
            c = vp.components
            return self._read_plane(self._field(vp.plate, c.well, c.site), c.z, c.channel, c.t)
        if vp.name is None:
            raise BackendError(f"{path!r} is a directory; list_files() it")
        anns = self._tables(vp.plate, vp.well)
        if vp.name not in anns:
            raise NotFound(f"no table {vp.name!r} in {path.rsplit('/', 1)[0]}")
        data = self._read_file(anns[vp.name][0].file.id.val)
        text = data.decode("utf-8")
        return json.loads(text) if vp.name.endswith(".json") else text

    def exists(self, path: str) -> bool:
        try:
            vp = self.parse(path)
            idx = self._index(vp.plate)
        except (NotFound, ComponentError):
            return False
        if vp.is_plane:
            c = vp.components
            ref = idx.fields.get((c.well, c.site))
            return ref is not None and c.t < ref.shape[0] and c.z < ref.shape[1] and c.channel < ref.shape[2]
        if vp.name is not None:
            return vp.name in self._tables(vp.plate, vp.well)
        return vp.well is None or vp.well in idx.structure.wells

    def save(self, data: Any, path: str) -> None:
        self.save_batch([data], [path])

    def save_batch(self, datas: Sequence[Any], paths: Sequence[str]) -> None:
        """Planes are grouped by field and each field written in one go;
        tables become FileAnnotations."""
        if len(datas) != len(paths):
            raise ValueError(f"save_batch: {len(datas)} items but {len(paths)} paths")
        groups: dict[tuple[str, str, int], dict[tuple[int, int, int], np.ndarray]] = {}
        for data, path in zip(datas, paths):
            vp = self.parse(path)
            if vp.is_plane:
                arr = np.asarray(data)
                if arr.ndim != 2:
                    raise BackendError(f"{path}: a plane must be a 2-D (Y, X) array, got shape {arr.shape}")
                c = vp.components
                groups.setdefault((vp.plate, c.well, c.site), {})[(c.t, c.z, c.channel)] = arr
            elif vp.name and vp.name.endswith((".csv", ".json")):
                self._save_named(vp.plate, vp.well, None, vp.name, data)
            else:
                raise BackendError(f"{path}: OMERO stores planes (.tif names), .csv and .json tables only")
        for (plate, well, site), planes in groups.items():
            self._save_planes(plate, well, site, planes)

    def _save_planes(self, plate: str, well: str, site: int, planes: dict) -> None:
        idx = self._index(plate)
        ref = idx.fields.get((well, site))
        first = next(iter(planes.values()))
        need = tuple(1 + max(k[i] for k in planes) for i in range(3))
        if ref is not None:
            if any(p.shape != ref.shape[3:] or p.dtype != np.dtype(ref.dtype) for p in planes.values()):
                raise BackendError(f"plate {plate} {well} field {site}: planes must be {ref.dtype} of shape "
                                   f"{ref.shape[3:]}")
            if all(n <= s for n, s in zip(need, ref.shape[:3])):
                with self._call(f"writing planes of {well} field {site}") as conn:
                    self._write_planes(conn, ref.pixels, planes, self._ctx(idx.group))
                return
            # an OMERO image cannot grow: rewrite the field with the new planes
            arr = self.load_field(plate, well, site)
            grown = np.zeros(tuple(max(a, b) for a, b in zip(need, ref.shape[:3])) + ref.shape[3:], ref.dtype)
            grown[:arr.shape[0], :arr.shape[1], :arr.shape[2]] = arr
        else:
            grown = np.zeros(need + first.shape, dtype=first.dtype)
        for (t, z, c), p in planes.items():
            grown[t, z, c] = p
        s = idx.structure
        self.save_field(plate, well, site, grown, channel_names=s.channel_names or None,
                        calibration=s.calibration if s.calibration.is_set else None)

    # -- writing plates and fields --------------------------------------------------------

    def create_plate(self, name: str, like: Optional[PlateStructure] = None, *,
                     provenance: Optional[Mapping[str, Any]] = None, screen: Optional[int] = None) -> str:
        """A new plate (linked to ``screen`` when given), with its provenance
        MapAnnotation, saved in one call in the connection's group."""
        _omero()
        from omero.model import MapAnnotationI, NamedValue, PlateAnnotationLinkI, PlateI, ScreenI
        from omero.rtypes import rint, rstring

        with self._call(f"creating plate {name!r}") as conn:
            gid = conn.getEventContext().groupId
            plate = PlateI()
            plate.name = rstring(str(name))
            plate.columnNamingConvention, plate.rowNamingConvention = rstring("number"), rstring("letter")
            if like is not None and like.rows and like.columns:
                plate.rows, plate.columns = rint(like.rows), rint(like.columns)
            if screen is not None:
                plate.linkScreen(ScreenI(int(screen), False))
            ann = MapAnnotationI()
            ann.ns = rstring(NS_PROVENANCE)
            ann.setMapValue([NamedValue(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
                             for k, v in dict(provenance or {}).items()])
            link = PlateAnnotationLinkI()
            link.parent, link.child = plate, ann
            saved = conn.getUpdateService().saveAndReturnObject(link, self._ctx(gid))
            pid = saved.parent.id.val
        self._plates.pop(str(pid), None)
        return str(pid)

    def plate_provenance(self, plate: str) -> dict:
        pid = self._plate_id(plate)
        with self._call(f"reading provenance of plate {pid}") as conn:
            anns = conn.getMetadataService().loadAnnotations(
                "Plate", [pid], ["MapAnnotation"], None, None, self._ctx(None)).get(pid, [])
        out: dict = {}
        for a in anns:
            if a.ns is not None and a.ns.val == NS_PROVENANCE:
                out.update({nv.name: nv.value for nv in (a.getMapValue() or [])})
        return out

    def save_field(self, plate: str, well: str, site: int, array: np.ndarray, *, name: Optional[str] = None,
                   channel_names: Optional[Sequence[str]] = None, calibration: Optional[Calibration] = None) -> None:
        _omero()
        from omero.model import LengthI
        from omero.rtypes import rstring

        well = normalize_well(well)
        site = int(site)
        arr = np.asarray(array)
        if arr.ndim != 5:
            raise BackendError(f"save_field needs a 5-D (T, Z, C, Y, X) array, got shape {arr.shape}")
        if arr.dtype == bool:
            arr = arr.astype("uint8")
        if arr.dtype.name not in _OMERO_OF:
            raise BackendError(f"OMERO has no pixel type for dtype {arr.dtype}: use one of {sorted(_OMERO_OF)}")
        idx = self._index(plate)
        s = idx.structure
        others = [k for k in idx.fields if k != (well, site)]
        if others:
            if arr.dtype.name != s.dtype:
                raise BackendError(f"plate {plate} holds {s.dtype} images; got dtype {arr.dtype} (pixel type)")
            if arr.shape[3:] != (s.size_y, s.size_x):
                raise BackendError(f"plate {plate} holds {s.size_y}x{s.size_x} images; got shape {arr.shape}")
        st, sz, sc, sy, sx = arr.shape
        if min(arr.shape) < 1:
            raise BackendError(f"save_field: empty array of shape {arr.shape}")
        names = list(channel_names or [])
        ctx = self._ctx(idx.group)
        label = name or f"{s.name} {well} field {site}"
        with self._call(f"writing {well} field {site} of plate {plate}") as conn:
            ptype = self._pixels_type(conn, _OMERO_OF[arr.dtype.name])
            iid = conn.getPixelsService().createImage(
                sx, sy, sz, st, list(range(sc)), ptype, label,
                f"fiji-bridge field: plate={plate} well={well} site={site}", ctx).val
            try:
                img = conn.getObject("Image", iid, opts={"load_channels": True})
                pix = img._obj.getPrimaryPixels()
                if calibration is not None:
                    for axis, v in (("X", calibration.pixel_width), ("Y", calibration.pixel_height),
                                    ("Z", calibration.pixel_depth)):
                        if v is not None:
                            getattr(pix, f"setPhysicalSize{axis}")(LengthI(float(v), _unit(calibration.unit)))
                for i, ch in enumerate(pix.copyChannels()):
                    if i < len(names) and names[i]:
                        ch.getLogicalChannel().setName(rstring(str(names[i])))
                conn.getUpdateService().saveObject(img._obj, ctx)
                planes = {(t, z, c): arr[t, z, c] for t in range(st) for z in range(sz) for c in range(sc)}
                self._write_planes(conn, pix.id.val, planes, ctx)
                ps = conn.getPixelsService()
                for c in range(sc):
                    ch = arr[:, :, c]
                    ps.setChannelGlobalMinMax(pix.id.val, c, float(ch.min()), float(ch.max()), ctx)
                old = self._link_field(conn, plate, idx, well, site, iid, ctx)
            except BaseException:
                try:  # never leave an orphan image behind
                    conn.deleteObjects("Image", [iid], wait=True)
                except Exception:
                    log.warning("could not delete unlinked image %s after a failed write", iid)
                raise
            if old is not None:
                conn.deleteObjects("Image", [old], deleteAnns=False, wait=True)
        self._plates.pop(str(plate), None)

    def _link_field(self, conn: Any, plate: str, idx: _PlateIndex, well: str, site: int, iid: int,
                    ctx: Any) -> Optional[int]:
        """Link image ``iid`` as field ``site`` of ``well`` (one save); return
        the image it replaces, if any."""
        from omero.model import ImageI, PlateI, WellI, WellSampleI
        from omero.rtypes import rint

        pid = self._plate_id(plate)
        wid = idx.wells.get(well)
        if wid is None:
            row, col = parse_well(well)
            w = WellI()
            w.row, w.column, w.plate = rint(row), rint(col), PlateI(pid, False)
            ws = WellSampleI()
            ws.image = ImageI(iid, False)
            w.addWellSample(ws)
            conn.getUpdateService().saveObject(w, ctx)
            if site != 0:
                log.info("field %s of new well %s saved before fields 0..%s: stored at index 0 for now",
                         site, well, site - 1)
            return None
        w = next(iter(conn.getObjects("Well", ids=[wid], opts={"load_images": True})))._obj
        self.metadata_reads += 1
        samples = list(w.copyWellSamples())
        if site < len(samples):
            old = samples[site].image.id.val if samples[site].image is not None else None
            samples[site].image = ImageI(iid, False)
            conn.getUpdateService().saveObject(w, ctx)
            return old
        ws = WellSampleI()
        ws.image = ImageI(iid, False)
        w.addWellSample(ws)
        conn.getUpdateService().saveObject(w, ctx)
        return None

    def _pixels_type(self, conn: Any, value: str) -> Any:
        pt = self._ptypes.get(value)
        if pt is None:
            pt = conn.getQueryService().findByQuery(f"from PixelsType as p where p.value='{value}'", None)
            if pt is None:
                raise BackendError(f"the OMERO server has no pixel type {value!r}")
            self._ptypes[value] = pt
        return pt

    # -- tables: FileAnnotations (+ OMERO.tables) ---------------------------------------------

    def save_table(self, plate: str, name: str, table: Union[str, Mapping[str, Sequence[Any]]], *,
                   well: Optional[str] = None, site: Optional[int] = None) -> str:
        text = table if isinstance(table, str) else columns_to_csv(table)
        well = normalize_well(well) if well else None
        self._save_named(str(plate), well, site, f"{name}.csv", text)
        return f"/{self.scheme}/plate_{plate}/" + (f"{well}/" if well else "") + f"{name}.csv"

    def _target(self, plate: str, well: Optional[str], site: Optional[int]) -> tuple[str, int, Optional[int]]:
        idx = self._index(plate)
        if well is None:
            return "Plate", self._plate_id(plate), idx.group
        if site is not None:
            return "Image", self._field(plate, well, site).image, idx.group
        if well not in idx.wells:
            raise NotFound(f"OMERO plate {plate} has no well {well} to attach a table to")
        return "Well", idx.wells[well], idx.group

    def _save_named(self, plate: str, well: Optional[str], site: Optional[int], filename: str, data: Any) -> None:
        if filename.endswith(".json"):
            if isinstance(data, (bytes, str)):
                payload = data.encode() if isinstance(data, str) else data
                json.loads(payload)  # refuse what is not JSON
            else:
                payload = json.dumps(data, indent=1, default=json_default).encode()
            mimetype = "application/json"
        else:
            if isinstance(data, Mapping):
                data = columns_to_csv(data)
            if not isinstance(data, (str, bytes)):
                raise BackendError(f"{filename}: a CSV table must be text or columns, got {type(data).__name__}")
            payload = data.encode() if isinstance(data, str) else data
            mimetype = "text/csv"
        kind, oid, group = self._target(plate, well, site)
        old = self._annotations(kind, oid).get(filename, [])
        self._attach_file(kind, oid, group, filename, payload, mimetype, NS_RESULTS)
        if mimetype == "text/csv":
            self._attach_table(kind, oid, group, filename, payload.decode("utf-8"))
        if old:
            with self._call(f"replacing {filename}") as conn:
                conn.deleteObjects("Annotation", [a.id.val for a in old], deleteAnns=True, wait=True)

    def _attach_file(self, kind: str, oid: int, group: Optional[int], filename: str, payload: bytes,
                     mimetype: str, ns: str) -> None:
        with self._call(f"attaching {filename} to {kind} {oid}") as conn:
            saved_group = conn.SERVICE_OPTS.getOmeroGroup()
            conn.SERVICE_OPTS.setOmeroGroup(group)  # the file lives in the object's group
            try:
                orig = conn.createOriginalFileFromFileObj(io.BytesIO(payload), "fiji-bridge/", filename,
                                                          len(payload), mimetype=mimetype)
            finally:
                conn.SERVICE_OPTS.setOmeroGroup(saved_group)
            self._link_file(conn, kind, oid, group, orig.getId(), ns)

    def _link_file(self, conn: Any, kind: str, oid: int, group: Optional[int], file_id: int, ns: str) -> None:
        import omero.model as om
        from omero.rtypes import rstring

        ann = om.FileAnnotationI()
        ann.file = om.OriginalFileI(file_id, False)
        ann.ns = rstring(ns)
        link = getattr(om, f"{kind}AnnotationLinkI")()
        link.parent = getattr(om, f"{kind}I")(oid, False)
        link.child = ann
        conn.getUpdateService().saveObject(link, self._ctx(group))

    def _attach_table(self, kind: str, oid: int, group: Optional[int], filename: str, text: str) -> Optional[int]:
        """The CSV as an OMERO.table (skipped, with a log line, when the server
        has no tables service or the CSV has no rows)."""
        import omero

        cols = _csv_columns(text)
        if not cols:
            return None
        with self._call(f"creating OMERO.table {filename}") as conn:
            resources = conn.c.sf.sharedResources()
            repos = resources.repositories()
            if not repos.descriptions:
                log.info("OMERO at %s has no repository for tables; %s kept as a file only",
                         self.params.address, filename)
                return None
            table = resources.newTable(repos.descriptions[0].id.val, f"{filename}.h5", self._ctx(group))
            if table is None:
                log.info("OMERO at %s runs no tables service; %s kept as a file only", self.params.address, filename)
                return None
            try:
                table.initialize([type(c)(c.name, c.description, *(( c.size, []) if hasattr(c, "size") else ([],)))
                                  for c in cols])
                table.addData(cols)
                orig = table.getOriginalFile()
            except omero.ServerError as e:
                log.warning("OMERO.table for %s failed (%s); the CSV file annotation is kept", filename, _msg(e))
                return None
            finally:
                table.close()
            old = self._annotations(kind, oid, ns=NS_TABLE).get(f"{filename}.h5", [])
            self._link_file(conn, kind, oid, group, orig.id.val, NS_TABLE)
            if old:
                conn.deleteObjects("Annotation", [a.id.val for a in old], deleteAnns=True, wait=True)
            return orig.id.val

    def _annotations(self, kind: str, oid: int, ns: str = NS_RESULTS) -> dict[str, list]:
        """FileAnnotations of one object in namespace ``ns``, by file name (newest last)."""
        with self._call(f"listing tables of {kind} {oid}") as conn:
            anns = conn.getMetadataService().loadAnnotations(
                kind, [oid], ["FileAnnotation"], None, None, self._ctx(None)).get(oid, [])
        out: dict[str, list] = {}
        for a in sorted(anns, key=lambda a: a.id.val):
            if a.ns is not None and a.ns.val == ns and a.file is not None and a.file.isLoaded():
                out.setdefault(a.file.name.val, []).append(a)
        return out

    def _tables(self, plate: str, well: Optional[str]) -> dict[str, list]:
        idx = self._index(plate)
        if well is None:
            return self._annotations("Plate", self._plate_id(plate))
        if well not in idx.wells:
            return {}
        out = self._annotations("Well", idx.wells[well])
        for (w, _site), ref in idx.fields.items():
            if w == well:
                for k, v in self._annotations("Image", ref.image).items():
                    out.setdefault(k, []).extend(v)
        return out

    def _read_file(self, file_id: int) -> bytes:
        with self._call(f"reading file {file_id}") as conn:
            rfs = conn.createRawFileStore()
            try:
                rfs.setFileId(file_id, self._ctx(None))
                size, chunk, parts = rfs.size(), 1 << 20, []
                for pos in range(0, size, chunk):
                    parts.append(rfs.read(pos, min(chunk, size - pos)))
            finally:
                rfs.close()
        return b"".join(parts)


# -- helpers ------------------------------------------------------------------------------------


def _ice_errors() -> tuple[type, ...]:
    try:
        import Ice

        return (Ice.LocalException,)
    except ImportError:
        return (ConnectionError,)


def _msg(e: BaseException) -> str:
    return str(getattr(e, "message", "") or e).strip()


def _unit(unit: str) -> Any:
    from omero.model.enums import UnitsLength

    u = (unit or "micron").lower()
    table = {"micron": "MICROMETER", "um": "MICROMETER", "µm": "MICROMETER", "micrometer": "MICROMETER",
             "nm": "NANOMETER", "nanometer": "NANOMETER", "mm": "MILLIMETER", "millimeter": "MILLIMETER"}
    if u not in table:
        raise BackendError(f"unknown length unit {unit!r}: use micron, nm or mm")
    return getattr(UnitsLength, table[u])


_INT_RE = re.compile(r"^[+-]?\d+$")


def _csv_columns(text: str) -> list:
    """CSV text -> omero.grid columns (Long, Double or String per column)."""
    import omero_Tables_ice  # noqa: F401
    import omero.grid as grid

    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2 or not rows[0]:
        return []
    head, body = rows[0], rows[1:]
    cols = []
    for i, name in enumerate(head):
        vals = [r[i] if i < len(r) else "" for r in body]
        if all(_INT_RE.match(v) for v in vals):
            cols.append(grid.LongColumn(name or f"col{i}", "", [int(v) for v in vals]))
            continue
        try:
            cols.append(grid.DoubleColumn(name or f"col{i}", "", [float(v) for v in vals]))
        except ValueError:
            size = max(1, max(len(v.encode()) for v in vals))
            cols.append(grid.StringColumn(name or f"col{i}", "", size, vals))
    return cols


def _keepalive_loop(ref: "weakref.ref[OmeroBackend]", stop: threading.Event) -> None:
    while True:
        backend = ref()
        if backend is None:
            return
        period = max(0.05, backend.keepalive)
        del backend
        if stop.wait(period):
            return
        backend = ref()
        if backend is None:
            return
        if backend._conn is not None and time.monotonic() - backend._last_use >= period / 2 \
                and backend._lock.acquire(blocking=False):
            try:
                backend._conn.keepAlive()
            except Exception as e:  # the next call reconnects
                log.info("OMERO keep-alive failed (%s); reconnecting on next use", type(e).__name__)
                backend._drop()
            finally:
                backend._lock.release()
        del backend
