"""The OMERO backend: the shared contract over the OMERO test double (and
over a live server when OMERO_HOST is set), plus what only OMERO has."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")

import omero  # noqa: E402

from backend_contract import *  # noqa: E402,F401,F403  (the contract tests and their fixtures)

from fiji_bridge.backends.base import BackendError, StoreUnavailable  # noqa: E402
from fiji_bridge.backends.omero import NS_PROVENANCE, NS_RESULTS, NS_TABLE, OmeroBackend
from fiji_bridge.backends.omero.annotations import NS_SUMMARY  # noqa: E402
from fiji_bridge.components import Calibration  # noqa: E402
from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble  # noqa: E402

PASSWORD = "double-secret-pw"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server():
    srv = ServerDouble(users={"alice": PASSWORD, "bob": "bob-pw"},
                       groups={"lab": ["alice", "bob"], "other": ["alice"]})
    srv.register("omero.test", 4064)
    yield srv
    srv.unregister()


def _backend(**kw) -> OmeroBackend:
    kw.setdefault("host", "omero.test")
    kw.setdefault("port", 4064)
    kw.setdefault("user", "alice")
    kw.setdefault("password", PASSWORD)
    kw.setdefault("gateway", GatewayDouble)
    kw.setdefault("keepalive", 0)
    return OmeroBackend(**kw)


@pytest.fixture(params=["double", "live"])
def backend_factory(request):
    """The contract runs against the double, and against a live OMERO when
    OMERO_HOST (+ OMERO_USER, OMERO_PASSWORD) is set (see README: omero/docker-compose.yml)."""
    made = []
    if request.param == "live":
        if not os.environ.get("OMERO_HOST"):
            pytest.skip("no live OMERO: set OMERO_HOST, OMERO_USER, OMERO_PASSWORD "
                        "(docker compose -f omero/docker-compose.yml up -d)")
        make_one = OmeroBackend
    else:
        srv = request.getfixturevalue("server")
        del srv
        make_one = _backend

    def make():
        b = make_one()
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def _distinct_field(shape=(2, 3, 2, 20, 24), dtype="uint16") -> np.ndarray:
    """Every plane different, every value above 255 (byte order matters)."""
    t, z, c, y, x = shape
    base = np.arange(y * x, dtype="int64").reshape(y, x)
    arr = np.empty(shape, dtype=dtype)
    for ti in range(t):
        for zi in range(z):
            for ci in range(c):
                arr[ti, zi, ci] = 300 + base * 7 + 1000 * (ti * 100 + zi * 10 + ci)
    return arr


# ------------------------------------------------------------------ reading


def test_structure_is_one_well_query_whatever_the_plate_size(server):
    fields = {(w, s): _distinct_field((1, 1, 2, 8, 8)) for w in ("A01", "A02", "B01", "C07", "H12") for s in range(3)}
    pid = server.seed_plate("big", fields, channel_names=["DAPI", "GFP"], pixel_size=(0.3, 0.3, 1.0))
    b = _backend()
    server.reset_counters()
    s = b.plate_structure(str(pid))
    assert s.wells == ("A01", "A02", "B01", "C07", "H12")  # 0-based row/column -> A01 names
    assert dict(s.fields) == {w: 3 for w in s.wells}
    assert s.channel_names == ("DAPI", "GFP")
    assert server.counters["query:Well"] == 1
    assert server.counters["query:Plate"] == 1
    assert server.counters["query:Image"] <= 1  # channel names of one image
    before = dict(server.counters)
    for (w, site), arr in fields.items():
        np.testing.assert_array_equal(b.load_field(str(pid), w, site), arr)
    queries = {k: v for k, v in server.counters.items() if k.startswith("query")}
    assert queries == {k: v for k, v in before.items() if k.startswith("query")}
    # one RawPixelsStore per image, reused for its planes
    assert server.counters["rps.create"] == len(fields)
    assert server.counters["rps.getPlane"] == 2 * len(fields)


def test_big_endian_planes_decode_like_numpy(server):
    arr = _distinct_field((1, 1, 1, 6, 5))
    pid = server.seed_plate("be", {("B02", 0): arr})
    img = server.objects("Image")[0]
    pix_id = server.children("Image", "pixels", img.id.val)[0]
    # the server's raw bytes are big-endian: the independent oracle is numpy's '>u2'
    raw = server._pixels[pix_id][0, 0, 0].tobytes()
    assert raw == arr[0, 0, 0].astype(">u2").tobytes() != arr[0, 0, 0].astype("<u2").tobytes()
    got = _backend().load(f"/omero/plate_{pid}/B02/B02_s000_z000_c000_t000.tif")
    assert got.dtype == np.dtype("uint16") and got.dtype.isnative
    np.testing.assert_array_equal(got, arr[0, 0, 0])


def test_zct_plane_order_with_z_and_c(server):
    b = _backend()
    pid = b.create_plate("order")
    arr = _distinct_field((2, 3, 2, 10, 12))
    b.save_field(pid, "C03", 0, arr, channel_names=["a", "b"])
    img = server.objects("Image")[0]
    pix_id = server.children("Image", "pixels", img.id.val)[0]
    stored = server.pixels_of(pix_id)  # TZCYX from the server's own buffer
    np.testing.assert_array_equal(stored, arr)
    pix = server.objects("Pixels")[0]
    assert (pix.sizeZ.val, pix.sizeC.val, pix.sizeT.val) == (3, 2, 2)


def test_channel_names_and_pixel_sizes_are_set(server):
    b = _backend()
    pid = b.create_plate("meta")
    cal = Calibration(pixel_width=0.65, pixel_height=0.66, pixel_depth=2.5, unit="micron")
    b.save_field(pid, "A01", 0, _distinct_field((1, 2, 3, 8, 8)), channel_names=["DAPI", "GFP", "Cy5"],
                 calibration=cal)
    names = [lc.name.val for lc in server.objects("LogicalChannel")]
    assert names == ["DAPI", "GFP", "Cy5"]
    pix = server.objects("Pixels")[0]
    assert pix.physicalSizeX.getValue() == pytest.approx(0.65)
    assert pix.physicalSizeY.getValue() == pytest.approx(0.66)
    assert pix.physicalSizeZ.getValue() == pytest.approx(2.5)
    assert str(pix.physicalSizeX.getUnit()) == "MICROMETER"


def _orphans(server) -> list[int]:
    linked = {ws.image.id.val for ws in server.objects("WellSample")}
    return [i.id.val for i in server.objects("Image") if i.id.val not in linked]


def test_no_orphan_images_on_replace_or_failure(server, monkeypatch):
    b = _backend()
    pid = b.create_plate("orphans")
    a = _distinct_field((1, 1, 2, 8, 8))
    b.save_field(pid, "A01", 0, a)
    b.save_field(pid, "A01", 0, a + 1)  # replaces
    b.save_field(pid, "A01", 1, a + 2)
    assert len(server.objects("Image")) == 2 and _orphans(server) == []
    calls = {"n": 0}
    real = ServerDouble._rpc_RawPixelsStore_setPlane

    def failing(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full on the binary repository")
        return real(self, *args, **kw)
    monkeypatch.setattr(ServerDouble, "_rpc_RawPixelsStore_setPlane", failing)
    with pytest.raises(BackendError, match="disk full|OSError"):
        b.save_field(pid, "B01", 0, a)
    assert _orphans(server) == [] and len(server.objects("Image")) == 2
    monkeypatch.undo()
    np.testing.assert_array_equal(_backend().load_field(pid, "A01", 0), a + 1)
    assert _backend().plate_structure(pid).fields == {"A01": 2}


def test_fields_arriving_out_of_order_keep_their_numbers(server):
    """Parallel workers finish fields in any order: a field is the field it was
    saved as, and the well's samples end in field order (OMERO lists them by index)."""
    b = _backend()
    pid = b.create_plate("order")
    a = {s: _distinct_field((1, 1, 1, 8, 8)) + 100 * s for s in range(3)}
    for s in (2, 0, 1):
        b.save_field(pid, "A01", s, a[s])
        np.testing.assert_array_equal(_backend().load_field(pid, "A01", s), a[s])
    r = _backend()
    assert r.plate_structure(pid).fields == {"A01": 3}
    for s in range(3):
        np.testing.assert_array_equal(r.load_field(pid, "A01", s), a[s])
    wid = server.objects("Well")[0].id.val
    images = [server._rows[ws].image.id.val for ws in server.children("Well", "wellSamples", wid)]
    # in index order, the images hold fields 0, 1, 2 (oracle: the pixels the server stores)
    pix = [server.children("Image", "pixels", i)[0] for i in images]
    for s, p in enumerate(pix):
        np.testing.assert_array_equal(server.pixels_of(p), a[s])
    b.save_field(pid, "A01", 1, a[0])  # replacing keeps the others in place
    np.testing.assert_array_equal(_backend().load_field(pid, "A01", 2), a[2])


