"""Native OMERO outputs: ImageJ ROIs become OMERO ROIs with shapes (and come
back as ImageJ .roi bytes), results become OMERO.tables with Well/Image/Roi
columns, processed images carry key-value summaries.

Oracles: real ImageJ (the ROIs come from a macro run by ImageJ 1, whose
RoiEncoder wrote the bytes; the bytes we give back are decoded by ImageJ's
own RoiDecoder in the JVM), the macro's ground-truth coordinates, ImageJ's
own measurements (bounding boxes) and masks, and numpy."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")
pytest.importorskip("roifile", reason="roifile is not installed")

from fiji_bridge.backends.omero import NS_ROIS, NS_SUMMARY, OmeroBackend  # noqa: E402
from fiji_bridge.outputs import save_result  # noqa: E402
from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble  # noqa: E402

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(180)]

PASSWORD = "roi-pw"
#: ImageJ ARGB red as OMERO's signed RGBA
RED_RGBA = (255 << 24 | 255) - (1 << 32)

SHAPES_MACRO = r'''
newImage("h", "8-bit black", 64, 48, 6);
run("Stack to Hyperstack...", "order=xyczt(default) channels=2 slices=3 frames=1 display=Color");
makeRectangle(5, 6, 10, 8); Roi.setName("rect"); Roi.setStrokeColor("#ff0000"); Roi.setPosition(2, 3, 1); roiManager("add");
makeOval(20, 10, 12, 6); Roi.setName("oval"); Roi.setPosition(0, 2, 0); roiManager("add");
makePolygon(1, 20, 9, 20, 5, 27); Roi.setName("poly"); roiManager("add");
makeLine(30, 30, 40, 35, 50, 30); Roi.setName("pline"); roiManager("add");
makeLine(2, 40, 20, 45); Roi.setName("line"); roiManager("add");
makeSelection("point", newArray(3, 7, 11), newArray(4, 8, 12)); Roi.setName("pts"); roiManager("add");
makeRectangle(40, 5, 20, 20); roiManager("add"); makeRectangle(45, 10, 10, 10); roiManager("add");
n = roiManager("count"); roiManager("select", newArray(n-2, n-1)); roiManager("XOR"); Roi.setName("frame"); roiManager("add");
roiManager("select", newArray(n-2, n-1)); roiManager("delete");
makeText("nucleus 1", 8, 30); Roi.setName("label"); roiManager("add");
makeArrow(50, 30, 60, 44, "filled"); Roi.setName("arrow"); roiManager("add");
run("Select None");
'''

PARTICLES_MACRO = r'''
newImage("blobs", "8-bit black", 80, 60, 1);
setColor(255);
fillRect(5, 5, 10, 8); fillOval(30, 20, 14, 12); fillRect(60, 40, 12, 15);
setThreshold(128, 255);
run("Set Measurements...", "area bounding redirect=None decimal=3");
run("Analyze Particles...", "display clear add");
run("Select None");
'''


@pytest.fixture
def server():
    srv = ServerDouble(users={"alice": PASSWORD}).register("rois.test", 4064)
    yield srv
    srv.unregister()


def _backend() -> OmeroBackend:
    return OmeroBackend(host="rois.test", user="alice", password=PASSWORD, gateway=GatewayDouble, keepalive=0)


@pytest.fixture(scope="module")
def shapes(ij):
    r = ij.run_macro(SHAPES_MACRO)
    by = {roi.name: roi for roi in r.rois}
    assert set(by) == {"rect", "oval", "poly", "pline", "line", "pts", "frame", "label", "arrow"}, \
        [x.name for x in r.rois]
    return r, by


def _field(b, shape=(1, 3, 2, 48, 64)):
    pid = b.create_plate("rois", provenance={"macro": "shapes.ijm", "macro_sha256": "abc", "source_plate": "7"})
    b.save_field(pid, "A01", 0, np.zeros(shape, "uint8"))
    return pid


def _shapes_of(server, roi_id):
    return [server._rows[k] for k in server.children("Roi", "shapes", roi_id)]


def _java_roi(data: bytes):
    """ImageJ's own RoiDecoder on ``data`` (the JVM of the ij fixture)."""
    import jpype

    from fiji_bridge.engine.transfer import J

    return J("ij.io.RoiDecoder").openFromByteArray(jpype.JArray(jpype.JByte)(bytes(data)))


