"""The local plate store: OME-NGFF HCS plates in Zarr (the embedded default).

Layout of a plate ``<root>/<plate>.zarr`` (as omero-cli-zarr writes them)::

    <plate>.zarr/                  plate group: NGFF ``plate`` + ``fiji_bridge`` attributes
      A/1/                         well group (row letter / column number): NGFF ``well``
        0/  1/ ...                 one multiscale image per field (well-sample index)
          s0/                      the pixels, TCZYX, one chunk per plane
          labels/<name>/           label images (NGFF ``image-label``), written with ngio
          tables/<name>/           field tables in ngio's layout (feature, ROI, ...)
      tables/<name>/               plate-level tables in ngio's layout
      tables/[<well>/]<name>.csv   CSV tables (found by their files)

The NGFF documents (``plate``, ``well``, ``multiscales`` with one
resolution level, ``omero``) are those ome-zarr-py writes
(:mod:`.ngff_meta`, checked against it); the array metadata is zarr 3's own;
the pixels go as chunk files, one a plane (:mod:`.zarr_chunks`).
The default is zarr format 2 = NGFF 0.4, what OMERO's OME-Zarr support,
napari-ome-zarr and Fiji's readers expect; ``zarr_format=3`` (or the
environment ``FIJI_BRIDGE_NGFF_VERSION=0.5``, ``fiji-bridge batch --ngff 0.5``)
writes NGFF 0.5. Both are read; an existing plate keeps its version. Our API is TZCYX; NGFF stores TCZYX: this module converts.
Pixel sizes are the ``scale`` coordinate transformation, channel names the
``omero.channels[].label``.

Writing a field is one transaction: the image is written under a temporary
name, swapped into place, and only then registered in the well and plate
metadata (under a plate lock shared by threads and processes).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import zarr

from ..colours import channel_hex
from ..components import Calibration, format_well, normalize_well, parse_well
from ._local import FieldInfo, Layout, LocalPlateStore, plate_lock, replace_dir, sort_wells
from .base import BackendError, NotFound, ObjectTable, PlateStructure
from .ngff_meta import ensure_groups, group_format, image_attrs, plate_attrs, read_attrs, well_attrs, write_group
from .ngff_tables import TABLE_BACKENDS, write_label, write_tables
from .zarr_chunks import ArrayTemplates, blosc_of, read_planes, write_planes

__all__ = ["NGFF_VERSION_ENV", "TABLE_BACKEND_ENV", "ZarrPlateStore"]

#: the NGFF version of new plates when the store is not told (0.4, or 0.5)
NGFF_VERSION_ENV = "FIJI_BRIDGE_NGFF_VERSION"
#: ngio's table backend when the store is not told (parquet, anndata, csv)
TABLE_BACKEND_ENV = "FIJI_BRIDGE_TABLE_BACKEND"

_AXES = "tczyx"
# ImageJ unit names <-> NGFF (UDUNITS-2) unit names
_SPACE_UNITS = {
    "micron": "micrometer", "microns": "micrometer", "um": "micrometer", "µm": "micrometer",
    "micrometer": "micrometer", "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter",
    "millimeter": "millimeter", "cm": "centimeter", "m": "meter", "meter": "meter", "inch": "inch",
}
_TIME_UNITS = {"s": "second", "sec": "second", "second": "second", "ms": "millisecond",
               "millisecond": "millisecond", "min": "minute", "minute": "minute", "h": "hour", "hour": "hour"}
_IJ_SPACE = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
             "meter": "m", "inch": "inch"}
_IJ_TIME = {"second": "s", "millisecond": "ms", "minute": "min", "hour": "h"}


def _ome(attrs: dict) -> dict:
    """NGFF metadata: under ``ome`` in 0.5, at the top in 0.4."""
    return attrs.get("ome", attrs)


class ZarrPlateStore(LocalPlateStore):
    """OME-Zarr HCS plates under ``root``; plate ``p`` is ``root/p.zarr``."""

    scheme = "zarr"
    plate_suffix = ".zarr"

    def __init__(self, root: str | os.PathLike, *, zarr_format: Optional[int] = None, compression: str = "lz4",
                 table_backend: Optional[str] = None) -> None:
        super().__init__(root)
        if zarr_format is None:  # new plates: NGFF 0.4 unless FIJI_BRIDGE_NGFF_VERSION=0.5
            want = os.environ.get(NGFF_VERSION_ENV, "0.4").strip()
            if want not in ("0.4", "0.5"):
                raise BackendError(f"{NGFF_VERSION_ENV}={want!r}: use 0.4 (zarr v2) or 0.5 (zarr v3)")
            zarr_format = 3 if want == "0.5" else 2
        table_backend = table_backend or os.environ.get(TABLE_BACKEND_ENV, "parquet")
        if zarr_format not in (2, 3):
            raise BackendError(f"zarr_format must be 2 (NGFF 0.4) or 3 (NGFF 0.5), got {zarr_format}")
        if table_backend not in TABLE_BACKENDS:
            raise BackendError(f"table_backend must be one of {', '.join(TABLE_BACKENDS)}, got {table_backend!r}")
        self.zarr_format = zarr_format
        self.compression = compression
        self.table_backend = table_backend
        self._images: dict[tuple[str, str], tuple[Any, str]] = {}
        self._arrays = ArrayTemplates()  # array metadata as zarr wrote it, by kind

    # ------------------------------------------------------------------ reading

    def _is_plate_dir(self, d: Path) -> bool:
        attrs = read_attrs(d)
        return attrs is not None and ("plate" in _ome(attrs) or "fiji_bridge" in attrs)

    def _read_layout(self, plate: str, d: Path) -> tuple[PlateStructure, Layout]:
        attrs = read_attrs(d) or {}
        self.metadata_reads += 1
        extra = attrs.get("fiji_bridge", {})
        meta = _ome(attrs).get("plate", {})
        rows = [str(r["name"]) for r in meta.get("rows", [])]
        cols = [str(c["name"]) for c in meta.get("columns", [])]
        layout = Layout()
        for w in meta.get("wells", []):
            wpath = str(w["path"])
            name = _well_name(wpath, rows, cols, w.get("rowIndex"), w.get("columnIndex"))
            wattrs = read_attrs(d / wpath) or {}
            self.metadata_reads += 1
            images = _ome(wattrs).get("well", {}).get("images", [])
            sites: dict[int, str] = {}
            for i, im in enumerate(images):
                p = str(im["path"])
                sites[int(p) if p.isdigit() else i] = f"{wpath}/{p}"
            if sites:
                layout.wells[name] = dict(sorted(sites.items()))
        wells = sort_wells(list(layout.wells))
        fields = {w: max(layout.wells[w]) + 1 for w in wells}
        sizes: dict[str, Any] = dict(size_t=0, size_z=0, size_c=0, size_y=0, size_x=0, dtype="")
        names: tuple[str, ...] = ()
        cal = Calibration()
        if wells:
            first = layout.wells[wells[0]][min(layout.wells[wells[0]])]
            img_attrs = read_attrs(d / first) or {}
            self.metadata_reads += 1
            info = self._field_info(plate, first)
            t, z, c, y, x = info.shape
            sizes = dict(size_t=t, size_z=z, size_c=c, size_y=y, size_x=x, dtype=info.dtype)
            names = tuple(str(ch.get("label", f"Channel {i}")) for i, ch in enumerate(_ome(img_attrs).get("omero", {}).get("channels", [])))
            cal = _calibration(_ome(img_attrs).get("multiscales", [{}])[0])
        s = PlateStructure(
            plate=plate,
            name=str(meta.get("name") or extra.get("name") or plate),
            wells=wells,
            fields=fields,
            channel_names=names,
            calibration=cal,
            rows=max(len(rows), int(extra.get("rows", 0))),
            columns=max(len(cols), int(extra.get("columns", 0))),
            **sizes,
        )
        return s, layout

    def _image(self, plate: str, rel: str) -> tuple[Any, str]:
        """(zarr array of the field's full-resolution level, its axes)."""
        key = (plate, rel)
        hit = self._images.get(key)
        if hit is not None:
            return hit
        d = self.plate_dir(plate) / rel
        attrs = read_attrs(d)
        if attrs is None:
            raise NotFound(f"field image {rel} of plate {plate!r} is missing on disk")
        ms = _ome(attrs).get("multiscales")
        if not ms:
            raise BackendError(f"{d} is not an OME-Zarr image (no multiscales metadata)")
        axes = _axes_names(ms[0])
        level = str(ms[0]["datasets"][0]["path"])
        try:
            arr = zarr.open_array(str(d / level), mode="r+")
        except Exception as e:  # zarr raises several types for a missing/corrupt array
            raise BackendError(f"cannot open the pixels of {d / level}: {e}") from None
        if arr.ndim != len(axes):
            raise BackendError(f"{d}: {arr.ndim}-D pixels but {len(axes)} axes {axes!r}")
        self._images[key] = (arr, axes)
        return arr, axes

    def refresh(self, plate: Optional[str] = None) -> None:
        super().refresh(plate)
        if plate is None:
            self._images.clear()
        else:
            for k in [k for k in self._images if k[0] == plate]:
                del self._images[k]

    def _field_info(self, plate: str, rel: str) -> FieldInfo:
        arr, axes = self._image(plate, rel)
        dims = dict(zip(axes, arr.shape))
        shape = tuple(int(dims.get(a, 1)) for a in "tzcyx")
        return FieldInfo(shape, np.dtype(arr.dtype).name)  # type: ignore[arg-type]

    def _read_plane(self, plate: str, rel: str, t: int, z: int, c: int) -> np.ndarray:
        arr, axes = self._image(plate, rel)
        at = {"t": t, "z": z, "c": c}
        idx = tuple(at[a] if a in at else slice(None) for a in axes)
        return np.asarray(arr[idx])

    def _read_field(self, plate: str, rel: str) -> np.ndarray:
        arr, axes = self._image(plate, rel)
        if axes == _AXES:  # the store's own axes: planes decoded straight into the TZCYX field
            t, c, z, y, x = arr.shape
            field = np.empty((t, z, c, y, x), dtype=np.dtype(arr.dtype).newbyteorder("="))
            if read_planes(arr, out=field.transpose(0, 2, 1, 3, 4)) is not None:
                return field
            data = np.asarray(arr[...])  # another layout: zarr reads it
        else:
            data = read_planes(arr)  # chunk file by chunk file where the layout allows
            if data is None:
                data = np.asarray(arr[...])
        missing = [a for a in _AXES if a not in axes]
        for _ in missing:
            data = data[np.newaxis]
        order = "".join(missing) + axes
        return np.ascontiguousarray(data.transpose([order.index(a) for a in "tzcyx"]))

    def _read_extra(self, d: Path) -> dict:
        attrs = read_attrs(d)
        if attrs is None:
            raise NotFound(f"no plate at {d}")
        return dict(attrs.get("fiji_bridge", {}))

    # ------------------------------------------------------------------ writing

    def _write_extra(self, d: Path, extra: dict) -> None:
        attrs = read_attrs(d) or {}
        attrs["fiji_bridge"] = extra
        write_group(d, group_format(d) or self.zarr_format, attrs)

    def _init_plate(self, d: Path, plate: str, name: str, rows: int, columns: int, extra: dict) -> None:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            g = zarr.open_group(str(d), mode="w-", zarr_format=self.zarr_format)
        except Exception as e:
            raise BackendError(f"cannot create plate {plate!r} at {d}: {e}") from None
        g.attrs["fiji_bridge"] = dict(extra, name=name, rows=rows, columns=columns)

    def _compressor(self) -> Any:
        if self.zarr_format == 2:
            from numcodecs import Blosc

            return Blosc(cname=self.compression, clevel=5, shuffle=Blosc.SHUFFLE)
        from zarr.codecs import BloscCodec

        return BloscCodec(cname=self.compression, clevel=5, shuffle="shuffle")

    def _write_field(
        self,
        plate: str,
        well: str,
        site: int,
        array: np.ndarray,
        name: str,
        channel_names: Sequence[str],
        calibration: Calibration,
    ) -> str:
        d = self.plate_dir(plate)
        fmt = group_format(d) or self.zarr_format  # the zarr format (NGFF version) follows the plate group
        wpath = self._well_path(d, well)
        tczyx = np.ascontiguousarray(array).transpose(0, 2, 1, 3, 4)  # a view: each (y, x) plane stays contiguous
        tmp = d / wpath / f"tmp_{site}_{uuid.uuid4().hex[:12]}"
        ensure_groups(d, wpath, fmt)
        try:
            self._write_image(tmp, fmt, tczyx, name, channel_names, calibration)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = d / wpath / str(site)
        with plate_lock(d):
            replace_dir(tmp, final, trash_prefix="trash_")
            self._register_field(d, fmt, well, wpath, site)
        self._images.pop((plate, f"{wpath}/{site}"), None)
        return f"{wpath}/{site}"

    # ------------------------------------------------ labels and tables (ngio)

    def _field_dir(self, plate: str, well: str, site: int) -> Path:
        well = normalize_well(well)
        return self._existing_plate_dir(plate) / self._field_rel(plate, well, int(site))

    def save_labels(self, plate, well, site, name, labels, *, colors=None) -> str:  # type: ignore[override]
        """The label image ``<field>/labels/<name>`` (see :mod:`.ngff_tables`)."""
        d = self._field_dir(plate, well, site)
        with plate_lock(self.plate_dir(plate)):
            write_label(d, name, np.asarray(labels))
        return f"/{self.scheme}/plate_{plate}/{normalize_well(well)}/s{int(site):03d}/labels/{name}"

    def save_field_tables(self, plate, well, site, tables) -> list[str]:  # type: ignore[override]
        """Tables in ``<field>/tables/`` in ngio's layout."""
        tables = list(tables)
        if not tables:
            return []
        d = self._field_dir(plate, well, site)
        with plate_lock(self.plate_dir(plate)):
            write_tables(d, tables, backend=self.table_backend)
        return [f"/{self.scheme}/plate_{plate}/{normalize_well(well)}/s{int(site):03d}/tables/{t.name}" for t in tables]

    def save_plate_tables(self, plate: str, tables: Sequence[ObjectTable], *, writer: Any = None) -> list[str]:
        """Tables in ``<plate>.zarr/tables/`` in ngio's layout (written by
        ``writer``, a :class:`~.ngff_tables.TableWriterProcess`, when given)."""
        tables = list(tables)
        if not tables:
            return []
        d = self._existing_plate_dir(plate)
        if "plate" not in _ome(read_attrs(d) or {}):
            raise BackendError(f"cannot write plate tables {[t.name for t in tables]}: plate {plate!r} has no fields yet "
                               f"(NGFF plate metadata comes with its first field)")
        with plate_lock(d):
            (writer.write if writer is not None else write_tables)(d, tables, plate=True, backend=self.table_backend)
        return [f"/{self.scheme}/plate_{plate}/tables/{t.name}" for t in tables]

    def _well_path(self, d: Path, well: str) -> str:
        """``row/column`` of a well: the plate's own names when it has the well's
        row or column already (foreign plates may pad), else ``A/1`` style."""
        r, c = parse_well(well)
        attrs = read_attrs(d) or {}
        meta = _ome(attrs).get("plate", {})
        for w in meta.get("wells", []):
            rows = [str(x["name"]) for x in meta.get("rows", [])]
            cols = [str(x["name"]) for x in meta.get("columns", [])]
            if _well_name(str(w["path"]), rows, cols, w.get("rowIndex"), w.get("columnIndex")) == well:
                return str(w["path"])
        return f"{format_well(r, 0)[:-2]}/{c + 1}"

    def _register_field(self, d: Path, fmt: int, well: str, wpath: str, site: int) -> None:
        """Add the field to its well's and the well to the plate's metadata
        (caller holds the plate lock)."""
        wattrs = read_attrs(d / wpath) or {}
        images = _ome(wattrs).get("well", {}).get("images", [])
        paths = {str(im["path"]) for im in images}
        if str(site) not in paths:
            images = sorted(images + [{"path": str(site)}], key=lambda im: (not str(im["path"]).isdigit(), int(im["path"]) if str(im["path"]).isdigit() else 0, str(im["path"])))
            write_group(d / wpath, fmt, well_attrs(fmt, images, wattrs))
        attrs = read_attrs(d) or {}
        extra = attrs.get("fiji_bridge", {})
        meta = _ome(attrs).get("plate", {})
        rows = [str(x["name"]) for x in meta.get("rows", [])]
        cols = [str(x["name"]) for x in meta.get("columns", [])]
        wells = [str(w["path"]) for w in meta.get("wells", [])]
        rname, cname = wpath.split("/")
        r, c = parse_well(well)
        n_rows = max(int(extra.get("rows", 0)), r + 1)
        n_cols = max(int(extra.get("columns", 0)), c + 1)
        for i in range(n_rows):  # our plates: every row letter up to the last
            letter = format_well(i, 0)[:-2]
            if letter not in rows and (not rows or _is_letter_run(rows)):
                rows.append(letter)
        if rname not in rows:
            rows.append(rname)
        for i in range(n_cols):
            if str(i + 1) not in cols and (not cols or _is_number_run(cols)):
                cols.append(str(i + 1))
        if cname not in cols:
            cols.append(cname)
        if _is_letter_run(rows):
            rows.sort(key=lambda n: parse_well(n + "1")[0])
        if _is_number_run(cols):
            cols.sort(key=int)
        if wpath not in wells:
            wells.append(wpath)
        if _is_letter_run(rows) and _is_number_run(cols):
            wells.sort(key=lambda p: (rows.index(p.split("/")[0]), cols.index(p.split("/")[1])) if p.count("/") == 1 and p.split("/")[0] in rows and p.split("/")[1] in cols else (len(rows), 0))
        field_count = max(meta.get("field_count", 0), site + 1)
        name = str(meta.get("name") or extra.get("name") or d.stem)
        same = (rows == [str(x["name"]) for x in meta.get("rows", [])]
                and cols == [str(x["name"]) for x in meta.get("columns", [])]
                and wells == [str(w["path"]) for w in meta.get("wells", [])]
                and field_count == meta.get("field_count") and name == meta.get("name"))
        if not same:  # a new well, row, column or field index: rewrite the plate's metadata
            write_group(d, fmt, plate_attrs(fmt, rows, cols, wells, name=name, field_count=field_count, existing=attrs,
                                            acquisitions=meta.get("acquisitions")))

    def _write_planes(self, plate: str, rel: str, info: FieldInfo, planes: Sequence[tuple[int, int, int, np.ndarray]]) -> None:
        arr, axes = self._image(plate, rel)
        for t, z, c, p in planes:
            at = {"t": t, "z": z, "c": c}
            arr[tuple(at[a] if a in at else slice(None) for a in axes)] = p

    def _write_image(self, tmp: Path, fmt: int, tczyx: np.ndarray, name: str, channel_names: Sequence[str],
                     calibration: Calibration) -> None:
        """One OME-Zarr image (one resolution level ``s0``) at ``tmp``: the
        group and its NGFF metadata (:mod:`.ngff_meta`: axes, scale and
        translation, ``omero``), the array's metadata as zarr writes it
        (:class:`~.zarr_chunks.ArrayTemplates`), then the pixels, one chunk a
        plane (:func:`~.zarr_chunks.write_planes`)."""
        t, c, z, y, x = tczyx.shape
        scale, units = _scale_units(calibration)
        datasets = [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [scale[a] for a in _AXES]},
            {"type": "translation", "translation": [0.0] * len(_AXES)},
        ]}]
        axes = [{"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space"), **({"unit": units[a]} if a in units else {})}
                for a in _AXES]
        write_group(tmp, fmt, image_attrs(fmt, datasets=datasets, axes=axes, name=name,
                                          omero=_omero_meta(tczyx, channel_names, name)),
                    atomic=False)  # the folder joins the plate by its rename
        compressor = self._compressor()
        kwargs: dict[str, Any] = dict(shape=tczyx.shape, dtype=tczyx.dtype, chunks=(1, 1, 1, min(y, 4096), min(x, 4096)),
                                      compressors=[compressor], fill_value=0)
        if fmt == 3:
            kwargs["dimension_names"] = list(_AXES)
            kwargs["chunk_key_encoding"] = {"name": "default", "separator": "/"}
        else:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}

        def create() -> Any:
            return zarr.open_group(str(tmp), mode="r+", zarr_format=fmt, use_consolidated=False).create_array("s0", **kwargs)

        kind = (fmt, tczyx.shape, tczyx.dtype.str, kwargs["chunks"], self.compression)
        meta = self._arrays.make(kind, tmp / "s0", create)
        if y <= 4096 and x <= 4096:
            write_planes(tmp / "s0", tczyx, blosc_of(compressor), meta.encode_chunk_key)
        else:  # planes of several chunks: zarr's own writer
            zarr.open_array(str(tmp / "s0"), mode="r+", zarr_format=fmt)[...] = tczyx

    def _grow_field(self, plate: str, rel: str, info: FieldInfo, shape: tuple[int, ...]) -> None:
        arr, axes = self._image(plate, rel)
        if any(a not in axes for a in "tzc"):
            raise BackendError(f"cannot grow field {rel} of plate {plate!r}: its axes are {axes!r}, not tczyx")
        want = dict(zip("tzcyx", shape))
        with plate_lock(self.plate_dir(plate)):
            arr.resize(tuple(want[a] for a in axes))
            g = zarr.open_group(str(self.plate_dir(plate) / rel), mode="r+")
            attrs = dict(g.attrs)
            ome = _ome(attrs)
            chans = ome.get("omero", {}).get("channels")
            if chans is not None and len(chans) < want["c"]:
                names = [ch.get("label", "") for ch in chans]
                colours = channel_hex(names, want["c"])
                for i in range(len(chans), want["c"]):
                    chans.append(_channel(f"Channel {i}", colours[i], np.dtype(info.dtype), 0, 0))
                if "ome" in attrs:
                    g.attrs["ome"] = ome
                else:
                    g.attrs["omero"] = ome["omero"]
        self._images.pop((plate, rel), None)


