"""Macro outputs back to a plate store, through the shared virtual backend.

What one macro run produced (a :class:`~fiji_bridge.engine.base.MacroResult`)
goes to a derived plate at the well and field it was computed from:

* images: the first image becomes the field ``(well, site)`` of the plate the
  URI names; each further image goes to the same field of a sibling plate
  ``<plate>_<image title>`` (a plate holds one image per field);
* tables: one CSV per table in the well's folder,
  ``<well>/<table>_s<site>.csv``, with ``plate``, ``well``, ``field`` columns
  first (so per-field tables concatenate into a plate table);
* ROIs: ``<well>/rois_s<site>.json`` (ImageJ ``.roi`` bytes in base64 plus
  polygon coordinates; the OME-TIFF store adds an ImageJ ``.zip``).

For the NGFF tools (napari, ngio, Fractal), on stores that hold them (the
OME-Zarr and OME-TIFF stores), when labels are asked for or the macro left
ROIs (the per-field tables describe objects; without them every field's
rows are in the batch's plate-level tables, and ~60 ms of table writes per
field are saved), also:

* labels: the output images ``labels`` names (:class:`~fiji_bridge.objects.LabelSpec`)
  become label images of the field (binary masks stay 0/1 unless
  ``objects`` asks for connected components); the field image is then the
  first other output image, or the input field itself (``input``);
* per-field tables: ``FOV_ROI_table`` (the field's box), for each labels of
  objects ``<label>_ROI_table`` (masking ROI: the objects' boxes) and, when
  the ``Results`` table has one row per object, ``<label>_features``
  (the feature table: the label value as index, ImageJ's columns); every
  other table as a generic table ``<table>``; the macro's ROIs as the ROI
  table ``imagej_ROI_table`` (and a label image when ``labels`` has
  ``rois=NAME``).

:func:`save_result` is what the bridge calls for ``run_macro(...,
save_to=URI)`` and what ``fiji-bridge batch`` calls for each work unit.

Writes to a remote store (OMERO: ``backend.is_remote``) go through the
uploader (:mod:`fiji_bridge.upload`): the batch passes its own; otherwise
:func:`save_result` uses one for the call (retries with backoff on
connection errors, a local fallback store under :func:`fallback_root` when
the server stays away) and waits for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .backends.base import columns_to_csv
from .components import Calibration, PlaneComponents, normalize_well
from .objects import ROIS, LabelSpec, field_box, object_boxes, parse_label_specs, roi_boxes, rois_to_labels, to_labels

__all__ = ["OutputError", "save_plate_ngff", "save_result", "table_file_name", "unit_columns", "open_or_create_plate", "fallback_root"]

_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


class OutputError(ValueError):
    """Outputs cannot be saved as asked (no well, no plate in the URI...)."""


def slug(name: str) -> str:
    """A table or image title as a file-name stem: ``"Nuclei counts" -> "nuclei_counts"``."""
    s = _SLUG_RE.sub("_", str(name).strip()).strip("_").lower()
    return s or "table"


def table_file_name(table: str, site: int) -> str:
    """The per-field table's name (without ``.csv``): ``results_s002``."""
    return f"{slug(table)}_s{int(site):03d}"


def unit_columns(columns: Mapping[str, Any], *, plate: str, well: str, site: int) -> dict[str, list]:
    """A table's columns with ``plate``, ``well``, ``field`` first. Columns
    of the table that carry those names are kept, renamed ``<name>_``."""
    n = max((len(v) for v in columns.values()), default=0)
    out: dict[str, list] = {"plate": [plate] * n, "well": [well] * n, "field": [int(site)] * n}
    for k, v in columns.items():
        key = k
        while key in out:
            key = key + "_"
        out[key] = list(np.asarray(v).tolist()) if isinstance(v, np.ndarray) else list(v)
    return out


def fallback_root(backend: Any) -> Path:
    """The local store (a folder of OME-Zarr plates) where writes to the
    remote ``backend`` land when its server stays away:
    ``<spill root>/fallback/<scheme>_<host>_<port>`` (see :func:`fiji_bridge.upload.spill_root`)."""
    from .upload import spill_root

    params = getattr(backend, "params", None)
    where = str(getattr(params, "address", "") or "")
    return spill_root() / "fallback" / slug(f"{backend.scheme}_{where}" if where else backend.scheme)