def test_tables_are_annotations_in_namespace_linked_to_their_target(server):
    b = _backend()
    pid = b.create_plate("tables")
    b.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)))
    b.save_table(pid, "plate_results", {"well": ["A01"], "count": [12], "area": [3.5]})
    b.save_table(pid, "well_results", "x,y\n1,2\n", well="A01")
    b.save_table(pid, "image_results", "n\n5\n", well="A01", site=0)
    b.save({"macro": "blur.ijm"}, f"/omero/plate_{pid}/summary.json")
    links = {}
    for kind in ("Plate", "Well", "Image"):
        for link in server.objects(f"{kind}AnnotationLink"):
            ann = server._rows[link.child.id.val]
            if type(ann).__name__ == "FileAnnotationI":
                f = server._rows[ann.file.id.val]
                links[f.name.val] = (kind, link.parent.id.val, ann.ns.val)
    plate_id = int(pid)
    well_id = server.objects("Well")[0].id.val
    image_id = server.objects("Image")[0].id.val
    assert links["plate_results.csv"] == ("Plate", plate_id, NS_RESULTS)
    assert links["summary.json"] == ("Plate", plate_id, NS_RESULTS)
    assert links["well_results.csv"] == ("Well", well_id, NS_RESULTS)
    assert links["image_results.csv"] == ("Image", image_id, NS_RESULTS)
    # CSV also as an OMERO.table, with typed columns equal to the CSV's
    assert links["plate_results.csv.h5"] == ("Plate", plate_id, NS_TABLE)
    table_file = next(f for f in server.objects("OriginalFile") if f.name.val == "plate_results.csv.h5")
    assert server.table_columns(table_file.id.val) == {"well": ["A01"], "count": [12], "area": [3.5],
                                                       "Well": [well_id]}  # a WellColumn for the "well" column
    # provenance MapAnnotation
    maps = [server._rows[l.child.id.val] for l in server.objects("PlateAnnotationLink")
            if type(server._rows[l.child.id.val]).__name__ == "MapAnnotationI"]
    assert [m.ns.val for m in maps] == [NS_PROVENANCE]
    # saving again replaces (one annotation per name)
    b.save_table(pid, "plate_results", "well,count\nA01,13\n")
    assert _backend().load(f"/omero/plate_{pid}/plate_results.csv") == "well,count\nA01,13\n"
    names = [server._rows[a.file.id.val].name.val for a in server.objects("FileAnnotation")]
    assert names.count("plate_results.csv") == 1 and names.count("plate_results.csv.h5") == 1


