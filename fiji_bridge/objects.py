"""Objects from macro outputs: label images, bounding boxes, ROI tables.

What the NGFF tools (napari, ngio, Fractal) expect next to an image, made
from what an ImageJ macro leaves behind, independently of the store:

* :class:`LabelSpec` / :func:`parse_label_specs`: which output image is a
  label (``--labels mask``, ``mask=nuclei``, ``mask=nuclei:objects``);
* :func:`to_labels`: an output image (TZCYX) -> a TZYX label array. A binary
  mask (ImageJ's 0/255) stays binary, values 0/1, unless ``objects`` asks for
  connected components (8-connected, numbered in raster order frame by
  frame, the order in which ImageJ's particle analyzer finds and lists them);
  an integer label image is kept as it is;
* :func:`object_boxes`, :func:`field_box`, :func:`roi_boxes`: ROI table
  columns in Fractal's layout (``x_micrometer``, ``len_x_micrometer``, ...,
  physical units from the ImageJ calibration; pixels count as 1 µm when the
  image is not calibrated);
* :func:`rois_to_labels`: ImageJ area ROIs painted into a label image
  (ROI ``i`` -> value ``i + 1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .components import Calibration

__all__ = [
    "LabelSpec",
    "LabelSpecError",
    "ROIS",
    "declared_labels",
    "field_box",
    "object_boxes",
    "parse_label_specs",
    "roi_boxes",
    "rois_to_labels",
    "to_labels",
]

#: the label source that means "the macro's ROI Manager areas"
ROIS = "rois"
_SPEC_RE = re.compile(r"^\s*(?P<image>[^=:]+?)\s*(?:=\s*(?P<name>[^:]+?)\s*)?(?::\s*(?P<mode>objects|binary)\s*)?$", re.I)
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_TO_UM = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
          "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6}
#: ROI types with an area (painted into a label image when asked)
AREA_TYPES = ("rectangle", "oval", "polygon", "freehand", "traced", "composite", "ellipse", "rotated rectangle")


class LabelSpecError(ValueError):
    """A ``--labels`` entry cannot be understood."""


@dataclass(frozen=True)
class LabelSpec:
    """One output image to store as a label image.

    ``image``: the macro's output image title (``"rois"``: the ROI Manager's
    area ROIs); ``name``: the label's name in the store; ``objects``:
    connected components of a binary mask (else it stays 0/1)."""

    image: str
    name: str
    objects: bool = False

    def matches(self, title: str) -> bool:
        return title == self.image or title.strip().lower() == self.image.strip().lower()


def _label_name(s: str) -> str:
    n = _NAME_RE.sub("_", s.strip()).strip("._")
    if not n:
        raise LabelSpecError(f"bad label name {s!r}: use letters, digits, '.', '_' or '-'")
    return n


def parse_label_specs(specs: Union[None, str, Sequence[Union[str, LabelSpec]]]) -> list[LabelSpec]:
    """``"mask"``, ``"mask=nuclei"``, ``"mask=nuclei:objects"`` (several
    separated by commas, or a list) -> :class:`LabelSpec` list."""
    if not specs:
        return []
    items: list[Union[str, LabelSpec]] = list(specs.split(",")) if isinstance(specs, str) else list(specs)
    out: list[LabelSpec] = []
    for it in items:
        if isinstance(it, LabelSpec):
            out.append(it)
            continue
        if not str(it).strip():
            continue
        m = _SPEC_RE.match(str(it))
        if not m:
            raise LabelSpecError(f"--labels {it!r}: expected IMAGE[=NAME][:objects], e.g. mask=nuclei:objects")
        image = m.group("image")
        out.append(LabelSpec(image=image, name=_label_name(m.group("name") or image),
                             objects=(m.group("mode") or "").lower() == "objects"))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LabelSpecError(f"--labels: label name(s) {', '.join(dup)} given twice")
    return out


def declared_labels(code: str) -> list[LabelSpec]:
    """Labels a macro declares in its header, ImageJ-comment style like its
    outputs: ``// Output labels: "mask" (objects)``, several comma-separated."""
    for line in code.splitlines():
        m = re.match(r"^\s*//\s*Output labels\s*:(.*)$", line)
        if m:
            out = []
            for title, rest in re.findall(r'"([^"]+)"\s*(\([^)]*\))?', m.group(1)):
                objects = "objects" in rest.lower()
                out.append(LabelSpec(image=title, name=_label_name(title), objects=objects))
            return out
    return []


