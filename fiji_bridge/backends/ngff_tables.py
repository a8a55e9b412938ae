"""Labels and tables inside OME-Zarr plates, in the layout ngio defines.

Written with ngio's own API (Fractal's library), so ngio, Fractal and
napari-ome-zarr find them::

    <plate>.zarr/tables/<name>/            plate-level tables (``plate.list_tables()``)
    <plate>.zarr/A/1/0/labels/<name>/      a label image of field 0 of well A1:
                                           NGFF ``image-label``, ``source`` -> ``../../``
    <plate>.zarr/A/1/0/tables/<name>/      field tables (``image.list_tables()``):
                                           feature (tied to a label), ROI, masking ROI, generic

Tables are typed as ngio types them (``feature_table``, ``roi_table``,
``masking_roi_table``, ``condition_table``, ``generic_table``); the storage
backend is ngio's ``parquet`` by default (ngio and Fractal read every
backend; an AnnData table takes ~8x as long to write: ~100 ms against
~12 ms), ``anndata`` or ``csv`` on request. The NGFF version (0.4 / 0.5) follows the
image's. A label that is a projection of a Z stack (one plane per T) is
stored with Z = 1.

Generic tables in the ``parquet`` and ``csv`` backends (a batch's plate
tables) are written with pyarrow alone, in the layout ngio 1.1 gives them
(``ngio/tables/_tables_container.py`` ``TablesContainer.add``,
``backends/_py_arrow_backends.py``): the group ``tables/<name>/`` whose only
attribute is ``{"backend": ...}``, the file ``table.parquet`` (or
``table.csv``) beside it, and the name appended to the ``tables`` list of
the ``tables/`` group. pyarrow imports in ~0.2 CPU-s, ngio in ~2.5 (dask,
xarray, pandas, anndata). ``tests/test_ngff_outputs.py`` reads them back
with ngio and compares them with the tables ngio itself writes.

:class:`TableWriterProcess` writes tables with ngio in a child process at
the lowest CPU priority, for a batch whose plate tables need ngio (the
``anndata`` backend): importing ngio costs about 2.5 CPU-seconds, which the
batch spends on the cores its JVMs leave idle, not on theirs.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ._local import replace_dir
from .base import BackendError, ObjectTable
from .ngff_meta import group_format, read_attrs, write_group

__all__ = ["TABLE_BACKENDS", "TableWriterProcess", "needs_ngio", "write_label", "write_tables"]

log = logging.getLogger("fiji_bridge.backends")

#: ngio table storage backends
TABLE_BACKENDS = ("anndata", "parquet", "csv")


def _ngio() -> Any:
    try:
        import ngio
    except ImportError as e:  # pragma: no cover - a dependency
        raise BackendError(f"writing NGFF labels and tables needs ngio (pip install ngio): {e}") from None
    return ngio


def write_label(image_dir: Path, name: str, labels: np.ndarray) -> None:
    """Write TZYX ``labels`` as the label ``name`` of the OME-Zarr image at
    ``image_dir`` (replacing one of that name)."""
    ngio = _ngio()
    lab = np.asarray(labels)
    if lab.ndim != 4:
        raise BackendError(f"label {name!r}: expected a TZYX array, got shape {lab.shape}")
    try:
        container = ngio.open_ome_zarr_container(str(image_dir), cache=True)  # one write: cached metadata
        image = container.get_image()
        dims = dict(zip(image.axes, image.shape))
        t, z, y, x = lab.shape
        if (y, x) != (dims.get("y"), dims.get("x")) or t != dims.get("t", 1):
            raise BackendError(
                f"label {name!r} of shape TZYX {lab.shape} does not fit its image "
                f"(T={dims.get('t', 1)}, Y={dims.get('y')}, X={dims.get('x')})")
        if z not in (1, dims.get("z", 1)):
            raise BackendError(f"label {name!r} has {z} Z planes, its image {dims.get('z', 1)} (use 1 or the same)")
        shape = [{"t": t, "z": z, "y": y, "x": x}[a] for a in image.axes if a != "c"]
        chunks = [{"y": min(y, 2048), "x": min(x, 2048)}.get(a, 1) for a in image.axes]  # in the image's axes
        label = container.derive_label(name, shape=shape, dtype=lab.dtype.name, chunks=chunks, overwrite=True)
        axes = [a for a in label.axes]
        order = [i for i, a in enumerate("tzyx") if a in axes]
        data = lab if len(order) == 4 else lab.reshape([lab.shape[i] for i in order])
        label.set_array(np.ascontiguousarray(data))
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"cannot write label {name!r} in {image_dir}: {type(e).__name__}: {e}") from None


def _frame(columns: Any, index: str | None) -> Any:
    import pandas as pd

    df = pd.DataFrame({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else list(v) for k, v in columns.items()})
    for k in df.columns:  # ImageJ text columns are objects: keep them strings
        if df[k].dtype == object:
            df[k] = df[k].astype(str)
    if index is not None:
        df = df.set_index(index)
    return df


def _rois(table: ObjectTable) -> list:
    from ngio import Roi

    cols = table.columns
    out = []
    for i in range(table.rows):
        slices = {a: (float(cols[f"{a}_micrometer"][i]), float(cols[f"len_{a}_micrometer"][i]))
                  for a in "xyz" if f"{a}_micrometer" in cols}
        extra = {k: cols[k][i] for k in cols
                 if k not in (table.index or "") and not k.endswith("_micrometer")}
        if table.kind == "masking_roi":
            lab = int(cols["label"][i])
            out.append(Roi.from_values(slices, name=str(lab), label=lab, **extra))
        else:
            out.append(Roi.from_values(slices, name=str(cols["FieldIndex"][i]), **extra))
    return out


def _ngio_table(table: ObjectTable) -> Any:
    from ngio.tables import ConditionTable, FeatureTable, GenericTable, MaskingRoiTable, RoiTable

    if table.kind == "feature":
        return FeatureTable(_frame(table.columns, "label"), reference_label=table.label)
    if table.kind == "masking_roi":
        return MaskingRoiTable(_rois(table), reference_label=table.label)
    if table.kind == "roi":
        return RoiTable(_rois(table))
    if table.kind == "condition":
        return ConditionTable(_frame(table.columns, None))
    return GenericTable(_frame(table.columns, None))


def needs_ngio(tables: Sequence[ObjectTable], backend: str) -> bool:
    """Whether writing ``tables`` in ``backend`` takes ngio (typed tables,
    AnnData); generic parquet and CSV tables are written with pyarrow."""
    return backend == "anndata" or any(t.kind != "generic" for t in tables)


def write_tables(group_dir: Path, tables: Sequence[ObjectTable], *, plate: bool = False,
                 backend: str = "parquet") -> None:
    """Write ``tables`` into the image (or, with ``plate``, the plate) group
    at ``group_dir`` in ngio's layout, replacing tables of the same names."""
    if backend not in TABLE_BACKENDS:
        raise BackendError(f"table backend {backend!r} is not one of {', '.join(TABLE_BACKENDS)}")
    if not needs_ngio(tables, backend):
        _write_generic_tables(group_dir, tables, backend)
        return
    ngio = _ngio()
    try:
        owner = (ngio.open_ome_zarr_plate(str(group_dir), cache=True) if plate
                 else ngio.open_ome_zarr_container(str(group_dir), cache=True))
        for t in tables:
            owner.add_table(t.name, _ngio_table(t), backend=backend, overwrite=True)
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"cannot write tables {[t.name for t in tables]} in {group_dir}: {type(e).__name__}: {e}") from None


