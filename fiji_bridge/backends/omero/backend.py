"""OmeroBackend: an OMERO server as a plate store (see the package docstring)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ...components import Calibration, ComponentError, PlaneComponents, format_well, normalize_well, parse_well
from ..base import BackendError, NotFound, PlateStructure, VirtualBackend, columns_to_csv
from .annotations import NS_PROVENANCE, NS_RESULTS, NS_SUMMARY, OmeroAnnotations, csv_columns, length_unit, microns
from .connection import OmeroConnection, OmeroParams, _omero
from .pixels import _NP_OF, _OMERO_OF, OmeroPixels, _FieldRef
from .rois import OmeroRois

log = logging.getLogger("fiji_bridge.backends.omero")

#: a per-field table name as fiji_bridge.outputs writes it: "<table>_s<site>"
_FIELD_TABLE = re.compile(r"^(?P<table>.+)_s(?P<site>\d{3})\.csv$")
#: the ROI document of a field as fiji_bridge.outputs writes it
_ROI_DOC = re.compile(r"^rois_s(?P<site>\d{3})\.json$")
#: the batch's per-unit marker (fiji_bridge.batch_tables.MARKER)
_MARKER = re.compile(r"^fiji_bridge_unit_s(?P<site>\d{3})\.json$")
#: the description save_field gives a field's image: its field number survives any sample order
_FIELD_DESC = re.compile(r"^fiji-bridge field: plate=\S+ well=\S+ site=(?P<site>\d+)$")


#: saves of a field's link before giving up when other writers keep changing its well
_LINK_ATTEMPTS = 4


def _sample_site(ws: Any, index: int) -> int:
    """The field number of a well sample: the one fiji-bridge recorded on its
    image, else its index in the well (as omero-cli-zarr numbers fields)."""
    img = ws.getImage()
    if img is not None and img.isLoaded() and img.getDescription() is not None:
        m = _FIELD_DESC.match(img.getDescription().getValue() or "")
        if m:
            return int(m.group("site"))
    return index


class _PlateIndex:
    """What a plate's one structure query told us."""

    def __init__(self, structure: PlateStructure, group: Optional[int], wells: dict[str, int],
                 fields: dict[tuple[str, int], _FieldRef]) -> None:
        self.structure, self.group, self.wells, self.fields = structure, group, wells, fields