def _java_mask(jroi) -> np.ndarray:
    b = jroi.getBounds()
    m = jroi.getMask()
    if m is None:  # a rectangle: all in
        return np.ones((int(b.height), int(b.width)), bool)
    return np.asarray(m.getPixels(), dtype=np.int8).reshape(int(b.height), int(b.width)) != 0


def test_imagej_rois_become_omero_shapes_shape_by_shape(ij, shapes, server):
    r, by = shapes
    b = _backend()
    pid = _field(b)
    ids = b.save_rois(pid, "A01", 0, r.rois)
    assert len(ids) == 9
    iid = server.objects("Image")[0].id.val
    assert server.children("Image", "rois", iid) == sorted(ids)  # linked to the image
    rois = {server._rows[i].name.val: server._rows[i] for i in ids}
    assert all(x.description.val.startswith(NS_ROIS) for x in rois.values())

    (rect,) = _shapes_of(server, rois["rect"].id.val)
    assert type(rect).__name__ == "RectangleI"
    assert (rect.x.val, rect.y.val, rect.width.val, rect.height.val) == (5, 6, 10, 8)  # makeRectangle(5, 6, 10, 8)
    # ImageJ c=2, z=3, t=1 (1-based) -> OMERO 0-based
    assert (rect.theC.val, rect.theZ.val, rect.theT.val) == (1, 2, 0)
    assert rect.strokeColor.val == RED_RGBA and rect.textValue.val == "rect"

    (oval,) = _shapes_of(server, rois["oval"].id.val)
    xs, ys = by["oval"].coordinates[:, 0], by["oval"].coordinates[:, 1]  # ImageJ's own polygon of the oval
    assert (oval.x.val, oval.y.val) == pytest.approx(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2), abs=0.05)
    assert (oval.x.val, oval.y.val, oval.radiusX.val, oval.radiusY.val) == (26, 13, 6, 3)  # makeOval(20, 10, 12, 6)
    assert oval.theZ.val == 1 and oval.theC is None and oval.theT is None  # 0 = all -> unset

    (poly,) = _shapes_of(server, rois["poly"].id.val)
    assert type(poly).__name__ == "PolygonI" and poly.points.val == "1,20 9,20 5,27"
    assert poly.theZ is None and poly.theC is None and poly.theT is None
    (pline,) = _shapes_of(server, rois["pline"].id.val)
    pts = [[float(v) for v in p.split(",")] for p in pline.points.val.split()]
    assert type(pline).__name__ == "PolylineI" and pts == by["pline"].coordinates.tolist()
    (line,) = _shapes_of(server, rois["line"].id.val)
    assert [[line.x1.val, line.y1.val], [line.x2.val, line.y2.val]] == by["line"].coordinates.tolist() \
        == [[2, 40], [20, 45]]
    points = _shapes_of(server, rois["pts"].id.val)
    assert [type(p).__name__ for p in points] == ["PointI"] * 3
    assert [[p.x.val, p.y.val] for p in points] == [[3, 4], [7, 8], [11, 12]]

    (mask,) = _shapes_of(server, rois["frame"].id.val)
    assert type(mask).__name__ == "MaskI"
    assert (mask.x.val, mask.y.val, mask.width.val, mask.height.val) == (40, 5, 20, 20)
    bits = np.unpackbits(np.frombuffer(mask.bytes, np.uint8))[:400].reshape(20, 20).astype(bool)
    truth = np.ones((20, 20), bool)
    truth[5:15, 5:15] = False  # the XOR of the two rectangles: a frame
    np.testing.assert_array_equal(bits, truth)
    np.testing.assert_array_equal(bits, _java_mask(_java_roi(by["frame"].data)))  # ImageJ's own mask

    (label,) = _shapes_of(server, rois["label"].id.val)
    assert type(label).__name__ == "LabelI" and label.textValue.val == "nucleus 1"
    assert (label.x.val, label.y.val) == (8, 30)  # makeText("nucleus 1", 8, 30)
    (arrow,) = _shapes_of(server, rois["arrow"].id.val)
    assert type(arrow).__name__ == "LineI" and arrow.markerEnd.val == "Arrow"
    assert [[arrow.x1.val, arrow.y1.val], [arrow.x2.val, arrow.y2.val]] == [[50, 30], [60, 44]]


