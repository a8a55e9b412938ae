"""Build a plate from a folder of HCS image files (``fiji-bridge import``).

File-name conventions (the extension ``.tif``/``.tiff`` in any case):

* ``cellomics``: ``<plate>_<well>f<field>d<channel>.tif``, e.g.
  ``AS_09125_050116030001_D03f00d1.tif``; field and channel are 0-based.
  Optional ``_z<z>`` and ``_t<t>`` suffixes (0-based) before the extension.
* ``imagexpress``: ``<plate>_<well>_s<site>_w<channel>.tif`` (MetaXpress);
  site, channel and the optional ``_z<z>`` / ``_t<t>`` suffixes are 1-based
  and converted to 0-based. ``_s`` and ``_w`` may be absent (one site, one
  channel). Thumbnails (``..._thumb....tif``) are skipped.
* any regular expression with named groups ``well``, ``site`` or ``field``,
  ``channel``, and optionally ``z``, ``t``, ``plate``; numbers are taken as
  0-based; ``channel`` may be a name (``DAPI``). It is matched against the
  file name (``re.fullmatch``).

For every convention, files in sub-folders named ``TimePoint_<n>`` or
``ZStep_<n>`` (MetaXpress, 1-based) take their t / z from the folder when
the name carries none. Without ``--pattern`` each convention is tried and the
one that places most files wins.

Channels, z and t are renumbered densely in sorted order (a folder holding
only Cellomics channel ``d2`` becomes a one-channel plate whose channel is
named ``d2``); sites keep their (0-based) numbers. Pixels are stored
unchanged (dtype preserved). Every file that cannot be placed - not a TIFF,
no match, another plate, not one 2-D plane, a shape or dtype unlike the
others, a duplicate - is listed in the :class:`ImportReport` with the
reason; planes missing from a field are stored as zeros and listed too.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import tifffile

from .backends import BackendError, PlateURI, URIError, open_plate
from .components import ComponentError, normalize_well

__all__ = ["FolderImportError", "ImportReport", "Placement", "PATTERNS", "import_folder", "import_command", "match_files"]

_TIF = re.compile(r"\.tiff?$", re.IGNORECASE)
_SUFFIX_ZT = r"(?:_z(?P<z>\d+))?(?:_t(?P<t>\d+))?"
PATTERNS: dict[str, re.Pattern] = {
    "cellomics": re.compile(
        r"(?P<plate>.+)_(?P<well>[A-Za-z]{1,2}\d{2,3})f(?P<site>\d+)d(?P<channel>\d+)" + _SUFFIX_ZT + r"\.tiff?",
        re.IGNORECASE,
    ),
    "imagexpress": re.compile(
        r"(?P<plate>.+?)_(?P<well>[A-Za-z]{1,2}\d{2,3})(?:_s(?P<site>\d+))?(?:_w(?P<channel>\d+))?" + _SUFFIX_ZT + r"\.tiff?",
        re.IGNORECASE,
    ),
}
#: conventions whose site/channel/z/t numbers start at 1
_ONE_BASED = {"imagexpress"}
_CHANNEL_PREFIX = {"cellomics": "d", "imagexpress": "w"}
_FOLDER_RE = {"t": re.compile(r"^TimePoint_(\d+)$", re.IGNORECASE), "z": re.compile(r"^ZStep_(\d+)$", re.IGNORECASE)}
_THUMB = re.compile(r"_thumb", re.IGNORECASE)


class FolderImportError(BackendError):
    """The folder cannot become a plate (nothing matches, bad pattern)."""


@dataclass(frozen=True)
class Placement:
    """Where one file goes (before channel/z/t are renumbered)."""

    path: Path
    plate: str
    well: str
    site: int
    channel: str  # raw channel value (renumbered later)
    z: int
    t: int


@dataclass
class ImportReport:
    """What an import did: the plate, what was placed, what was not and why."""

    plate_uri: str = ""
    plate: str = ""
    pattern: str = ""
    files: int = 0
    placed: int = 0
    wells: list[str] = field(default_factory=list)
    fields: dict[str, list[int]] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    shape: tuple[int, ...] = ()  # TZCYX of each field
    dtype: str = ""
    unplaced: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    missing: list[str] = field(default_factory=list)  # planes stored as zeros

    @property
    def ok(self) -> bool:
        return self.placed > 0

    def summary(self) -> str:
        lines = [
            f"imported {self.placed} of {self.files} files into {self.plate_uri} "
            f"(pattern {self.pattern}): {len(self.wells)} wells, "
            f"{sum(len(v) for v in self.fields.values())} fields, TZCYX {self.shape} {self.dtype}, "
            f"channels {', '.join(self.channel_names)}",
        ]
        if self.unplaced:
            lines.append(f"{len(self.unplaced)} files not placed:")
            lines += [f"  {f}: {why}" for f, why in self.unplaced]
        if self.missing:
            lines.append(f"{len(self.missing)} planes missing (stored as zeros):")
            lines += [f"  {m}" for m in self.missing]
        return "\n".join(lines)


def _compile(pattern: str) -> tuple[str, re.Pattern]:
    if pattern.lower() in PATTERNS:
        return pattern.lower(), PATTERNS[pattern.lower()]
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise FolderImportError(f"bad --pattern {pattern!r}: {e} (give cellomics, imagexpress or a regex)") from None
    groups = set(rx.groupindex)
    if "well" not in groups or not ({"site", "field"} & groups) or "channel" not in groups:
        raise FolderImportError(
            f"--pattern {pattern!r} needs named groups well, site (or field) and channel, "
            f"e.g. (?P<well>[A-P]\\d\\d)_s(?P<site>\\d+)_(?P<channel>\\w+)\\.tif; it has {sorted(groups)}"
        )
    return pattern, rx


def _folder_index(rel: Path, axis: str) -> Optional[int]:
    for part in rel.parts[:-1]:
        m = _FOLDER_RE[axis].match(part)
        if m:
            return int(m.group(1)) - 1
    return None


def match_files(folder: Path, files: Sequence[Path], kind: str, rx: re.Pattern) -> tuple[list[Placement], list[tuple[str, str]]]:
    """Placements of the files a convention matches, and the others with why."""
    placed, unplaced = [], []
    one = 1 if kind in _ONE_BASED else 0
    for f in files:
        rel = f.relative_to(folder)
        if not _TIF.search(f.name):
            unplaced.append((str(rel), "not a TIFF file"))
            continue
        if kind == "imagexpress" and _THUMB.search(f.name):
            unplaced.append((str(rel), "thumbnail"))
            continue
        m = rx.fullmatch(f.name)
        if not m:
            unplaced.append((str(rel), f"name does not match the {kind} pattern"))
            continue
        g = m.groupdict()
        try:
            well = normalize_well(g["well"])
            site = int(g.get("site") or g.get("field") or one) - one
            channel = g.get("channel") or str(one)
            z = int(g["z"]) - one if g.get("z") else _folder_index(rel, "z") or 0
            t = int(g["t"]) - one if g.get("t") else _folder_index(rel, "t") or 0
            if min(site, z, t) < 0:
                raise ComponentError(f"an index below {one} in a {kind} name")
        except (ComponentError, ValueError) as e:
            unplaced.append((str(rel), f"bad components: {e}"))
            continue
        placed.append(Placement(f, g.get("plate") or "", well, site, str(channel), z, t))
    return placed, unplaced


def _dense(values: Sequence[str]) -> dict[str, int]:
    key = (lambda v: (0, int(v), v)) if all(v.isdigit() for v in values) else (lambda v: (1, 0, v))
    return {v: i for i, v in enumerate(sorted(set(values), key=key))}


def _header(path: Path) -> tuple[tuple[int, ...], str]:
    with tifffile.TiffFile(path) as tif:
        s = tif.series[0]
        return tuple(int(n) for n in s.shape), np.dtype(s.dtype).name


def import_folder(
    folder: Union[str, Path],
    plate_uri: Union[str, Path, PlateURI],
    *,
    pattern: Optional[str] = None,
    name: Optional[str] = None,
) -> ImportReport:
    """Import ``folder`` into a new plate at ``plate_uri``; see the module doc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderImportError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FolderImportError(f"{folder} holds no files")

    kinds = [_compile(pattern)] if pattern else [(k, rx) for k, rx in PATTERNS.items()]
    best = None
    for kind, rx in kinds:
        placed, unplaced = match_files(folder, files, kind, rx)
        if best is None or len(placed) > len(best[2]):
            best = (kind, rx, placed, unplaced)
    assert best is not None
    kind, _, placed, unplaced = best
    if not placed:
        tried = pattern or " or ".join(PATTERNS)
        raise FolderImportError(
            f"no file in {folder} matches {tried}; give --pattern with a regex "
            f"(named groups well, site, channel[, z, t])"
        )

    # one plate per import: files of other plates are reported
    plates = Counter(p.plate for p in placed)
    main_plate = plates.most_common(1)[0][0]
    if len(plates) > 1:
        for p in placed:
            if p.plate != main_plate:
                unplaced.append((str(p.path.relative_to(folder)), f"belongs to plate {p.plate!r}, not {main_plate!r}"))
        placed = [p for p in placed if p.plate == main_plate]

    # every plane must be one 2-D image of the common shape and dtype
    headers = {}
    for p in placed:
        try:
            headers[p] = _header(p.path)
        except Exception as e:  # tifffile raises several types on a corrupt file
            unplaced.append((str(p.path.relative_to(folder)), f"unreadable TIFF: {e}"))
    common = Counter(h for h in headers.values() if len(h[0]) == 2).most_common(1)
    if not common:
        raise FolderImportError(f"no file in {folder} is a single 2-D plane")
    (yx, dtype), _ = common[0]
    good: dict[tuple[str, int, str, int, int], Placement] = {}
    for p, (shape, dt) in headers.items():
        rel = str(p.path.relative_to(folder))
        if len(shape) != 2:
            unplaced.append((rel, f"not one 2-D plane (shape {shape})"))
        elif (shape, dt) != (yx, dtype):
            unplaced.append((rel, f"{dt} {shape[0]}x{shape[1]} unlike the plate's {dtype} {yx[0]}x{yx[1]}"))
        else:
            key = (p.well, p.site, p.channel, p.z, p.t)
            if key in good:
                unplaced.append((rel, f"same position as {good[key].path.relative_to(folder)}"))
            else:
                good[key] = p

    chans = _dense([k[2] for k in good])
    zs = _dense([str(k[3]) for k in good])
    ts = _dense([str(k[4]) for k in good])
    size = (len(ts), len(zs), len(chans)) + tuple(yx)
    prefix = _CHANNEL_PREFIX.get(kind, "")
    channel_names = [f"{prefix}{c}" for c in chans]

    try:
        u = plate_uri if isinstance(plate_uri, PlateURI) else PlateURI.parse(plate_uri)
    except URIError as e:
        raise FolderImportError(str(e)) from None
    store, ref = open_plate(u)
    label = name or main_plate or folder.name
    pid = store.create_plate(
        ref or label,
        provenance={
            "imported_from": str(folder.resolve()),
            "pattern": kind,
            "source_plate": main_plate,
            "name": label,
            "files": str(len(good)),
            "tool": "fiji-bridge import",
        },
    )
    report = ImportReport(
        plate_uri=str(u.with_plate(pid)),
        plate=pid,
        pattern=kind,
        files=len(files),
        channel_names=channel_names,
        shape=size,
        dtype=dtype,
        unplaced=unplaced,
    )
    units = sorted({(k[0], k[1]) for k in good}, key=lambda wf: (normalize_well(wf[0]), wf[1]))
    try:
        for well, site in units:
            arr = np.zeros(size, dtype=dtype)
            for c, ci in chans.items():
                for z, zi in zs.items():
                    for t, ti in ts.items():
                        p = good.get((well, site, c, int(z), int(t)))
                        if p is None:
                            report.missing.append(f"{well} site {site} channel {channel_names[ci]} z {z} t {t}")
                            continue
                        arr[ti, zi, ci] = tifffile.imread(p.path)
                        report.placed += 1
            store.save_field(pid, well, site, arr, name=f"{well}_s{site:03d}", channel_names=channel_names)
            report.fields.setdefault(well, []).append(site)
    finally:
        store.close()
    report.wells = sorted(report.fields)
    report.unplaced.sort()
    return report


def import_command(folder: str, plate_uri: str, *, pattern: Optional[str] = None, name: Optional[str] = None) -> int:
    """CLI body of ``fiji-bridge import``: 0 when files were placed, 1 when
    none could be, 2 on an error (printed)."""
    try:
        report = import_folder(folder, plate_uri, pattern=pattern, name=name)
    except BackendError as e:
        print(f"fiji-bridge import: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1