def test_rule6_no_tables_service_file_kept_no_orphans_no_duplicates():
    """SharedResourcesI.newTable raises (never None) without a tables service: the
    backend asks areTablesEnabled() first; retried saves leave one CSV and no table file."""
    srv = ServerDouble(users={"alice": PASSWORD}, tables=False).register("notables.test", 4064)
    try:
        b = _backend(host="notables.test")
        pid = b.create_plate("p")
        b.save_table(pid, "results", "a,b\n1,2\n")
        b.save_table(pid, "results", "a,b\n1,2\n")
        assert srv.counters["tables.newTable"] == 0 and srv.waited <= 2 * srv.registry_timeout
        assert [f.name.val for f in srv.objects("OriginalFile") if f.mimetype.val == "OMERO.tables"] == []
        names = [srv._rows[a.file.id.val].name.val for a in srv.objects("FileAnnotation")]
        assert names == ["results.csv"]
        assert _backend(host="notables.test").load(f"/omero/plate_{pid}/results.csv") == "a,b\n1,2\n"
    finally:
        srv.unregister()


def test_rule6_a_failing_table_leaves_the_csv_and_no_table_file(server, monkeypatch):
    b = _backend()
    pid = b.create_plate("p")

    def broken(self, s, sid, columns, ctx=None):
        raise OSError("HDF5 write failed")
    monkeypatch.setattr(ServerDouble, "_rpc_Table_addData", broken)
    b.save_table(pid, "results", "a,b\n1,2\n")
    b.save_table(pid, "results", "a,b\n1,3\n")
    names = [server._rows[a.file.id.val].name.val for a in server.objects("FileAnnotation")]
    assert names == ["results.csv"]
    assert [f for f in server.objects("OriginalFile") if f.mimetype.val == "OMERO.tables"] == []
    assert _backend().load(f"/omero/plate_{pid}/results.csv") == "a,b\n1,3\n"


def test_a_failed_table_deletes_no_other_objects_table(server, monkeypatch):
    """Deleting an OriginalFile deletes the FileAnnotations holding it (blitz-delete-rules.xml),
    so the cleanup after a failed table may delete only the file this attempt created."""
    b = _backend()
    pid = b.create_plate("p")
    other = b.create_plate("q")
    for well in ("A01", "A02"):
        b.save_field(pid, well, 0, _distinct_field((1, 1, 1, 8, 8)))
    b.save_table(pid, "results", "a,b\n1,2\n", well="A01")
    b.save_table(other, "results", "a,b\n5,6\n")
    tables = lambda: sorted(f.id.val for f in server.objects("OriginalFile")  # noqa: E731
                            if f.mimetype.val == "OMERO.tables")
    before = tables()
    assert len(before) == 2

    def broken(self, s, sid, columns, ctx=None):
        raise omero.ValidationException(message="addData failed")
    monkeypatch.setattr(ServerDouble, "_rpc_Table_addData", broken)
    b.save_table(pid, "results", "a,b\n3,4\n", well="A02")
    monkeypatch.undo()
    assert tables() == before  # A01's and the other plate's tables, and only they
    held = {a.file.id.val for a in server.objects("FileAnnotation")}
    assert set(before) <= held
    assert _backend().load(f"/omero/plate_{pid}/A01/results.csv") == "a,b\n1,2\n"
    assert _backend().load(f"/omero/plate_{pid}/A02/results.csv") == "a,b\n3,4\n"


def test_a_failed_new_table_deletes_only_the_file_it_saved(server, monkeypatch):
    """SharedResourcesI.newTable saves the file before it looks for a tables service: when that
    fails, the file left behind (this user's, new since the attempt, held by no annotation) is
    deleted, and no other object's table of the same name."""
    b = _backend()
    pid = b.create_plate("p")
    b.save_table(pid, "results", "a,b\n1,2\n")
    kept = [f.id.val for f in server.objects("OriginalFile") if f.mimetype.val == "OMERO.tables"]
    other = b.create_plate("q")
    monkeypatch.setattr(server, "tables", False)  # the service went away after areTablesEnabled said yes
    monkeypatch.setattr(ServerDouble, "_rpc_SharedResources_areTablesEnabled", lambda self, s, ctx=None: True)
    b.save_table(other, "results", "a,b\n3,4\n")
    assert server.counters["tables.newTable"] == 2
    assert [f.id.val for f in server.objects("OriginalFile") if f.mimetype.val == "OMERO.tables"] == kept
    assert _backend().load(f"/omero/plate_{other}/results.csv") == "a,b\n3,4\n"