def test_omero_rois_come_back_as_imagej_rois(ij, shapes, server):
    r, by = shapes
    b = _backend()
    pid = _field(b)
    b.save_rois(pid, "A01", 0, r.rois)
    back = {x.name: x for x in _backend().load_rois(plate=pid, well="A01", site=0)}
    assert set(back) == set(by)
    for name, orig in by.items():
        j0, j1 = _java_roi(orig.data), _java_roi(back[name].data)  # ImageJ decodes both
        assert str(j1.getName()) == name
        assert (j1.getCPosition(), j1.getZPosition(), j1.getTPosition()) == orig.position == back[name].position
        b0, b1 = j0.getBounds(), j1.getBounds()
        if name == "frame":
            assert (b1.x, b1.y, b1.width, b1.height) == (b0.x, b0.y, b0.width, b0.height)
            np.testing.assert_array_equal(_java_mask(j1), _java_mask(j0))
            continue
        if name == "arrow":  # OMERO keeps the line and that it ends in an arrow, not the head's style and size
            assert str(j1.getTypeAsString()) == str(j0.getTypeAsString()) == "Arrow"
            assert [j1.x1d, j1.y1d, j1.x2d, j1.y2d] == [j0.x1d, j0.y1d, j0.x2d, j0.y2d] == [50, 30, 60, 44]
            continue
        if name == "label":  # OMERO keeps the text and its corner, not ImageJ's text box
            assert str(j1.getText()).strip() == str(j0.getText()).strip() == "nucleus 1"
            assert (b1.x, b1.y) == (b0.x, b0.y) and str(j1.getTypeAsString()) == "Text"
            continue
        assert (b1.x, b1.y, b1.width, b1.height) == (b0.x, b0.y, b0.width, b0.height), name
        assert str(j1.getTypeAsString()).lower() == str(j0.getTypeAsString()).lower(), name
        p0, p1 = j0.getFloatPolygon(), j1.getFloatPolygon()
        np.testing.assert_allclose(np.array([list(p1.xpoints)[:p1.npoints], list(p1.ypoints)[:p1.npoints]]),
                                   np.array([list(p0.xpoints)[:p0.npoints], list(p0.ypoints)[:p0.npoints]]),
                                   atol=1e-4, err_msg=name)
    assert _java_roi(back["rect"].data).getStrokeColor().getRGB() == _java_roi(by["rect"].data).getStrokeColor().getRGB()


def test_roi_document_makes_native_rois_and_a_new_run_replaces_them(ij, shapes, server):
    r, _by = shapes
    b = _backend()
    pid = _field(b)
    doc = {"well": "A01", "field": 0, "rois": [x.to_dict() for x in r.rois]}
    b.save(doc, f"/omero/plate_{pid}/A01/rois_s000.json")
    b.save(doc, f"/omero/plate_{pid}/A01/rois_s000.json")
    assert len(server.objects("Roi")) == 9  # replaced, not doubled
    assert _backend().load(f"/omero/plate_{pid}/A01/rois_s000.json")["rois"][0]["name"] == r.rois[0].name
    assert _backend().image_summary(pid, "A01", 0)["ROIs"] == "9"


def test_run_macro_outputs_to_omero_tables_with_image_well_and_roi_columns(ij, server):
    """Analyze Particles makes one ROI per results row: the plate table's RoiColumn
    links each row to its OMERO ROI, whose shape has the row's bounding box."""
    r = ij.run_macro(PARTICLES_MACRO)
    assert len(r.rois) == 3 and len(r.tables["Results"]["Area"]) == 3
    b = _backend()
    pid = b.create_plate("particles", provenance={"macro": "particles.ijm", "arguments": {"sigma": 2}})
    b.save_field(pid, "B02", 0, np.zeros((1, 1, 1, 60, 80), "uint8"))
    paths = save_result(r, "omero://rois.test/plate/x", well="B02", site=0, backend=b, plate=pid)
    assert f"/omero/plate_{pid}/B02/results_s000.csv" in paths
    # the plate-level table, as the batch assembles it from the per-field tables
    text = _backend().load(f"/omero/plate_{pid}/B02/results_s000.csv")
    b.save_table(pid, "results", text)
    iid = server.objects("WellSample")[0].image.id.val
    wid = server.objects("Well")[0].id.val
    roi_ids = server.children("Image", "rois", iid)
    assert len(roi_ids) == 3
    tfile = next(f for f in server.objects("OriginalFile") if f.name.val == "results.csv.h5")
    cols = server.table_columns(tfile.id.val)
    assert cols["Image"] == [iid] * 3 and cols["Well"] == [wid] * 3 and cols["Roi"] == sorted(roi_ids)
    import omero.grid

    kinds = {c.name: type(c).__name__ for c in server._tables[tfile.id.val]["columns"]}
    assert kinds["Roi"] == "RoiColumn" and kinds["Image"] == "ImageColumn" and kinds["Well"] == "WellColumn"
    assert kinds["Area"] == "DoubleColumn" and kinds["well"] == "StringColumn" and kinds["field"] == "LongColumn"
    assert isinstance(server._tables[tfile.id.val]["columns"][0], omero.grid.Column)
    # row i's ROI is the particle of row i: its shape's bounds are ImageJ's measured bounding box
    rows = list(csv.DictReader(io.StringIO(text)))
    for row, rid in zip(rows, cols["Roi"]):
        (sh,) = _shapes_of(server, rid)
        pts = np.array([[float(v) for v in p.split(",")] for p in sh.points.val.split()])
        assert pts.min(axis=0).tolist() == [float(row["BX"]), float(row["BY"])]
        assert (pts.max(axis=0) - pts.min(axis=0)).tolist() == [float(row["Width"]), float(row["Height"])]
    # the image's key-value summary: what ran, and what it found
    summary = _backend().image_summary(pid, "B02", 0)
    assert summary["macro"] == "particles.ijm" and summary["results rows"] == "3" and summary["ROIs"] == "3"
    assert summary["well"] == "B02" and summary["field"] == "0"
    maps = [server._rows[l.child.id.val] for l in server.objects("ImageAnnotationLink")
            if type(server._rows[l.child.id.val]).__name__ == "MapAnnotationI"]
    assert [m.ns.val for m in maps] == [NS_SUMMARY]  # one summary per image, replaced on update


