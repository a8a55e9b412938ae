"""ImageJ ROIs <-> OMERO ROIs and shapes.

ImageJ ``.roi`` bytes (ImageJ's RoiEncoder format, read and written with the
``roifile`` package) become ``omero.model.RoiI`` objects with one shape each
(several Points for a multi-point ROI), and back:

==================================  =====================================
ImageJ                              OMERO
==================================  =====================================
rectangle                           Rectangle (x, y = top-left, width, height)
oval                                Ellipse (x, y = centre, radiusX/Y = half sides)
polygon, freehand, traced           Polygon (points "x1,y1 x2,y2 ...")
polyline, freeline, angle           Polyline
line (arrow)                        Line (x1, y1, x2, y2; markerEnd "Arrow")
text                                Label (x, y = top-left, textValue, fontSize)
point (multi-point)                 one Point per point
composite (ShapeRoi)                Mask over its bounds (1 bit per pixel,
                                    row-major, MSB first; a pixel is in when
                                    its centre is inside the path, even-odd)
==================================  =====================================

Coordinates are image pixels with the origin at the top-left corner of the
top-left pixel in both (as omero-ij and OMERO.web use them). Positions:
ImageJ's c/z/t positions are 1-based with 0 = "all"; OMERO's ``theC/theZ/
theT`` are 0-based and unset = all (the off-by-one of omero-ij's ROI Z/T,
openmicroscopy #3682). A stack ROI with only ``position`` set (no hyperstack
position) is taken as a Z position. Names go to ``Roi.name`` and each shape's
``textValue``; stroke and fill colours (ImageJ ARGB) to OMERO's RGBA integers
(``strokeColor``/``fillColor``, signed 32 bit), the stroke width to
``strokeWidth`` in pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..base import BackendError, NotFound

log = logging.getLogger("fiji_bridge.backends.omero")

__all__ = ["OmeroRoiError", "ImagejShape", "rois_to_omero", "omero_to_rois", "mask_of_path"]


class OmeroRoiError(BackendError):
    """An ImageJ ROI that cannot be stored in OMERO (the message says which and why)."""


def _roifile() -> Any:
    try:
        import roifile
    except ImportError as e:  # pragma: no cover - a dependency
        raise OmeroRoiError(f"ImageJ ROIs need the roifile package: pip install roifile ({e})") from None
    return roifile


@dataclass
class ImagejShape:
    """One ImageJ ROI as read from its bytes (the part OMERO keeps)."""

    name: str
    kind: str  # rectangle, ellipse, polygon, polyline, line, points, mask
    coords: np.ndarray  # rectangle/ellipse: [[left, top], [right, bottom]]; others: (N, 2) x, y
    position: tuple[int, int, int] = (0, 0, 0)  # (c, z, t), 1-based, 0 = all
    stroke: Optional[int] = None  # ARGB as ImageJ stores it
    fill: Optional[int] = None
    stroke_width: float = 0.0
    mask: Optional[np.ndarray] = field(default=None, repr=False)  # bool (H, W) at coords[0]
    text: str = ""  # a text ROI's text
    font_size: int = 0
    arrow: bool = False


# -- colours ------------------------------------------------------------------------------


def _argb(raw: bytes) -> Optional[int]:
    v = int.from_bytes(bytes(raw), "big")
    return v or None  # 0: ImageJ's "no colour"


def argb_to_rgba(argb: int) -> int:
    """ImageJ ARGB -> OMERO's signed 32-bit RGBA."""
    a, r, g, b = (argb >> 24) & 255, (argb >> 16) & 255, (argb >> 8) & 255, argb & 255
    v = (r << 24) | (g << 16) | (b << 8) | a
    return v - (1 << 32) if v >= 1 << 31 else v


