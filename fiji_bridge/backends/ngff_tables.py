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

:class:`TableWriterProcess` writes tables with ngio in a child process at
the lowest CPU priority: importing ngio costs about 1.7 CPU-seconds (dask,
xarray, pandas, anndata), which a batch that only needs its plate tables at
the end spends on the cores its JVMs leave idle, not on theirs.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .base import BackendError, ObjectTable

__all__ = ["TABLE_BACKENDS", "TableWriterProcess", "write_label", "write_tables"]

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


def write_tables(group_dir: Path, tables: Sequence[ObjectTable], *, plate: bool = False,
                 backend: str = "parquet") -> None:
    """Write ``tables`` into the image (or, with ``plate``, the plate) group
    at ``group_dir`` with ngio, replacing tables of the same names."""
    ngio = _ngio()
    if backend not in TABLE_BACKENDS:
        raise BackendError(f"table backend {backend!r} is not one of {', '.join(TABLE_BACKENDS)}")
    try:
        owner = (ngio.open_ome_zarr_plate(str(group_dir), cache=True) if plate
                 else ngio.open_ome_zarr_container(str(group_dir), cache=True))
        for t in tables:
            owner.add_table(t.name, _ngio_table(t), backend=backend, overwrite=True)
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"cannot write tables {[t.name for t in tables]} in {group_dir}: {type(e).__name__}: {e}") from None


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
