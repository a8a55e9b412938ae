"""A plate as a folder of OME-TIFF files: one file per well field.

For users who live in TIFF: every field opens in Fiji (Bio-Formats) as a
hyperstack with its channel names and pixel sizes. Layout::

    <root>/<plate>/
      plate.json                     name, rows/columns, provenance, tables
      A01_s000.ome.tif  A01_s001.ome.tif  B03_s000.ome.tif ...
      A01_s000.<label>.labels.ome.tif  a label image of that field (TZYX, 0 = background)
      A01_s000.rois.zip               its ImageJ ROIs (opens in Fiji's ROI Manager)
      tables/[<well>/]<name>.csv|json
      tables/<well>/<name>_s000.csv|parquet   typed field tables (same columns as
                                      the OME-Zarr store's: feature, ROI, masking ROI)

Each file holds the field's planes in T, Z, C order (OME ``DimensionOrder``
XYCZT), written by tifffile with OME-XML (``Channel/Name``,
``PhysicalSizeX/Y/Z``, ``TimeIncrement``). Wells and fields come from the
file names (a folder of such files is a plate even without ``plate.json``),
sizes and channels from the first field's OME-XML.

ImageJ 1 without Bio-Formats does not read OME-XML: it opens such a file as a
plain stack of T*Z*C slices in this order, which
``run("Stack to Hyperstack...", "order=xyczt(default) channels=C slices=Z frames=T")``
turns into the right hyperstack (see :func:`imagej1_hyperstack_macro`).
tifffile cannot write OME and ImageJ metadata in one file; OME-TIFF, read by
Bio-Formats in Fiji and by OMERO, is the format this store promises.

Writing is atomic per field (a temporary file replaced into place); saving
single planes rewrites the field's file, so prefer ``save_field`` or
``save_batch`` of a whole field.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import tifffile

from ..components import Calibration
from ._local import FieldInfo, Layout, LocalPlateStore, plate_lock, sort_wells, update_json
from .base import BackendError, NotFound, ObjectTable, PlateStructure

__all__ = ["OmeTiffStore", "imagej1_hyperstack_macro", "field_file_name"]

_FIELD_RE = re.compile(r"^(?P<well>[A-Z]{1,2}\d{2,3})_s(?P<site>\d+)\.ome\.tiff?$")
_OME_UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "µm": "µm", "micrometer": "µm", "nm": "nm",
              "nanometer": "nm", "mm": "mm", "millimeter": "mm", "cm": "cm", "m": "m", "inch": "in"}
_IJ_UNITS = {"µm": "micron", "um": "micron", "nm": "nm", "mm": "mm", "cm": "cm", "m": "m", "in": "inch"}
_HANDLES = 32  # open TiffFiles kept per store


def field_file_name(well: str, site: int) -> str:
    """``("A01", 1) -> "A01_s001.ome.tif"``."""
    return f"{well}_s{int(site):03d}.ome.tif"


def imagej1_hyperstack_macro(size_c: int, size_z: int, size_t: int) -> str:
    """The ImageJ 1 macro line that makes an opened field file a hyperstack."""
    return (
        f'run("Stack to Hyperstack...", "order=xyczt(default) channels={size_c} '
        f'slices={size_z} frames={size_t} display=Composite");'
    )


class OmeTiffStore(LocalPlateStore):
    """OME-TIFF plates under ``root``; plate ``p`` is the folder ``root/p``."""

    scheme = "ometiff"

    def __init__(self, root: str | os.PathLike, *, compression: Optional[str] = None, table_format: str = "csv") -> None:
        super().__init__(root)
        if table_format not in ("csv", "parquet"):
            raise BackendError(f"table_format must be csv or parquet, got {table_format!r}")
        self.compression = compression  # None: uncompressed, read by every TIFF reader
        self.table_format = table_format
        self._handles: dict[str, tuple[tuple[int, int], tifffile.TiffFile]] = {}

    def close(self) -> None:
        for _, tif in self._handles.values():
            tif.close()
        self._handles.clear()

    # ------------------------------------------------------------------ reading

    def _is_plate_dir(self, d: Path) -> bool:
        return (d / "plate.json").is_file() or any(_FIELD_RE.match(p.name) for p in d.glob("*.ome.tif*"))

    def _plate_json(self, d: Path) -> dict:
        import json

        try:
            return json.loads((d / "plate.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise BackendError(f"{d / 'plate.json'} is not valid JSON: {e}") from None

    def _read_layout(self, plate: str, d: Path) -> tuple[PlateStructure, Layout]:
        extra = self._plate_json(d).get("fiji_bridge", {})
        self.metadata_reads += 1
        layout = Layout()
        for p in d.iterdir():
            m = _FIELD_RE.match(p.name)
            if m:
                layout.wells.setdefault(m.group("well"), {})[int(m.group("site"))] = p.name
        self.metadata_reads += 1
        for w in layout.wells:
            layout.wells[w] = dict(sorted(layout.wells[w].items()))
        wells = sort_wells(list(layout.wells))
        sizes: dict[str, Any] = dict(size_t=0, size_z=0, size_c=0, size_y=0, size_x=0, dtype="")
        names: tuple[str, ...] = ()
        cal = Calibration()
        if wells:
            first = layout.wells[wells[0]][min(layout.wells[wells[0]])]
            self.metadata_reads += 1
            info = self._field_info(plate, first)
            t, z, c, y, x = info.shape
            sizes = dict(size_t=t, size_z=z, size_c=c, size_y=y, size_x=x, dtype=info.dtype)
            names, cal, _ = _ome_info(self._tif(plate, first))
        from ..components import parse_well

        rows = max([int(extra.get("rows", 0))] + [parse_well(w)[0] + 1 for w in wells])
        cols = max([int(extra.get("columns", 0))] + [parse_well(w)[1] + 1 for w in wells])
        s = PlateStructure(
            plate=plate,
            name=str(extra.get("name") or plate),
            wells=wells,
            fields={w: max(layout.wells[w]) + 1 for w in wells},
            channel_names=names,
            calibration=cal,
            rows=rows,
            columns=cols,
            **sizes,
        )
        return s, layout

    def _tif(self, plate: str, rel: str) -> tifffile.TiffFile:
        """An open TiffFile, reused while the file is unchanged."""
        path = self.plate_dir(plate) / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"field file {path} is missing") from None
        key = str(path)
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._handles.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        if hit is not None:
            hit[1].close()
        try:
            tif = tifffile.TiffFile(path)
        except Exception as e:
            raise BackendError(f"cannot read {path}: {e}") from None
        if len(self._handles) >= _HANDLES:
            _, old = self._handles.pop(next(iter(self._handles)))
            old.close()
        self._handles[key] = (stamp, tif)
        return tif

    def _axes(self, tif: tifffile.TiffFile) -> tuple[str, tuple[int, ...]]:
        s = tif.series[0]
        axes, shape = s.axes.upper(), tuple(s.shape)
        if "C" not in axes and "S" in axes:
            axes = axes.replace("S", "C")
        for a, n in zip(axes, shape):
            if a not in "TZCYX" and n != 1:
                raise BackendError(f"{tif.filename}: axis {a!r} of size {n} is not T, Z, C, Y or X")
        return axes, shape

    def _field_info(self, plate: str, rel: str) -> FieldInfo:
        tif = self._tif(plate, rel)
        axes, shape = self._axes(tif)
        dims = dict(zip(axes, shape))
        return FieldInfo(tuple(int(dims.get(a, 1)) for a in "TZCYX"), np.dtype(tif.series[0].dtype).name)  # type: ignore[arg-type]

    def _read_plane(self, plate: str, rel: str, t: int, z: int, c: int) -> np.ndarray:
        tif = self._tif(plate, rel)
        axes, shape = self._axes(tif)
        if axes.endswith("YX"):
            lead_axes, lead_shape = axes[:-2], shape[:-2]
            at = {"T": t, "Z": z, "C": c}
            idx = int(np.ravel_multi_index(tuple(at.get(a, 0) for a in lead_axes), lead_shape)) if lead_axes else 0
            page = tif.series[0].pages[idx]
            if page is not None:
                return page.asarray()
        return self._read_field(plate, rel)[t, z, c]  # unusual layouts (RGB samples): read all

    def _read_field(self, plate: str, rel: str) -> np.ndarray:
        tif = self._tif(plate, rel)
        axes, _ = self._axes(tif)
        data = tif.series[0].asarray()
        keep = [i for i, a in enumerate(axes) if a in "TZCYX"]
        data = data.reshape([data.shape[i] for i in keep])
        axes = "".join(axes[i] for i in keep)
        missing = [a for a in "TZCYX" if a not in axes]
        for _ in missing:
            data = data[np.newaxis]
        order = "".join(missing) + axes
        return np.ascontiguousarray(data.transpose([order.index(a) for a in "TZCYX"]))

    def _read_extra(self, d: Path) -> dict:
        if not d.is_dir():
            raise NotFound(f"no plate at {d}")
        return dict(self._plate_json(d).get("fiji_bridge", {}))

    # ------------------------------------------------------------------ writing

    def _write_extra(self, d: Path, extra: dict) -> None:
        update_json(d / "plate.json", lambda data: data.__setitem__("fiji_bridge", extra))

    def _init_plate(self, d: Path, plate: str, name: str, rows: int, columns: int, extra: dict) -> None:
        d.mkdir(parents=True, exist_ok=True)
        with plate_lock(d):
            update_json(d / "plate.json", lambda data: data.__setitem__("fiji_bridge", dict(extra, name=name, rows=rows, columns=columns)))

    def _write_tiff(self, path: Path, array: np.ndarray, name: str, names: Sequence[str], cal: Calibration) -> None:
        meta: dict[str, Any] = {"axes": "TZCYX", "Name": name}
        if names:
            meta["Channel"] = {"Name": list(names)}
        if cal.pixel_width is not None or cal.pixel_height is not None:
            unit = _OME_UNITS.get((cal.unit or "").strip(), _OME_UNITS.get((cal.unit or "").lower()))
            meta["PhysicalSizeX"] = float(cal.pixel_width or cal.pixel_height)  # type: ignore[arg-type]
            meta["PhysicalSizeY"] = float(cal.pixel_height or cal.pixel_width)  # type: ignore[arg-type]
            if cal.pixel_depth is not None:
                meta["PhysicalSizeZ"] = float(cal.pixel_depth)
            if unit:
                for k in ("X", "Y", "Z"):
                    if f"PhysicalSize{k}" in meta:
                        meta[f"PhysicalSize{k}Unit"] = unit
        if cal.frame_interval is not None:
            meta["TimeIncrement"] = float(cal.frame_interval)
            meta["TimeIncrementUnit"] = cal.time_unit or "s"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            tifffile.imwrite(
                tmp,
                array,
                ome=True,
                photometric="minisblack",
                metadata=meta,
                compression=self.compression,
                bigtiff=array.nbytes > 2**31,
            )
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._handles.pop(str(path), None)

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
        rel = field_file_name(well, site)
        self._write_tiff(self.plate_dir(plate) / rel, np.ascontiguousarray(array), name, channel_names, calibration)
        return rel

    # ------------------------------------------------ labels, tables, ROIs

    def _field_stem(self, plate: str, well: str, site: int) -> tuple[Path, str]:
        rel = self._field_rel(plate, well, int(site))  # NotFound when the field is not there
        return self.plate_dir(plate), rel[: -len(".ome.tif")] if rel.endswith(".ome.tif") else Path(rel).stem

    def save_labels(self, plate, well, site, name, labels, *, colors=None) -> str:  # type: ignore[override]
        """``<field>.<name>.labels.ome.tif`` beside the field (TZYX)."""
        d, stem = self._field_stem(plate, well, site)
        lab = np.asarray(labels)
        info = self._field_info(plate, self._field_rel(plate, well, int(site)))
        if lab.ndim != 4 or lab.shape[0] != info.shape[0] or lab.shape[2:] != info.shape[3:]:
            raise BackendError(f"label {name!r} of shape {lab.shape} does not fit field {well}/s{site} "
                               f"(TZCYX {info.shape}): expected TZYX with the same T, Y, X")
        if not np.issubdtype(lab.dtype, np.integer):
            raise BackendError(f"label {name!r}: labels are integers, got {lab.dtype}")
        names, cal, _ = _ome_info(self._tif(plate, self._field_rel(plate, well, int(site))))
        path = d / f"{stem}.{name}.labels.ome.tif"
        with plate_lock(d):
            self._write_tiff(path, np.ascontiguousarray(lab[:, :, np.newaxis]), f"{stem} {name}", [name], cal)
        return str(path)

    def _write_object_table(self, d: Path, rel: str, table: ObjectTable) -> Path:
        if self.table_format == "parquet":
            import io

            import pandas as pd

            buf = io.BytesIO()
            pd.DataFrame({k: list(v) for k, v in table.columns.items()}).to_parquet(buf, index=False)
            path = d / "tables" / f"{rel}.parquet"
            from ._local import atomic_write

            atomic_write(path, buf.getvalue())
            return path
        return d / "tables" / f"{rel}.csv"

    def save_field_tables(self, plate, well, site, tables) -> list[str]:  # type: ignore[override]
        """``tables/<well>/<name>_s<site>.csv`` (or ``.parquet``), the same columns as in OME-Zarr."""
        out = []
        d, _ = self._field_stem(plate, well, site)
        for t in tables:
            if self.table_format == "csv":
                out.append(self.save_table(plate, t.name, dict(t.columns), well=well, site=site))
            else:
                out.append(str(self._write_object_table(d, f"{well}/{t.name}_s{int(site):03d}", t)))
        return out

    def save_plate_tables(self, plate: str, tables: Sequence[ObjectTable]) -> list[str]:
        """``tables/<name>.csv`` (or ``.parquet``) beside the plate."""
        d = self._existing_plate_dir(plate)
        out = []
        for t in tables:
            if self.table_format == "csv":
                out.append(self.save_table(plate, t.name, dict(t.columns)))
            else:
                out.append(str(self._write_object_table(d, t.name, t)))
        return out

    def save_rois(self, plate, well, site, rois) -> str:  # type: ignore[override]
        """The JSON of every store, and ``<field>.rois.zip``: the ``.roi``
        files as Fiji's ROI Manager saves and opens them."""
        import io
        import zipfile

        from ._local import atomic_write

        json_path = super().save_rois(plate, well, site, rois)
        d, stem = self._field_stem(plate, well, site)
        buf = io.BytesIO()
        seen: dict[str, int] = {}
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for i, r in enumerate(rois):
                name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(r.name or f"roi_{i + 1:04d}")) or f"roi_{i + 1:04d}"
                n = seen[name] = seen.get(name, 0) + 1
                z.writestr(f"{name}.roi" if n == 1 else f"{name}-{n}.roi", bytes(r.data))
        atomic_write(d / f"{stem}.rois.zip", buf.getvalue())
        return json_path

    def _rewrite(self, plate: str, rel: str, data: np.ndarray) -> None:
        names, cal, name = _ome_info(self._tif(plate, rel))
        names = tuple(names) + tuple(f"Channel {i}" for i in range(len(names), data.shape[2])) if names else ()
        with plate_lock(self.plate_dir(plate)):
            self._write_tiff(self.plate_dir(plate) / rel, data, name or Path(rel).stem, names, cal)

    def _write_planes(self, plate: str, rel: str, info: FieldInfo, planes: Sequence[tuple[int, int, int, np.ndarray]]) -> None:
        data = self._read_field(plate, rel)
        for t, z, c, p in planes:
            data[t, z, c] = p
        self._rewrite(plate, rel, data)

    def _grow_field(self, plate: str, rel: str, info: FieldInfo, shape: tuple[int, ...]) -> None:
        old = self._read_field(plate, rel)
        data = np.zeros(shape, dtype=old.dtype)
        data[tuple(slice(0, n) for n in old.shape)] = old
        self._rewrite(plate, rel, data)


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return x if isinstance(x, list) else [x]