@pytest.fixture(params=["double", "live"])
def any_backend(request):
    """The double, and a live OMERO when OMERO_HOST (+ OMERO_USER, OMERO_PASSWORD) is set."""
    import os

    if request.param == "live":
        if not os.environ.get("OMERO_HOST"):
            pytest.skip("no live OMERO: set OMERO_HOST, OMERO_USER, OMERO_PASSWORD")
        b = OmeroBackend()
        yield b
        b.close()
        return
    srv = ServerDouble(users={"alice": PASSWORD}).register("rois-api.test", 4064)
    b = OmeroBackend(host="rois-api.test", user="alice", password=PASSWORD, gateway=GatewayDouble, keepalive=0)
    yield b
    b.close()
    srv.unregister()


def test_rois_and_roi_table_through_the_api_only(ij, any_backend):
    """Only the OMERO API (no look inside the server): what a client of the
    server finds — ROIs that ImageJ decodes to the macro's shapes, and an
    OMERO.table whose Roi/Image/Well columns are those objects' ids."""
    from omero.model import OriginalFileI

    from fiji_bridge.backends.omero import NS_TABLE

    b = any_backend
    r = ij.run_macro(PARTICLES_MACRO)
    pid = b.create_plate("particles-api", provenance={"macro": "particles.ijm"})
    b.save_field(pid, "C03", 0, np.zeros((1, 1, 1, 60, 80), "uint8"))
    ids = b.save_rois(pid, "C03", 0, r.rois)
    back = b.load_rois(plate=pid, well="C03", site=0)
    assert len(back) == 3
    for orig, got in zip(r.rois, back):
        b0, b1 = _java_roi(orig.data).getBounds(), _java_roi(got.data).getBounds()
        assert (b1.x, b1.y, b1.width, b1.height) == (b0.x, b0.y, b0.width, b0.height)
    cols = {"plate": ["p"] * 3, "well": ["C03"] * 3, "field": [0] * 3,
            "Area": [float(v) for v in r.tables["Results"]["Area"]]}
    b.save_table(pid, "results", cols)
    ann = b._annotations("Plate", int(pid), ns=NS_TABLE)["results.csv.h5"][-1]
    with b._call("reading the table") as conn:
        table = conn.c.sf.sharedResources().openTable(OriginalFileI(ann.file.id.val, False))
        try:
            heads = [h.name for h in table.getHeaders()]
            data = table.read(list(range(len(heads))), 0, table.getNumberOfRows())
        finally:
            table.close()
    got = {h: list(c.values) for h, c in zip(heads, data.columns)}
    image = b._field(pid, "C03", 0).image
    assert got["Roi"] == ids and got["Image"] == [image] * 3 and got["Area"] == cols["Area"]
    assert got["Well"] == [b._index(pid).wells["C03"]] * 3
    assert b.image_summary(pid, "C03", 0)["ROIs"] == "3"


