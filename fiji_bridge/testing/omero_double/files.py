"""The double's RawFileStore and OMERO.tables.

Rules, each from the source:

* ``SharedResources.newTable(repo, path)`` saves an OriginalFile named and
  pathed ``path`` (the full path, mimetype "OMERO.tables"), then looks for a
  tables service; without one it waits ``omero.grid.registry_timeout`` and
  raises ``InternalException`` — it never returns None on 5.6 (omero-blitz
  SharedResourcesI.java newTable/openTable); ``areTablesEnabled()`` says
  whether the service runs (SharedResourcesI.areTablesEnabled);
* ``Table.initialize`` refuses a second initialize ("Already initialized."),
  no columns, unnamed columns, reserved names (``__``-prefixed,
  hdfstorageV2.internal_attr) and duplicate names (omero-py hdfstorageV2.py
  HdfStorage.initialize, columns.py columns2definition);
* ``addData`` takes the table's columns in order, of equal lengths
  (hdfstorageV2.py HdfStorage.append);
* a StringColumn's ``size`` (bytes) and an array column's length are at
  least 1 at initialize (``ApiUsageException``, omero-py columns.py
  StringColumnI / *ArrayColumnI.descriptor); at addData a string longer in
  UTF-8 bytes than the table's column size, or an array of another length,
  is a ``ValidationException`` (columns.py StringColumnI.arrays,
  AbstractArrayColumn.arrays).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from ._common import _cls, _Session, omero, rlong, rstring

#: the columns of fixed-length arrays (omero-py columns.py AbstractArrayColumn)
_ARRAY_COLUMNS = (omero.grid.FloatArrayColumn, omero.grid.DoubleArrayColumn, omero.grid.LongArrayColumn)
#: omero.grid.registry_timeout (ms), the wait of newTable/areTablesEnabled
#: for a tables service (omero-blitz SharedResourcesI.java waitMillis)
REGISTRY_TIMEOUT = 5.0


class FileServices:
    """RawFileStore, SharedResources and Table of :class:`~.server.ServerDouble` (a mixin)."""

    _files: dict
    _tables: dict
    tables: bool
    registry_timeout: float

    # -- files -----------------------------------------------------------------------

    def _system_file(self, name: str, path: str, mimetype: str) -> int:
        f = omero.model.OriginalFileI()
        f.name, f.path, f.mimetype = rstring(name), rstring(path), rstring(mimetype)
        oid = self._new_id()
        f._id = rlong(oid)
        self._rows[oid] = f
        return oid

    def _rpc_sf_createRawFileStore(self, s: _Session) -> int:
        return self._open(s, "rfs", file=None)

    def _rfs(self, s: _Session, sid: int) -> tuple[dict, bytearray]:
        st = self._svc(s, sid, "rfs")
        if st["file"] is None:
            raise omero.ApiUsageException(message="RawFileStore: setFileId() first")
        return st, self._files.setdefault(st["file"], bytearray())

    def _rpc_RawFileStore_setFileId(self, s: _Session, sid: int, fid: int, ctx: Any = None) -> None:
        st = self._svc(s, sid, "rfs")
        if fid not in self._rows or _cls(self._rows[fid]) != "OriginalFile" or not self._visible(s, fid, ctx):
            raise omero.ValidationException(message=f"no OriginalFile:{fid}")
        st["file"] = fid

    def _rpc_RawFileStore_write(self, s: _Session, sid: int, data: bytes, pos: int, n: int,
                                ctx: Any = None) -> None:
        _st, buf = self._rfs(s, sid)
        if len(buf) < pos:
            buf.extend(b"\0" * (pos - len(buf)))
        buf[pos:pos + n] = data[:n]

    def _rpc_RawFileStore_read(self, s: _Session, sid: int, pos: int, n: int, ctx: Any = None) -> bytes:
        self.counters["rfs.read"] += 1
        return bytes(self._rfs(s, sid)[1][pos:pos + n])

    def _rpc_RawFileStore_size(self, s: _Session, sid: int, ctx: Any = None) -> int:
        return len(self._rfs(s, sid)[1])

    def _rpc_RawFileStore_save(self, s: _Session, sid: int, ctx: Any = None) -> Any:
        st, buf = self._rfs(s, sid)
        row = self._rows[st["file"]]
        row.size = rlong(len(buf))
        row.hash = rstring(hashlib.sha1(bytes(buf)).hexdigest())
        return self._load(st["file"], set())

    def _rpc_RawFileStore_close(self, s: _Session, sid: int, ctx: Any = None) -> None:
        self._services.pop(sid, None)



    # -- OMERO.tables -------------------------------------------------------------------------

    def _rpc_SharedResources_repositories(self, s: _Session) -> Any:
        return omero.grid.RepositoryMap(descriptions=[self._load(self.repository_id, set())], proxies=[None])

    def _rpc_SharedResources_areTablesEnabled(self, s: _Session, ctx: Any = None) -> bool:
        self.counters["tables.areTablesEnabled"] += 1
        if not self.tables:
            self._wait_registry()
        return self.tables

    def _wait_registry(self) -> None:
        """SharedResourcesI.lookup waits registry_timeout for a service that is not there."""
        self.counters["tables.registry_wait"] += 1
        self.waited += self.registry_timeout

    def _rpc_SharedResources_newTable(self, s: _Session, repo_id: int, name: str, ctx: Any = None) -> int:
        self.counters["tables.newTable"] += 1
        # SharedResourcesI.newTable: the file is saved first (name = path = the full path) ...
        f = omero.model.OriginalFileI()
        f.name, f.path, f.mimetype = rstring(name), rstring(name), rstring("OMERO.tables")
        fid = self._save(s, f, self._write_group(s, ctx))
        if not self.tables:  # ... then openTable finds no tables service
            self._wait_registry()
            raise omero.InternalException(message="No tables service available (omero.grid.registry_timeout)")
        self._tables[fid] = {"columns": None}
        return self._open(s, "table", file=fid)

    def _table(self, s: _Session, sid: int) -> dict:
        return self._tables[self._svc(s, sid, "table")["file"]]

    def _rpc_Table_initialize(self, s: _Session, sid: int, columns: list, ctx: Any = None) -> None:
        t = self._table(s, sid)
        if t["columns"] is not None:
            raise omero.ValidationException(message="Already initialized.")
        if not columns:
            raise omero.ApiUsageException(message="No columns provided")
        names: set = set()
        for col in columns:
            if not col.name:
                raise omero.ApiUsageException(message=f"Column unnamed: {col}")
            if col.name.startswith("__"):  # hdfstorageV2.py internal_attr
                raise omero.ApiUsageException(message=f"Reserved column name: {col.name}")
            if col.name in names:  # columns.py columns2definition
                raise omero.ApiUsageException(message=f"Duplicate column name: {col.name}")
            names.add(col.name)
            if isinstance(col, omero.grid.StringColumn) and not (col.size or 0) >= 1:
                # columns.py StringColumnI.descriptor
                raise omero.ApiUsageException(message=f"String size must be > 0 (Column: {col.name})")
            if isinstance(col, _ARRAY_COLUMNS) and not (col.size or 0) >= 1:
                # columns.py Float/Double/LongArrayColumnI.descriptor
                raise omero.ApiUsageException(message=f"Array length must be > 0 (Column: {col.name})")
        for col in columns:
            col.values = []
        t["columns"] = columns

    def _rpc_Table_addData(self, s: _Session, sid: int, columns: list, ctx: Any = None) -> None:
        t = self._table(s, sid)
        if t["columns"] is None:
            raise omero.ApiUsageException(message="Not yet initialized")
        if [type(c) for c in columns] != [type(c) for c in t["columns"]] or \
                [c.name for c in columns] != [c.name for c in t["columns"]]:
            raise omero.ValidationException(message="addData: columns differ from the table's")
        if len({len(c.values) for c in columns}) > 1:
            raise omero.ValidationException(message="addData: columns of different lengths")
        for mine, new in zip(t["columns"], columns):
            # the table's column width, as initialized (columns.py StringColumnI.settable / arrays)
            if isinstance(mine, omero.grid.StringColumn):
                if any(len(str(v).encode()) > mine.size for v in new.values):
                    raise omero.ValidationException(
                        message=f"Maximum string (byte) length in column {mine.name} is {mine.size}")
            elif isinstance(mine, _ARRAY_COLUMNS):
                if any(len(v) != mine.size for v in new.values):  # AbstractArrayColumn.arrays
                    raise omero.ValidationException(
                        message=f"Column {mine.name} requires arrays of length {mine.size}")
        for mine, new in zip(t["columns"], columns):
            mine.values.extend(new.values)

    def _rpc_Table_getHeaders(self, s: _Session, sid: int, ctx: Any = None) -> list:
        cols = self._table(s, sid)["columns"] or []
        heads = []
        for c in cols:
            h = type(c)()
            h.__dict__.update({k: v for k, v in c.__dict__.items() if k != "values"})
            h.values = None
            heads.append(h)
        return heads

    def _rpc_Table_getNumberOfRows(self, s: _Session, sid: int, ctx: Any = None) -> int:
        cols = self._table(s, sid)["columns"] or []
        return len(cols[0].values) if cols else 0

    def _rpc_Table_read(self, s: _Session, sid: int, col_numbers: list, start: int, stop: int,
                        ctx: Any = None) -> Any:
        cols = self._table(s, sid)["columns"] or []
        out = []
        for i in col_numbers:
            c = type(cols[i])()
            c.__dict__.update(cols[i].__dict__)
            c.values = list(cols[i].values[start:stop])
            out.append(c)
        return omero.grid.Data(lastModification=0, rowNumbers=list(range(start, stop)), columns=out)

    def _rpc_Table_getOriginalFile(self, s: _Session, sid: int, ctx: Any = None) -> Any:
        return self._load(self._svc(s, sid, "table")["file"], set())

    def _rpc_Table_close(self, s: _Session, sid: int, ctx: Any = None) -> None:
        self._services.pop(sid, None)

    def _rpc_SharedResources_openTable(self, s: _Session, original_file: Any, ctx: Any = None) -> Optional[int]:
        if original_file is None or original_file.id is None:
            raise omero.ValidationException(message="file must be a managed instance.")
        fid = original_file.id.val
        if not self.tables or fid not in self._tables:
            self._wait_registry()
            raise omero.InternalException(message="No tables service available (omero.grid.registry_timeout)")
        return self._open(s, "table", file=fid)