def open_or_create_plate(uri: str, *, like: Any = None, provenance: Optional[Mapping[str, Any]] = None) -> tuple[Any, str]:
    """``(backend, plate id)`` of the plate ``uri`` names, created when it
    does not exist yet."""
    from .backends import open_plate

    backend, pid = open_plate(uri)
    if not pid:
        raise OutputError(f"{uri!r} names a store, not a plate: add the plate name (e.g. zarr:///data/derived.zarr)")
    if not backend.exists(f"/{backend.scheme}/plate_{pid}"):
        pid = backend.create_plate(pid, like, provenance=dict(provenance or {}))
    return backend, pid


def save_result(
    result: Any,
    uri: str,
    *,
    well: str,
    site: int,
    source: Optional[Mapping[str, Any]] = None,
    backend: Any = None,
    plate: Optional[str] = None,
    plate_label: Optional[str] = None,
    uploader: Any = None,
    upload_timeout: Optional[float] = None,
    labels: Any = None,
    input: Any = None,
    labels_also_to: Sequence[tuple[Any, str]] = (),
    tables_written: Optional[dict[str, str]] = None,
) -> list[str]:
    """Write a macro's images and tables into the derived plate ``uri`` at
    ``well``/``site``; returns the virtual paths written.

    ``source`` (what the data came from: source plate, stack key...) is
    recorded as provenance when the plate has to be created. ``backend`` and
    ``plate`` may be given instead of opening ``uri`` (batch reuses one
    backend). ``plate_label`` fills the ``plate`` column of tables (default:
    ``source["plate"]`` or the derived plate id).

    ``uploader``: an :class:`~fiji_bridge.upload.Uploader` the fields,
    tables and ROIs are submitted to (they are written when it gets to them;
    the batch does this). Without one, a remote store gets an uploader for
    this call, waited for (at most ``upload_timeout`` s): paths that went to
    the local fallback store come back as ``"<path> (server unavailable:
    saved in the local fallback store <root>)"``, and :class:`OutputError`
    says what could not be saved anywhere.

    ``labels``: which output images are label images (``"mask=nuclei:objects"``
    or :class:`~fiji_bridge.objects.LabelSpec` list); ``input``: the field
    the macro ran on (an array TZCYX, or an object with ``.array``,
    ``.channel_names``, ``.calibration``, or a callable returning one: called
    only when needed), the field image when every output image is a label.
    ``labels_also_to``: more ``(backend, plate)`` whose field ``well``/``site``
    gets the label images too (the source plate, when the user asks).
    ``tables_written``: filled with each table's CSV text as written here
    (title -> text; the batch assembles its plate tables from them).
    """
    if not well:
        raise OutputError(
            "cannot save outputs: the data has no well (stream it with plate/well/site components, "
            "or run the macro on a plate field)"
        )
    well = normalize_well(well)
    site = int(site)
    specs = parse_label_specs(labels)
    if backend is None or plate is None:
        backend, plate = open_or_create_plate(uri, provenance={"source": dict(source or {})})
    label = plate_label or str((source or {}).get("plate") or plate)
    own = None
    if uploader is None and getattr(backend, "is_remote", False):
        from .backends.zarr_plate import ZarrPlateStore
        from .upload import Uploader

        own = uploader = Uploader(backend, fallback=ZarrPlateStore(fallback_root(backend)))
    if specs and getattr(backend, "is_remote", False):
        raise OutputError(f"label images go to OME-Zarr or OME-TIFF plates; {type(backend).__name__} does not store them yet")
    try:
        written = _write(result, backend, plate, well, site, label, source, uploader, specs, input, labels_also_to,
                         tables_written)
    except BaseException:
        if own is not None:
            own.finalize(timeout=upload_timeout)
        raise
    if own is None:
        return written
    return _settle(own, written, upload_timeout)


def _settle(up: Any, written: list[str], timeout: Optional[float]) -> list[str]:
    """Wait for this call's uploader; say where each path went."""
    from .upload import key_of

    rep = up.finalize(timeout=timeout)
    if not rep.complete:
        left = {k: rep.failed.get(k, "still queued") for k in rep.left}
        raise OutputError(f"the outputs could not be saved to the server nor to the local fallback store: {left}")
    fell = set(rep.fallback)
    root = getattr(up.fallback, "root", "")
    return [f"{p} (server unavailable: saved in the local fallback store {root})" if key_of(p) in fell else p
            for p in written]


