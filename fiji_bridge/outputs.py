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
  polygon coordinates).

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
from typing import Any, Mapping, Optional

import numpy as np

from .components import PlaneComponents, normalize_well

__all__ = ["OutputError", "save_result", "table_file_name", "unit_columns", "open_or_create_plate", "fallback_root"]

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
    """
    if not well:
        raise OutputError(
            "cannot save outputs: the data has no well (stream it with plate/well/site components, "
            "or run the macro on a plate field)"
        )
    well = normalize_well(well)
    site = int(site)
    if backend is None or plate is None:
        backend, plate = open_or_create_plate(uri, provenance={"source": dict(source or {})})
    label = plate_label or str((source or {}).get("plate") or plate)
    own = None
    if uploader is None and getattr(backend, "is_remote", False):
        from .backends.zarr_plate import ZarrPlateStore
        from .upload import Uploader

        own = uploader = Uploader(backend, fallback=ZarrPlateStore(fallback_root(backend)))
    try:
        written = _write(result, backend, plate, well, site, label, source, uploader)
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


def _write(result: Any, backend: Any, plate: str, well: str, site: int, label: str,
           source: Optional[Mapping[str, Any]], uploader: Any) -> list[str]:
    written: list[str] = []
    requires: list[str] = []  # a well's tables follow its field (OMERO attaches them to the well)

    # images: the first to the plate, the others to sibling plates
    images = list(getattr(result, "images", {}).items())
    for i, (title, arr) in enumerate(images):
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
            written.append(backend.save_table(plate, name, cols, well=well))

    rois = list(getattr(result, "rois", []) or [])
    if rois:
        path = f"/{backend.scheme}/plate_{plate}/{well}/rois_s{site:03d}.json"
        doc = {"well": well, "field": site, "rois": [r.to_dict() for r in rois]}
        if uploader is not None:
            uploader.submit(doc, path, requires=requires)
        else:
            backend.save(doc, path)
        written.append(path)
    return written
