"""What fiji-bridge attaches to OMERO objects: file annotations (.csv, .json),
OMERO.tables, key-value pairs (MapAnnotations) and units.

Rules followed:

* ``SharedResources.newTable`` never returns None on 5.6: without a tables
  service it saves the table's OriginalFile, waits omero.grid.registry_timeout
  and raises (omero-blitz ``SharedResourcesI.java``); the backend asks
  ``areTablesEnabled()`` first, catches ``omero.ServerError`` around the
  table, and deletes a table file that a failure left behind — the CSV file
  annotation is kept either way, once;
* table column names are unique and never start with ``__`` (omero-py
  ``hdfstorageV2.py`` / ``columns.py``); the file name is the path given
  to ``newTable``;
* an annotation is created in the object's group (omero.group in the call
  context), or linking fails with a SecurityViolation;
* of duplicate annotations (two writers raced), the newest wins;
* another user's annotation is left alone unless the server says we may edit
  (``canEdit()``) or delete (``canDelete()``) it: a summary then gets an
  annotation of our own beside theirs (omero-server BasicACLVoter);
* units: ImageJ's "micron", "um", "µm"/"μm", "nm", "mm", "cm", "m", "inch"
  map to ``omero.model.enums.UnitsLength``; "pixel" is no physical length
  and is not stored; a stored PIXEL/REFERENCEFRAME length reads as unknown
  (``LengthI(v, MICROMETER)`` cannot convert it).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from typing import Any, Mapping, Optional, Sequence

from ..base import BackendError, columns_to_csv, json_default

log = logging.getLogger("fiji_bridge.backends.omero")

#: namespace of fiji-bridge's .csv/.json FileAnnotations
NS_RESULTS = "fiji-bridge/results"
#: namespace of the FileAnnotation on the OMERO.table made from a CSV
NS_TABLE = "fiji-bridge/results-table"
#: namespace of the provenance MapAnnotation of a derived plate
NS_PROVENANCE = "fiji-bridge/provenance"
#: namespace of the per-image key-value summary (OMERO.web's key-value panel)
NS_SUMMARY = "fiji-bridge/summary"

# -- units -------------------------------------------------------------------------------

_UNITS = {"micron": "MICROMETER", "microns": "MICROMETER", "um": "MICROMETER", "\u00b5m": "MICROMETER",
          "\u03bcm": "MICROMETER", "micrometer": "MICROMETER", "nm": "NANOMETER", "nanometer": "NANOMETER",
          "mm": "MILLIMETER", "millimeter": "MILLIMETER", "cm": "CENTIMETER", "centimeter": "CENTIMETER",
          "m": "METER", "meter": "METER", "inch": "INCH", "inches": "INCH", "in": "INCH",
          "\u00c5": "ANGSTROM", "angstrom": "ANGSTROM"}
_NO_LENGTH = {"pixel", "pixels", "px", ""}


def length_unit(unit: Optional[str]) -> Optional[Any]:
    """ImageJ's calibration unit as an ``UnitsLength``; None for pixels."""
    from omero.model.enums import UnitsLength

    u = (unit if unit is not None else "micron").strip()
    key = u if u in _UNITS else u.lower()
    if key in _NO_LENGTH:
        return None
    if key not in _UNITS:
        raise BackendError(f"unknown length unit {unit!r}: use one of {sorted(set(_UNITS) | {'pixel'})}")
    return getattr(UnitsLength, _UNITS[key])


def microns(length: Any) -> Optional[float]:
    """A stored OMERO length in micrometres; None when unset or not a length
    (PIXEL, REFERENCEFRAME)."""
    if length is None:
        return None
    from omero.model import LengthI
    from omero.model.enums import UnitsLength

    try:
        return float(LengthI(length, UnitsLength.MICROMETER).getValue())
    except Exception:  # omero-py: "... PIXEL cannot be converted to MICROMETER"
        return None


# -- CSV -> typed columns --------------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?\d+$")
_BOOL = {"true": True, "false": False}