def rgba_to_argb(rgba: int) -> int:
    v = rgba & 0xFFFFFFFF
    r, g, b, a = (v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255, v & 255
    return (a << 24) | (r << 16) | (g << 8) | b


# -- ImageJ bytes -> ImagejShape -------------------------------------------------------------------


def parse_imagej(data: bytes, name: str = "", position: Optional[Sequence[int]] = None) -> ImagejShape:
    """Read one ImageJ ``.roi`` encoding."""
    rf = _roifile()
    try:
        r = rf.ImagejRoi.frombytes(bytes(data))
    except Exception as e:
        raise OmeroRoiError(f"ROI {name!r}: not an ImageJ .roi encoding ({type(e).__name__}: {e})") from None
    T = rf.ROI_TYPE
    if position is None or tuple(position) == (0, 0, 0):
        c, z, t = int(r.c_position), int(r.z_position), int(r.t_position)
        if (c, z, t) == (0, 0, 0) and int(r.position) > 0:
            z = int(r.position)
    else:
        c, z, t = (int(v) for v in position)
    common = dict(name=name or r.name or "", position=(c, z, t), stroke=_argb(r.stroke_color),
                  fill=_argb(r.fill_color), stroke_width=float(r.float_stroke_width or r.stroke_width or 0))
    if r.composite and r.roitype == T.RECT:
        paths = [np.asarray(p, float) for p in r.coordinates(multi=True)]
        left, top, right, bottom = int(r.left), int(r.top), int(r.right), int(r.bottom)
        mask = mask_of_path(paths, left, top, right - left, bottom - top)
        return ImagejShape(kind="mask", coords=np.array([[left, top], [right, bottom]], float), mask=mask, **common)
    S = rf.ROI_SUBTYPE
    if r.roitype == T.RECT and r.subtype == S.TEXT:
        return ImagejShape(kind="label", coords=np.array([[r.left, r.top], [r.right, r.bottom]], float),
                           text=(r.text or "").rstrip("\n"), font_size=int(r.text_size or 0), **common)
    if r.roitype in (T.RECT, T.OVAL):
        if r.subpixelrect:
            box = [[r.xd, r.yd], [r.xd + r.widthd, r.yd + r.heightd]]
        else:
            box = [[r.left, r.top], [r.right, r.bottom]]
        return ImagejShape(kind="rectangle" if r.roitype == T.RECT else "ellipse", coords=np.array(box, float),
                           **common)
    if r.roitype == T.LINE:
        return ImagejShape(kind="line", coords=np.array([[r.x1, r.y1], [r.x2, r.y2]], float),
                           arrow=r.subtype == S.ARROW, **common)
    pts = np.asarray(r.coordinates(), float).reshape(-1, 2)
    if r.roitype in (T.POLYGON, T.FREEHAND, T.TRACED):
        return ImagejShape(kind="polygon", coords=pts, **common)
    if r.roitype in (T.POLYLINE, T.FREELINE, T.ANGLE):
        return ImagejShape(kind="polyline", coords=pts, **common)
    if r.roitype == T.POINT:
        return ImagejShape(kind="points", coords=pts, **common)
    raise OmeroRoiError(f"ROI {name or r.name!r}: ImageJ ROI type {r.roitype.name} has no OMERO shape")


def mask_of_path(paths: Iterable[np.ndarray], left: int, top: int, width: int, height: int) -> np.ndarray:
    """Pixels (``height`` x ``width`` at ``left``/``top``) whose centre lies
    inside closed polygons ``paths`` under the even-odd rule."""
    ys, xs = np.mgrid[0:height, 0:width]
    px, py = xs + left + 0.5, ys + top + 0.5
    inside = np.zeros((height, width), bool)
    for poly in paths:
        poly = np.asarray(poly, float).reshape(-1, 2)
        if len(poly) < 3:
            continue
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1):
            if b == d:
                continue
            crosses = (py >= min(b, d)) & (py < max(b, d))
            xcross = a + (py - b) * (c - a) / (d - b)
            inside ^= crosses & (px < xcross)
    return inside


# -- ImagejShape -> OMERO --------------------------------------------------------------------------