def _arrow_column(values: Sequence[Any]) -> Any:
    """A column as pandas types it from a list, then ngio stores it:
    bools, int64, float64 (ints and floats mixed, NaN), else strings
    (``str()`` of every cell, as :func:`_frame` makes object columns).

    Built from its buffers: ``pa.array`` imports pandas (~0.45 CPU-s) to
    look for pandas types first."""
    import pyarrow as pa

    vals = np.asarray(values).tolist() if isinstance(values, np.ndarray) else list(values)
    n = len(vals)
    kinds = {type(v) for v in vals}
    try:
        if not kinds:  # no rows: as ngio reads an empty column back
            return pa.Array.from_buffers(pa.float64(), 0, [None, pa.py_buffer(np.zeros(0))])
        if kinds <= {bool}:
            bits = np.packbits(np.array(vals, dtype=bool), bitorder="little")
            return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(bits)])
        if kinds <= {int}:
            return pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(np.array(vals, dtype=np.int64))])
        if kinds <= {int, float}:
            return pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(np.array(vals, dtype=np.float64))])
    except OverflowError:  # ints beyond int64: pandas keeps them as objects
        pass
    encoded = [str(v).encode() for v in vals]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise BackendError(f"a text column of {offsets[-1]} bytes: over the 2 GiB of one table column")
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                  pa.py_buffer(b"".join(encoded))])