def to_labels(image: np.ndarray, *, objects: bool = False) -> np.ndarray:
    """An output image (TZCYX, first channel used) -> TZYX labels.

    A binary image (two values, 0 and one other) becomes 0/1 ``uint8``, or,
    with ``objects``, its 8-connected components numbered 1..n over the
    planes in T, Z order and raster order within a plane (``uint32``). Any
    other integer image is kept as labels (unsigned). Floats are refused.
    """
    from scipy import ndimage

    a = np.asarray(image)
    if a.ndim != 5:
        raise LabelSpecError(f"a label image must be TZCYX, got shape {a.shape}")
    a = a[:, :, 0]
    if not np.issubdtype(a.dtype, np.integer):
        if np.all(np.mod(a, 1) == 0) and a.min() >= 0:
            a = a.astype(np.uint32)
        else:
            raise LabelSpecError(f"a label image needs integer values, got {a.dtype} with fractions")
    values = np.unique(a)
    binary = len(values) <= 2 and values[0] == 0 or len(values) == 1
    if not binary:
        if a.min() < 0:
            raise LabelSpecError("a label image cannot have negative values")
        return a.astype(np.uint32 if a.max() > 65535 else np.uint16, copy=False)
    fg = a > 0
    if not objects:
        return fg.astype(np.uint8)
    out = np.zeros(fg.shape, np.uint32)
    offset = 0
    eight = np.ones((3, 3), bool)
    for t in range(fg.shape[0]):
        for z in range(fg.shape[1]):
            lab, n = ndimage.label(fg[t, z], structure=eight)
            out[t, z] = np.where(lab > 0, lab + offset, 0)
            offset += n
    return out


def _um(cal: Optional[Calibration]) -> tuple[float, float, float]:
    """(x, y, z) pixel sizes in micrometres (1 when not calibrated)."""
    if cal is None or not cal.is_set:
        return 1.0, 1.0, 1.0
    f = _TO_UM.get((cal.unit or "").strip().lower(), 1.0)
    px = float(cal.pixel_width or cal.pixel_height or 1.0) * f
    py = float(cal.pixel_height or cal.pixel_width or 1.0) * f
    pz = float(cal.pixel_depth or 1.0) * f
    return px, py, pz


def _box_columns() -> dict[str, list]:
    return {k: [] for k in ("x_micrometer", "y_micrometer", "z_micrometer",
                            "len_x_micrometer", "len_y_micrometer", "len_z_micrometer")}


def object_boxes(labels: np.ndarray, calibration: Optional[Calibration] = None) -> dict[str, list]:
    """Bounding boxes of the objects of a TZYX label array: ``label`` and the
    box columns, one row per label value present (ascending)."""
    from scipy import ndimage

    px, py, pz = _um(calibration)
    lab = np.asarray(labels)
    cols: dict[str, list] = {"label": [], **_box_columns()}
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):  # T, Z, Y, X slices of label i
        if sl is None:
            continue
        _, z, y, x = sl
        cols["label"].append(i)
        for k, s, p in (("x", x, px), ("y", y, py), ("z", z, pz)):
            cols[f"{k}_micrometer"].append(s.start * p)
            cols[f"len_{k}_micrometer"].append((s.stop - s.start) * p)
    return cols


