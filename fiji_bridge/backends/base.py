"""The shared virtual backend: one interface for every plate store.

Producers and the bridge address data by *virtual paths* (see
:mod:`fiji_bridge.components`)::

    /<scheme>/plate_<id>/<well>/<well>_s<site>_z<z>_c<c>_t<t>.tif   one plane
    /<scheme>/plate_<id>/<name>.csv|json                            a plate table
    /<scheme>/plate_<id>/<well>/<name>.csv|json                     a well table

A store implements the file-like primitives (``list_files``, ``load``,
``save``, ``save_batch``, ``exists``) and the plate-level operations that
batch processing needs (``plate_structure``, ``load_field``,
``create_plate``, ``save_field``, ``save_table``). The plate structure is
fetched once per plate and cached: later calls make no metadata query.

What a macro measured can also be stored the way the OME-NGFF tools expect
it (napari, ngio, Fractal): ``save_labels`` (a label image of a field),
``save_field_tables`` (feature / ROI / masking-ROI / generic tables of a
field), ``save_plate_tables`` (plate-level tables) and ``save_rois`` (ImageJ
ROIs). Stores that cannot hold them raise :class:`NotImplementedError`
saying so; the tables are described by :class:`ObjectTable`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..components import Calibration, ComponentError, PlaneComponents, VirtualPath

__all__ = [
    "TABLE_KINDS",
    "BackendError",
    "ObjectTable",
    "NotFound",
    "PlateStructure",
    "StoreUnavailable",
    "VirtualBackend",
]


class BackendError(RuntimeError):
    """A store operation failed; the message says which path and why."""


class NotFound(BackendError, KeyError):
    """The path, plate, well or field does not exist in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class StoreUnavailable(BackendError, ConnectionError):
    """The store cannot be reached (server down, connection dropped).

    The uploader retries writes that fail with this error."""