# ----------------------------------------------------------------- metadata


def _well_name(wpath: str, rows: list[str], cols: list[str], ri: Any, ci: Any) -> str:
    try:
        if ri is not None and ci is not None:
            return normalize_well(rows[int(ri)] + str(int(cols[int(ci)])))
    except (IndexError, ValueError):
        pass
    try:
        r, c = wpath.split("/")
        return normalize_well(r + str(int(c)))
    except ValueError:
        if ri is not None and ci is not None:
            return format_well(int(ri), int(ci))
        raise BackendError(f"cannot name the well at {wpath!r}") from None


def _is_letter_run(rows: list[str]) -> bool:
    return all(r.isalpha() and len(r) <= 2 for r in rows)


def _is_number_run(cols: list[str]) -> bool:
    return all(c.isdigit() and not c.startswith("0") for c in cols)


def _axes_names(multiscale: dict) -> str:
    axes = multiscale.get("axes")
    if not axes:  # NGFF 0.1/0.2: always 5-D TCZYX
        return _AXES
    return "".join(str(a["name"] if isinstance(a, dict) else a).lower()[0] for a in axes)


def _scale_units(cal: Calibration) -> tuple[dict[str, float], dict[str, str]]:
    scale = {
        "t": float(cal.frame_interval or 1.0),
        "c": 1.0,
        "z": float(cal.pixel_depth or 1.0),
        "y": float(cal.pixel_height or cal.pixel_width or 1.0),
        "x": float(cal.pixel_width or cal.pixel_height or 1.0),
    }
    units: dict[str, str] = {}
    space = _SPACE_UNITS.get((cal.unit or "").strip().lower()) or _SPACE_UNITS.get((cal.unit or "").strip())
    if cal.is_set and space:
        units.update(x=space, y=space, z=space)
    tunit = _TIME_UNITS.get((cal.time_unit or "").strip().lower())
    if cal.frame_interval and tunit:
        units["t"] = tunit
    return scale, units


