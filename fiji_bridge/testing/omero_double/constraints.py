"""The double's database constraints: what PostgreSQL refuses at the end of
a save, all or nothing.

Rules, each from the source:

* ``create unique index well_col_row on well (plate, "column", "row")``
  (omero-model ``templates/psql-footer.vm``): two Wells of one plate at
  the same row and column;
* UNIQUE (parent, child, owner_id) on every link, UNIQUE (parent, child) on
  a global one (omero-dsl-plugin ``SemanticTypeProcessor.java``, "apply
  UNIQUE (parent, child) to all links");
* UNIQUE (<collection>, <collection>_index) on every ordered collection
  (SemanticTypeProcessor.java, "Check for all ordered relationships and
  apply unique constraints"): WellSample (well, well_index), Channel
  (pixels, pixels_index), Shape (roi, roi_index), Pixels (image,
  image_index). The double checks the state at the end of the save, which is
  more lenient than row-by-row checks during a reorder;
* the ``positive_int`` / ``positive_float`` domains (omero-model
  ``psql-header.vm`` ``CHECK (VALUE > 0)``, ``psql-types.properties``
  PositiveInteger / PositiveFloat, the ``ALTER ... TYPE positive_float`` of
  psql-footer.vm): Pixels sizes and significantBits, its physical sizes,
  LogicalChannel wavelengths and samplesPerPixel;
* a violated constraint reaches the client as ``omero.ValidationException``
  (omero-server ``ServiceHandler.java``: DataIntegrityViolationException ->
  ValidationException) and nothing of the save is stored. (A domain that
  the generated model setter checks first, object.vm "must be strictly
  positive", is an IllegalArgumentException, ApiUsageException on the
  server side; either is an ``omero.ServerError``.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ._common import _INVERSE, _cls, omero, unwrap

#: fields of the positive_int / positive_float domains (omero-model mappings acquisition.ome.xml
#: ``type="PositiveInteger"`` and psql-footer.vm ``ALTER COLUMN ... TYPE positive_float``)
_POSITIVE = {
    "Pixels": ("significantBits", "sizeX", "sizeY", "sizeZ", "sizeC", "sizeT",
               "physicalSizeX", "physicalSizeY", "physicalSizeZ"),
    "LogicalChannel": ("samplesPerPixel", "excitationWave", "emissionWave"),
}
#: ordered collections: child class -> (parent class, collection, child's field to the parent)
_ORDERED = {ccls: (pcls, pf, fk) for (pcls, pf), (ccls, fk, ordered) in _INVERSE.items() if ordered}


def _base(row: Any) -> str:
    """The class a uniqueness rule is stated for (every Shape subclass is a Shape)."""
    cls = _cls(row)
    if cls in _ORDERED:
        return cls
    return "Shape" if isinstance(row, omero.model.Shape) else cls


def check_domains(cls: str, row: Any) -> None:
    """Raise ValidationException for a value outside its domain."""
    for f in _POSITIVE.get(cls, ()):
        v = getattr(row, "_" + f, None)
        if v is None:
            continue
        value = v.getValue() if hasattr(v, "getUnit") else unwrap(v)
        if value is not None and not value > 0:
            raise omero.ValidationException(
                message=f"{cls}.{f} = {value!r} violates the domain positive_{'float' if hasattr(v, 'getUnit') or isinstance(value, float) else 'int'} (CHECK (VALUE > 0))")


class Constraints:
    """Unique keys of :class:`~.server.ServerDouble`'s rows and the save transaction (a mixin)."""

    _rows: dict
    _order: dict

    def _unique_keys(self, oid: int, row: Any) -> list[tuple]:
        cls = _base(row)
        keys: list[tuple] = []
        if cls == "Well" and row._plate is not None and row._row is not None and row._column is not None:
            keys.append(("well_col_row", row._plate.id.val, unwrap(row._column), unwrap(row._row)))
        elif cls.endswith("Link") and getattr(row, "_parent", None) is not None \
                and getattr(row, "_child", None) is not None:
            owner = row._details._owner.id.val if row._details is not None and row._details._owner else None
            keys.append((cls, row._parent.id.val, row._child.id.val, owner))
        elif cls in _ORDERED and oid in self._order:
            pcls, pf, fk = _ORDERED[cls]
            parent = getattr(row, "_" + fk)
            if parent is not None:
                keys.append((f"{pcls}.{pf}", parent.id.val, self._order[oid]))
        return keys

    def _check_unique(self, touched: set) -> None:
        mine: dict[tuple, int] = {}
        kinds = set()
        for oid in touched:
            row = self._rows.get(oid)
            if row is None:
                continue
            for k in self._unique_keys(oid, row):
                if k in mine and mine[k] != oid:
                    raise omero.ValidationException(message=f"duplicate key value violates unique constraint {k}")
                mine[k] = oid
                kinds.add(_base(row))
        if not mine:
            return
        for oid, row in self._rows.items():
            if oid in touched or _base(row) not in kinds:
                continue
            for k in self._unique_keys(oid, row):
                if k in mine:
                    raise omero.ValidationException(
                        message=f"duplicate key value violates unique constraint {k[0]}: {k[1:]} exists "
                        f"(row {oid})")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict]:
        """One save, all or nothing: yields the ``seen`` map (object -> id) of
        the save; at the end the unique constraints are checked."""
        rows, order = dict(self._rows), dict(self._order)
        seen: dict = {}
        try:
            yield seen
            self._check_unique(set(seen.values()))
        except BaseException:
            self._rows.clear()
            self._rows.update(rows)
            self._order.clear()
            self._order.update(order)
            raise