def test_two_workers_writing_fields_of_one_new_well_both_succeed(server):
    """Well (plate, column, row) and WellSample (well, well_index) are unique (psql-footer.vm,
    SemanticTypeProcessor.java): workers that indexed the plate before either wrote must not make a second
    well, nor lose a field to an index collision."""
    b1, b2 = _backend(), _backend()
    pid = b1.create_plate("derived")
    b1.plate_structure(pid)
    b2.plate_structure(pid)  # both indexed the empty plate
    fields = {s: _distinct_field((1, 1, 1, 8, 8)) + s for s in range(4)}
    b1.save_field(pid, "B01", 0, fields[0])
    b2.save_field(pid, "B01", 1, fields[1])  # b2 still believes B01 does not exist
    assert len(server.objects("Well")) == 1
    b3, b4 = _backend(), _backend()
    b3.plate_structure(pid)
    b4.plate_structure(pid)  # both saw two samples
    b3.save_field(pid, "B01", 2, fields[2])
    b4.save_field(pid, "B01", 3, fields[3])
    # a race between reading the well and saving it: another worker appends a sample in between
    fields[4], fields[5] = _distinct_field((1, 1, 1, 8, 8)) + 4, _distinct_field((1, 1, 1, 8, 8)) + 5
    real_save, raced = ServerDouble._rpc_IUpdate_saveObject, []

    def save_after_a_rival(self, s, obj, ctx=None):
        if type(obj).__name__ == "WellI" and not raced:
            raced.append(True)
            _backend().save_field(pid, "B01", 5, fields[5])
        return real_save(self, s, obj, ctx)
    ServerDouble._rpc_IUpdate_saveObject = save_after_a_rival
    try:
        b4.save_field(pid, "B01", 4, fields[4])
    finally:
        ServerDouble._rpc_IUpdate_saveObject = real_save
    assert raced
    fresh = _backend()
    assert dict(fresh.plate_structure(pid).fields) == {"B01": 6}
    for s, a in fields.items():
        np.testing.assert_array_equal(fresh.load_field(pid, "B01", s), a)


def test_calibrations_of_zero_or_less_are_not_stored(server, caplog):
    """Pixels.physicalSize* are of the positive_float domain (psql-footer.vm): a zero or negative
    calibration is skipped with a log line; the field is written."""
    b = _backend()
    pid = b.create_plate("p")
    a = _distinct_field((1, 1, 1, 8, 8))
    with caplog.at_level(logging.INFO, logger="fiji_bridge.backends.omero"):
        b.save_field(pid, "A01", 0, a, calibration=Calibration(pixel_width=0.0, pixel_height=-1.0,
                                                             pixel_depth=2.0, unit="micron"))
    np.testing.assert_array_equal(_backend().load_field(pid, "A01", 0), a)
    pix = server.objects("Pixels")[0]
    assert pix.physicalSizeX is None and pix.physicalSizeY is None and pix.physicalSizeZ.getValue() == 2.0
    assert "not > 0" in caplog.text


def test_a_table_of_non_ascii_strings_fits_its_byte_sized_columns(server):
    """StringColumn sizes are UTF-8 bytes (omero-py columns.py StringColumnI.arrays)."""
    b = _backend()
    pid = b.create_plate("p")
    b.save_table(pid, "labels", "unit,name\n\u00b5m,na\u00efve\nnm,x\n")
    f = next(f for f in server.objects("OriginalFile") if f.name.val == "labels.csv.h5")
    assert server.table_columns(f.id.val) == {"unit": ["\u00b5m", "nm"], "name": ["na\u00efve", "x"]}


def test_a_summary_another_user_owns_is_not_edited_a_new_one_is_made(server):
    """BasicACLVoter: editing or deleting another user's annotation needs WRITE, which a read-annotate
    group (rwra--) does not give: the backend writes its own summary next to theirs."""
    import omero.model as om
    from omero.rtypes import rstring

    srv = ServerDouble(users={"alice": PASSWORD, "bob": "bob-pw"}, groups={"lab": ["alice", "bob"]},
                       permissions={"lab": "rwra--"}).register("ra.test", 4064)
    try:
        bob = _backend(host="ra.test", user="bob", password="bob-pw")
        pid = bob.create_plate("bob's")
        bob.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)))
        image = bob._field(pid, "A01", 0).image
        alice = _backend(host="ra.test")
        with alice._call("alice annotates bob's image") as conn:  # rwra--: she may annotate it
            ann = om.MapAnnotationI()
            ann.ns = rstring(NS_SUMMARY)
            ann.setMapValue([om.NamedValue("note", "alice was here")])
            alice._link_annotation(conn, "Image", image, srv.group_id("lab"), ann)
        bob.save_rois(pid, "A01", 0, [])  # each re-summarizes the image
        bob.save_table(pid, "field_A01_s000_results", "n\n1\n", well="A01")
        alice_anns = [a for a in srv.objects("MapAnnotation") if a.details.owner.id.val != srv._users["bob"].uid]
        assert [nv.value for a in alice_anns for nv in a.getMapValue()] == ["alice was here"]
        assert bob.image_summary(pid, "A01", 0)["ROIs"] == "0"
    finally:
        srv.unregister()