def _points_text(pts: np.ndarray) -> str:
    return " ".join(f"{_num(x)},{_num(y)}" for x, y in pts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def to_omero_shapes(s: ImagejShape) -> list:
    """The OMERO shapes of one ImageJ ROI (omero.model objects, unsaved)."""
    import omero.model as om
    from omero.model.enums import UnitsLength
    from omero.rtypes import rdouble, rint, rstring

    shapes = []
    if s.kind in ("rectangle", "ellipse", "mask"):
        (x0, y0), (x1, y1) = s.coords
        if s.kind == "rectangle":
            sh = om.RectangleI()
            sh.x, sh.y, sh.width, sh.height = rdouble(x0), rdouble(y0), rdouble(x1 - x0), rdouble(y1 - y0)
        elif s.kind == "ellipse":
            sh = om.EllipseI()
            sh.x, sh.y = rdouble((x0 + x1) / 2), rdouble((y0 + y1) / 2)
            sh.radiusX, sh.radiusY = rdouble((x1 - x0) / 2), rdouble((y1 - y0) / 2)
        else:
            sh = om.MaskI()
            sh.x, sh.y, sh.width, sh.height = rdouble(x0), rdouble(y0), rdouble(x1 - x0), rdouble(y1 - y0)
            sh.bytes = np.packbits(np.asarray(s.mask, bool).ravel()).tobytes()
        shapes.append(sh)
    elif s.kind in ("polygon", "polyline"):
        sh = om.PolygonI() if s.kind == "polygon" else om.PolylineI()
        sh.points = rstring(_points_text(s.coords))
        shapes.append(sh)
    elif s.kind == "line":
        sh = om.LineI()
        (a, b), (c, d) = s.coords
        sh.x1, sh.y1, sh.x2, sh.y2 = rdouble(a), rdouble(b), rdouble(c), rdouble(d)
        if s.arrow:
            sh.markerEnd = rstring("Arrow")  # as OMERO.web/iviewer draw arrows
        shapes.append(sh)
    elif s.kind == "label":
        sh = om.LabelI()
        sh.x, sh.y = rdouble(s.coords[0][0]), rdouble(s.coords[0][1])
        if s.font_size:
            sh.fontSize = om.LengthI(float(s.font_size), UnitsLength.POINT)
        shapes.append(sh)
    elif s.kind == "points":
        for x, y in s.coords:
            sh = om.PointI()
            sh.x, sh.y = rdouble(x), rdouble(y)
            shapes.append(sh)
    c, z, t = s.position
    for sh in shapes:
        if c > 0:
            sh.theC = rint(c - 1)
        if z > 0:
            sh.theZ = rint(z - 1)
        if t > 0:
            sh.theT = rint(t - 1)
        if s.kind == "label":
            sh.textValue = rstring(s.text)
        elif s.name:
            sh.textValue = rstring(s.name)
        if s.stroke is not None:
            sh.strokeColor = rint(argb_to_rgba(s.stroke))
        if s.fill is not None:
            sh.fillColor = rint(argb_to_rgba(s.fill))
        if s.stroke_width:
            sh.strokeWidth = om.LengthI(float(s.stroke_width), UnitsLength.PIXEL)
    return shapes


def rois_to_omero(rois: Sequence[Any], image_id: int, description: str,
                  skipped: Optional[list] = None) -> list:
    """``omero.model.RoiI`` objects (unsaved) for engine ROIs (objects with
    ``name``, ``data`` = .roi bytes and ``position`` (c, z, t)) on an image.
    With a ``skipped`` list, a ROI OMERO cannot hold is logged and its
    reason appended there instead of failing the others."""
    out = []
    for i, roi in enumerate(rois):
        try:
            out.append(_roi_to_omero(i, roi, image_id, description))
        except OmeroRoiError as e:
            if skipped is None:
                raise
            log.warning("%s; not stored in OMERO", e)
            skipped.append(str(e))
    return out


def _roi_to_omero(i: int, roi: Any, image_id: int, description: str) -> Any:
    """One engine ROI (or its ``to_dict()``) as an unsaved ``RoiI``."""
    import omero.model as om
    from omero.rtypes import rstring

    data = roi.get("data") if isinstance(roi, dict) else getattr(roi, "data", None)
    name = (roi.get("name") if isinstance(roi, dict) else getattr(roi, "name", "")) or ""
    pos = roi.get("position") if isinstance(roi, dict) else getattr(roi, "position", None)
    if isinstance(data, str):
        import base64

        data = base64.b64decode(data)
    if not data:
        raise OmeroRoiError(f"ROI {i} ({name!r}) has no .roi bytes")
    shape = parse_imagej(data, name, pos)
    r = om.RoiI()
    if shape.name:
        r.name = rstring(shape.name)
    r.description = rstring(description)
    r.setImage(om.ImageI(int(image_id), False))
    for sh in to_omero_shapes(shape):
        r.addShape(sh)
    return r


# -- OMERO -> ImageJ bytes ---------------------------------------------------------------------------


def _val(v: Any) -> Any:
    return None if v is None else v.getValue() if hasattr(v, "getValue") else v


def _position(sh: Any) -> tuple[int, int, int]:
    def one(v: Any) -> int:
        v = _val(v)
        return 0 if v is None or v < 0 else int(v) + 1
    return one(sh.theC), one(sh.theZ), one(sh.theT)


def _imagej_roi(rf: Any, roitype: Any, name: str, pts: Optional[np.ndarray] = None) -> Any:
    r = rf.ImagejRoi(roitype=roitype, name=name)
    if pts is not None and len(pts):
        pts = np.asarray(pts, float)
        left, top = np.floor(pts.min(axis=0)).astype(int)
        right, bottom = np.ceil(pts.max(axis=0)).astype(int)
        r.left, r.top, r.right, r.bottom = int(left), int(top), int(right), int(bottom)
        r.n_coordinates = len(pts)
        r.integer_coordinates = np.round(pts - [left, top]).astype(np.int32)
        if not np.all(pts == np.round(pts)):
            r.options |= rf.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
            r.subpixel_coordinates = pts.astype(np.float32)
    return r


def _finish(r: Any, sh: Any, position: tuple[int, int, int]) -> Any:
    r.c_position, r.z_position, r.t_position = position
    stroke, fill = _val(sh.strokeColor), _val(sh.fillColor)
    if stroke is not None:
        r.stroke_color = rgba_to_argb(int(stroke)).to_bytes(4, "big")
    if fill is not None:
        r.fill_color = rgba_to_argb(int(fill)).to_bytes(4, "big")
    width = sh.strokeWidth.getValue() if sh.strokeWidth is not None else 0
    if width:
        r.stroke_width = int(round(width))
        r.float_stroke_width = float(width)
    return r


def _parse_points(text: str) -> np.ndarray:
    """OMERO's "x1,y1 x2,y2 ..." points (5.1+; the legacy "points[...]" SVG-ish form too)."""
    t = text.strip()
    if t.startswith("points["):
        t = t[len("points["):].split("]", 1)[0]
    pairs = [p.split(",") for p in t.replace(", ", ",").split() if p]
    return np.array([[float(a), float(b)] for a, b in pairs], float).reshape(-1, 2)


def omero_to_rois(roi: Any) -> list[tuple[str, bytes, tuple[int, int, int], str]]:
    """An ``omero.model.Roi`` (shapes loaded) -> ImageJ ROIs as ``(name,
    .roi bytes, (c, z, t) 1-based, ImageJ type)``; Points of one Roi and one
    position form one multi-point ROI."""
    rf = _roifile()
    T = rf.ROI_TYPE
    name = _val(roi.name) or ""
    out = []
    points: dict[tuple, list] = {}
    for sh in roi.copyShapes():
        kind = type(sh).__name__[:-1]
        label = (name or _val(sh.textValue) or "") if kind == "Label" else (_val(sh.textValue) or name)
        pos = _position(sh)
        if kind == "Point":
            points.setdefault((pos, label), []).append((sh, [_val(sh.x), _val(sh.y)]))
            continue
        if kind in ("Rectangle", "Ellipse"):
            x, y, = _val(sh.x), _val(sh.y)
            if kind == "Rectangle":
                w, h = _val(sh.width), _val(sh.height)
            else:
                rx, ry = _val(sh.radiusX), _val(sh.radiusY)
                x, y, w, h = x - rx, y - ry, 2 * rx, 2 * ry
            r = rf.ImagejRoi(roitype=T.RECT if kind == "Rectangle" else T.OVAL, name=label)
            r.left, r.top = int(np.floor(x)), int(np.floor(y))
            r.right, r.bottom = int(np.ceil(x + w)), int(np.ceil(y + h))
            if any(not float(v).is_integer() for v in (x, y, w, h)):
                r.options |= rf.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
                r.xd, r.yd, r.widthd, r.heightd = float(x), float(y), float(w), float(h)
            itype = "rectangle" if kind == "Rectangle" else "oval"
        elif kind in ("Polygon", "Polyline"):
            pts = _parse_points(_val(sh.points) or "")
            r = _imagej_roi(rf, T.POLYGON if kind == "Polygon" else T.POLYLINE, label, pts)
            itype = kind.lower()
        elif kind == "Label":
            text = _val(sh.textValue) or ""
            size = int(round(sh.fontSize.getValue())) if sh.fontSize is not None else 12
            r = rf.ImagejRoi(roitype=T.RECT, subtype=rf.ROI_SUBTYPE.TEXT, name=label, text=text, text_size=size)
            r.left, r.top = int(np.floor(_val(sh.x))), int(np.floor(_val(sh.y)))
            r.right = r.left + max(1, int(0.6 * size * max(1, len(text))))  # OMERO keeps no text box
            r.bottom = r.top + int(1.4 * size)
            itype = "text"
        elif kind == "Line":
            arrow = (_val(sh.markerEnd) or "") == "Arrow"
            r = rf.ImagejRoi(roitype=T.LINE, subtype=rf.ROI_SUBTYPE.ARROW if arrow else rf.ROI_SUBTYPE.UNDEFINED,
                             name=label)
            r.x1, r.y1, r.x2, r.y2 = (float(_val(v)) for v in (sh.x1, sh.y1, sh.x2, sh.y2))
            r.left, r.top = int(np.floor(min(r.x1, r.x2))), int(np.floor(min(r.y1, r.y2)))
            r.right, r.bottom = int(np.ceil(max(r.x1, r.x2))), int(np.ceil(max(r.y1, r.y2)))
            r.options |= rf.ROI_OPTIONS.SUB_PIXEL_RESOLUTION  # ImageJ keeps float line ends
            itype = "arrow" if arrow else "line"
        elif kind == "Mask":
            r = _mask_roi(rf, sh, label)
            itype = "composite"
        else:
            log.info("OMERO ROI %s: a %s shape has no ImageJ ROI; skipped", _val(roi.id), kind)
            continue
        out.append((label, _finish(r, sh, pos).tobytes(), pos, itype))
    for (pos, label), items in points.items():
        r = _imagej_roi(rf, T.POINT, label, np.array([p for _sh, p in items], float))
        out.append((label, _finish(r, items[0][0], pos).tobytes(), pos, "point"))
    return out


def _mask_roi(rf: Any, sh: Any, label: str) -> Any:
    """A Mask as an ImageJ composite (ShapeRoi): one closed rectangle per row run."""
    x, y = int(round(_val(sh.x))), int(round(_val(sh.y)))
    w, h = int(round(_val(sh.width))), int(round(_val(sh.height)))
    bits = np.unpackbits(np.frombuffer(bytes(_val(sh.bytes) or b""), np.uint8))[:w * h]
    if bits.size < w * h:
        raise OmeroRoiError(f"mask shape {_val(sh.id)}: {bits.size} bits for {w}x{h} pixels")
    mask = bits.reshape(h, w).astype(bool)
    path: list[float] = []
    for row in range(h):
        line = np.concatenate([[False], mask[row], [False]])
        edges = np.flatnonzero(line[1:] != line[:-1])
        for a, b in zip(edges[::2], edges[1::2]):
            x0, x1, y0, y1 = x + a, x + b, y + row, y + row + 1
            path += [0, x0, y0, 1, x1, y0, 1, x1, y1, 1, x0, y1, 4]  # MOVETO, LINETO x3, CLOSE
    r = rf.ImagejRoi(roitype=rf.ROI_TYPE.RECT, name=label)
    r.left, r.top, r.right, r.bottom = x, y, x + w, y + h
    r.multi_coordinates = np.asarray(path, np.float32)
    r.shape_roi_size = len(path)
    return r


#: ``Roi.description`` of the ROIs fiji-bridge made (so a new run replaces them, and no one else's)
NS_ROIS = "fiji-bridge/rois"


class OmeroRois:
    """Native ROIs of :class:`~fiji_bridge.backends.omero.OmeroBackend` (a mixin)."""

    rois_on_source: bool = False

    def save_rois(self, plate: str, well: str, site: int, rois: Sequence[Any]) -> list[int]:
        """ImageJ ROIs (engine :class:`~fiji_bridge.engine.base.Roi` objects or
        their ``to_dict()`` form) as OMERO ROIs on the field's image, replacing
        the ROIs an earlier run made there; returns the new ROI ids in order.
        A ROI OMERO has no shape for is skipped with a warning (and named in
        the image's summary), the others are stored."""
        from ...components import normalize_well

        well = normalize_well(well)
        ref = self._field(plate, well, int(site))
        idx = self._index(plate)
        skipped: list[str] = []
        objs = rois_to_omero(list(rois), ref.image, f"{NS_ROIS} well={well} field={int(site)}", skipped)
        ids = self._replace_rois(ref.image, idx.group, objs, f"{NS_ROIS} well={well} field={int(site)}")
        not_on_source = None
        if self.rois_on_source:
            src = self._source_field(plate, well, int(site))
            if src is not None:  # the raw image too, marked with the derived plate it came from
                not_on_source = self._rois_on_source(plate, well, int(site), src, list(rois))
        if getattr(self, "summaries", False):
            self._summarize(plate, well, int(site), {"ROIs": len(ids),
                                                     "ROIs not stored": "; ".join(skipped) or None,
                                                     "ROIs not stored on the source image": not_on_source})
        return ids

    def _rois_on_source(self, plate: str, well: str, site: int, src: tuple[int, Optional[int]],
                        rois: list) -> Optional[str]:
        """The ROIs on the source image too; None when stored, else why not.

        A Roi on an Image needs the ANNOTATE right on that image
        (omero-server OmeroInterceptor.neededRight): on another user's image
        in a private or read-only group the server refuses it, so the image's
        ``canAnnotate()`` is asked first, and a refusal skips the source (the
        derived image keeps its ROIs) instead of failing the save."""
        image, group = src
        with self._call(f"checking the source image {image}") as conn:
            saved_group = conn.SERVICE_OPTS.getOmeroGroup()
            conn.SERVICE_OPTS.setOmeroGroup(-1 if group is None else group)
            try:
                img = conn.getObject("Image", image)
            finally:
                conn.SERVICE_OPTS.setOmeroGroup(saved_group)
            may = img is not None and img.canAnnotate()
        if not may:
            why = f"source image {image}: this user may not annotate it (group permissions)"
            log.info("ROIs of %s %s field %s not stored on the %s", plate, well, site, why)
            return why
        tag = f"{NS_ROIS} derived plate={plate} well={well} field={site}"
        try:
            self._replace_rois(image, group, rois_to_omero(rois, image, tag, []), tag)
        except BackendError as e:  # refused by the server after all: the derived ROIs stand
            log.warning("ROIs of %s %s field %s not stored on source image %s: %s", plate, well, site, image, e)
            return f"source image {image}: {e}"
        return None

    def _replace_rois(self, image: int, group: Optional[int], objs: list, tag: str) -> list[int]:
        """Save ``objs`` on ``image``; delete the ROIs an earlier save with ``tag`` made there."""
        old = self._roi_ids([image], tag).get(image, [])
        with self._call(f"saving {len(objs)} ROIs on image {image}") as conn:
            saved = conn.getUpdateService().saveAndReturnArray(objs, self._ctx(group)) if objs else []
            if old:
                self._delete(conn, "Roi", old)
        return [r.id.val for r in saved]

    def _source_field(self, plate: str, well: str, site: int) -> Optional[tuple[int, Optional[int]]]:
        """(image id, group) of the field the derived ``plate``'s provenance
        names as its source, when that is a plate of this server."""
        prov = self.plate_provenance(plate)
        source, src = str(prov.get("source") or ""), str(prov.get("source_plate") or "")
        if not src.isdigit() or (source and not source.startswith("omero://")):
            return None
        if source:
            from ..uri import PlateURI

            u = PlateURI.parse(source)
            if u.host and u.host != self.params.host:
                return None
        try:
            idx = self._index(src)
        except (NotFound, BackendError) as e:
            log.info("source plate %s of %s not readable (%s): ROIs on the derived image only", src, plate, e)
            return None
        ref = idx.fields.get((well, site))
        return None if ref is None else (ref.image, idx.group)

    def _roi_ids(self, images: Sequence[int], tag: Optional[str] = None) -> dict[int, list[int]]:
        """Our ROIs per image (those whose description is ``tag``, or any of
        ours on the derived image), oldest first (one query)."""
        from omero.sys import ParametersI

        if not images:
            return {}
        with self._call("listing ROIs") as conn:
            rows = conn.getQueryService().findAllByQuery(
                "select r from Roi as r where r.image.id in (:ids)", ParametersI().addIds(list(images)),
                self._ctx(None))
        out: dict[int, list[int]] = {}
        for r in sorted({r.id.val: r for r in rows}.values(), key=lambda r: r.id.val):
            d = r.description.val if r.description is not None else ""
            if (d == tag) if tag is not None else (d.startswith(NS_ROIS) and " derived plate=" not in d):
                out.setdefault(r.image.id.val, []).append(r.id.val)
        return out

    def load_rois(self, image: Optional[int] = None, *, plate: Optional[str] = None, well: Optional[str] = None,
                  site: int = 0) -> list:
        """Every ROI on an OMERO image (``image`` id, or the field ``plate``/
        ``well``/``site``) as ImageJ ROIs: engine
        :class:`~fiji_bridge.engine.base.Roi` objects whose ``data`` is the
        ``.roi`` encoding a macro can load into the ROI Manager."""
        from omero.sys import ParametersI

        from ...engine.base import Roi

        if image is None:
            if plate is None or well is None:
                raise BackendError("load_rois needs an image id, or plate= and well= (and site=)")
            image = self._field(plate, well, site).image
        with self._call(f"reading ROIs of image {image}") as conn:
            rows = conn.getQueryService().findAllByQuery(
                "select r from Roi as r left outer join fetch r.shapes where r.image.id = :id",
                ParametersI().addId(int(image)), self._ctx(None))
        rf = _roifile()
        out = []
        for r in sorted({r.id.val: r for r in rows}.values(), key=lambda r: r.id.val):  # one row per shape
            for name, data, pos, itype in omero_to_rois(r):
                coords = np.asarray(rf.ImagejRoi.frombytes(data).coordinates(), float).reshape(-1, 2)
                out.append(Roi(name=name, type=itype, data=data, coordinates=coords, position=pos))
        return out
