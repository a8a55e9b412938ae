"""Plane coordinates and the virtual path codec.

Every image plane that moves through fiji-bridge is addressed by its
*components*: the plate it belongs to, the well, the site (field) in the
well, and its channel, z and time indices. This module is the one place where
those components are defined, validated and turned into names.

Conventions, stated once:

* ``site``, ``channel``, ``z`` and ``t`` are **0-based** integers everywhere
  (in the API, on the wire, in virtual paths), like OMERO's well samples and
  plane indices and the Cellomics ``f``/``d`` fields. Importers convert
  1-based conventions (ImageXpress ``_s1_w1``) on the way in.
* Wells are a row letter (or two: ``AA`` for 1536-well plates) and a
  1-based column, written with at least two digits: ``A01``, ``P24``,
  ``AF48``. ``A1`` is accepted as input and normalised to ``A01``.
* A virtual path names one plane of a plate in a store::

      /<scheme>/plate_<plate>/<well>/<well>_s<site>_z<z>_c<c>_t<t>.tif
      /omero/plate_12/A01/A01_s001_z000_c000_t000.tif   (site 1 = 2nd field)

  Indices are zero-padded to three digits (more digits when needed). Other
  files (tables, JSON) live beside planes: ``/<scheme>/plate_<plate>/results.csv``
  or ``/<scheme>/plate_<plate>/<well>/<name>.csv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

__all__ = [
    "Calibration",
    "ComponentError",
    "PlaneComponents",
    "VirtualPath",
    "format_well",
    "normalize_well",
    "parse_well",
    "stack_key",
]


class ComponentError(ValueError):
    """A component value (well name, index, path) is malformed."""


_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def parse_well(well: str) -> tuple[int, int]:
    """Return the 0-based (row, column) of a well name such as ``"B03"``.

    >>> parse_well("A01"), parse_well("b3"), parse_well("AA10")
    ((0, 0), (1, 2), (26, 9))
    """
    m = _WELL_RE.match(str(well).strip())
    if not m:
        raise ComponentError(
            f"bad well name {well!r}: expected a row letter and a column number, e.g. 'A01'"
        )
    letters, digits = m.group(1).upper(), int(m.group(2))
    if digits < 1:
        raise ComponentError(f"bad well name {well!r}: columns start at 1")
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row - 1, digits - 1


def format_well(row: int, column: int) -> str:
    """Format 0-based (row, column) as a well name: ``(1, 2) -> "B03"``."""
    if row < 0 or column < 0:
        raise ComponentError(f"well row/column must be >= 0, got ({row}, {column})")
    letters = ""
    r = row + 1
    while r:
        r, rem = divmod(r - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{column + 1:02d}"


def normalize_well(well: str) -> str:
    """``"a1" -> "A01"``; raises :class:`ComponentError` on a malformed name."""
    return format_well(*parse_well(well))


@dataclass(frozen=True)
class Calibration:
    """Physical pixel sizes of an image, as ImageJ's ``Calibration`` holds them.

    ``None`` means unknown (ImageJ then shows pixels). ``unit`` applies to
    x, y and z; ``frame_interval`` is in ``time_unit``.
    """

    pixel_width: Optional[float] = None
    pixel_height: Optional[float] = None
    pixel_depth: Optional[float] = None
    unit: str = "micron"
    frame_interval: Optional[float] = None
    time_unit: str = "s"

    @property
    def is_set(self) -> bool:
        return self.pixel_width is not None or self.pixel_height is not None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Calibration":
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def stack_key(plate: str = "", well: str = "", site: Optional[int] = 0) -> str:
    """The default window key of a plane: plate + well + site.

    ``stack_key("p1", "A01", 2) -> "p1/A01/s002"``; empty parts are left out;
    with nothing at all the key is ``"default"``.
    """
    parts = [p for p in (str(plate or ""), str(well or "")) if p]
    if site is not None and (parts or site):
        parts.append(f"s{int(site):03d}")
    return "/".join(parts) or "default"


@dataclass(frozen=True)
class PlaneComponents:
    """Where one 2-D plane belongs: plate, well, site and its (c, z, t) indices."""

    plate: str = ""
    well: str = ""
    site: int = 0
    channel: int = 0
    z: int = 0
    t: int = 0
    #: optional display name of the channel ("DAPI"); not part of the address
    channel_name: Optional[str] = field(default=None, compare=False)

    # indices above this are refused: a typo, not a real acquisition
    MAX_INDEX = 100_000

    def __post_init__(self) -> None:
        for name in ("site", "channel", "z", "t"):
            v = getattr(self, name)
            if isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", "") == "b":
                raise ComponentError(f"{name} must be an integer, got {v!r}")
            if not isinstance(v, int):
                try:
                    iv = int(v)
                except (TypeError, ValueError):
                    raise ComponentError(f"{name} must be an integer, got {v!r}") from None
                if iv != v:
                    raise ComponentError(f"{name} must be an integer, got {v!r}")
                object.__setattr__(self, name, iv)
                v = iv
            if v < 0 or v > self.MAX_INDEX:
                raise ComponentError(f"{name}={v} is out of range 0..{self.MAX_INDEX}")
        if self.well:
            object.__setattr__(self, "well", normalize_well(self.well))
        object.__setattr__(self, "plate", str(self.plate or ""))

    @property
    def stack_key(self) -> str:
        """The default stack (window) key: plate + well + site."""
        return stack_key(self.plate, self.well, self.site)

    def with_(self, **changes) -> "PlaneComponents":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = {
            "plate": self.plate,
            "well": self.well,
            "site": self.site,
            "channel": self.channel,
            "z": self.z,
            "t": self.t,
        }
        if self.channel_name is not None:
            d["channel_name"] = self.channel_name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlaneComponents":
        unknown = set(d) - {"plate", "well", "site", "channel", "z", "t", "channel_name"}
        if unknown:
            raise ComponentError(f"unknown components: {sorted(unknown)}")
        return cls(**d)


_PLANE_RE = re.compile(
    r"^(?P<well>[A-Z]{1,2}\d{2,3})_s(?P<site>\d{3,})_z(?P<z>\d{3,})_c(?P<c>\d{3,})_t(?P<t>\d{3,})\.tif$"
)


@dataclass(frozen=True)
class VirtualPath:
    """A parsed virtual path: ``/<scheme>/plate_<plate>[/<well>][/<name>]``.

    ``components`` is set when the name is a plane name; ``name`` is the file
    name otherwise (``results.csv``), or ``None`` for a plate/well directory.
    """

    scheme: str
    plate: str
    well: Optional[str] = None
    name: Optional[str] = None
    components: Optional[PlaneComponents] = None

    @classmethod
    def plane(cls, scheme: str, c: PlaneComponents) -> "VirtualPath":
        if not c.plate or not c.well:
            raise ComponentError("a plane path needs a plate and a well")
        return cls(scheme, c.plate, c.well, _plane_name(c), c)

    @classmethod
    def parse(cls, path: str) -> "VirtualPath":
        """Parse a virtual path; raises :class:`ComponentError` when malformed."""
        parts = [p for p in str(path).split("/") if p]
        if len(parts) < 2 or not parts[1].startswith("plate_") or len(parts[1]) <= 6:
            raise ComponentError(
                f"bad virtual path {path!r}: expected /<scheme>/plate_<id>/[<well>/]<file>"
            )
        scheme, plate = parts[0], parts[1][len("plate_"):]
        rest = parts[2:]
        if len(rest) > 2:
            raise ComponentError(f"bad virtual path {path!r}: too deep")
        well = name = None
        comps = None
        if len(rest) == 2:
            well, name = normalize_well(rest[0]), rest[1]
        elif len(rest) == 1:
            if _WELL_RE.match(rest[0]):
                well = normalize_well(rest[0])
            else:
                name = rest[0]
        if name is not None:
            m = _PLANE_RE.match(name)
            if m:
                if well is None or normalize_well(m.group("well")) != well:
                    raise ComponentError(
                        f"bad virtual path {path!r}: plane file is not in its well's folder"
                    )
                comps = PlaneComponents(
                    plate=plate,
                    well=well,
                    site=int(m.group("site")),
                    z=int(m.group("z")),
                    channel=int(m.group("c")),
                    t=int(m.group("t")),
                )
        return cls(scheme, plate, well, name, comps)

    def __str__(self) -> str:
        parts = ["", self.scheme, f"plate_{self.plate}"]
        if self.well:
            parts.append(self.well)
        if self.name:
            parts.append(self.name)
        return "/".join(parts)

    @property
    def is_plane(self) -> bool:
        return self.components is not None


def _plane_name(c: PlaneComponents) -> str:
    return f"{c.well}_s{c.site:03d}_z{c.z:03d}_c{c.channel:03d}_t{c.t:03d}.tif"