@dataclass(frozen=True)
class PlateStructure:
    """The layout of a plate, fetched once and cached by the backend.

    ``fields[well]`` is the number of fields (sites) of that well; fields are
    numbered 0..n-1. Sizes are per field image (every field of a plate has
    the same sizes in a well-formed plate).
    """

    plate: str  # the plate's id in its store
    name: str
    wells: tuple[str, ...]  # normalised names, "A01", row-major order
    fields: Mapping[str, int]
    size_t: int
    size_z: int
    size_c: int
    size_y: int
    size_x: int
    dtype: str
    channel_names: tuple[str, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)
    rows: int = 0  # plate rows/columns when known (e.g. 16 x 24)
    columns: int = 0

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one field image, TZCYX."""
        return (self.size_t, self.size_z, self.size_c, self.size_y, self.size_x)

    def units(self) -> list[tuple[str, int]]:
        """Every (well, field) of the plate, in plate order: the batch work units."""
        return [(w, f) for w in self.wells for f in range(self.fields.get(w, 0))]

    def to_dict(self) -> dict:
        return {
            "plate": self.plate,
            "name": self.name,
            "wells": list(self.wells),
            "fields": dict(self.fields),
            "size_t": self.size_t,
            "size_z": self.size_z,
            "size_c": self.size_c,
            "size_y": self.size_y,
            "size_x": self.size_x,
            "dtype": self.dtype,
            "channel_names": list(self.channel_names),
            "calibration": self.calibration.to_dict(),
            "rows": self.rows,
            "columns": self.columns,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlateStructure":
        return cls(
            plate=str(d["plate"]),
            name=d.get("name", str(d["plate"])),
            wells=tuple(d["wells"]),
            fields=dict(d["fields"]),
            size_t=int(d["size_t"]),
            size_z=int(d["size_z"]),
            size_c=int(d["size_c"]),
            size_y=int(d["size_y"]),
            size_x=int(d["size_x"]),
            dtype=str(d["dtype"]),
            channel_names=tuple(d.get("channel_names", ())),
            calibration=Calibration.from_dict(d.get("calibration")),
            rows=int(d.get("rows", 0)),
            columns=int(d.get("columns", 0)),
        )


Data = Union[np.ndarray, bytes, str, Mapping[str, Any]]

#: the table types of ngio / Fractal (``feature_table``, ``roi_table``,
#: ``masking_roi_table``, ``condition_table``, ``generic_table``)
TABLE_KINDS = ("feature", "roi", "masking_roi", "condition", "generic")
#: the index column of each table kind (None: the row number)
TABLE_INDEX = {"feature": "label", "roi": "FieldIndex", "masking_roi": "label", "condition": None, "generic": None}


@dataclass(frozen=True)
class ObjectTable:
    """A table for the NGFF tools, as columns of equal length.

    ``kind`` (one of :data:`TABLE_KINDS`) says what the rows are: objects of
    the label image ``label`` (``feature``: one row per object, the label
    value in the ``label`` column; ``masking_roi``: the objects' bounding
    boxes), regions (``roi``: named boxes, index ``FieldIndex``), or anything
    (``generic``, ``condition``). ROI tables carry the bounding boxes in
    physical units: ``x_micrometer``, ``len_x_micrometer`` (and y, z).
    """

    name: str
    columns: Mapping[str, Sequence[Any]]
    kind: str = "generic"
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in TABLE_KINDS:
            raise BackendError(f"table {self.name!r}: kind {self.kind!r} is not one of {', '.join(TABLE_KINDS)}")
        n = {len(v) for v in self.columns.values()}
        if len(n) > 1:
            raise BackendError(f"table {self.name!r}: columns differ in length: { {k: len(v) for k, v in self.columns.items()} }")
        index = self.index
        if index is not None and index not in self.columns:
            raise BackendError(f"table {self.name!r}: a {self.kind} table needs a {index!r} column")

    @property
    def index(self) -> Optional[str]:
        """The index column (``label``, ``FieldIndex``) or None."""
        return TABLE_INDEX[self.kind]

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


class VirtualBackend(abc.ABC):
    """A plate store behind virtual paths. Subclasses: ``ZarrPlateStore``,
    ``OmeTiffStore``, ``OmeroBackend``."""

    #: the first component of this store's virtual paths ("zarr", "omero", ...)
    scheme: str = ""

    #: a server across the network (writes go through :mod:`fiji_bridge.upload`)
    is_remote: bool = False

    #: how many metadata queries this backend made to learn plate structures
    #: (a file/group read, a server query); stores increment it on every such
    #: read, so tests can check that ``plate_structure`` is served from cache
    metadata_reads: int = 0

    # -- file-like primitives ------------------------------------------------

    @abc.abstractmethod
    def list_files(self, directory: str) -> list[str]:
        """Virtual paths directly under ``directory`` (``/<scheme>`` lists
        plates, a plate lists wells and plate tables, a well its planes and
        tables), sorted."""

    @abc.abstractmethod
    def load(self, path: str) -> Data:
        """A plane as a 2-D array (Y, X); a ``.csv`` as ``str``; a ``.json``
        as a dict. Raises :class:`NotFound`."""

    @abc.abstractmethod
    def save(self, data: Data, path: str) -> None:
        """Write one plane or table. Writing the same plane twice leaves one
        plane (idempotent)."""

    def save_batch(self, datas: Sequence[Data], paths: Sequence[str]) -> None:
        """Write many items; stores override this to write a well in one
        transaction."""
        if len(datas) != len(paths):
            raise ValueError(f"save_batch: {len(datas)} items but {len(paths)} paths")
        for d, p in zip(datas, paths):
            self.save(d, p)

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a plane, table, well or plate exists at ``path``."""

    # -- plates --------------------------------------------------------------

    @abc.abstractmethod
    def plate_structure(self, plate: str) -> PlateStructure:
        """The plate's layout; fetched once, then served from the cache."""

    def load_field(self, plate: str, well: str, site: int) -> np.ndarray:
        """All planes of one field as a TZCYX array (a batch work unit)."""
        s = self.plate_structure(plate)
        out = np.zeros(s.shape, dtype=s.dtype)
        for t in range(s.size_t):
            for z in range(s.size_z):
                for c in range(s.size_c):
                    p = self.path(PlaneComponents(plate, well, site, c, z, t))
                    out[t, z, c] = self.load(p)
        return out

    @abc.abstractmethod
    def create_plate(
        self,
        name: str,
        like: Optional[PlateStructure] = None,
        *,
        provenance: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """Create an empty (derived) plate and return its id. ``like`` gives
        wells/rows/columns to lay out; ``provenance`` (source plate, macro,
        arguments, version, time) is recorded with the plate."""

    @abc.abstractmethod
    def save_field(
        self,
        plate: str,
        well: str,
        site: int,
        array: np.ndarray,
        *,
        name: Optional[str] = None,
        channel_names: Optional[Sequence[str]] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        """Write one field image (TZCYX) into ``plate`` at well/site, creating
        the well and field as needed, in one transaction. Idempotent."""

    def save_table(
        self,
        plate: str,
        name: str,
        table: Union[str, Mapping[str, Sequence[Any]]],
        *,
        well: Optional[str] = None,
        site: Optional[int] = None,
    ) -> str:
        """Save a table (CSV text, or columns) as ``<name>.csv`` beside the
        plate, or the well when given; returns its virtual path."""
        text = table if isinstance(table, str) else columns_to_csv(table)
        path = f"/{self.scheme}/plate_{plate}/" + (f"{well}/" if well else "") + f"{name}.csv"
        self.save(text, path)
        return path

    # -- what the NGFF tools read: labels, typed tables, ROIs -------------------

    def save_labels(
        self,
        plate: str,
        well: str,
        site: int,
        name: str,
        labels: np.ndarray,
        *,
        colors: Optional[Mapping[int, Sequence[int]]] = None,
    ) -> str:
        """Write ``labels`` (an integer TZYX array, 0 = background; the field's
        Y, X sizes) as the label image ``name`` of field ``well``/``site``,
        which must exist. Replaces a label of that name. Returns where it went."""
        raise NotImplementedError(
            f"{type(self).__name__} does not store label images yet; write them to an OME-Zarr or OME-TIFF plate")

    def save_field_tables(self, plate: str, well: str, site: int, tables: Sequence["ObjectTable"]) -> list[str]:
        """Write tables of one field (feature, ROI, masking-ROI... see
        :class:`ObjectTable`), replacing tables of the same names; returns
        where they went."""
        raise NotImplementedError(
            f"{type(self).__name__} does not store typed field tables yet; write them to an OME-Zarr or OME-TIFF plate")

    def save_plate_tables(self, plate: str, tables: Sequence["ObjectTable"]) -> list[str]:
        """Write plate-level tables (with ``plate``, ``well``, ``field``
        columns), replacing tables of the same names; returns where they went."""
        raise NotImplementedError(
            f"{type(self).__name__} does not store typed plate tables yet; write them to an OME-Zarr or OME-TIFF plate")

    def save_rois(self, plate: str, well: str, site: int, rois: Sequence[Any]) -> str:
        """Keep a field's ImageJ ROIs (:class:`~fiji_bridge.engine.base.Roi`):
        by default as ``<well>/rois_s<site>.json`` (``.roi`` bytes in base64
        plus coordinates); returns its path."""
        path = f"/{self.scheme}/plate_{plate}/{well}/rois_s{int(site):03d}.json"
        self.save({"well": well, "field": int(site), "rois": [r.to_dict() for r in rois]}, path)
        return path

    def plate_provenance(self, plate: str) -> dict:
        """What ``create_plate(provenance=...)`` recorded for ``plate``
        (``{}`` when nothing); stores that keep only strings return strings."""
        raise NotImplementedError(f"{type(self).__name__} does not read provenance back")

    # -- helpers ---------------------------------------------------------------

    def path(self, components: PlaneComponents) -> str:
        """The virtual path of a plane in this store."""
        return str(VirtualPath.plane(self.scheme, components))

    def parse(self, path: str) -> VirtualPath:
        """Parse a virtual path and check that it belongs to this store."""
        vp = VirtualPath.parse(path)
        if vp.scheme != self.scheme:
            raise ComponentError(f"{path!r} is not a {self.scheme!r} path")
        return vp

    def close(self) -> None:
        """Release connections/handles (no-op for local stores)."""

    def __enter__(self) -> "VirtualBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def columns_to_csv(columns: Mapping[str, Sequence[Any]]) -> str:
    """Columns -> CSV text (header line, then rows); equal lengths required."""
    import csv
    import io

    names = list(columns)
    n = {len(columns[k]) for k in names}
    if len(n) > 1:
        raise ValueError(f"table columns differ in length: { {k: len(columns[k]) for k in names} }")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    # a column of plain Python values goes to the writer as it is (it writes
    # each as _cell would: str() of a float is its repr); others cell by cell
    cells = [col if set(map(type, col)) <= _PLAIN else [_cell(v) for v in col] for col in (columns[k] for k in names)]
    w.writerows(zip(*cells))
    return buf.getvalue()


#: the types of cells :func:`columns_to_csv` hands to the csv writer unchanged
_PLAIN = {str, int, float, bool, type(None)}


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for store payloads (tables, manifests,
    provenance): numpy scalars and arrays as plain values, anything else as
    its ``str``."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _cell(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return repr(float(v))
    if isinstance(v, np.generic):
        return v.item()
    return v