def _write_generic_tables(group_dir: Path, tables: Sequence[ObjectTable], backend: str) -> None:
    """Generic tables with pyarrow, as ngio lays them out (module docstring)."""
    import pyarrow as pa

    fmt = group_format(group_dir)
    if fmt is None:
        raise BackendError(f"cannot write tables {[t.name for t in tables]}: {group_dir} is not a zarr group")
    root = group_dir / "tables"
    attrs = read_attrs(root)
    if attrs is None:
        attrs = {}
    elif attrs and not isinstance(attrs.get("tables"), list):  # as ngio's TablesContainer refuses it
        raise BackendError(f"cannot write tables in {root}: its attributes are not ngio's list of tables "
                           f"({json.dumps(attrs)[:200]})")
    names = list(attrs.get("tables", []))
    for t in tables:
        if not t.name or "/" in t.name or t.name.startswith("."):
            raise BackendError(f"bad table name {t.name!r}: a table is a folder of {root}")
        try:
            data = pa.Table.from_arrays([_arrow_column(v) for v in t.columns.values()], names=[str(k) for k in t.columns])
            data.validate(full=True)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise BackendError(f"cannot write table {t.name!r}: {type(e).__name__}: {e}") from None
        tmp = root / f".{t.name}.{uuid.uuid4().hex[:12]}"
        try:
            write_group(tmp, fmt, {"backend": backend}, atomic=False)
            _write_arrow(data, tmp, backend)
            replace_dir(tmp, root / t.name, trash_prefix=f".trash-{t.name}.")
        except (OSError, pa.ArrowException) as e:
            raise BackendError(f"cannot write table {t.name!r} in {root}: {type(e).__name__}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
        if t.name not in names:
            names.append(t.name)
    if attrs.get("tables") != names or group_format(root) != fmt:
        write_group(root, fmt, {**attrs, "tables": names})


def _write_arrow(data: Any, folder: Path, backend: str) -> None:
    """``table.parquet`` or ``table.csv`` of ``data`` in ``folder``, as ngio's pyarrow backends write them."""
    if backend == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(data, str(folder / "table.parquet"))
    else:
        import pyarrow.csv as pa_csv

        pa_csv.write_csv(data, str(folder / "table.csv"))


# ------------------------------------------------------- a child process that writes tables


class TableWriterProcess:
    """A child process (``python -m fiji_bridge.backends.ngff_tables``, at
    nice 19) that imports ngio at once, says ``ready``, and then writes one
    set of tables with :func:`write_tables`: :meth:`write` sends them and
    waits. A child not ready by then (a machine too busy to give it its
    idle cycles) is stopped and the tables are written in the caller's
    process, so a batch never waits on a starved child. It exits after that
    write, or when its parent goes (its stdin closes)."""

    def __init__(self) -> None:
        self._err = tempfile.TemporaryFile()
        self._ready = False
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, "-m", "fiji_bridge.backends.ngff_tables"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._err)
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        except OSError:  # pragma: no cover - gone already, or not permitted: it still writes
            pass

    def ready(self) -> bool:
        """Whether the child has imported ngio and waits for its tables (or
        has died: then False, and for good)."""
        proc = self.proc
        if proc is None or proc.stdout is None:
            return False
        if self._ready:
            return True
        if not select.select([proc.stdout], [], [], 0)[0]:
            return False
        self._ready = proc.stdout.readline() == b"ready\n"  # "" = it died
        return self._ready

    def _stderr(self) -> str:
        self._err.seek(0)
        lines = self._err.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def write(self, group_dir: Path, tables: Sequence[ObjectTable], *, plate: bool = False, backend: str = "parquet",
              timeout: float = 600) -> None:
        """As :func:`write_tables`, in the child (once) when it is ready,
        else here. Raises BackendError with ngio's reason when the tables
        could not be written."""
        if self.proc is None:
            raise BackendError("this table writer process has written its tables already")
        try:
            self._write(group_dir, tables, plate, backend, timeout)
        finally:
            self._err.close()

    def _write(self, group_dir: Path, tables: Sequence[ObjectTable], plate: bool, backend: str, timeout: float) -> None:
        ready = self.ready()
        proc, self.proc = self.proc, None
        assert proc is not None
        if not needs_ngio(tables, backend):  # pyarrow's: no reason to send them over
            proc.kill()
            proc.communicate()
            write_tables(group_dir, tables, plate=plate, backend=backend)
            return
        if not ready:
            proc.kill()
            proc.communicate()
            why = self._stderr() if proc.returncode not in (None, -9) else "not ready yet"
            log.info("the table writer process is %s: writing the tables in this process", why or f"gone (exit {proc.returncode})")
            write_tables(group_dir, tables, plate=plate, backend=backend)
            return
        doc = {"group": str(group_dir), "plate": plate, "backend": backend,
               "tables": [{"name": t.name, "kind": t.kind, "label": t.label,
                           "columns": {k: np.asarray(v).tolist() for k, v in t.columns.items()}} for t in tables]}
        try:
            out, _ = proc.communicate(json.dumps(doc).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BackendError(f"the table writer process took more than {timeout:.0f} s") from None
        try:
            reply = json.loads(out.decode() or "{}")
        except ValueError:
            reply = {}
        if reply.get("ok") and proc.returncode == 0:
            return
        if "error" in reply:  # the tables themselves: ngio said why
            raise BackendError(str(reply["error"]))
        # the child died before it could answer: write them here
        log.warning("the table writer process ended (exit %s: %s): writing the tables in this process",
                    proc.returncode, self._stderr())
        write_tables(group_dir, tables, plate=plate, backend=backend)

    def close(self) -> None:
        """Stop the child if it has not written (a batch that ends without tables)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.communicate()
            self._err.close()


def _serve() -> int:
    """The child of :class:`TableWriterProcess`: ngio first, then one request."""
    _ngio()
    import ngio.tables  # noqa: F401  (the table classes: most of the import)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        doc = json.loads(sys.stdin.buffer.read() or b"null")
    except ValueError as e:
        print(json.dumps({"ok": False, "error": f"bad request: {e}"}))
        return 2
    if doc is None:  # the parent went without a request
        return 0
    try:
        tables = [ObjectTable(t["name"], t["columns"], kind=t["kind"], label=t["label"]) for t in doc["tables"]]
        write_tables(Path(doc["group"]), tables, plate=bool(doc["plate"]), backend=str(doc["backend"]))
    except BackendError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    code = _serve()
    sys.stdout.flush()
    os._exit(code)  # the answer is out: no teardown of dask, pandas and ngio for the parent to wait on