def test_annotation_linked_in_the_objects_group(server):
    fields = {("A01", 0): _distinct_field((1, 1, 1, 8, 8))}
    pid = server.seed_plate("in-other-group", fields, group="other", user="alice")
    b = _backend()  # alice's session group is "lab"
    assert b.conn.getEventContext().groupId == server.group_id("lab")
    b.save_table(str(pid), "results", "a\n1\n", well="A01")
    ann = server.objects("FileAnnotation")[0]
    assert ann.details.group.id.val == server.group_id("other")
    assert _backend().load(f"/omero/plate_{pid}/A01/results.csv") == "a\n1\n"


def _write_read(host, arr, **kw):
    b = _backend(host=host, **kw)
    pid = b.create_plate("big")
    b.save_field(pid, "A01", 0, arr)
    got = _backend(host=host, **kw).load_field(pid, "A01", 0)
    b.close()
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype,side", [("uint16", 3000), ("float32", 2304), ("float64", 2048)])
def test_rule3_planes_below_the_pyramid_threshold_are_written_as_planes_or_strips(server, dtype, side):
    """RomioPixelBuffer.setTile takes full-width strips only: the old 1024^2 tiles failed for these."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 60000, size=(1, 1, 1, side, side)).astype(dtype)
    np.testing.assert_array_equal(_write_read("omero.test", arr), arr)
    assert server.counters["rps.setTile"] == 0 or server.counters["rps.setPlane"] == 0


@pytest.mark.timeout(120)
def test_rule4_a_pyramid_is_written_in_tiles_of_get_tile_size_in_xyzct_order():
    """Above 3192^2 px (scaled here: max_plane_size=40 -> 1600 px) BfPyramidPixelBuffer refuses
    setPlane and takes tiles of getTileSize() in sequence; Z fastest, then C."""
    srv = ServerDouble(users={"alice": PASSWORD}, max_plane_size=40, tile_size=16).register("pyr.test", 4064)
    try:
        arr = _distinct_field((2, 3, 2, 45, 37))  # 1665 px > 1600
        np.testing.assert_array_equal(_write_read("pyr.test", arr), arr)
        per_plane = 3 * 3  # ceil(45/16) * ceil(37/16)
        assert srv.counters["rps.setTile"] == per_plane * 12 and srv.counters["rps.setPlane"] == 0
    finally:
        srv.unregister()


def test_rule4_float_planes_never_need_a_pyramid():
    """omero.pixeldata.max_plane_float_override=true: a big float32 image is ROMIO (planes/strips)."""
    srv = ServerDouble(users={"alice": PASSWORD}, max_plane_size=40, tile_size=16).register("fpyr.test", 4064)
    try:
        arr = np.random.default_rng(1).standard_normal((1, 2, 1, 45, 37)).astype("float32")
        np.testing.assert_array_equal(_write_read("fpyr.test", arr), arr)
        assert srv.counters["rps.setTile"] == 0 and srv.counters["rps.setPlane"] == 2
    finally:
        srv.unregister()


def test_an_imported_big_image_without_its_pyramid_yet_is_unavailable_then_readable():
    """PixelsService.handleMissingPyramid: MissingPyramidException until the pyramid exists;
    the backend says so (StoreUnavailable: retry later), then reads."""
    srv = ServerDouble(users={"alice": PASSWORD}, max_plane_size=40).register("mpyr.test", 4064)
    try:
        arr = _distinct_field((1, 1, 1, 45, 37))
        pid = srv.seed_plate("imported", {("A01", 0): arr}, pyramid_pending=True)
        b = _backend(host="mpyr.test")
        with pytest.raises(StoreUnavailable, match="pyramid"):
            b.load_field(str(pid), "A01", 0)
        srv.finish_pyramids()
        np.testing.assert_array_equal(b.load_field(str(pid), "A01", 0), arr)
    finally:
        srv.unregister()


def test_rule4_a_real_size_pyramid_plane():
    """3300^2 uint8 > 3192^2: a pyramid; 13 x 13 tiles of 256."""
    srv = ServerDouble(users={"alice": PASSWORD}).register("bigpyr.test", 4064)
    try:
        arr = (np.arange(3300 * 3300, dtype="uint32").reshape(1, 1, 1, 3300, 3300) % 251).astype("uint8")
        np.testing.assert_array_equal(_write_read("bigpyr.test", arr), arr)
        assert srv.counters["rps.setTile"] == 13 * 13
    finally:
        srv.unregister()


def _field_image(server, well_row=0, well_col=0, site=0):
    w = next(w for w in server.objects("Well") if (w.row.val, w.column.val) == (well_row, well_col))
    return server._rows[server.children("Well", "wellSamples", w.id.val)[site]].image.id.val


def test_rule2_pixels_are_write_once_a_plane_write_makes_a_new_image(server):
    """PixelsService: written pixels are read-only; saving a plane into an existing
    field writes a new image, relinks the well sample and deletes the old image."""
    b = _backend()
    pid = b.create_plate("once")
    arr = _distinct_field((1, 2, 2, 8, 8))
    b.save_field(pid, "A01", 0, arr)
    old = _field_image(server)
    new_plane = np.full((8, 8), 4242, "uint16")
    b.save(new_plane, f"/omero/plate_{pid}/A01/A01_s000_z001_c000_t000.tif")
    expected = arr.copy()
    expected[0, 1, 0] = new_plane
    np.testing.assert_array_equal(_backend().load_field(pid, "A01", 0), expected)
    assert _field_image(server) != old and old not in [i.id.val for i in server.objects("Image")]
    assert _orphans(server) == []


def test_rule2_planes_into_an_imported_field(server):
    arr = _distinct_field((1, 1, 2, 6, 6))
    pid = server.seed_plate("imported", {("B02", 0): arr})
    b = _backend()
    b.save(np.zeros((6, 6), "uint16"), f"/omero/plate_{pid}/B02/B02_s000_z000_c001_t000.tif")
    expected = arr.copy()
    expected[0, 0, 1] = 0
    np.testing.assert_array_equal(_backend().load_field(str(pid), "B02", 0), expected)


def test_rule7_load_takes_the_newest_of_duplicate_annotations(server):
    b = _backend()
    pid = b.create_plate("dups")
    b.save_table(pid, "results", "v\n1\n")
    # a second writer (another worker) attaches the same name again, without replacing
    other = _backend()
    other._attach_file("Plate", int(pid), other._index(pid).group, "results.csv", b"v\n2\n", "text/csv", NS_RESULTS)
    assert _backend().load(f"/omero/plate_{pid}/results.csv") == "v\n2\n"


def test_rule8_slow_deletes_finish_and_failures_are_backend_errors(server):
    """deleteObjects(wait=True) waits 10 x 500 ms then closes (cancels) the delete: the
    backend waits with waitOnCmd; a refused delete is a BackendError, not a raw CmdError."""
    server.delete_polls = 25
    b = _backend()
    pid = b.create_plate("slow")
    a = _distinct_field((1, 1, 1, 8, 8))
    b.save_field(pid, "A01", 0, a)
    b.save_field(pid, "A01", 0, a + 1)  # replaces: the old image must really go
    assert len(server.objects("Image")) == 1 and server.counters["cmd.cancelled"] == 0
    b.save_table(pid, "t", "x\n1\n")
    b.save_table(pid, "t", "x\n2\n")
    assert [server._rows[f.file.id.val].name.val for f in server.objects("FileAnnotation")].count("t.csv") == 1
    with pytest.raises(BackendError, match="WellSample|delete"):
        with b._call("deleting a linked image") as conn:
            b._delete(conn, "Image", [_field_image(server)])


def test_rule9_keepalive_false_drops_the_connection_and_the_next_call_reconnects(server):
    server.session_timeout = 0.3
    b = _backend(keepalive=0.15)
    pid = b.create_plate("ka")
    b.keepalive = 10.0  # the thread stops pinging; the session dies
    time.sleep(0.6)
    assert b.keep_alive() is False and b._conn is None
    assert b.plate_structure(pid).wells == ()  # logged in again (password from the params)
    assert server.counters["login"] == 2
    b.close()


def test_rule10_unreachable_or_starting_servers_are_unavailable_not_refused_logins(server):
    with pytest.raises(StoreUnavailable, match="nowhere.test:4064"):
        _backend(host="nowhere.test").plate_structure("1")  # DNS: connect() is False, not a raise
    server.ready = False
    with pytest.raises(StoreUnavailable, match="not fully initialized|starting"):
        _backend().plate_structure("1")
    server.ready = True
    with pytest.raises(BackendError, match="login refused") as e:
        _backend(password="wrong").plate_structure("1")
    assert not isinstance(e.value, StoreUnavailable)


@pytest.mark.timeout(60)
def test_rule10_with_the_real_blitzgateway_no_server_needed():
    """omero-py's own BlitzGateway (no double): a refused port raises
    ConnectionRefusedException, an unknown host returns False with a
    DNSException in getLastError(); both are StoreUnavailable."""
    import socket

    from omero.gateway import BlitzGateway

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for host, port in (("127.0.0.1", closed), ("nowhere.invalid", 4064)):
        made = []

        def tracked(*a, **kw):
            gw = BlitzGateway(*a, **kw)
            made.append(gw)
            return gw
        b = OmeroBackend(host=host, port=port, user="u", password="p", gateway=tracked, keepalive=0)
        with pytest.raises(StoreUnavailable, match=f"{host}:{port}"):
            b.plate_structure("1")
        b.close()
        assert made and all(gw.c is None for gw in made)  # every omero.client (Ice communicator) closed


def test_rule11_group_by_id_or_name_lands_in_that_group_or_fails_loudly(server):
    b = _backend(group=server.group_id("other"))
    pid = b.create_plate("by-id")
    plate = next(p for p in server.objects("Plate") if p.id.val == int(pid))
    assert plate.details.group.id.val == server.group_id("other")
    b2 = _backend(group="other")
    pid2 = b2.create_plate("by-name")
    plate2 = next(p for p in server.objects("Plate") if p.id.val == int(pid2))
    assert plate2.details.group.id.val == server.group_id("other")
    with pytest.raises(BackendError, match="nosuchgroup"):
        _backend(group="nosuchgroup").create_plate("nowhere")
    assert len(server.objects("Plate")) == 2


def test_rule12_instance_manager_needs_a_working_omero(server):
    from fiji_bridge.omero import InstanceManager

    host, port = server.serve()
    im = InstanceManager(host=host, port=port, user="alice", password=PASSWORD, gateway=GatewayDouble, timeout=1)
    assert im.check()
    server.ready = False  # the port is open, the server is still starting
    assert not im.check()
    server.ready = True
    wrong = InstanceManager(host=host, port=port, user="alice", password="nope", gateway=GatewayDouble, timeout=1)
    assert wrong.check()  # a refused login (PermissionDenied) proves an OMERO answered


@pytest.mark.parametrize("unit,factor", [("pixel", None), ("cm", 1e4), ("inch", 25400.0), ("\u03bcm", 1.0),
                                         ("\u00b5m", 1.0), ("nm", 1e-3)])
def test_rule13_imagej_units(server, unit, factor):
    b = _backend()
    pid = b.create_plate("units")
    cal = Calibration(pixel_width=0.5, pixel_height=0.5, pixel_depth=2.0, unit=unit)
    b.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)), calibration=cal)
    s = _backend().plate_structure(pid)
    if factor is None:  # pixels are no length: no physical size is stored
        assert server.objects("Pixels")[0].physicalSizeX is None and s.calibration.pixel_width is None
    else:
        assert s.calibration.pixel_width == pytest.approx(0.5 * factor)
        assert s.calibration.pixel_depth == pytest.approx(2.0 * factor)


def test_rule13_stored_pixel_units_read_without_error(server):
    from omero.model import LengthI
    from omero.model.enums import UnitsLength

    pid = server.seed_plate("px", {("A01", 0): _distinct_field((1, 1, 1, 4, 4))})
    pix = server._rows[server.objects("Pixels")[0].id.val]
    pix.setPhysicalSizeX(LengthI(1.0, UnitsLength.PIXEL))
    pix.setPhysicalSizeY(LengthI(2.0, UnitsLength.MILLIMETER))
    s = _backend().plate_structure(str(pid))
    assert s.calibration.pixel_width is None and s.calibration.pixel_height == pytest.approx(2000.0)


def test_rule14_duplicate_well_rows_give_one_well_each(server):
    fields = {("A01", s): _distinct_field((1, 1, 1, 4, 4)) for s in range(4)}
    pid = server.seed_plate("dup", fields)
    s = _backend().plate_structure(str(pid))
    assert s.wells == ("A01",) and s.fields == {"A01": 4}
    assert _backend().list_files(f"/omero/plate_{pid}") == [f"/omero/plate_{pid}/A01"]


def test_rule15_no_leaked_clients_or_stores(server):
    GatewayDouble.open_clients.clear()
    b = _backend()
    pid = b.create_plate("leaks")
    b.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)))
    for _ in range(3):
        server.drop_connections()
        with pytest.raises(StoreUnavailable):
            b.load_field(pid, "A01", 0)
        b.load_field(pid, "A01", 0)
    assert len(GatewayDouble.open_clients) == 1  # every dropped gateway closed its omero.client
    # stores of a lost connection cannot be closed over it: the server reaps them with the session
    lost = set(server.open_services())
    for site in range(12):  # more images than the store cache holds
        b.save_field(pid, "B01", site, _distinct_field((1, 1, 1, 8, 8)))
        b.load_field(pid, "B01", site)
    for _ in range(3):  # replacing a field that has an open read store closes that store
        b.save_field(pid, "B01", 0, _distinct_field((1, 1, 1, 8, 8)))
        b.load_field(pid, "B01", 0)
        assert all(server._services[s]["pixels"] in server._pixels for s in set(server.open_services("rps")) - lost)
    assert len(set(server.open_services("rps")) - lost) <= 8
    b.close()
    assert set(server.open_services()) - lost == set()
    assert GatewayDouble.open_clients == []


def test_rule16_compose_publishes_on_localhost_with_file_limits():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(open(os.path.join(ROOT, "omero", "docker-compose.yml")))
    ports = [p for svc in doc["services"].values() for p in svc.get("ports", [])]
    assert sorted(ports) == ["127.0.0.1:4063:4063", "127.0.0.1:4064:4064", "127.0.0.1:4080:4080"]
    assert doc["services"]["omeroserver"]["ulimits"]["nofile"]["soft"] >= 8192
    # omero-server omero-server.properties: binary_access is who may *download* binaries, not pixel writes
    text = open(os.path.join(ROOT, "omero", "docker-compose.yml")).read()
    comment = text.split("CONFIG_omero_policy_binary__access")[0].rsplit("\n\n", 1)[-1]
    assert "download" in comment and "write pixels" not in comment


def test_strict_proxy_refuses_invented_gateway_methods(server):
    """The backend drives the real omero-py surface only: the double refuses a
    method BlitzGateway lacks, as the real library would."""
    from fiji_bridge.testing.omero_double import StrictAttributeError

    b = _backend()
    with pytest.raises(StrictAttributeError):
        b.conn.getSessionId()
    assert b.create_plate("strict")


# ------------------------------------------------------------------ connection


def test_password_never_in_repr_logs_or_pickles(server, caplog):
    caplog.set_level(logging.DEBUG)
    b = _backend()
    pid = b.create_plate("secret")
    b.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)))
    text = repr(b) + str(b) + repr(b.params) + str(b.params) + caplog.text
    blob = pickle.dumps(b)
    assert PASSWORD not in text
    assert PASSWORD.encode() not in blob
    assert "alice" in repr(b) and "omero.test:4064" in repr(b)


def test_pickled_backend_reconnects_in_a_subprocess(server, tmp_path):
    host, port = server.serve()
    b = _backend(host=host, port=port)
    pid = b.create_plate("shared")
    arr = _distinct_field((1, 2, 2, 12, 10))
    b.save_field(pid, "B02", 0, arr)
    (tmp_path / "backend.pkl").write_bytes(pickle.dumps(b))
    logins = server.counters["login"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMERO_PASSWORD", "OMERO_SESSION")}
    code = textwrap.dedent(f"""
        import pickle, sys, numpy as np
        b = pickle.loads(open({str(tmp_path / 'backend.pkl')!r}, 'rb').read())
        assert b._conn is None
        a = b.load_field({pid!r}, "B02", 0)
        np.save({str(tmp_path / 'out.npy')!r}, a)
        b.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), arr)
    assert server.counters["login"] == logins  # joined the session by key, no password needed
    assert server.counters["join"] >= 1
    b.close()