def _calibration(multiscale: dict) -> Calibration:
    axes = multiscale.get("axes") or []
    names = _axes_names(multiscale)
    units = {}
    for a in axes:
        if isinstance(a, dict) and a.get("unit"):
            units[str(a["name"]).lower()[0]] = str(a["unit"])
    scale: dict[str, float] = {}
    ds = (multiscale.get("datasets") or [{}])[0]
    for tr in ds.get("coordinateTransformations", []) or []:
        if tr.get("type") == "scale":
            scale = dict(zip(names, (float(v) for v in tr["scale"])))
    space = units.get("x") or units.get("y")
    if not space:
        return Calibration()
    return Calibration(
        pixel_width=scale.get("x"),
        pixel_height=scale.get("y"),
        pixel_depth=scale.get("z") if "z" in units else None,
        unit=_IJ_SPACE.get(space, space),
        frame_interval=scale.get("t") if "t" in units else None,
        time_unit=_IJ_TIME.get(units.get("t", "second"), units.get("t", "s")),
    )


def _channel(label: str, colour: str, dtype: np.dtype, lo: float, hi: float) -> dict:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        dmin, dmax = float(info.min), float(info.max)
    else:
        dmin, dmax = float(min(lo, 0.0)), float(max(hi, 1.0))
    return {
        "label": label,
        "color": colour,
        "active": True,
        "window": {"min": dmin, "max": dmax, "start": float(lo), "end": float(hi if hi > lo else dmax)},
    }


def _omero_meta(tczyx: np.ndarray, names: Sequence[str], name: str) -> dict:
    n = tczyx.shape[1]
    labels = [names[i] if i < len(names) else f"Channel {i}" for i in range(n)]
    colours = channel_hex(list(names), n)  # as Fiji draws them
    chans = []
    for i in range(n):
        plane = tczyx[:, i]
        lo, hi = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 0.0)
        chans.append(_channel(labels[i], colours[i], tczyx.dtype, lo, hi))
    return {"name": name, "channels": chans, "rdefs": {"model": "color" if n > 1 else "greyscale", "defaultT": 0, "defaultZ": tczyx.shape[2] // 2}}
