"""What the local plate stores share: virtual-path dispatch, the structure
cache, tables beside the plate, plate-level locks, data validation.

A local store keeps each plate in a folder under its root and implements the
field-level primitives (``_read_layout``, ``_field_info``, ``_read_plane``,
``_read_field``, ``_write_field``, ``_write_planes``, ``_init_plate``,
``_read_extra``/``_write_extra``). Everything path-shaped lives here, so the
OME-Zarr and OME-TIFF stores behave the same.

Tables live in ``<plate folder>/tables/[<well>/]<name>.csv|json``, each
written atomically; a plate's tables are the files there (keyed by their
path under ``tables/``, ``results.csv`` or ``A01/cells.csv``). Earlier
versions also listed them in the plate's metadata (``fiji_bridge.tables``):
one read-modify-write of a growing document per table, which a plate of
thousands of fields felt; that list is no longer written nor needed.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ..components import Calibration, ComponentError, PlaneComponents, VirtualPath, normalize_well, parse_well
from .base import BackendError, Data, NotFound, PlateStructure, VirtualBackend, columns_to_csv

TABLE_SUFFIXES = (".csv", ".json")
#: file names no table may take: the metadata of a zarr group (an OME-Zarr
#: plate's ``tables/`` folder is one: ngio's tables live there too)
RESERVED_TABLE_NAMES = frozenset({"zarr.json", ".zattrs", ".zgroup", ".zarray"})
#: pixel types every store (and ImageJ) handles
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Layout:
    """Where a plate's fields live: ``wells[well][site] = store-relative path``."""

    wells: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FieldInfo:
    """Sizes of one stored field image."""

    shape: tuple[int, int, int, int, int]  # TZCYX
    dtype: str


def slug(name: str) -> str:
    """A plate name -> a safe folder stem: ``"run 1/a" -> "run_1_a"``."""
    s = _SLUG_RE.sub("_", str(name).strip()).strip("._")
    if not s:
        raise BackendError(f"bad plate name {name!r}: use letters, digits, '.', '_' or '-'")
    return s


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_plane(data: Any, path: str) -> np.ndarray:
    """A plane to write: a 2-D array of a supported dtype."""
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise BackendError(f"cannot save {path}: a plane must be 2-D (Y, X), got shape {arr.shape}")
    _check_dtype(arr.dtype, path)
    return arr


def check_field(array: Any, what: str) -> np.ndarray:
    """A field to write: a 5-D TZCYX array of a supported dtype."""
    arr = np.asarray(array)
    if arr.ndim != 5:
        raise BackendError(f"cannot save {what}: a field must be 5-D TZCYX, got shape {arr.shape}")
    if 0 in arr.shape:
        raise BackendError(f"cannot save {what}: empty field of shape {arr.shape}")
    _check_dtype(arr.dtype, what)
    return arr


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if np.dtype(dtype).name not in SUPPORTED_DTYPES:
        raise BackendError(
            f"cannot save {what}: pixel type {np.dtype(dtype).name} is not supported "
            f"(use one of {', '.join(SUPPORTED_DTYPES)})"
        )


