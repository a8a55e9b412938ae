"""The OMERO test double is at least as strict as OMERO 5.6 where the backend
relies on it. Oracles: omero-py's own client code run against the double
(createImageFromNumpySeq, getObjects, createOriginalFileFromFileObj,
keepAlive, deleteObjects), numpy, and the rules read from the server's
source (named in each test and beside each rule in the double)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")

import Glacier2  # noqa: E402
import Ice  # noqa: E402
import omero  # noqa: E402
import omero.gateway  # noqa: E402
import omero.grid  # noqa: E402
import omero_Tables_ice  # noqa: E402,F401
from omero.model import (  # noqa: E402
    EllipseI,
    FileAnnotationI,
    OriginalFileI,
    PlateAnnotationLinkI,
    PlateI,
    PointI,
    PolygonI,
    RectangleI,
    RoiI,
)
from omero.rtypes import rdouble, rint, rstring  # noqa: E402

from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble, StrictAttributeError  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    srv = ServerDouble(users={"alice": "pw"}, groups={"lab": ["alice"], "other": ["alice"]})
    srv.register("double.test", 4064)
    yield srv
    srv.unregister()


@pytest.fixture
def conn(server):
    c = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert c.connect()
    yield c
    c.close()


def _stack(z=3, c=2, t=2, y=6, x=7):
    """A ZCT stack whose every plane is distinct: value = 100*z + 10*c + t."""
    a = np.zeros((t, z, c, y, x), "uint16")
    for ti in range(t):
        for zi in range(z):
            for ci in range(c):
                a[ti, zi, ci] = 100 * zi + 10 * ci + ti
    return a


def _new_pixels(server, conn, shape=(1, 1, 1, 6, 7), ptype="uint16") -> int:
    """An image made by IPixels.createImage (no pixels file yet): its Pixels id."""
    t, z, c, y, x = shape
    pt = conn.getQueryService().findByQuery(f"from PixelsType as p where p.value='{ptype}'", None)
    iid = conn.getPixelsService().createImage(x, y, z, t, list(range(c)), pt, "new", "").val
    return server.children("Image", "pixels", iid)[0]


def _rps(conn, pid):
    rps = conn.c.sf.createRawPixelsStore()
    rps.setPixelsId(pid, True)
    return rps


def test_create_image_from_numpy_seq_consumes_z_then_c_then_t(server, conn):
    truth = _stack()
    t, z, c = truth.shape[:3]
    zct = (truth[ti, zi, ci] for zi in range(z) for ci in range(c) for ti in range(t))
    img = conn.createImageFromNumpySeq(zct, "zct", sizeZ=z, sizeC=c, sizeT=t)  # omero-py's own code
    pix_id = img.getPrimaryPixels().getId()
    np.testing.assert_array_equal(server.pixels_of(pix_id), truth)
    # OpenHCS's order (T outermost, then Z, then C) transposes planes when Z>1 and C>1
    tzc = (truth[ti, zi, ci] for ti in range(t) for zi in range(z) for ci in range(c))
    bad = conn.createImageFromNumpySeq(tzc, "tzc", sizeZ=z, sizeC=c, sizeT=t)
    assert not np.array_equal(server.pixels_of(bad.getPrimaryPixels().getId()), truth)
    # and it sets no channel names and no pixel sizes
    p = conn.getObject("Image", img.getId(), opts={"load_channels": True})._obj.getPrimaryPixels()
    assert p.getPhysicalSizeX() is None
    assert all(ch.getLogicalChannel().getName() is None for ch in p.copyChannels())


def test_raw_planes_are_big_endian_without_a_plane_size_limit(server, conn):
    # rule 5: RawPixelsBean.getPlane/setPlane have no size limit of their own
    small = ServerDouble(users={"a": "b"}, max_plane_size=4).register("small.test", 4064)
    try:
        c2 = GatewayDouble("a", "b", host="small.test", port=4064)
        assert c2.connect()
        truth = np.arange(3 * 5, dtype="uint16").reshape(3, 5) + 1000  # 5 > 4: still no pyramid (15 < 16)
        pid = _new_pixels(small, c2, (1, 1, 1, 3, 5))
        rps = _rps(c2, pid)
        rps.setPlane(truth.astype(">u2").tobytes(), 0, 0, 0)
        assert rps.getPlane(0, 0, 0) == truth.astype(">u2").tobytes() != truth.astype("<u2").tobytes()
        with pytest.raises(omero.ApiUsageException):  # DimensionsOutOfBoundsException
            rps.getPlane(1, 0, 0)
    finally:
        small.unregister()


def test_pixels_are_write_once(server, conn):
    # rule 2: PixelsService._getPixelBuffer gives a read-only ROMIO buffer once the file exists
    truth = _stack(1, 1, 1, 4, 5)
    img = conn.createImageFromNumpySeq(iter([truth[0, 0, 0]]), "written")  # writes the pixels file
    rps = _rps(conn, img.getPrimaryPixels().getId())
    with pytest.raises(omero.ApiUsageException, match="Write-method not permitted"):
        rps.setPlane(truth[0, 0, 0].astype(">u2").tobytes(), 0, 0, 0)
    # imported images are read-only too
    pid = server.seed_plate("p", {("A01", 0): truth})
    seeded = server.children("Image", "pixels", server.objects("WellSample")[0].image.id.val)[0]
    with pytest.raises(omero.ApiUsageException, match="Write-method not permitted"):
        _rps(conn, seeded).setTile(truth[0, 0, 0].astype(">u2").tobytes(), 0, 0, 0, 0, 0, 5, 4)
    assert pid
    # a new image's pixels take writes until its first store wrote them, through that store
    fresh = _new_pixels(server, conn, (1, 1, 2, 4, 5))
    first = _rps(conn, fresh)
    first.setPlane(truth[0, 0, 0].astype(">u2").tobytes(), 0, 0, 0)
    first.setPlane(truth[0, 0, 0].astype(">u2").tobytes(), 0, 1, 0)  # same store: still writable
    with pytest.raises(omero.ApiUsageException, match="Write-method not permitted"):
        _rps(conn, fresh).setPlane(truth[0, 0, 0].astype(">u2").tobytes(), 0, 0, 0)


def test_plane_buffer_of_the_wrong_size_is_a_resource_error(server, conn):
    pid = _new_pixels(server, conn, (1, 1, 1, 4, 5))
    with pytest.raises(omero.ResourceError, match="BufferUnderflow"):  # RawPixelsBean.handleException
        _rps(conn, pid).setPlane(b"\0" * 39, 0, 0, 0)
    with pytest.raises(omero.ResourceError, match="BufferOverflow"):
        _rps(conn, pid).setPlane(b"\0" * 41, 0, 0, 0)


def test_romio_takes_only_full_width_strips(server, conn):
    # rule 3: RomioPixelBuffer.setTile / getTileSize; below the pyramid threshold
    pid = _new_pixels(server, conn, (1, 1, 1, 12, 10))
    rps = _rps(conn, pid)
    assert rps.getTileSize() == [10, 12]  # [sizeX, min(sizeY, 1 MiB / 2 / sizeX)]
    with pytest.raises(omero.InternalException, match="0 offseted"):
        rps.setTile(b"\0" * 2 * 5 * 4, 0, 0, 0, 5, 0, 5, 4)
    with pytest.raises(omero.InternalException, match="full row"):
        rps.setTile(b"\0" * 2 * 5 * 4, 0, 0, 0, 0, 0, 5, 4)
    strip = (np.arange(40, dtype="uint16").reshape(4, 10) + 500)
    rps.setTile(strip.astype(">u2").tobytes(), 0, 0, 0, 0, 8, 10, 4)
    np.testing.assert_array_equal(server.pixels_of(pid)[0, 0, 0, 8:12], strip)
    # a plane of 3000 x 1000 uint16 has strips of 1 MiB / 2 / 3000 = 174 rows
    big = _new_pixels(server, conn, (1, 1, 1, 1000, 3000))
    assert _rps(conn, big).getTileSize() == [3000, 174]


def test_pyramid_takes_tiles_in_sequence_only():
    # rule 4: above 3192^2 px (here 8^2) BfPyramidPixelBuffer: no setPlane, tiles in XYZCT order, row-major
    srv = ServerDouble(users={"a": "b"}, max_plane_size=8, tile_size=4).register("pyr.test", 4064)
    try:
        c = GatewayDouble("a", "b", host="pyr.test", port=4064)
        assert c.connect()
        pid = _new_pixels(srv, c, (1, 2, 2, 6, 10))  # 60 px > 64? no: 6*10 = 60 < 64
        assert not _rps(c, pid).requiresPixelsPyramid()
        floats = _new_pixels(srv, c, (1, 1, 1, 7, 10), ptype="float")  # max_plane_float_override: no pyramid
        assert not _rps(c, floats).requiresPixelsPyramid()
        pid = _new_pixels(srv, c, (1, 2, 2, 7, 10))  # 70 px > 64: a pyramid
        rps = _rps(c, pid)
        assert rps.requiresPixelsPyramid() and rps.getTileSize() == [4, 4]
        with pytest.raises(omero.InternalException, match="Non-tile based writing unsupported"):
            rps.setPlane(b"\0" * 140, 0, 0, 0)
        truth = np.arange(2 * 2 * 7 * 10, dtype="uint16").reshape(2, 2, 7, 10)  # C, Z, Y, X
        order = []
        for ci in range(2):
            for zi in range(2):  # XYZCT: z fastest, then c
                for y in range(0, 7, 4):
                    for x in range(0, 10, 4):
                        order.append((zi, ci, x, y, min(4, 10 - x), min(4, 7 - y)))
        # out of order (c before z): refused
        zi, ci, x, y, w, h = order[0]
        rps.setTile(truth[ci, zi, y:y + h, x:x + w].astype(">u2").tobytes(), zi, ci, 0, x, y, w, h)
        with pytest.raises(omero.InternalException, match="expects tile"):
            rps.setTile(truth[0, 0, 0:4, 4:8].astype(">u2").tobytes(), 0, 0, 0, 4, 4, 4, 3)
        rps2 = _rps(c, _new_pixels(srv, c, (1, 2, 2, 7, 10)))
        for zi, ci, x, y, w, h in order:
            rps2.setTile(truth[ci, zi, y:y + h, x:x + w].astype(">u2").tobytes(), zi, ci, 0, x, y, w, h)
        last = srv.children("Image", "pixels", srv.objects("Image")[-1].id.val)[0]
        np.testing.assert_array_equal(srv.pixels_of(last)[0], truth.transpose(1, 0, 2, 3))
    finally:
        srv.unregister()


def test_a_read_ends_pyramid_writing_and_any_romio_access_creates_the_file():
    """BfPyramidPixelBuffer.delegate() closes the writer on a read; RomioPixelBuffer.getFileChannel()
    creates the file on any access (then read-only), and reading what was never written is past its end."""
    srv = ServerDouble(users={"a": "b"}, max_plane_size=8, tile_size=4).register("pyr2.test", 4064)
    try:
        c = GatewayDouble("a", "b", host="pyr2.test", port=4064)
        assert c.connect()
        rps = _rps(c, _new_pixels(srv, c, (1, 1, 1, 7, 10)))
        assert rps.requiresPixelsPyramid() and rps.getTileSize() == [4, 4]  # both safe while writing
        rps.setTile(b"\0" * 32, 0, 0, 0, 0, 0, 4, 4)
        assert rps.getByteWidth() == 2  # ends the writing
        with pytest.raises(omero.ApiUsageException, match="In read-only mode"):
            rps.setTile(b"\0" * 32, 0, 0, 0, 4, 0, 4, 4)
        # ROMIO: two planes; reading the unwritten second one is past the end of the file
        pid = _new_pixels(srv, c, (1, 1, 2, 3, 4))
        rps = _rps(c, pid)
        rps.setPlane(np.arange(12, dtype=">u2").tobytes(), 0, 0, 0)
        assert np.frombuffer(rps.getPlane(0, 0, 0), ">u2").tolist() == list(range(12))
        with pytest.raises(omero.ResourceError):
            rps.getPlane(0, 1, 0)
        # one read through a fresh writable store creates the file: every later store is read-only
        pid = _new_pixels(srv, c, (1, 1, 1, 3, 4))
        rps = _rps(c, pid)
        with pytest.raises(omero.ResourceError):
            rps.getTile(0, 0, 0, 0, 0, 4, 1)
        rps.close()
        with pytest.raises(omero.ApiUsageException, match="Write-method not permitted"):
            _rps(c, pid).setPlane(b"\0" * 24, 0, 0, 0)
    finally:
        srv.unregister()


def test_raw_pixels_save_is_null_unless_the_store_wrote(server, conn):
    """RawPixelsBean.save: ``if (isModified())`` ... else null; a write sets Pixels.sha1 from the digest."""
    pid = _new_pixels(server, conn, (1, 1, 1, 3, 4))
    rps = _rps(conn, pid)
    assert rps.save() is None
    rps.setPlane(np.arange(12, dtype=">u2").tobytes(), 0, 0, 0)
    saved = rps.save()
    assert saved.id.val == pid and saved.sha1 is not None
    assert rps.save() is None


def test_sessions_logins_and_a_dead_server(server):
    # omero/gateway/__init__.py BlitzGateway.connect: False (not a raise) for a refused login
    bad = GatewayDouble("alice", "wrong", host="double.test", port=4064)
    assert bad.connect() is False
    assert isinstance(bad.getLastError(), Glacier2.PermissionDeniedException)
    assert GatewayDouble("nobody", "pw", host="double.test", port=4064).connect() is False
    c = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert c.connect()
    key = c.c.getSessionId()
    other = GatewayDouble(host="double.test", port=4064)
    assert other.connect(sUuid=key) and other.getEventContext().userName == "alice"
    assert GatewayDouble(host="double.test", port=4064).connect(sUuid="not-a-session") is False
    server.stop()
    with pytest.raises(Ice.ConnectionLostException):
        c.getObject("Plate", 1)
    with pytest.raises(Ice.ConnectionRefusedException):  # a SyscallException: re-raised
        GatewayDouble("alice", "pw", host="double.test", port=4064).connect()
    server.start()
    # rule 10: DNS failures are LocalExceptions: connect() returns False, getLastError() says why
    dns = GatewayDouble("alice", "pw", host="nowhere.test", port=4064)
    assert dns.connect() is False and isinstance(dns.getLastError(), Ice.DNSException)
    logins = server.counters["login"]
    assert GatewayDouble("alice", "wrong", host="double.test", port=4064).connect() is False
    server.ready = False  # SessionManagerI: "Server not fully initialized"
    booting = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert booting.connect() is False  # omero/clients.py createSession: 3 tries, then a ClientError
    assert isinstance(booting.getLastError(), omero.ClientError) and "null object" in str(booting.getLastError())
    assert server.counters["login"] - logins == 2 + 2 * 3  # the wrong password twice (gateway retry), 2 x 3 here


def test_group_is_a_name_and_an_unknown_one_falls_back(server):
    # rule 11: the group travels in the Ice implicit context (strings only)
    by_id = GatewayDouble("alice", "pw", host="double.test", port=4064, group=server.group_id("other"))
    assert by_id.connect() is False
    by_name = GatewayDouble("alice", "pw", host="double.test", port=4064, group="other")
    assert by_name.connect() and by_name.getEventContext().groupId == server.group_id("other")
    unknown = GatewayDouble("alice", "pw", host="double.test", port=4064, group="nosuchgroup")
    assert unknown.connect()  # silently the default group
    assert unknown.getEventContext().groupId == server.group_id("lab")
    # setGroupForSession (omero-py's own) switches by id
    assert unknown.setGroupForSession(server.group_id("other"))
    assert unknown.getEventContext().groupId == server.group_id("other")


def test_strict_surface_admits_only_what_omero_py_has(server, conn):
    # rule 1: BlitzGateway has no getSessionId (only _getSessionId; the key is c.getSessionId())
    with pytest.raises(StrictAttributeError, match="BlitzGateway has no attribute 'getSessionId'"):
        conn.getSessionId()
    assert conn._getSessionId() == conn.c.getSessionId()
    with pytest.raises(StrictAttributeError, match="IQueryPrx"):
        conn.getQueryService().findEverything()
    with pytest.raises(StrictAttributeError, match="RawPixelsStorePrx"):
        conn.c.sf.createRawPixelsStore().getPlaneFast(0, 0, 0)
    with pytest.raises(StrictAttributeError, match="ServiceFactoryPrx"):
        conn.c.sf.newTable(1, "x")
    assert omero.gateway.BlitzGateway.keepAlive is GatewayDouble.keepAlive  # omero-py's own code


def test_every_call_is_marshalled_by_the_real_ice_proxy_first(server, conn):
    """IcePy refuses what does not fit the Slice types before sending (wire.py): the double
    raises the same ValueError/TypeError, on every path (services, tables, the session
    factory, handles, the gateway's RawFileStore)."""
    server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    n_rois = len(server.objects("Roi"))
    q = conn.getQueryService()
    with pytest.raises(TypeError):
        q.findAllByQuery("from Image as i")  # IQueryPrx.findAllByQuery needs params
    roi = RoiI()
    roi.image = omero.model.ImageI(server.objects("Image")[0].id.val, False)
    rect = RectangleI()
    rect.x, rect.y, rect.width, rect.height = rdouble(0), rdouble(0), rdouble(1), rdouble(1)
    rect.theZ = 3  # an int where the model has an RInt
    roi.addShape(rect)
    with pytest.raises(ValueError, match="theZ"):
        conn.getUpdateService().saveObject(roi)
    rect.theZ = rdouble(1)  # an RDouble where the model has an RInt
    with pytest.raises(ValueError, match="theZ"):
        conn.getUpdateService().saveObject(roi)
    assert len(server.objects("Roi")) == n_rois
    resources = conn.c.sf.sharedResources()
    with pytest.raises(ValueError):
        resources.newTable(1, 5)  # the path is a string
    with pytest.raises(ValueError):
        resources.openTable("results.h5")
    assert server.counters["tables.newTable"] == 0
    with pytest.raises(ValueError):
        conn.c.sf.submit("delete everything")
    with pytest.raises(ValueError):
        conn.c.sf.setSecurityContext(server.group_id("other"))  # an ExperimenterGroup, not an id
    with pytest.raises(ValueError):
        conn.createRawFileStore().setFileId("1")
    handle = conn.deleteObjects("Roi", [1])
    with pytest.raises(ValueError):
        handle.getResponse(["not", "a", "context"])
    rect.theZ = rint(0)
    conn.getUpdateService().saveObject(roi)  # well typed: stored
    assert len(server.objects("Roi")) == n_rois + 1


def test_strict_checks_modules_named_like_omero_but_not_in_it(server, conn):
    """Only the omero package and its submodules are omero-py's own code; omero_rois or
    omero2pandas are callers like any other."""
    for module in ("omero_rois", "omero2pandas", "omeroweb_tool"):
        code = compile("conn._transport", f"<{module}>", "exec")  # the double's, not BlitzGateway's
        with pytest.raises(StrictAttributeError):
            exec(code, {"__name__": module, "conn": conn})


def test_the_double_itself_invents_no_methods():
    """Every public name the double's client classes define exists on the real class."""
    from fiji_bridge.testing.omero_double import client, real_attributes

    for cls in (client.GatewayDouble, client._ClientDouble, client._SessionFactory, client._CmdCallback):
        own = {n for n in vars(cls) if not n.startswith("__") and n not in ("_real", "_real_for")}
        extra = {n for n in own if not n.startswith("_") or n in ("_getSessionId", "_waitOnCmd", "_getObj")}
        assert extra - real_attributes(*cls._real) == set() or cls is client.GatewayDouble and \
            extra - real_attributes(*cls._real) == {"open_clients"}, cls
    for name in ("newTable", "openTable", "areTablesEnabled", "repositories"):
        assert name in real_attributes("omero.grid.SharedResourcesPrx")


def test_keepalive_is_false_on_a_dead_session(server):
    # rule 9: BlitzGateway.keepAlive catches ObjectNotExistException and returns False
    server.session_timeout = 0.2
    c = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert c.connect()
    time.sleep(0.1)
    assert c.keepAlive() is True
    time.sleep(0.3)
    assert c.keepAlive() is False


def test_well_query_returns_a_well_once_per_sample(server, conn):
    # rule 14: _WellWrapper._getQueryString joins fetch wellSamples without distinct
    pid = server.seed_plate("p", {("B03", s): _stack(1, 1, 1, 2, 2) for s in range(3)} |
                            {("A01", 0): _stack(1, 1, 1, 2, 2)})
    rows = list(conn.getObjects("Well", opts={"plate": pid, "load_pixels": True}))
    assert sorted((w.row, w.column) for w in rows) == [(0, 0), (1, 2), (1, 2), (1, 2)]
    (plain,) = [w for w in conn.getObjects("Well", opts={"plate": pid}) if w.row == 1]  # no join: once
    assert not plain._obj.isWellSamplesLoaded()
    img = rows[-1]._obj.copyWellSamples()[0].getImage()
    assert img.getPrimaryPixels().getSizeX().val == 2 and not img.getPrimaryPixels().isChannelsLoaded()
    with pytest.raises(NotImplementedError, match="cannot"):
        conn.getQueryService().findAllByQuery("select count(w) from Well w group by w.row", None)


def test_delete_is_a_command_with_graph_rules(server, conn):
    # rule 8: blitz-delete-rules.xml "may not delete Image while WellSample remains"; CmdError from waitOnCmd
    server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    iid = server.objects("WellSample")[0].image.id.val
    with pytest.raises(omero.CmdError) as err:
        conn.deleteObjects("Image", [iid], wait=True)
    assert not isinstance(err.value, omero.ServerError) and isinstance(err.value, omero.ClientError)
    assert "WellSample" in str(err.value.err.parameters)
    assert len(server.objects("Image")) == 1
    # a slow delete: deleteObjects(wait=True) waits 10 polls, then closes the handle -> cancelled
    server.delete_polls = 15
    orphan = conn.createImageFromNumpySeq(iter([_stack(1, 1, 1, 2, 2)[0, 0, 0]]), "orphan").getId()
    conn.deleteObjects("Image", [orphan], wait=True)
    assert orphan in [i.id.val for i in server.objects("Image")] and server.counters["cmd.cancelled"] == 1
    handle = conn.deleteObjects("Image", [orphan])
    cb = conn.c.waitOnCmd(handle, loops=20, failontimeout=True, closehandle=True)
    assert isinstance(cb.getResponse(), omero.cmd.OK)
    cb.close(True)
    assert orphan not in [i.id.val for i in server.objects("Image")]
    with pytest.raises(omero.LockTimeout):
        conn.c.waitOnCmd(conn.deleteObjects("Well", [server.objects("Well")[0].id.val]), loops=3,
                         failontimeout=True, closehandle=True)


def test_deleting_an_original_file_deletes_the_file_annotations_holding_it(server, conn):
    # blitz-delete-rules.xml: A:FileAnnotation[E].file = [D] -> A:[D]/n, and the links go with it
    pid = server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    f = conn.createOriginalFileFromFileObj(io.BytesIO(b"a,b\n1,2\n"), "x/", "t.csv", 8, mimetype="text/csv")
    ann = omero.model.FileAnnotationI()
    ann.file = omero.model.OriginalFileI(f.getId(), False)
    link = omero.model.PlateAnnotationLinkI()
    link.parent, link.child = omero.model.PlateI(pid, False), ann
    conn.getUpdateService().saveAndReturnObject(link)
    assert len(server.objects("FileAnnotation")) == 1
    conn.deleteObjects("OriginalFile", [f.getId()], wait=True)
    assert server.objects("FileAnnotation") == [] and server.objects("PlateAnnotationLink") == []
    assert f.getId() not in [o.id.val for o in server.objects("OriginalFile")]
    assert [p.id.val for p in server.objects("Plate")] == [pid]


def test_database_unique_and_domain_constraints_are_validation_exceptions(server, conn):
    """psql-footer.vm well_col_row; SemanticTypeProcessor.java UNIQUE (parent, child, owner) on links and
    (coll, coll_index) on ordered collections; psql-header.vm positive_int/positive_float: ValidationException,
    nothing of the failed save stored."""
    pid = server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    upd = conn.getUpdateService()
    n_wells = len(server.objects("Well"))

    def well(row, col):
        w = omero.model.WellI()
        w.row, w.column, w.plate = rint(row), rint(col), omero.model.PlateI(pid, False)
        return w
    with pytest.raises(omero.ValidationException):
        upd.saveObject(well(0, 0))  # A01 exists
    with pytest.raises(omero.ValidationException):
        upd.saveArray([well(1, 1), well(1, 1)])  # two B02s in one save
    assert len(server.objects("Well")) == n_wells
    upd.saveObject(well(1, 1))
    # a sample saved on its own is appended to its well: a new index
    wid = server.objects("Well")[0].id.val
    n_samples = len(server.objects("WellSample"))
    img = conn.createImageFromNumpySeq(iter([_stack(1, 1, 1, 2, 2)[0, 0, 0]]), "x").getId()
    ws = omero.model.WellSampleI()
    ws.well, ws.image = omero.model.WellI(wid, False), omero.model.ImageI(img, False)
    upd.saveObject(ws)
    assert len(server.objects("WellSample")) == n_samples + 1
    # two links of one parent and child by the same owner
    tag = omero.model.TagAnnotationI()
    tag.textValue = rstring("t")
    tag = upd.saveAndReturnObject(tag)
    for attempt in range(2):
        link = omero.model.PlateAnnotationLinkI()
        link.parent, link.child = omero.model.PlateI(pid, False), omero.model.TagAnnotationI(tag.id.val, False)
        if attempt == 0:
            upd.saveObject(link)
        else:
            with pytest.raises(omero.ValidationException):
                upd.saveObject(link)
    assert len(server.objects("PlateAnnotationLink")) == 1
    # domains: sizes and physical sizes > 0
    pix_id = server.objects("Pixels")[0].id.val
    pix = conn.getQueryService().get("Pixels", pix_id)
    pix.setPhysicalSizeX(omero.model.LengthI(0.0, omero.model.enums.UnitsLength.MICROMETER))
    with pytest.raises(omero.ValidationException):
        upd.saveObject(pix)
    pix.setPhysicalSizeX(omero.model.LengthI(-1.0, omero.model.enums.UnitsLength.MICROMETER))
    with pytest.raises(omero.ValidationException):
        upd.saveObject(pix)
    assert server.objects("Pixels")[0].physicalSizeX is None
    pix.setPhysicalSizeX(omero.model.LengthI(0.5, omero.model.enums.UnitsLength.MICROMETER))
    upd.saveObject(pix)
    assert server.objects("Pixels")[0].physicalSizeX.getValue() == 0.5


def test_ordered_collection_index_is_unique(server, conn):
    """SemanticTypeProcessor.java: UNIQUE (well, well_index); two writers saving a Well they loaded
    with one sample, each adding a second one at index 1: the second save is refused."""
    server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    wid = server.objects("Well")[0].id.val
    a, b = (conn.getObjects("Well", ids=[wid], opts={"load_images": True}) for _ in range(2))
    wa, wb = next(iter(a))._obj, next(iter(b))._obj
    for w, name in ((wa, "first"), (wb, "second")):
        img = conn.createImageFromNumpySeq(iter([_stack(1, 1, 1, 2, 2)[0, 0, 0]]), name).getId()
        ws = omero.model.WellSampleI()
        ws.image = omero.model.ImageI(img, False)
        w.addWellSample(ws)
    conn.getUpdateService().saveObject(wa)
    with pytest.raises(omero.ValidationException):
        conn.getUpdateService().saveObject(wb)
    assert len(server.children("Well", "wellSamples", wid)) == 2


def _two_users(perms):
    srv = ServerDouble(users={"alice": "pw", "bob": "pw"}, groups={"lab": ["alice", "bob"]},
                       permissions={"lab": perms}).register(f"perm-{perms}.test", 4064)
    pid = srv.seed_plate("alice's", {("A01", 0): _stack(1, 1, 1, 2, 2)}, user="alice")
    bob = GatewayDouble("bob", "pw", host=f"perm-{perms}.test", port=4064)
    assert bob.connect()
    return srv, pid, bob


def _tag_link(conn, kind, oid):
    tag = omero.model.TagAnnotationI()
    tag.textValue = rstring("bob's")
    link = getattr(omero.model, f"{kind}AnnotationLinkI")()
    link.parent, link.child = getattr(omero.model, f"{kind}I")(oid, False), tag
    return conn.getUpdateService().saveAndReturnObject(link)


def _roi_on(conn, iid):
    roi = RoiI()
    roi.image = omero.model.ImageI(iid, False)
    pt = omero.model.PointI()
    pt.x, pt.y = rdouble(0), rdouble(0)
    roi.addShape(pt)
    return conn.getUpdateService().saveAndReturnObject(roi)


@pytest.mark.parametrize("perms", ["rw----", "rwr---", "rwra--", "rwrw--"])
def test_group_permissions_govern_reads_links_edits_and_deletes(perms):
    """Permissions.java parseString; OmeroInterceptor neededRight (WRITE, ANNOTATE for annotation links and
    Roi->Image) / throwIfNotGranted; BasicACLVoter allowLoad/allowUpdate/allowDelete; canAnnotate() etc."""
    srv, pid, bob = _two_users(perms)
    try:
        iid = srv.objects("Image")[0].id.val
        readable, annotate, write = perms[2] == "r", perms[3] in "aw", perms[3] == "w"
        seen = list(bob.getObjects("Plate", ids=[pid]))
        assert bool(seen) == readable
        if not readable:
            with pytest.raises((omero.ValidationException, omero.SecurityViolation)):  # not found or "Cannot read"
                bob.getQueryService().get("Image", iid)
            return
        img = bob.getObject("Image", iid)
        assert img.canAnnotate() == annotate and img.canEdit() == write and img.canDelete() == write
        if annotate:
            _tag_link(bob, "Image", iid)
            _roi_on(bob, iid)
        else:
            with pytest.raises(omero.SecurityViolation, match=f"Group is {perms}"):
                _tag_link(bob, "Image", iid)
            with pytest.raises(omero.SecurityViolation):
                _roi_on(bob, iid)
        ws = omero.model.WellSampleI()  # an ordinary link needs WRITE
        ws.well = omero.model.WellI(srv.objects("Well")[0].id.val, False)
        ws.image = omero.model.ImageI(iid, False)
        plate = bob.getQueryService().get("Plate", pid)  # an update of another's object needs WRITE
        plate.name = rstring("renamed by bob")
        for obj in (ws, plate):
            if write:
                bob.getUpdateService().saveObject(obj)
            else:
                with pytest.raises(omero.SecurityViolation):
                    bob.getUpdateService().saveObject(obj)
        assert (srv.objects("Plate")[0].name.val == "renamed by bob") == write
        if not write:
            with pytest.raises(omero.CmdError):
                bob.deleteObjects("Plate", [pid], wait=True)
            assert [p.id.val for p in srv.objects("Plate")] == [pid]
    finally:
        bob.close()
        srv.unregister()


def test_delete_keeps_annotations_still_linked_elsewhere_and_others_files():
    """blitz-delete-rules.xml: an annotation of a deleted object that remains linked to another object is kept;
    a file annotation of a deleted object is considered only when the object's owner owns it (X =/o A)."""
    srv, pid, bob = _two_users("rwra--")
    try:
        alice = GatewayDouble("alice", "pw", host="perm-rwra--.test", port=4064)
        assert alice.connect()
        a, b = (alice.createImageFromNumpySeq(iter([_stack(1, 1, 1, 2, 2)[0, 0, 0]]), n).getId() for n in "ab")
        shared = omero.model.MapAnnotationI()
        shared.setMapValue([omero.model.NamedValue("k", "v")])
        shared = alice.getUpdateService().saveAndReturnObject(shared)
        for iid in (a, b):
            link = omero.model.ImageAnnotationLinkI()
            link.parent, link.child = omero.model.ImageI(iid, False), omero.model.MapAnnotationI(shared.id.val, False)
            alice.getUpdateService().saveObject(link)
        f = bob.createOriginalFileFromFileObj(io.BytesIO(b"bob"), "x/", "bob.txt", 3, mimetype="text/plain")
        fa = omero.model.FileAnnotationI()
        fa.file = omero.model.OriginalFileI(f.getId(), False)
        link = omero.model.ImageAnnotationLinkI()
        link.parent, link.child = omero.model.ImageI(a, False), fa
        bob.getUpdateService().saveObject(link)  # rwra--: bob may annotate alice's image
        alice.deleteObjects("Image", [a], deleteAnns=True, wait=True)
        assert [m.id.val for m in srv.objects("MapAnnotation")] == [shared.id.val]  # still on b
        assert len(srv.objects("FileAnnotation")) == 1  # bob's, on alice's deleted image: kept
        assert [lk.parent.id.val for lk in srv.objects("ImageAnnotationLink")] == [b]
        alice.deleteObjects("Image", [b], deleteAnns=True, wait=True)
        assert srv.objects("MapAnnotation") == [] and srv.objects("ImageAnnotationLink") == []
        alice.close()
    finally:
        bob.close()
        srv.unregister()


def test_deleting_a_plate_without_its_children_keeps_the_images(server, conn):
    """omero-py deleteObjects('Plate', deleteChildren=False) excludes Image (with the annotation types, when
    more than one type is excluded): the wells and samples go, the images stay."""
    pid = server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    iid = server.objects("Image")[0].id.val
    conn.deleteObjects("Plate", [pid], wait=True)
    assert server.objects("Plate") == [] and server.objects("WellSample") == []
    assert [i.id.val for i in server.objects("Image")] == [iid]
    pid = server.seed_plate("q", {("A01", 0): _stack(1, 1, 1, 2, 2)})
    conn.deleteObjects("Plate", [pid], deleteChildren=True, wait=True)
    assert [i.id.val for i in server.objects("Image")] == [iid]


def test_tables_service_rules():
    # rule 6: SharedResourcesI.newTable saves the file, then raises without a tables service
    srv = ServerDouble(users={"a": "b"}, tables=False).register("notables.test", 4064)
    try:
        c = GatewayDouble("a", "b", host="notables.test", port=4064)
        assert c.connect()
        res = c.c.sf.sharedResources()
        assert res.areTablesEnabled() is False
        repo = res.repositories().descriptions[0].id.val
        with pytest.raises(omero.InternalException):
            res.newTable(repo, "fiji-bridge/results.h5")
        assert [f.name.val for f in srv.objects("OriginalFile") if f.mimetype.val == "OMERO.tables"] == \
            ["fiji-bridge/results.h5"]  # the file name is the full path, and it stays behind
        assert srv.waited >= 5.0  # omero.grid.registry_timeout
    finally:
        srv.unregister()
    srv = ServerDouble(users={"a": "b"}).register("tables.test", 4064)
    try:
        c = GatewayDouble("a", "b", host="tables.test", port=4064)
        assert c.connect()
        res = c.c.sf.sharedResources()
        repo = res.repositories().descriptions[0].id.val
        for cols, msg in ((["a", "a"], "Duplicate column name"), (["__a"], "Reserved column name")):
            t = res.newTable(repo, "t.h5")
            with pytest.raises(omero.ApiUsageException, match=msg):  # hdfstorageV2.py / columns.py
                t.initialize([omero.grid.LongColumn(n, "", []) for n in cols])
            t.close()
        t = res.newTable(repo, "ok.h5")
        t.initialize([omero.grid.LongColumn("n", "", [])])
        with pytest.raises(omero.ValidationException, match="Already initialized"):
            t.initialize([omero.grid.LongColumn("n", "", [])])
        t.close()
    finally:
        srv.unregister()


def test_string_and_array_column_sizes(server, conn):
    """omero-py columns.py: StringColumn size >= 1 at initialize (ApiUsageException); at addData a value longer
    in UTF-8 bytes than the table's size is a ValidationException; array columns likewise."""
    res = conn.c.sf.sharedResources()
    repo = res.repositories().descriptions[0].id.val
    for col in (omero.grid.StringColumn("s", "", 0, []), omero.grid.LongArrayColumn("a", "", 0, [])):
        t = res.newTable(repo, "t.h5")
        with pytest.raises(omero.ApiUsageException, match="must be > 0"):
            t.initialize([col])
        t.close()
    t = res.newTable(repo, "s.h5")
    t.initialize([omero.grid.StringColumn("s", "", 2, []), omero.grid.LongArrayColumn("a", "", 2, [])])
    with pytest.raises(omero.ValidationException, match="byte"):  # "µm" is 3 bytes
        t.addData([omero.grid.StringColumn("s", "", 3, ["\u00b5m"]), omero.grid.LongArrayColumn("a", "", 2, [[1, 2]])])
    with pytest.raises(omero.ValidationException, match="arrays of length 2"):
        t.addData([omero.grid.StringColumn("s", "", 2, ["um"]), omero.grid.LongArrayColumn("a", "", 2, [[1]])])
    assert t.getNumberOfRows() == 0
    t.addData([omero.grid.StringColumn("s", "", 2, ["um"]), omero.grid.LongArrayColumn("a", "", 2, [[1, 2]])])
    assert t.getNumberOfRows() == 1
    t.close()


def test_annotation_must_be_linked_in_the_objects_group(server, conn):
    pid = server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 2, 2)}, group="other")
    # the naive way: the file is saved in the session's group ("lab"), linked to a plate in "other"
    orig = conn.createOriginalFileFromFileObj(io.BytesIO(b"a,b\n"), "x/", "t.csv", 4, mimetype="text/csv")
    ann = FileAnnotationI()
    ann.file, ann.ns = OriginalFileI(orig.getId(), False), rstring("ns")
    link = PlateAnnotationLinkI()
    link.parent, link.child = PlateI(pid, False), ann
    with pytest.raises(omero.SecurityViolation, match="different groups"):
        conn.getUpdateService().saveObject(link, {"omero.group": str(server.group_id("other"))})
    with pytest.raises(omero.SecurityViolation, match="different groups"):  # -1: the plate's group, then the file's
        conn.getUpdateService().saveObject(link, {"omero.group": "-1"})
    with pytest.raises(omero.SecurityViolation, match="links no existing object"):
        conn.getUpdateService().saveObject(PlateI(), {"omero.group": "-1"})
    # the right way: the file saved in the plate's group too
    conn.SERVICE_OPTS.setOmeroGroup(server.group_id("other"))
    orig = conn.createOriginalFileFromFileObj(io.BytesIO(b"a,b\n"), "x/", "t.csv", 4, mimetype="text/csv")
    ann.file = OriginalFileI(orig.getId(), False)
    conn.getUpdateService().saveObject(link, {"omero.group": str(server.group_id("other"))})
    assert server.file_bytes(orig.getId()) == b"a,b\n"
    assert len(server.objects("PlateAnnotationLink")) == 1
    # under -1 a new object linked to the plate lands in the plate's group (OmeroInterceptor)
    link2 = PlateAnnotationLinkI()
    link2.parent, link2.child = PlateI(pid, False), FileAnnotationI()
    link2.child.file = OriginalFileI(orig.getId(), False)
    saved = conn.getUpdateService().saveAndReturnObject(link2, {"omero.group": "-1"})
    assert saved.details.group.id.val == server.group_id("other")