def field_box(shape: Sequence[int], calibration: Optional[Calibration] = None, name: str = "FOV") -> dict[str, list]:
    """The whole field (TZCYX ``shape``) as one ROI row named ``name``."""
    px, py, pz = _um(calibration)
    _, z, _, y, x = shape
    return {"FieldIndex": [name], "x_micrometer": [0.0], "y_micrometer": [0.0], "z_micrometer": [0.0],
            "len_x_micrometer": [x * px], "len_y_micrometer": [y * py], "len_z_micrometer": [z * pz]}


def roi_boxes(rois: Sequence[Any], calibration: Optional[Calibration] = None, size_z: int = 1) -> dict[str, list]:
    """ImageJ ROIs -> ROI table columns: ``FieldIndex`` (the ROI's name, made
    unique) and the box of its coordinates (its Z plane, or every plane when
    its Z position is 0). Only the specification's columns: the ROIs
    themselves, with type and C/Z/T position, are kept as ImageJ ``.roi`` data."""
    px, py, pz = _um(calibration)
    cols: dict[str, list] = {"FieldIndex": [], **_box_columns()}
    seen: dict[str, int] = {}
    for i, r in enumerate(rois):
        name = str(r.name or f"roi_{i + 1}")
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        xy = np.asarray(r.coordinates, dtype=float).reshape(-1, 2)
        x0, y0 = (xy.min(axis=0) if len(xy) else (0.0, 0.0))
        x1, y1 = (xy.max(axis=0) if len(xy) else (0.0, 0.0))
        z = (tuple(r.position) + (0, 0, 0))[1]
        cols["FieldIndex"].append(name)
        cols["x_micrometer"].append(float(x0) * px)
        cols["y_micrometer"].append(float(y0) * py)
        cols["len_x_micrometer"].append(float(x1 - x0) * px)
        cols["len_y_micrometer"].append(float(y1 - y0) * py)
        cols["z_micrometer"].append(float(max(int(z) - 1, 0)) * pz)
        cols["len_z_micrometer"].append((1.0 if z else float(size_z)) * pz)
    return cols


def polygon_mask(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(Y, X) bool mask of the pixels whose centres lie inside the polygon
    ``xy`` ((N, 2) x, y in pixel-corner coordinates), by scanlines."""
    ny, nx = shape
    out = np.zeros((ny, nx), bool)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo = max(int(np.floor(y0.min())), 0)
    hi = min(int(np.ceil(y0.max())), ny)
    for row in range(lo, hi):
        yc = row + 0.5
        cross = (y0 <= yc) != (y1 <= yc)  # edges crossing the scanline (half-open: no double count)
        if not cross.any():
            continue
        xs = np.sort(x0[cross] + (yc - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross]))
        for a, b in zip(xs[0::2], xs[1::2]):
            start = max(int(np.ceil(a - 0.5)), 0)  # first pixel centre >= a
            stop = min(int(np.ceil(b - 0.5)), nx)  # centres < b
            if stop > start:
                out[row, start:stop] = True
    return out


def rois_to_labels(rois: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    """Area ROIs painted into a TZYX label array for a field of TZCYX
    ``shape``: ROI ``i`` (in ROI Manager order, areas only) gets ``i + 1``,
    on its Z/T position or every plane when that is 0; later ROIs paint over
    earlier ones where they overlap. A pixel belongs to a ROI when its centre
    is inside the ROI's polygon (even-odd rule), as ImageJ's masks are made."""
    t, z, _, y, x = shape
    out = np.zeros((t, z, y, x), np.uint32 if len(rois) > 65535 else np.uint16)
    for i, r in enumerate(rois):
        if str(r.type).lower() not in AREA_TYPES:
            continue
        xy = np.asarray(r.coordinates, dtype=float).reshape(-1, 2)
        if len(xy) < 3:
            continue
        m = polygon_mask(xy, (y, x))
        _, rz, rt = (tuple(r.position) + (0, 0, 0))[:3]
        ts = range(t) if not rt else [int(rt) - 1]
        zs = range(z) if not rz else [int(rz) - 1]
        for ti in ts:
            for zi in zs:
                if 0 <= ti < t and 0 <= zi < z:
                    out[ti, zi][m] = i + 1
    return out