def test_dead_server_bad_login_and_missing_credentials(server, monkeypatch):
    with pytest.raises(BackendError, match="login refused for user 'alice' at omero.test:4064"):
        _backend(password="wrong").plate_structure("1")
    monkeypatch.delenv("OMERO_PASSWORD", raising=False)
    monkeypatch.delenv("OMERO_SESSION", raising=False)
    with pytest.raises(BackendError, match="OMERO_PASSWORD"):
        _backend(password=None).plate_structure("1")
    with pytest.raises(StoreUnavailable, match="nowhere.test:4064"):
        _backend(host="nowhere.test").plate_structure("1")
    b = _backend()
    pid = b.create_plate("p")
    server.stop()
    with pytest.raises(StoreUnavailable, match="omero.test:4064"):
        b.plate_structure(pid)
    server.start()
    assert b.plate_structure(pid).wells == ()  # reconnects (joins its session) once the server is back


def test_connection_drop_then_reconnect_by_session(server):
    b = _backend()
    pid = b.create_plate("drop")
    b.save_field(pid, "A01", 0, _distinct_field((1, 1, 1, 8, 8)))
    server.drop_connections()
    with pytest.raises(StoreUnavailable):
        b.load_field(pid, "A01", 0)
    logins = server.counters["login"]
    b.load_field(pid, "A01", 0)
    assert server.counters["login"] == logins and server.counters["join"] == 1