def encode_table(data: Data, path: str) -> bytes:
    """CSV text/columns or JSON data -> file bytes, validated."""
    if path.endswith(".csv"):
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        if isinstance(data, Mapping):
            data = columns_to_csv(data)
        if not isinstance(data, str):
            raise BackendError(f"cannot save {path}: a .csv takes CSV text or a columns mapping, got {type(data).__name__}")
        return data.encode("utf-8")
    if isinstance(data, (bytes, str)):
        try:
            json.loads(data)
        except ValueError as e:
            raise BackendError(f"cannot save {path}: not valid JSON ({e})") from None
        return data.encode("utf-8") if isinstance(data, str) else data
    try:
        return json.dumps(data, indent=1, default=_json_default).encode("utf-8")
    except TypeError as e:
        raise BackendError(f"cannot save {path}: not JSON-serialisable ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def decode_table(raw: bytes, path: str) -> Data:
    text = raw.decode("utf-8")
    return json.loads(text) if path.endswith(".json") else text


def _is_well_folder(name: str) -> bool:
    """A folder of well tables: named as the well is (``A01``)."""
    try:
        return normalize_well(name) == name
    except (ComponentError, ValueError):
        return False


def atomic_write(path: Path, raw: bytes) -> None:
    """Write ``raw`` to ``path`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_dir(new: Path, final: Path, trash_prefix: str = ".trash-") -> None:
    """Rename the folder ``new`` to ``final``; an old ``final`` is moved aside
    first (``<trash_prefix><hex>`` beside it) and removed after, so a reader
    sees the old folder or the new one, never a mix."""
    trash = None
    if final.exists():
        trash = final.parent / f"{trash_prefix}{uuid.uuid4().hex[:12]}"
        os.rename(final, trash)
    os.rename(new, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


_thread_locks: dict[str, threading.RLock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def plate_lock(plate_dir: Path) -> Iterator[None]:
    """Exclusive lock on a plate's metadata, across threads and processes
    (``fcntl.flock`` on ``<plate>/.fiji_bridge.lock``)."""
    key = str(plate_dir)
    with _thread_locks_guard:
        tl = _thread_locks.setdefault(key, threading.RLock())
    with tl:
        plate_dir.mkdir(parents=True, exist_ok=True)
        with open(plate_dir / ".fiji_bridge.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sort_wells(wells: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(wells, key=parse_well))


class LocalPlateStore(VirtualBackend):
    """Plates as folders under ``root``; subclasses store the field images."""

    #: suffix of a plate folder (".zarr"), "" for plain folders
    plate_suffix = ""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        self.metadata_reads = 0
        self._structures: dict[str, PlateStructure] = {}
        self._layouts: dict[str, Layout] = {}
        self._plates_seen: set[Path] = set()  # plate folders found to be plates (refresh forgets them)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # ------------------------------------------------------------ subclass API

    @abc.abstractmethod
    def _is_plate_dir(self, d: Path) -> bool:
        """Whether ``d`` holds a plate of this store."""

    @abc.abstractmethod
    def _read_layout(self, plate: str, d: Path) -> tuple[PlateStructure, Layout]:
        """Read the plate's structure from disk (counts ``metadata_reads``)."""

    @abc.abstractmethod
    def _field_info(self, plate: str, rel: str) -> FieldInfo:
        """Sizes of the field stored at ``rel`` (raises NotFound)."""

    @abc.abstractmethod
    def _read_plane(self, plate: str, rel: str, t: int, z: int, c: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _read_field(self, plate: str, rel: str) -> np.ndarray:
        """The field at ``rel`` as TZCYX."""

    @abc.abstractmethod
    def _write_field(
        self,
        plate: str,
        well: str,
        site: int,
        array: np.ndarray,
        name: str,
        channel_names: Sequence[str],
        calibration: Calibration,
    ) -> str:
        """Write (replace) a whole field and register it in the plate,
        atomically; return its store-relative path."""

    @abc.abstractmethod
    def _write_planes(
        self, plate: str, rel: str, info: FieldInfo, planes: Sequence[tuple[int, int, int, np.ndarray]]
    ) -> None:
        """Write planes (t, z, c, yx) into an existing field of ``info.shape``
        (already grown to fit them)."""

    @abc.abstractmethod
    def _grow_field(self, plate: str, rel: str, info: FieldInfo, shape: tuple[int, ...]) -> None:
        """Make an existing field TZCYX ``shape`` (>= its current sizes), zero-filled."""

    @abc.abstractmethod
    def _init_plate(self, d: Path, plate: str, name: str, rows: int, columns: int, extra: dict) -> None:
        """Create an empty plate folder with its metadata."""

    @abc.abstractmethod
    def _read_extra(self, d: Path) -> dict:
        """The plate's ``fiji_bridge`` metadata (provenance, tables)."""

    @abc.abstractmethod
    def _write_extra(self, d: Path, extra: dict) -> None:
        ...

    # ----------------------------------------------------------------- plates

    def plate_dir(self, plate: str) -> Path:
        """The folder of ``plate`` (existing or to be created)."""
        if not plate or "/" in plate or plate in (".", ".."):
            raise ComponentError(f"bad plate id {plate!r}")
        d = self.root / f"{plate}{self.plate_suffix}"
        if self.plate_suffix and not d.exists():
            bare = self.root / plate
            if bare.is_dir() and self._is_plate_dir(bare):
                return bare
        return d

    def _existing_plate_dir(self, plate: str) -> Path:
        d = self.plate_dir(plate)
        if not (d.is_dir() and self._is_plate_dir(d)):
            raise NotFound(f"plate {plate!r} not found in {self.root} (looked for {d})")
        return d

    def plate_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and self._is_plate_dir(d):
                stem = d.name[: -len(self.plate_suffix)] if self.plate_suffix and d.name.endswith(self.plate_suffix) else d.name
                out.append(stem)
        return sorted(out)

    def plate_structure(self, plate: str) -> PlateStructure:
        s = self._structures.get(plate)
        if s is None:
            s, layout = self._read_layout(plate, self._existing_plate_dir(plate))
            self._structures[plate] = s
            self._layouts[plate] = layout
        return s

    def refresh(self, plate: Optional[str] = None) -> None:
        """Forget cached structures (all, or one plate's): the next call re-reads."""
        if plate is None:
            self._structures.clear()
            self._layouts.clear()
            self._plates_seen.clear()
        else:
            self._structures.pop(plate, None)
            self._layouts.pop(plate, None)
            self._plates_seen.discard(self.plate_dir(plate))

    def _well_sites(self, plate: str, well: str, site: Optional[int] = None) -> Optional[dict[int, str]]:
        """The fields of a well (site -> store path), or None. On a miss (no
        such well, or no such ``site``) the structure is re-read once: another
        process may have written it since it was cached."""
        for attempt in range(2):
            self.plate_structure(plate)
            sites = self._layouts[plate].wells.get(well)
            if (sites is not None and (site is None or site in sites)) or attempt:
                return sites
            self.refresh(plate)
        return None  # pragma: no cover

    def _field_rel(self, plate: str, well: str, site: int) -> str:
        """Store-relative path of a field; raises NotFound."""
        well = normalize_well(well)
        sites = self._well_sites(plate, well, int(site))
        if sites is None:
            raise NotFound(f"well {well} not found in plate {plate!r}")
        if int(site) not in sites:
            raise NotFound(f"field {site} of well {well} not found in plate {plate!r} (it has fields {sorted(sites)})")
        return sites[int(site)]

    def _register(self, plate: str, well: str, site: int, rel: str, arr: np.ndarray,
                  names: Sequence[str], calibration: Calibration) -> None:
        """Update the cached structure after writing a field (no re-read)."""
        s, layout = self._structures.get(plate), self._layouts.get(plate)
        if s is None or layout is None:
            return
        layout.wells.setdefault(well, {})[site] = rel
        wells = sort_wells(list(layout.wells))
        fields = {w: max(layout.wells[w]) + 1 for w in wells}
        r, col = parse_well(well)
        s = replace(s, wells=wells, fields=fields, rows=max(s.rows, r + 1), columns=max(s.columns, col + 1))
        first = wells[0], min(layout.wells[wells[0]])
        if first == (well, site):  # the plate's sizes and channels are its first field's
            t, z, c, y, x = arr.shape
            s = replace(s, size_t=t, size_z=z, size_c=c, size_y=y, size_x=x, dtype=arr.dtype.name,
                        channel_names=tuple(names) or tuple(f"Channel {i}" for i in range(c)),
                        calibration=calibration)
        self._structures[plate] = s

    def create_plate(
        self,
        name: str,
        like: Optional[PlateStructure] = None,
        *,
        provenance: Optional[Mapping[str, Any]] = None,
    ) -> str:
        plate = slug(name)
        d = self.plate_dir(plate)
        if d.exists():
            raise BackendError(f"cannot create plate {plate!r}: {d} already exists (choose another name or delete it)")
        rows = columns = 0
        if like is not None:
            rows, columns = like.rows, like.columns
            for w in like.wells:
                r, c = parse_well(w)
                rows, columns = max(rows, r + 1), max(columns, c + 1)
        extra = {
            "version": 1,
            "created": now_iso(),
            "provenance": dict(provenance or {}),
        }
        if like is not None:
            extra["like"] = {"plate": like.plate, "name": like.name}
        self._init_plate(d, plate, str(name), rows, columns, extra)
        self.refresh(plate)
        return plate

    def plate_provenance(self, plate: str) -> dict:
        """What ``create_plate(provenance=...)`` recorded ({} when nothing)."""
        return dict(self._read_extra(self._existing_plate_dir(plate)).get("provenance") or {})

    def _ensure_plate(self, plate: str) -> Path:
        """The plate's folder; a plate written to without ``create_plate``
        is created on the fly (local stores only)."""
        d = self.plate_dir(plate)
        if d in self._plates_seen:  # a unit writes several files: the plate is looked for once
            return d
        if not (d.is_dir() and self._is_plate_dir(d)):
            with plate_lock(self.root / ".locks" / plate):
                if not (d.is_dir() and self._is_plate_dir(d)):
                    self._init_plate(d, plate, plate, 0, 0, {"version": 1, "created": now_iso(), "provenance": {}})
        self._plates_seen.add(d)
        return d

    # ------------------------------------------------------------------ fields

    def load_field(self, plate: str, well: str, site: int) -> np.ndarray:
        return self._read_field(plate, self._field_rel(plate, well, site))

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
        c = PlaneComponents(plate=plate, well=well, site=site)  # validates well/site
        what = f"field {c.well}/s{c.site} of plate {plate!r}"
        arr = check_field(array, what)
        names = list(channel_names or [])
        if names and len(names) != arr.shape[2]:
            raise BackendError(f"cannot save {what}: {len(names)} channel names for {arr.shape[2]} channels")
        self._ensure_plate(plate)
        self._check_against_plate(plate, c.well, c.site, arr.shape, arr.dtype, what)
        rel = self._write_field(
            plate,
            c.well,
            c.site,
            arr,
            name or f"{c.well}_s{c.site:03d}",
            names,
            calibration or Calibration(),
        )
        self._register(plate, c.well, c.site, rel, arr, names, calibration or Calibration())

    def _check_against_plate(self, plate: str, well: str, site: int, shape: tuple, dtype: np.dtype, what: str) -> None:
        """A field must match the plate's other fields in dtype and sizes."""
        s = self.plate_structure(plate)
        others = [(w, f) for w, f in s.units() if (w, f) != (well, site)]
        if not others:
            return
        if np.dtype(dtype).name != s.dtype:
            raise BackendError(f"cannot save {what}: pixel type {np.dtype(dtype).name} differs from the plate's {s.dtype}")
        if tuple(shape) != s.shape:
            raise BackendError(
                f"cannot save {what}: shape TZCYX {tuple(shape)} differs from the plate's {s.shape}"
            )

    # ---------------------------------------------------------- virtual paths

    def _parse_dir(self, directory: str) -> Optional[VirtualPath]:
        parts = [p for p in str(directory).split("/") if p]
        if parts == [self.scheme]:
            return None
        return self.parse(directory)

    def list_files(self, directory: str) -> list[str]:
        vp = self._parse_dir(directory)
        if vp is None:
            return [f"/{self.scheme}/plate_{p}" for p in self.plate_ids()]
        if vp.name is not None:
            raise NotFound(f"{directory} is a file, not a folder")
        d = self._existing_plate_dir(vp.plate)
        tables = list(self._table_files(d))
        base = f"/{self.scheme}/plate_{vp.plate}"
        if vp.well is None:
            s = self.plate_structure(vp.plate)
            return sorted([f"{base}/{w}" for w in s.wells] + [f"{base}/{t}" for t in tables if "/" not in t])
        well = vp.well
        sites = self._well_sites(vp.plate, well)
        if sites is None:
            raise NotFound(f"well {well} not found in plate {vp.plate!r}")
        out = [f"{base}/{t}" for t in tables if t.startswith(f"{well}/")]
        for site, rel in sites.items():
            info = self._field_info(vp.plate, rel)
            st, sz, sc = info.shape[:3]
            for t in range(st):
                for z in range(sz):
                    for ch in range(sc):
                        out.append(self.path(PlaneComponents(vp.plate, well, site, ch, z, t)))
        return sorted(out)

    def exists(self, path: str) -> bool:
        vp = self._parse_dir(path)
        if vp is None:
            return self.root.is_dir()
        d = self.plate_dir(vp.plate)
        if not (d.is_dir() and self._is_plate_dir(d)):
            return False
        if vp.name is not None and vp.components is None:
            return self._table_file(d, vp).is_file()
        if vp.well is None:
            return True
        if vp.components is None:
            return self._well_sites(vp.plate, vp.well) is not None
        c = vp.components
        try:
            rel = self._field_rel(c.plate, c.well, c.site)
            info = self._field_info(c.plate, rel)
        except NotFound:
            return False
        return c.t < info.shape[0] and c.z < info.shape[1] and c.channel < info.shape[2]

    def load(self, path: str) -> Data:
        vp = self.parse(path)
        if vp.components is not None:
            c = vp.components
            rel = self._field_rel(c.plate, c.well, c.site)
            info = self._field_info(c.plate, rel)
            if not (c.t < info.shape[0] and c.z < info.shape[1] and c.channel < info.shape[2]):
                raise NotFound(
                    f"{path} not found: field {c.well}/s{c.site} has T={info.shape[0]} Z={info.shape[1]} C={info.shape[2]}"
                )
            return self._read_plane(c.plate, rel, c.t, c.z, c.channel)
        if vp.name is None:
            raise BackendError(f"cannot load {path}: it is a plate or well folder (use list_files)")
        self._check_table_name(vp, path)
        f = self._table_file(self._existing_plate_dir(vp.plate), vp)
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path} not found") from None
        return decode_table(raw, vp.name)

    def save(self, data: Data, path: str) -> None:
        self.save_batch([data], [path])

    def save_batch(self, datas: Sequence[Data], paths: Sequence[str]) -> None:
        """Write planes grouped by field (one write per field) and tables.
        Every item is validated before anything is written."""
        if len(datas) != len(paths):
            raise ValueError(f"save_batch: {len(datas)} items but {len(paths)} paths")
        fields: dict[tuple[str, str, int], list[tuple[int, int, int, np.ndarray]]] = {}
        tables: list[tuple[VirtualPath, bytes, str]] = []
        for data, path in zip(datas, paths):
            vp = self.parse(path)
            if vp.components is not None:
                c = vp.components
                fields.setdefault((c.plate, c.well, c.site), []).append((c.t, c.z, c.channel, check_plane(data, path)))
            elif vp.name is not None:
                self._check_table_name(vp, path)
                tables.append((vp, encode_table(data, vp.name), path))
            else:
                raise BackendError(f"cannot save to {path}: it is a plate or well folder, not a file")
        for (plate, well, site), planes in fields.items():
            self._save_planes(plate, well, site, planes)
        for vp, raw, path in tables:
            self._save_table_file(vp, raw)

    def _save_planes(self, plate: str, well: str, site: int, planes: list[tuple[int, int, int, np.ndarray]]) -> None:
        what = f"planes of {well}/s{site} in plate {plate!r}"
        yx = {p[3].shape for p in planes}
        dts = {p[3].dtype.name for p in planes}
        if len(yx) > 1 or len(dts) > 1:
            raise BackendError(f"cannot save {what}: planes differ in shape {sorted(yx)} or dtype {sorted(dts)}")
        (ny, nx), dtype = yx.pop(), dts.pop()
        need = (
            max(p[0] for p in planes) + 1,
            max(p[1] for p in planes) + 1,
            max(p[2] for p in planes) + 1,
        )
        self._ensure_plate(plate)
        try:
            rel = self._field_rel(plate, well, site)
        except NotFound:
            rel = None
        if rel is None:  # a new field: the plate's sizes (or what the planes need), zeros elsewhere
            s = self.plate_structure(plate)
            if s.units():
                need = tuple(max(a, b) for a, b in zip(need, s.shape[:3]))  # type: ignore[assignment]
            arr = np.zeros(need + (ny, nx), dtype=dtype)
            for t, z, c, p in planes:
                arr[t, z, c] = p
            self.save_field(plate, well, site, arr)
            return
        info = self._field_info(plate, rel)
        if info.dtype != dtype or info.shape[3:] != (ny, nx):
            raise BackendError(
                f"cannot save {what}: plane {dtype} {ny}x{nx} does not match the field's "
                f"{info.dtype} {info.shape[3]}x{info.shape[4]}"
            )
        grown = tuple(max(a, b) for a, b in zip(info.shape[:3], need))
        if grown != info.shape[:3]:
            self._grow_field(plate, rel, info, grown + info.shape[3:])
            info = FieldInfo(grown + info.shape[3:], info.dtype)
            self.refresh(plate)
        self._write_planes(plate, rel, info, planes)

    # ------------------------------------------------------------------ tables

    def _check_table_name(self, vp: VirtualPath, path: str) -> None:
        if not vp.name or not vp.name.endswith(TABLE_SUFFIXES) or vp.name.startswith("."):
            raise ComponentError(f"bad file name in {path!r}: tables end in .csv or .json, planes follow the plane naming")
        if vp.name in RESERVED_TABLE_NAMES:
            raise ComponentError(f"bad file name in {path!r}: {vp.name} is the name of zarr's own metadata; "
                                 f"give the table another name")

    def _table_file(self, d: Path, vp: VirtualPath) -> Path:
        return d / "tables" / (vp.well or "") / str(vp.name)

    def _save_table_file(self, vp: VirtualPath, raw: bytes) -> None:
        d = self._ensure_plate(vp.plate)
        if vp.well is not None:
            self.plate_structure(vp.plate)  # well tables need no field, but the plate must exist
        atomic_write(self._table_file(d, vp), raw)

    def _table_files(self, d: Path) -> dict[str, tuple[Optional[str], Path]]:
        """The tables of the plate folder ``d``: key (``results.csv``,
        ``A01/cells_s000.csv``) -> (well or None, file)."""
        out: dict[str, tuple[Optional[str], Path]] = {}

        def is_table(e: os.DirEntry) -> bool:
            return (e.name.endswith(TABLE_SUFFIXES) and not e.name.startswith(".")
                    and e.name not in RESERVED_TABLE_NAMES and e.is_file())

        try:
            entries = list(os.scandir(d / "tables"))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for e in entries:
            if is_table(e):
                out[e.name] = (None, Path(e.path))
            elif e.is_dir() and _is_well_folder(e.name):
                for f in os.scandir(e.path):
                    if is_table(f):
                        out[f"{e.name}/{f.name}"] = (e.name, Path(f.path))
        return dict(sorted(out.items()))

    def save_table(self, plate, name, table, *, well=None, site=None) -> str:  # type: ignore[override]
        """As :meth:`VirtualBackend.save_table`; a site's table is named
        ``<name>_s<site>.csv`` in its well's folder."""
        if name.endswith(".csv"):
            name = name[: -len(".csv")]
        if site is not None:
            if well is None:
                raise BackendError("save_table: a site needs its well")
            name = f"{name}_s{int(site):03d}"
        if well is not None:
            well = normalize_well(well)
        return super().save_table(plate, name, table, well=well)

    def tables(self, plate: str) -> dict[str, dict]:
        """The plate's tables, by path under ``tables/``: each with its
        ``path`` (relative to the plate folder), ``format``, ``well`` and
        ``saved`` (the file's modification time)."""
        d = self._existing_plate_dir(plate)
        out = {}
        for key, (well, f) in self._table_files(d).items():
            saved = datetime.fromtimestamp(f.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
            out[key] = {"path": str(f.relative_to(d)), "format": f.suffix[1:], "well": well, "saved": saved}
        return out


def update_json(path: Path, fn: Callable[[dict], None]) -> dict:
    """Read-modify-write a JSON file atomically (callers hold the plate lock)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    fn(data)
    atomic_write(path, json.dumps(data, indent=1).encode())
    return data


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))
