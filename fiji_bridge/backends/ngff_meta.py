"""NGFF metadata of the plate store, and the zarr group files that hold it.

The documents are the ones ome-zarr-py's writers make (``ome_zarr/writer.py``
0.18: ``write_multiscales_metadata``, ``add_metadata``,
``write_well_metadata``, ``write_plate_metadata``), for NGFF 0.4 in zarr v2
and 0.5 in zarr v3:

* 0.4: ``multiscales`` (with ``version``), ``omero``, ``well`` and ``plate``
  (each with ``version``) at the top of the group's ``.zattrs``;
* 0.5: everything under ``ome`` (``{"version": "0.5", ...}``) in the
  ``attributes`` of the group's ``zarr.json``; ``omero`` and ``plate`` keep a
  ``version`` of their own, as ome-zarr-py writes them.

``tests/test_zarr_write.py`` checks them against ome-zarr-py's own writers,
key for key. They are made here rather than by calling those writers
because a batch writes one field after another, and importing
``ome_zarr.writer`` costs about 1.3 CPU-seconds (it pulls in dask, xarray
and pandas) that a batch start spends beside its JVMs, while each group
written through zarr-python's API is an asyncio round trip of 1-2 ms.

Group files are written with :func:`write_group`: each file replaced
atomically (a temporary file renamed over it), or written in place in a
folder that is not yet part of the plate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ._local import atomic_write

__all__ = ["NGFF_VERSIONS", "group_format", "image_attrs", "plate_attrs", "read_attrs", "well_attrs",
           "write_group", "ensure_groups"]

#: the NGFF version a plate of each zarr format is written in
NGFF_VERSIONS = {2: "0.4", 3: "0.5"}


def group_format(d: Path) -> Optional[int]:
    """The zarr format (2 or 3) of the group at ``d``, or None when there is none."""
    if (d / ".zgroup").is_file():
        return 2
    if (d / "zarr.json").is_file():
        return 3
    return None


def read_attrs(d: Path) -> Optional[dict]:
    """The attributes of the zarr group at ``d`` (v2 ``.zattrs`` or v3
    ``zarr.json``), or None when ``d`` holds no group."""
    v2 = d / ".zattrs"
    if v2.is_file():
        return json.loads(v2.read_text() or "{}")
    v3 = d / "zarr.json"
    if v3.is_file():
        return json.loads(v3.read_text()).get("attributes", {})
    if (d / ".zgroup").is_file():
        return {}
    return None


def _write_json(path: Path, doc: Any, atomic: bool) -> None:
    raw = json.dumps(doc, indent=2).encode()
    if atomic:
        atomic_write(path, raw)
    else:
        path.write_bytes(raw)


def write_group(d: Path, zarr_format: int, attrs: Mapping[str, Any], *, atomic: bool = True) -> None:
    """Make ``d`` a zarr group of ``zarr_format`` with exactly ``attrs``
    (v2: ``.zgroup`` and ``.zattrs``; v3: ``zarr.json``, whose other keys an
    existing file keeps). Each file is replaced atomically unless ``atomic``
    is False (a group in a folder nobody reads yet)."""
    d.mkdir(parents=True, exist_ok=True)
    if zarr_format == 2:
        if not (d / ".zgroup").is_file():
            _write_json(d / ".zgroup", {"zarr_format": 2}, atomic)
        _write_json(d / ".zattrs", dict(attrs), atomic)
        return
    try:
        doc = json.loads((d / "zarr.json").read_text())
    except FileNotFoundError:
        doc = {}
    doc.update(attributes=dict(attrs), zarr_format=3, node_type="group")
    _write_json(d / "zarr.json", doc, atomic)


def ensure_groups(root: Path, rel: str, zarr_format: int) -> None:
    """Every folder from ``root`` down to ``root/rel`` a zarr group (those
    missing made with no attributes), as zarr's ``require_group`` does."""
    d = root
    for part in [p for p in rel.split("/") if p]:
        d = d / part
        if group_format(d) is None:
            write_group(d, zarr_format, {})


def _ngff(zarr_format: int) -> str:
    try:
        return NGFF_VERSIONS[int(zarr_format)]
    except KeyError:
        raise ValueError(f"zarr format {zarr_format!r}: NGFF plates are zarr v2 (0.4) or v3 (0.5)") from None


def image_attrs(zarr_format: int, *, datasets: Sequence[dict], axes: Sequence[dict], name: str,
                omero: Mapping[str, Any]) -> dict:
    """The attributes of an image group: ``multiscales`` of one multiscale
    (``datasets``, ``name``, ``axes``) and ``omero``."""
    version = _ngff(zarr_format)
    multiscale: dict[str, Any] = {"datasets": [dict(d) for d in datasets], "name": name, "axes": [dict(a) for a in axes]}
    if version == "0.4":
        multiscale["version"] = version
        return {"multiscales": [multiscale], "omero": dict(omero)}
    return {"ome": {"version": version, "multiscales": [multiscale], "omero": dict(omero, version=version)}}


def well_attrs(zarr_format: int, images: Sequence[Mapping[str, Any]], existing: Optional[Mapping[str, Any]] = None) -> dict:
    """A well group's attributes with its ``well`` (``images``: ``{"path": ...}``
    entries, in order); the group's other attributes kept."""
    version = _ngff(zarr_format)
    attrs = dict(existing or {})
    well: dict[str, Any] = {"images": [dict(im) for im in images]}
    if version == "0.4":
        well["version"] = version
        attrs["well"] = well
    else:
        attrs["ome"] = {"version": version, "well": well}
    return attrs


def plate_attrs(zarr_format: int, rows: Sequence[str], columns: Sequence[str], wells: Sequence[str], *,
                name: Optional[str], field_count: Optional[int], existing: Optional[Mapping[str, Any]] = None,
                acquisitions: Optional[Sequence[Mapping[str, Any]]] = None) -> dict:
    """A plate group's attributes with its ``plate``: ``rows`` and ``columns``
    by name, ``wells`` by path (``"<row>/<column>"``, each of a known row and
    column); the group's other attributes kept."""
    version = _ngff(zarr_format)
    index_r = {r: i for i, r in enumerate(rows)}
    index_c = {c: i for i, c in enumerate(columns)}
    entries = []
    for w in wells:
        r, _, c = str(w).partition("/")
        if r not in index_r or c not in index_c:
            raise ValueError(f"well {w!r} is not <row>/<column> of the plate's rows {list(rows)} and columns {list(columns)}")
        entries.append({"path": str(w), "rowIndex": index_r[r], "columnIndex": index_c[c]})
    if not entries:
        raise ValueError("a plate needs at least one well")
    plate: dict[str, Any] = {"columns": [{"name": str(c)} for c in columns], "rows": [{"name": str(r)} for r in rows],
                             "wells": entries}
    if name is not None:
        plate["name"] = name
    if field_count is not None:
        plate["field_count"] = int(field_count)
    if acquisitions is not None:
        plate["acquisitions"] = [dict(a) for a in acquisitions]
    attrs = dict(existing or {})
    plate["version"] = version
    if version == "0.4":
        attrs["plate"] = plate
    else:
        attrs["ome"] = {"version": version, "plate": plate}
    return attrs