def _input_image(input: Any) -> Optional[tuple[np.ndarray, list, Any]]:
    if callable(input):
        input = input()
    if input is None:
        return None
    arr = np.asarray(getattr(input, "array", input))
    return arr, list(getattr(input, "channel_names", []) or []), getattr(input, "calibration", None)


def _write(result: Any, backend: Any, plate: str, well: str, site: int, label: str,
           source: Optional[Mapping[str, Any]], uploader: Any, specs: Sequence[LabelSpec] = (),
           input: Any = None, also: Sequence[tuple[Any, str]] = (),
           tables_written: Optional[dict[str, str]] = None) -> list[str]:
    written: list[str] = []
    requires: list[str] = []  # a well's tables follow its field (OMERO attaches them to the well)

    all_images = list(getattr(result, "images", {}).items())
    label_images = [(s, next((t for t, _ in all_images if s.matches(t)), None)) for s in specs if s.image != ROIS]
    missing = [s.image for s, t in label_images if t is None]
    if missing:
        raise OutputError(f"--labels: the macro left no image titled {', '.join(map(repr, missing))} "
                          f"(its images: {', '.join(repr(t) for t, _ in all_images) or 'none'})")
    label_titles = {t for _, t in label_images}
    images = [(t, (a, None)) for t, a in all_images if t not in label_titles]
    if specs and not images:
        got = _input_image(input)
        if got is None:
            raise OutputError("label images need their field image: pass the input field (input=...)")
        images = [("input", (got[0], got[1:]))]
    field_cal: Any = None
    field_shape: Optional[tuple] = None

    # images: the first to the plate, the others to sibling plates
    for i, (title, (arr, meta)) in enumerate(images):
        if meta is not None:  # the input field: its own names and calibration
            names, cal = list(meta[0]), meta[1]
        else:
            info = getattr(result, "image_info", {}).get(title)
            names = list(getattr(info, "channel_names", []) or []) if info is not None else []
            cal = getattr(info, "calibration", None) if info is not None else None
        arr = np.asarray(arr)
        if arr.ndim != 5:
            raise OutputError(f"image {title!r} has {arr.ndim} dims; expected TZCYX")
        if names and len(names) != arr.shape[2]:
            names = []
        target_backend, target = backend, plate
        if i > 0:
            target = f"{plate}_{slug(title)}"
            if not backend.exists(f"/{backend.scheme}/plate_{target}"):
                target = backend.create_plate(target, None, provenance={"source": dict(source or {}), "image": title, "of": plate})
        if uploader is not None:
            uploader.submit_field(target, well, site, arr, name=str(title), channel_names=names or None,
                                  calibration=cal)
            if i == 0:
                from .upload import field_key

                requires.append(field_key(backend.scheme, target, well, site))
        else:
            target_backend.save_field(target, well, site, arr, name=str(title), channel_names=names or None,
                                      calibration=cal)
        if i == 0:
            field_cal, field_shape = cal, arr.shape
        t, z, c = arr.shape[:3]
        written += [
            target_backend.path(PlaneComponents(target, well, site, ci, zi, ti))
            for ti in range(t)
            for zi in range(z)
            for ci in range(c)
        ]

    # tables: one CSV per table in the well's folder
    for title, columns in getattr(result, "tables", {}).items():
        cols = unit_columns(columns, plate=label, well=well, site=site)
        name = table_file_name(title, site)
        if uploader is not None:
            uploader.submit_table(plate, name, cols, well=well, requires=requires)
            written.append(f"/{backend.scheme}/plate_{plate}/{well}/{name}.csv")
        else:
            text = columns_to_csv(cols)
            written.append(backend.save_table(plate, name, text, well=well))
            if tables_written is not None:
                tables_written[title] = text

    rois = list(getattr(result, "rois", []) or [])
    if rois:
        if uploader is not None:
            path = f"/{backend.scheme}/plate_{plate}/{well}/rois_s{site:03d}.json"
            uploader.submit({"well": well, "field": site, "rois": [r.to_dict() for r in rois]}, path, requires=requires)
            written.append(path)
        else:
            written.append(backend.save_rois(plate, well, site, rois))
    if uploader is None and field_shape is not None and (specs or rois) and _has_ngff(backend):
        written += _write_ngff(result, backend, plate, label, well, site, specs, dict(all_images), field_shape, field_cal,
                               rois, also)
    return written