def test_rois_also_on_the_source_image_and_never_on_anyone_elses(ij, shapes, server):
    """rois_on_source: the raw image of the source plate gets the same ROIs (marked
    with the derived plate); a re-run replaces ours and leaves a user's own ROI alone."""
    import omero.model as om
    from omero.rtypes import rdouble, rstring

    r, _by = shapes
    src = server.seed_plate("raw", {("A01", 0): np.zeros((1, 3, 2, 48, 64), "uint8")})
    raw_image = server.objects("Image")[0].id.val
    mine = om.RoiI()
    mine.name = rstring("drawn in OMERO.iviewer")
    mine.setImage(om.ImageI(raw_image, False))
    pt = om.PointI()
    pt.x, pt.y = rdouble(1), rdouble(1)
    mine.addShape(pt)
    with _backend()._call("a user's ROI") as conn:
        conn.getUpdateService().saveObject(mine, {"omero.group": str(server.group_id("lab"))})
    b = OmeroBackend(host="rois.test", user="alice", password=PASSWORD, gateway=GatewayDouble, keepalive=0,
                     rois_on_source=True)
    pid = b.create_plate("derived", provenance={"source": f"omero://rois.test/plate/{src}", "source_plate": str(src)})
    b.save_field(pid, "A01", 0, np.zeros((1, 3, 2, 48, 64), "uint8"))
    derived_image = _backend()._field(pid, "A01", 0).image
    for _ in range(2):
        b.save_rois(pid, "A01", 0, r.rois)
    assert len(server.children("Image", "rois", derived_image)) == 9
    on_raw = [server._rows[i] for i in server.children("Image", "rois", raw_image)]
    assert len(on_raw) == 10 and sum(x.name.val == "drawn in OMERO.iviewer" for x in on_raw) == 1
    assert {x.name.val for x in on_raw} == {x.name for x in r.rois} | {"drawn in OMERO.iviewer"}


def _roi_dict(name):
    import base64

    import roifile

    r = roifile.ImagejRoi.frompoints(np.array([[1, 1], [10, 1], [10, 8], [1, 8]]))
    r.name = name
    return {"name": name, "data": base64.b64encode(r.tobytes()).decode(), "position": [0, 0, 0]}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("perms", ["rwr---", "rwra--"])
def test_source_rois_need_annotate_on_the_source_and_are_skipped_with_a_note(perms):
    """OmeroInterceptor.neededRight: a Roi on an Image needs ANNOTATE. In a read-only group another
    user's source image cannot take ROIs: the derived image gets them, the source is skipped and the
    summary says so; in a read-annotate group both get them."""
    host = f"src-{perms}.test"
    srv = ServerDouble(users={"alice": PASSWORD, "bob": "bob-pw"}, groups={"lab": ["alice", "bob"]},
                       permissions={"lab": perms}).register(host, 4064)
    try:
        src = srv.seed_plate("raw", {("A01", 0): np.zeros((1, 1, 1, 16, 16), "uint8")}, user="alice")
        raw_image = srv.objects("Image")[0].id.val
        b = OmeroBackend(host=host, user="bob", password="bob-pw", gateway=GatewayDouble, keepalive=0,
                         rois_on_source=True)
        pid = b.create_plate("derived", provenance={"source": f"omero://{host}/plate/{src}",
                                                    "source_plate": str(src)})
        b.save_field(pid, "A01", 0, np.zeros((1, 1, 1, 16, 16), "uint8"))
        ids = b.save_rois(pid, "A01", 0, [_roi_dict("cell")])
        assert len(ids) == 1 and srv._rows[ids[0]].image.id.val != raw_image
        on_raw = srv.children("Image", "rois", raw_image)
        note = b.image_summary(pid, "A01", 0).get("ROIs not stored on the source image")
        if perms == "rwr---":
            assert on_raw == [] and note and str(raw_image) in note
        else:
            assert len(on_raw) == 1 and note is None
        b.close()
    finally:
        srv.unregister()


def test_a_roi_omero_cannot_hold_is_skipped_and_named_the_others_are_stored(shapes, server):
    import base64

    r, by = shapes
    b = _backend()
    pid = _field(b)
    broken = {"name": "garbage", "data": base64.b64encode(b"not a roi").decode(), "position": [0, 0, 0]}
    ids = b.save_rois(pid, "A01", 0, [by["rect"].to_dict(), broken, by["oval"].to_dict()])
    assert [server._rows[i].name.val for i in ids] == ["rect", "oval"]
    assert "garbage" in b.image_summary(pid, "A01", 0)["ROIs not stored"]