class OmeroBackend(OmeroConnection, OmeroPixels, OmeroAnnotations, OmeroRois, VirtualBackend):
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
        plane_bytes: int = 16 * 2**20,
        store_cache: int = 8,
        delete_timeout: float = 300.0,
        share_session: bool = True,
        summaries: bool = True,
        rois_on_source: Optional[bool] = None,
    ) -> None:
        self.params = OmeroParams.from_env(host, port, user, password, session, group, secure)
        self._gateway_factory = gateway
        self.keepalive = float(keepalive)
        self.plane_bytes = int(plane_bytes)
        self.store_cache = int(store_cache)
        self.delete_timeout = float(delete_timeout)
        self.share_session = share_session
        self.summaries = summaries
        if rois_on_source is None:  # e.g. for fiji-bridge batch: FIJI_BRIDGE_OMERO_ROIS_ON_SOURCE=1
            rois_on_source = os.environ.get("FIJI_BRIDGE_OMERO_ROIS_ON_SOURCE", "") not in ("", "0", "false", "no")
        self.rois_on_source = bool(rois_on_source)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._init_connection()
        self._plates: dict[str, _PlateIndex] = {}
        self._ptypes: dict[str, Any] = {}
        self._provenance: dict[str, dict] = {}
        self.metadata_reads = 0

    @classmethod
    def from_uri(cls, uri: Any, **kwargs: Any) -> "OmeroBackend":
        """A backend for ``omero://[user@]host[:port]/plate/<id>`` (a string or
        a parsed :class:`~fiji_bridge.backends.uri.PlateURI`)."""
        if isinstance(uri, str):
            from ..uri import PlateURI

            uri = PlateURI.parse(uri)
        if getattr(uri, "scheme", "omero") != "omero":
            raise BackendError(f"{uri} is not an omero:// URI")
        return cls(host=uri.host or None, port=uri.port, user=uri.user or None, **kwargs)

    # -- pickling: parameters, never the connection -------------------------------

    _OPTIONS = ("keepalive", "plane_bytes", "store_cache", "delete_timeout", "share_session", "summaries",
                "rois_on_source")

    def __getstate__(self) -> dict:
        key = self._session_key if self.share_session else self.params.session
        return {"params": replace(self.params, session=key, password=None), "gateway": self._gateway_factory,
                "options": {k: getattr(self, k) for k in self._OPTIONS}}

    def __setstate__(self, state: dict) -> None:
        self.params = state["params"]
        self._gateway_factory = state["gateway"]
        for k, v in state["options"].items():
            setattr(self, k, v)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"OmeroBackend({self.params.user or '?'}@{self.params.address}, connected={self._conn is not None})"

    __str__ = __repr__

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
            # ONE query for every well, well sample, image and pixels of the plate; the
            # join fetch returns a Well once per well sample (no distinct): keep one each
            wells = list({w.getId(): w for w in conn.getObjects("Well", opts={"plate": pid, "load_pixels": True})}
                         .values())
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
        by_name: dict[str, int] = {}
        fields: dict[tuple[str, int], _FieldRef] = {}
        first: Optional[Any] = None
        max_r = max_c = -1
        for w in sorted(wells, key=lambda w: (w.row, w.column)):
            name = format_well(int(w.row), int(w.column))
            max_r, max_c = max(max_r, int(w.row)), max(max_c, int(w.column))
            by_name[name] = w.getId()
            wss = w._obj.copyWellSamples() if w._obj.isWellSamplesLoaded() else []
            sites = [_sample_site(ws, i) for i, ws in enumerate(wss)]
            if len(set(sites)) != len(sites):  # not ours, or inconsistent: the index decides
                sites = list(range(len(wss)))
            for site, ws in zip(sites, wss):
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
                if first is None:
                    first = pix
        names = tuple(n for n in by_name if any(k[0] == n for k in fields))
        nfields = {n: sum(1 for k in fields if k[0] == n) for n in names}
        if first is not None:
            ref = next(iter(fields.values()))
            t, z, c, y, x = ref.shape
            dtype = ref.dtype
            chans = []
            for i, ch in enumerate(channels or []):
                lc = ch.getLogicalChannel()
                nm = lc.getName() if lc is not None and lc.isLoaded() else None
                chans.append(nm.val if nm is not None and nm.val else f"C{i}")
            cal = Calibration(pixel_width=microns(first.getPhysicalSizeX()),
                              pixel_height=microns(first.getPhysicalSizeY()),
                              pixel_depth=microns(first.getPhysicalSizeZ()), unit="micron")
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
        return _PlateIndex(structure, group, by_name, fields)

    def plate_structure(self, plate: str) -> PlateStructure:
        return self._index(plate).structure

    def _field(self, plate: str, well: str, site: int) -> _FieldRef:
        idx = self._index(plate)
        ref = idx.fields.get((normalize_well(well), int(site)))
        if ref is None:
            raise NotFound(f"OMERO plate {plate}: no field {site} in well {well}")
        return ref

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

    def load(self, path: str) -> Any:
        import json

        vp = self.parse(path)
        if vp.is_plane:
            c = vp.components
            return self._read_plane(self._field(vp.plate, c.well, c.site), c.z, c.channel, c.t)
        if vp.name is None:
            raise BackendError(f"{path!r} is a directory; list_files() it")
        anns = self._tables(vp.plate, vp.well)
        if vp.name not in anns:
            raise NotFound(f"no table {vp.name!r} in {path.rsplit('/', 1)[0]}")
        newest = max(anns[vp.name], key=lambda a: a.id.val)  # two writers raced: the last one wins
        text = self._read_file(newest.file.id.val).decode("utf-8")
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
        """Planes are grouped by field and each field written as one new image;
        tables become FileAnnotations (a field's ROI document also native
        OMERO ROIs; a batch marker also the field's key-value summary)."""
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
            elif vp.name and vp.name.endswith(".csv"):
                self.save_table(vp.plate, vp.name[:-4], data, well=vp.well)
            elif vp.name and vp.name.endswith(".json"):
                self._save_named(vp.plate, vp.well, None, vp.name, data)
                self._native_json(vp.plate, vp.well, vp.name, data)
            else:
                raise BackendError(f"{path}: OMERO stores planes (.tif names), .csv and .json tables only")
        for (plate, well, site), planes in groups.items():
            self._save_planes(plate, well, site, planes)

    def _native_json(self, plate: str, well: Optional[str], name: str, data: Any) -> None:
        """What OMERO users see natively for our JSON documents."""
        if well is None or not isinstance(data, Mapping):
            return
        m = _ROI_DOC.match(name)
        if m and isinstance(data.get("rois"), list):
            self.save_rois(plate, well, int(m.group("site")), data["rois"])
            return
        m = _MARKER.match(name)
        if m and self.summaries:
            site = int(m.group("site"))
            keep = {"status": data.get("status"), "elapsed (s)": data.get("elapsed"), "worker": data.get("worker"),
                    "imagej": data.get("imagej"), "error": (data.get("error") or {}).get("message")}
            if (well, site) in self._index(plate).fields:
                self._summarize(plate, well, site, keep)

    def _save_planes(self, plate: str, well: str, site: int, planes: dict) -> None:
        """Pixels are write-once on the server: the field's planes, merged with
        the new ones, become a new image that replaces the old one."""
        idx = self._index(plate)
        ref = idx.fields.get((well, site))
        first = next(iter(planes.values()))
        need = tuple(1 + max(k[i] for k in planes) for i in range(3))
        if ref is not None:
            if any(p.shape != ref.shape[3:] or p.dtype != np.dtype(ref.dtype) for p in planes.values()):
                raise BackendError(f"plate {plate} {well} field {site}: planes must be {ref.dtype} of shape "
                                   f"{ref.shape[3:]}")
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
        import json

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
        plate = str(plate)
        if plate not in self._provenance:
            self._provenance[plate] = self._map_values("Plate", self._plate_id(plate), NS_PROVENANCE)
        return dict(self._provenance[plate])

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
        parse_well(well)
        unit = length_unit(calibration.unit) if calibration is not None else None
        if calibration is not None and unit is None and calibration.is_set:
            log.info("calibration of %s field %s is in pixels: no physical size stored", well, site)
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
                if calibration is not None and unit is not None:
                    for axis, v in (("X", calibration.pixel_width), ("Y", calibration.pixel_height),
                                    ("Z", calibration.pixel_depth)):
                        if v is not None and not float(v) > 0:  # positive_float domain (psql-footer.vm)
                            log.info("calibration of %s field %s: pixel size %s = %r is not > 0; not stored",
                                     well, site, axis, v)
                        elif v is not None:
                            getattr(pix, f"setPhysicalSize{axis}")(LengthI(float(v), unit))
                for i, ch in enumerate(pix.copyChannels()):
                    if i < len(names) and names[i]:
                        ch.getLogicalChannel().setName(rstring(str(names[i])))
                conn.getUpdateService().saveObject(img._obj, ctx)
                self._write_pixels(conn, pix.id.val, arr, ctx)
                ps = conn.getPixelsService()
                for c in range(sc):
                    ch = arr[:, :, c]
                    ps.setChannelGlobalMinMax(pix.id.val, c, float(ch.min()), float(ch.max()), ctx)
                old = self._link_field(conn, plate, idx, well, site, iid, ctx)
            except BaseException:
                try:  # never leave an orphan image behind
                    self._delete(conn, "Image", [iid])
                except Exception:
                    log.warning("could not delete unlinked image %s after a failed write", iid)
                raise
            if old is not None:
                prev = idx.fields.get((well, site))
                rps = self._stores.pop(prev.pixels, None) if prev is not None else None
                if rps is not None:  # a read store on the pixels about to go
                    try:
                        rps.close()
                    except Exception:
                        pass
                try:
                    self._delete(conn, "Image", [old])
                except BackendError as e:  # e.g. another user's image the group does not let us delete
                    log.warning("%s field %s of plate %s: the new image is linked; the image it replaced (%s) "
                                "could not be deleted and is left unlinked: %s", well, site, plate, old, e)
        self._plates.pop(str(plate), None)
        if self.summaries:
            self._summarize_image(plate, iid, idx.group, well, site, {"image": label})

    def _link_field(self, conn: Any, plate: str, idx: _PlateIndex, well: str, site: int, iid: int,
                    ctx: Any) -> Optional[int]:
        """Link image ``iid`` as field ``site`` of ``well``; return the image it
        replaces, if any.

        Another worker may have created the well, or added a sample, since
        this one read the plate: the database's unique constraints (Well
        (plate, column, row), WellSample (well, well_index); omero-model
        psql-footer.vm, omero-dsl-plugin SemanticTypeProcessor.java) then
        refuse the save with a ValidationException, and the well is read again
        from the server and the save retried."""
        import omero

        wid = idx.wells.get(well)
        for attempt in range(_LINK_ATTEMPTS):
            try:
                return self._link_field_once(conn, plate, well, site, iid, ctx, wid)
            except omero.ValidationException:
                if attempt == _LINK_ATTEMPTS - 1:
                    raise
                wid = self._find_well(conn, plate, well, ctx)
                log.info("%s of plate %s changed under this writer; linking field %s again", well, plate, site)
        raise AssertionError("unreachable")

    def _find_well(self, conn: Any, plate: str, well: str, ctx: Any) -> Optional[int]:
        """The id of ``well`` of ``plate`` as the server has it now (None if there is none)."""
        from omero.rtypes import rint, rlong
        from omero.sys import ParametersI

        row, col = parse_well(well)
        params = ParametersI()
        params.add("pid", rlong(self._plate_id(plate)))
        params.add("row", rint(row))
        params.add("col", rint(col))
        found = conn.getQueryService().findByQuery(
            "from Well as w where w.plate.id = :pid and w.row = :row and w.column = :col", params, ctx)
        return None if found is None else found.id.val

    def _link_field_once(self, conn: Any, plate: str, well: str, site: int, iid: int, ctx: Any,
                         wid: Optional[int]) -> Optional[int]:
        """One save linking ``iid`` to the well ``wid`` (created when None)."""
        from omero.model import ImageI, PlateI, WellI, WellSampleI
        from omero.rtypes import rint

        pid = self._plate_id(plate)
        if wid is None:
            row, col = parse_well(well)
            w = WellI()
            w.row, w.column, w.plate = rint(row), rint(col), PlateI(pid, False)
            ws = WellSampleI()
            ws.image = ImageI(iid, False)
            w.addWellSample(ws)
            conn.getUpdateService().saveObject(w, ctx)
            return None
        found = {w.getId(): w for w in conn.getObjects("Well", ids=[wid], opts={"load_images": True})}
        w = found[wid]._obj
        self.metadata_reads += 1
        samples = list(w.copyWellSamples())
        sites = [_sample_site(ws, i) for i, ws in enumerate(samples)]
        if len(set(sites)) != len(sites):
            sites = list(range(len(samples)))
        if site in sites:
            ws = samples[sites.index(site)]
            old = ws.image.id.val if ws.image is not None else None
            ws.image = ImageI(iid, False)
            conn.getUpdateService().saveObject(w, ctx)
            return old
        # fields may arrive in any order (parallel workers): the samples stay in field order
        ws = WellSampleI()
        ws.image = ImageI(iid, False)
        order = sorted(zip(sites + [site], range(len(samples) + 1), samples + [ws]), key=lambda x: (x[0], x[1]))
        w.clearWellSamples()
        for _s, _i, sample in order:
            w.addWellSample(sample)
        conn.getUpdateService().saveObject(w, ctx)
        return None

    # -- tables ----------------------------------------------------------------------------

    def save_table(self, plate: str, name: str, table: Union[str, Mapping[str, Sequence[Any]]], *,
                   well: Optional[str] = None, site: Optional[int] = None) -> str:
        """A CSV FileAnnotation on the plate, well or field image, and the same
        rows as an OMERO.table with typed columns; where the rows name wells
        and fields (``well``/``field`` columns), the table also gets a
        WellColumn, an ImageColumn and, when the field's ROIs are one per row,
        a RoiColumn."""
        if isinstance(table, bytes):
            table = table.decode("utf-8")
        text = table if isinstance(table, str) else columns_to_csv(table)
        well = normalize_well(well) if well else None
        filename = f"{name}.csv"
        self._save_named(str(plate), well, site, filename, text, links=self._row_links(str(plate), text))
        m = _FIELD_TABLE.match(filename)
        if m and well and site is None and self.summaries:
            fsite = int(m.group("site"))
            if (well, fsite) in self._index(plate).fields:
                _head, cols = csv_columns(text)
                self._summarize(plate, well, fsite, {f"{m.group('table')} rows": len(cols[0][2]) if cols else 0})
        return f"/{self.scheme}/plate_{plate}/" + (f"{well}/" if well else "") + filename

    def _target(self, plate: str, well: Optional[str], site: Optional[int]) -> tuple[str, int, Optional[int]]:
        idx = self._index(plate)
        if well is None:
            return "Plate", self._plate_id(plate), idx.group
        if site is not None:
            return "Image", self._field(plate, well, site).image, idx.group
        if well not in idx.wells:
            raise NotFound(f"OMERO plate {plate} has no well {well} to attach a table to")
        return "Well", idx.wells[well], idx.group

    def _row_links(self, plate: str, text: str) -> dict[str, list]:
        """Image/Well/Roi id columns for a table whose rows name their well and
        field (as the batch's tables do); {} when some row does not resolve."""
        head, cols = csv_columns(text)
        by = {name: vals for name, _kind, vals in cols}
        if "well" not in by:
            return {}
        idx = self._index(plate)
        try:
            wells = [normalize_well(str(w)) for w in by["well"]]
        except ComponentError:
            return {}
        if any(w not in idx.wells for w in wells):
            return {}
        out: dict[str, list] = {"Well": [idx.wells[w] for w in wells]}
        if "field" not in by:
            return out
        try:
            units = [(w, int(f)) for w, f in zip(wells, by["field"])]
        except (TypeError, ValueError):
            return out
        if any(u not in idx.fields for u in units):
            return out
        images = [idx.fields[u].image for u in units]
        out["Image"] = images
        rois = self._roi_ids(sorted(set(images)))
        counts: dict[int, int] = {}
        for i in images:
            counts[i] = counts.get(i, 0) + 1
        if rois and all(len(rois.get(i, [])) == n for i, n in counts.items()):
            seen: dict[int, int] = {}
            roi_col = []
            for i in images:
                roi_col.append(rois[i][seen.get(i, 0)])
                seen[i] = seen.get(i, 0) + 1
            out["Roi"] = roi_col
        return out

    # -- per-image key-value summary -------------------------------------------------------

    def _summarize(self, plate: str, well: str, site: int, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the field image's summary MapAnnotation (with
        the plate's provenance: macro, arguments, source)."""
        idx = self._index(plate)
        ref = idx.fields.get((well, site))
        if ref is not None:
            self._summarize_image(plate, ref.image, idx.group, well, site, values)

    def _summarize_image(self, plate: str, image: int, group: Optional[int], well: str, site: int,
                         values: Mapping[str, Any]) -> None:
        prov = self.plate_provenance(plate)
        base = {k: prov[k] for k in ("macro", "macro_sha256", "arguments", "source", "source_plate", "fiji_bridge",
                                     "imagej", "created") if prov.get(k) not in (None, "", "null")}
        self._set_map("Image", image, group, NS_SUMMARY,
                      {**base, "plate": str(plate), "well": well, "field": str(site), **dict(values)})

    def image_summary(self, plate: str, well: str, site: int) -> dict[str, str]:
        """The key-value summary of a field's image (OMERO.web's key-value panel)."""
        return self._map_values("Image", self._field(plate, well, site).image, NS_SUMMARY)


__all__ = ["OmeroBackend", "NS_RESULTS"]