def _ome_info(tif: tifffile.TiffFile) -> tuple[tuple[str, ...], Calibration, str]:
    """Channel names, calibration and image name from a file's OME-XML."""
    if not tif.ome_metadata:
        return (), Calibration(), ""
    try:
        ome = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
    except Exception:  # malformed OME-XML: pixels still readable
        return (), Calibration(), ""
    image = _as_list(ome.get("Image"))[0] if ome.get("Image") else {}
    px = image.get("Pixels", {})
    chans = _as_list(px.get("Channel"))
    names = tuple(str(c.get("Name")) for c in chans if isinstance(c, dict) and c.get("Name") is not None)
    if len(names) != len(chans):
        names = ()
    cal = Calibration()
    if px.get("PhysicalSizeX") is not None or px.get("PhysicalSizeY") is not None:
        unit = str(px.get("PhysicalSizeXUnit", "µm"))
        cal = Calibration(
            pixel_width=_f(px.get("PhysicalSizeX")),
            pixel_height=_f(px.get("PhysicalSizeY")),
            pixel_depth=_f(px.get("PhysicalSizeZ")),
            unit=_IJ_UNITS.get(unit, unit),
            frame_interval=_f(px.get("TimeIncrement")),
            time_unit=str(px.get("TimeIncrementUnit", "s")),
        )
    elif px.get("TimeIncrement") is not None:
        cal = Calibration(frame_interval=_f(px.get("TimeIncrement")), time_unit=str(px.get("TimeIncrementUnit", "s")))
    return names, cal, str(image.get("Name") or "")


def _f(v: Any) -> Optional[float]:
    return None if v is None else float(v)