def test_keepalive_keeps_an_idle_session(server):
    server.session_timeout = 0.6
    b = _backend(keepalive=0.2)
    pid = b.create_plate("idle")
    time.sleep(1.5)
    assert server.counters["keepAlive"] >= 2
    b.plate_structure(pid)
    assert server.counters["login"] == 1 and server.counters["join"] == 0
    b.close()


def test_env_configuration_and_uri(server, monkeypatch):
    monkeypatch.setenv("OMERO_HOST", "omero.test")
    monkeypatch.setenv("OMERO_USER", "alice")
    monkeypatch.setenv("OMERO_PASSWORD", PASSWORD)
    b = OmeroBackend(gateway=GatewayDouble, keepalive=0)
    assert b.params.port == 4064 and b.params.password is None
    pid = b.create_plate("env")
    u = OmeroBackend.from_uri(f"omero://alice@omero.test:4064/plate/{pid}", gateway=GatewayDouble, keepalive=0)
    assert u.plate_structure(pid).name == "env"


def test_missing_omero_py_gives_install_hint():
    code = textwrap.dedent("""
        import sys
        for m in ("omero", "omero.gateway", "Ice"):
            sys.modules[m] = None
        from fiji_bridge.backends.omero import OmeroBackend
        from fiji_bridge.backends.base import BackendError
        b = OmeroBackend(host="h", user="u", password="p")
        try:
            b.plate_structure("1")
        except BackendError as e:
            print("ERR", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "pip install fiji-bridge[omero]" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ InstanceManager


def test_instance_manager_check_connect_and_clear_start_error(server, monkeypatch, tmp_path):
    import shutil
    import socket

    from fiji_bridge.omero import InstanceError, InstanceManager

    host, port = server.serve()
    im = InstanceManager(host=host, port=port, user="alice", password=PASSWORD, gateway=GatewayDouble, timeout=5)
    assert im.check()
    b = im.ensure(keepalive=0)  # a server answers: no start
    assert b.create_plate("via-manager")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = InstanceManager(host="127.0.0.1", port=closed, gateway=GatewayDouble, timeout=0.5)
    assert not down.check(timeout=0.5)
    if shutil.which("docker") is None:
        with pytest.raises(InstanceError, match="docker is not installed"):
            down.ensure()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/docker")
    monkeypatch.delenv("OMERO_ROOT_PASSWORD", raising=False)
    with pytest.raises(InstanceError, match="OMERO_ROOT_PASSWORD"):
        down.start()
    with pytest.raises(InstanceError, match="within"):
        down.wait(timeout=0.3)