def test_rois_and_shapes_are_omero_py_model_objects(server, conn):
    pid = server.seed_plate("p", {("A01", 0): _stack(1, 1, 1, 8, 8)})
    assert pid
    iid = server.objects("Image")[0].id.val
    roi = RoiI()
    roi.name = rstring("cell")
    roi.setImage(omero.model.ImageI(iid, False))
    rect = RectangleI()
    rect.x, rect.y, rect.width, rect.height, rect.theZ = rdouble(1), rdouble(2), rdouble(3), rdouble(4), rint(0)
    ell = EllipseI()
    ell.x, ell.y, ell.radiusX, ell.radiusY = rdouble(4), rdouble(4), rdouble(2), rdouble(1)
    poly = PolygonI()
    poly.points = rstring("1,1 5,1 3,4")
    pt = PointI()
    pt.x, pt.y = rdouble(2.5), rdouble(3.5)
    for s in (rect, ell, poly, pt):
        roi.addShape(s)
    saved = conn.getUpdateService().saveAndReturnObject(roi, {"omero.group": str(server.group_id("lab"))})
    assert [type(s).__name__ for s in saved.copyShapes()] == ["RectangleI", "EllipseI", "PolygonI", "PointI"]
    got = conn.getQueryService().findAllByQuery(
        "select r from Roi r left outer join fetch r.shapes where r.image.id in (:ids)",
        omero.sys.ParametersI().addIds([iid]))
    assert len(got) == 4  # one row per shape, as Hibernate joins
    (r,) = {x.id.val: x for x in got}.values()
    shapes = r.copyShapes()
    assert shapes[2].points.val == "1,1 5,1 3,4" and shapes[0].theZ.val == 0 and shapes[1].theZ is None
    assert server.children("Image", "rois", iid) == [r.id.val]