def csv_columns(text: str) -> tuple[list[str], list[tuple[str, str, list]]]:
    """CSV text -> its header and typed columns ``(name, kind, values)`` with
    kind Long, Double, Bool or String (from the data); empty cells of numeric
    columns make them Double with NaN."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2 or not rows[0]:
        return (rows[0] if rows else []), []
    head, body = rows[0], rows[1:]
    cols = []
    for i, name in enumerate(head):
        vals = [r[i] if i < len(r) else "" for r in body]
        if vals and all(_INT_RE.match(v) for v in vals) and all(abs(int(v)) < 2**63 for v in vals):
            cols.append((name, "Long", [int(v) for v in vals]))
        elif vals and all(v.strip().lower() in _BOOL for v in vals):
            cols.append((name, "Bool", [_BOOL[v.strip().lower()] for v in vals]))
        else:
            try:
                cols.append((name, "Double", [float(v) if v.strip() else float("nan") for v in vals]))
            except ValueError:
                cols.append((name, "String", vals))
    return head, cols


def grid_columns(cols: Sequence[tuple[str, str, list]]) -> list:
    """omero.grid columns, with unique names that do not start with ``__``."""
    import omero_Tables_ice  # noqa: F401
    import omero.grid as grid

    out, seen = [], set()
    for i, (name, kind, vals) in enumerate(cols):
        name = (name or f"col{i}").lstrip("_") or f"col{i}"
        while name in seen:
            name += "_"
        seen.add(name)
        if kind == "String":
            size = max(1, max((len(v.encode()) for v in vals), default=1))
            out.append(grid.StringColumn(name, "", size, list(vals)))
        else:
            out.append(getattr(grid, f"{kind}Column")(name, "", list(vals)))
    return out


def permitted(obj: Any, check: str) -> bool:
    """``obj.details.permissions.<check>()`` of a model object read from the
    server (``canEdit``, ``canDelete``, ``canAnnotate``...): what the server's
    restrictions for this user allow; True when it carries no permissions."""
    details = obj.getDetails()
    perms = details.getPermissions() if details is not None else None
    return True if perms is None else bool(getattr(perms, check)())


class OmeroAnnotations:
    """Annotations of :class:`~fiji_bridge.backends.omero.OmeroBackend` (a mixin)."""

    def _save_named(self, plate: str, well: Optional[str], site: Optional[int], filename: str, data: Any,
                    links: Optional[Mapping[str, list]] = None) -> None:
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
        if old:
            with self._call(f"replacing {filename}") as conn:
                self._delete(conn, "Annotation", [a.id.val for a in old], delete_anns=True)
        if mimetype == "text/csv":
            self._attach_table(kind, oid, group, filename, payload.decode("utf-8"), links)

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
            self._link_annotation(conn, kind, oid, group, self._file_annotation(orig.getId(), ns))

    def _file_annotation(self, file_id: int, ns: str) -> Any:
        import omero.model as om
        from omero.rtypes import rstring

        ann = om.FileAnnotationI()
        ann.file = om.OriginalFileI(file_id, False)
        ann.ns = rstring(ns)
        return ann

    def _link_annotation(self, conn: Any, kind: str, oid: int, group: Optional[int], ann: Any) -> Any:
        import omero.model as om

        link = getattr(om, f"{kind}AnnotationLinkI")()
        link.parent = getattr(om, f"{kind}I")(oid, False)
        link.child = ann
        return conn.getUpdateService().saveAndReturnObject(link, self._ctx(group))

    def _attach_table(self, kind: str, oid: int, group: Optional[int], filename: str, text: str,
                      links: Optional[Mapping[str, list]] = None) -> Optional[int]:
        """The CSV as an OMERO.table (with ``links``: extra Image/Well/Roi
        columns of object ids); skipped, with a log line, when the server runs
        no tables service or the CSV has no rows. The CSV file stays either way."""
        import omero
        import omero_Tables_ice  # noqa: F401
        import omero.grid as grid

        _head, typed = csv_columns(text)
        if not typed:
            return None
        cols = grid_columns(typed)
        taken = {c.name for c in cols}
        for name, ids in (links or {}).items():
            while name in taken:
                name += "_"
            taken.add(name)
            cols.append(getattr(grid, f"{name.rstrip('_')}Column")(name, "", [int(i) for i in ids]))
        path = f"{filename}.h5"
        ctx = self._ctx(group)
        with self._call(f"creating OMERO.table {filename}") as conn:
            resources = conn.c.sf.sharedResources()
            if not resources.areTablesEnabled(ctx):
                log.info("OMERO at %s runs no tables service; %s kept as a file only", self.params.address, filename)
                return None
            repos = resources.repositories()
            if not repos.descriptions:
                log.info("OMERO at %s has no repository for tables; %s kept as a file only",
                         self.params.address, filename)
                return None
            old = self._annotations(kind, oid, ns=NS_TABLE).get(path, [])
            existing = {f.id.val for f in self._own_table_files(conn, path)}
            table = None
            made: Optional[int] = None
            try:
                table = resources.newTable(repos.descriptions[0].id.val, path, ctx)
                made = table.getOriginalFile().id.val
                table.initialize([type(c)(c.name, c.description, *((c.size, []) if hasattr(c, "size") else ([],)))
                                  for c in cols])
                table.addData(cols)
                orig = table.getOriginalFile()
            except omero.ServerError as e:
                log.warning("OMERO.table for %s failed (%s: %s); the CSV file annotation is kept",
                            filename, type(e).__name__, str(getattr(e, "message", "") or e).strip())
                self._drop_table_files(conn, path, made, existing)
                return None
            finally:
                if table is not None:
                    try:
                        table.close()
                    except Exception:
                        pass
            self._link_annotation(conn, kind, oid, group, self._file_annotation(orig.id.val, NS_TABLE))
            if old:
                self._delete(conn, "Annotation", [a.id.val for a in old], delete_anns=True)
            return orig.id.val

    def _own_table_files(self, conn: Any, path: str) -> list:
        """This user's OMERO.tables files named ``path`` (in every group)."""
        from omero.rtypes import rlong, rstring
        from omero.sys import ParametersI

        params = ParametersI()
        params.add("name", rstring(path))
        params.add("me", rlong(conn.getEventContext().userId))
        return conn.getQueryService().findAllByQuery(
            "from OriginalFile as f where f.name = :name and f.mimetype = 'OMERO.tables' "
            "and f.details.owner.id = :me", params, self._ctx(None))

    def _drop_table_files(self, conn: Any, path: str, made: Optional[int], existing: set) -> None:
        """Delete what this failed table attempt left behind, and nothing else.

        Deleting an OriginalFile deletes every FileAnnotation holding it and
        its links (omero-blitz blitz-delete-rules.xml ``A:FileAnnotation[E].file
        = [D]`` -> ``A:[D]/n``), so only a file this attempt created (``made``,
        the table's own file; when newTable itself failed, this user's files
        of that name that were not there before) and that no FileAnnotation
        holds is deleted."""
        from omero.rtypes import rlist, rlong
        from omero.sys import ParametersI

        try:
            ids = {made} if made is not None else \
                {f.id.val for f in self._own_table_files(conn, path)} - existing
            if not ids:
                return
            params = ParametersI()
            params.add("ids", rlist([rlong(i) for i in sorted(ids)]))
            held = {a.file.id.val for a in conn.getQueryService().findAllByQuery(
                "from FileAnnotation as a where a.file.id in (:ids)", params, self._ctx(None))}
            doomed = sorted(ids - held)
            if doomed:
                self._delete(conn, "OriginalFile", doomed)
        except Exception as e:  # the CSV is kept; a stray table file is no data loss
            log.warning("could not delete the table file left by a failed table %s: %s", path, e)

    def _annotations(self, kind: str, oid: int, ns: str = NS_RESULTS, types: str = "FileAnnotation") -> dict[str, list]:
        """Annotations of one object in namespace ``ns``, by file name (or "" for
        map annotations), oldest first: ``[-1]`` is the newest."""
        with self._call(f"listing annotations of {kind} {oid}") as conn:
            anns = conn.getMetadataService().loadAnnotations(
                kind, [oid], [types], None, None, self._ctx(None)).get(oid, [])
        out: dict[str, list] = {}
        for a in sorted(anns, key=lambda a: a.id.val):
            if a.ns is None or a.ns.val != ns:
                continue
            if types == "FileAnnotation":
                if a.file is not None and a.file.isLoaded():
                    out.setdefault(a.file.name.val, []).append(a)
            else:
                out.setdefault("", []).append(a)
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

    # -- key-value pairs ---------------------------------------------------------------

    def _map_values(self, kind: str, oid: int, ns: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in self._annotations(kind, oid, ns=ns, types="MapAnnotation").get("", []):
            out.update({nv.name: nv.value for nv in (a.getMapValue() or [])})
        return out

    def _set_map(self, kind: str, oid: int, group: Optional[int], ns: str, values: Mapping[str, Any],
                 merge: bool = True) -> None:
        """The object's one MapAnnotation in ``ns`` holds ``values`` (merged
        into what it held), updated in place."""
        import omero.model as om
        from omero.rtypes import rstring

        # another user's annotation is theirs: kept as it is, unless the group lets us edit it
        # (BasicACLVoter.allowUpdate; omero-py PermissionsI.canEdit from the server's restrictions)
        olds = [a for a in self._annotations(kind, oid, ns=ns, types="MapAnnotation").get("", [])
                if permitted(a, "canEdit")]
        merged: dict[str, str] = {}
        if merge:
            for a in olds:
                merged.update({nv.name: nv.value for nv in (a.getMapValue() or [])})
        merged.update({str(k): v if isinstance(v, str) else json.dumps(v, default=json_default)
                       for k, v in values.items() if v is not None})
        pairs = [om.NamedValue(k, v) for k, v in merged.items()]
        with self._call(f"saving key-value pairs of {kind} {oid}") as conn:
            if len(olds) == 1:  # update it in place: one save
                olds[0].setMapValue(pairs)
                conn.getUpdateService().saveObject(olds[0], self._ctx(group))
                return
            ann = om.MapAnnotationI()
            ann.ns = rstring(ns)
            ann.setMapValue(pairs)
            self._link_annotation(conn, kind, oid, group, ann)
            doomed = [a.id.val for a in olds if permitted(a, "canDelete")]
            if doomed:  # two writers raced: one merged annotation replaces theirs
                self._delete(conn, "Annotation", doomed)