def _has_ngff(backend: Any) -> bool:
    """Whether the store overrides the NGFF methods (labels, typed tables)."""
    from .backends.base import VirtualBackend

    return type(backend).save_field_tables is not VirtualBackend.save_field_tables


def _write_ngff(result: Any, backend: Any, plate: str, plate_label: str, well: str, site: int, specs: Sequence[LabelSpec],
                images: Mapping[str, Any], shape: tuple, cal: Any, rois: Sequence[Any],
                also: Sequence[tuple[Any, str]] = ()) -> list[str]:
    """Labels and typed tables of one field (see the module docstring)."""
    from .backends.base import ObjectTable

    cal = cal if isinstance(cal, Calibration) else None
    written: list[str] = []
    tables = [ObjectTable("FOV_ROI_table", field_box(shape, cal), kind="roi")]
    macro_tables = dict(getattr(result, "tables", {}) or {})
    tied: set[str] = set()
    for spec in specs:
        if spec.image == ROIS:
            lab = rois_to_labels(rois, shape)
        else:
            title = next(t for t in images if spec.matches(t))
            lab = to_labels(np.asarray(images[title]), objects=spec.objects)
        written.append(backend.save_labels(plate, well, site, spec.name, lab))
        for other, other_plate in also:
            written.append(other.save_labels(other_plate, well, site, spec.name, lab))
        if not (spec.objects or spec.image == ROIS or lab.dtype != np.uint8):
            continue  # a binary mask: no objects to list
        boxes = object_boxes(lab, cal)
        tables.append(ObjectTable(f"{spec.name}_ROI_table", boxes, kind="masking_roi", label=spec.name))
        results = macro_tables.get("Results")
        n = len(boxes["label"])
        if spec.image != ROIS and results and "Results" not in tied and _rows(results) == n and n == int(lab.max()):
            feats: dict[str, list] = {"label": list(range(1, n + 1))}
            for k, v in results.items():  # ImageJ's columns; one named "label" is kept as "label_"
                key = k
                while key in feats:
                    key = key + "_"
                feats[key] = np.asarray(v).tolist()
            tables.append(ObjectTable(f"{spec.name}_features", feats, kind="feature", label=spec.name))
            tied.add("Results")
    for title, columns in macro_tables.items():
        if title not in tied:
            tables.append(ObjectTable(slug(title), unit_columns(columns, plate=plate_label, well=well, site=site)))
    if rois:
        tables.append(ObjectTable("imagej_ROI_table", roi_boxes(rois, cal, size_z=shape[1]), kind="roi"))
    written += backend.save_field_tables(plate, well, site, tables)
    return written


def _rows(columns: Mapping[str, Any]) -> int:
    return max((len(v) for v in columns.values()), default=0)


def save_plate_ngff(backend: Any, plate: str, tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]]]],
                    writer: Any = None) -> list[str]:
    """Plate-level tables (name -> CSV header and rows, as the batch assembles
    them) as typed tables for the NGFF tools, on stores that hold them;
    numeric columns become numbers. Returns where they went ([] otherwise).
    ``writer``: a :class:`~fiji_bridge.backends.ngff_tables.TableWriterProcess`
    to write them (an OME-Zarr store's)."""
    from .backends.base import ObjectTable

    if not tables or not _has_ngff(backend):
        return []
    out = []
    for name, (header, rows) in tables.items():
        cols: dict[str, list] = {}
        for i, h in enumerate(header):
            vals = [r[i] if i < len(r) else "" for r in rows]
            cols[h] = _numeric(vals)
        out.append(ObjectTable(slug(name), cols))
    return backend.save_plate_tables(plate, out, writer=writer) if writer is not None else backend.save_plate_tables(plate, out)


def _numeric(vals: list[str]) -> list:
    """CSV cells -> ints or floats when every cell is one ('' -> NaN), else strings."""
    try:
        nums = [float(v) if v not in ("", "NaN", "nan") else float("nan") for v in vals]
    except ValueError:
        return [str(v) for v in vals]
    if all(v == v and float(v).is_integer() for v in nums) and all("." not in v and "e" not in v.lower() for v in vals):
        return [int(v) for v in nums]
    return nums
