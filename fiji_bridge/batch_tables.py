"""A batch's bookkeeping on the derived plate: unit markers and plate tables.

Each unit's outputs are written first and its *marker* last
(``<well>/fiji_bridge_unit_s<site>.json``: done or failed, with the tables it
wrote), so the markers say exactly which units are done. :func:`assemble`
builds the plate-level tables from the per-unit tables the markers list, in
plate order (well, field, row), plus a per-well summary of each and the
failures table; the same tables also go to the store's NGFF tables (ngio's
layout) where it has them.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from .outputs import save_plate_ngff, slug

__all__ = ["MARKER", "assemble", "marker_path", "read_marker"]

log = logging.getLogger("fiji_bridge.batch")

#: the name of a unit's marker file
MARKER = "fiji_bridge_unit"


def marker_path(scheme: str, plate: str, well: str, site: int) -> str:
    return f"/{scheme}/plate_{plate}/{well}/{MARKER}_s{site:03d}.json"


def _csv_rows(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return [], []
    return rows[0], rows[1:]


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def read_marker(backend: Any, plate: str, well: str, site: int) -> Optional[dict]:
    path = marker_path(backend.scheme, plate, well, site)
    try:
        if not backend.exists(path):
            return None
        data = backend.load(path)
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def assemble(backend: Any, plate: str, units: Sequence[tuple[str, int]], well_order: Mapping[str, int],
              failures: list[dict], save_table: Optional[Callable[[str, str, str], str]] = None,
              known: Optional[Mapping[tuple[str, int], tuple[dict, Mapping[str, str]]]] = None,
              ngff_writer: Any = None) -> dict[str, str]:
    """Plate tables from the per-unit tables of every done unit (in plate
    order: well, field, row), per-well summaries, and the failures table.
    ``save_table(plate, name, text) -> path`` writes them (default: the backend's).
    ``known``: (marker, {table: CSV text}) of units this run wrote, exactly
    as written: those are not read back; the others (earlier runs) are.
    ``ngff_writer``: the process that writes the NGFF copies of the plate
    tables (:class:`~fiji_bridge.backends.ngff_tables.TableWriterProcess`)."""
    save_table = save_table or backend.save_table
    known = known or {}
    per_table: dict[str, list[tuple[tuple[int, int], list[str], list[list[str]]]]] = {}
    failed: list[dict] = []
    for w, s in sorted(units, key=lambda u: (well_order.get(u[0], 1 << 30), u[1])):
        marker, texts = known.get((w, s)) or (read_marker(backend, plate, w, s), {})
        if not marker:
            continue
        if marker.get("status") != "done":
            failed.append({"well": w, "field": s, **(marker.get("error") or {})})
            continue
        for title, path in (marker.get("tables") or {}).items():
            text = texts.get(title)
            if text is None:
                text = backend.load(f"/{backend.scheme}/{path.lstrip('/').split('/', 1)[1]}")  # a fallback plate too
            header, rows = _csv_rows(text if isinstance(text, str) else str(text))
            per_table.setdefault(title, []).append(((well_order.get(w, 0), s), header, rows))
    written: dict[str, str] = {}
    ngff: dict[str, tuple[list[str], list[list[str]]]] = {}  # the same tables for the NGFF tools
    for title, parts in per_table.items():
        header: list[str] = []
        for _, h, _ in parts:
            header += [c for c in h if c not in header]
        rows = []
        for _, h, rs in parts:
            idx = [h.index(c) if c in h else None for c in header]
            rows += [[r[i] if i is not None and i < len(r) else "" for i in idx] for r in rs]
        name = slug(title)
        written[title] = save_table(plate, name, _csv_text(header, rows))
        per_well = _per_well(header, rows)
        written[f"{title} per well"] = save_table(plate, f"{name}_per_well", per_well)
        ngff[name] = (header, rows)
        ngff[f"{name}_per_well"] = _csv_rows(per_well)
    try:
        save_plate_ngff(backend, plate, ngff, writer=ngff_writer)
    except Exception as e:  # the CSV tables are written: say so, keep the batch's result
        log.error("could not write the plate tables for the NGFF tools: %s", e)
    # failures from this run first, then units still failed from earlier runs
    seen = {(f["well"], f["field"]) for f in failures}
    failures.extend(f for f in failed if (f["well"], f["field"]) not in seen)
    if failures:
        fails = sorted(failures, key=lambda f: (well_order.get(f["well"], 1 << 30), f["field"]))
        failures[:] = fails
        written["failures"] = save_table(
            plate, "failures",
            _csv_text(["well", "field", "kind", "message", "line"],
                      [[f["well"], f["field"], f.get("kind", ""), f.get("message", ""), f.get("line") or ""] for f in fails]))
    return written


def _numbers(rows: list[list[str]], i: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Column ``i`` as floats and where it has a value (cells ``""`` have
    none), each cell parsed once; None when a cell is not a number, or no cell
    has a value."""
    cells = [r[i] for r in rows]
    present = np.array([c != "" for c in cells], dtype=bool)
    if not present.any():
        return None
    try:
        values = np.array([float(c) if c != "" else 0.0 for c in cells], dtype=float)
    except (TypeError, ValueError):
        return None
    return values, present


def _per_well(header: list[str], rows: list[list[str]]) -> str:
    """Rows per well, fields per well, and the mean of every numeric column."""
    skip = {"plate", "well", "field"}
    columns = {c: _numbers(rows, i) for i, c in enumerate(header) if c not in skip and rows}
    numeric = {c: col for c, col in columns.items() if col is not None}
    iw, ifd = header.index("well"), header.index("field")
    ip = header.index("plate") if "plate" in header else None
    groups: dict[str, list[int]] = {}
    for n, r in enumerate(rows):
        groups.setdefault(r[iw], []).append(n)
    out = []
    for w, idx in groups.items():
        line: list[Any] = [rows[idx[0]][ip] if ip is not None else "", w, len(idx), len({rows[n][ifd] for n in idx})]
        at = np.array(idx)
        for values, present in numeric.values():
            vals = values[at][present[at]]
            line.append(repr(float(np.mean(vals))) if vals.size else "")
        out.append(line)
    return _csv_text(["plate", "well", "rows", "fields"] + [f"mean_{c}" for c in numeric], out)
