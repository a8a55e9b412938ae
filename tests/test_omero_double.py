"""The OMERO test double is faithful to omero-py where the backend relies on
it. Oracles: omero-py's own client code run against the double (its
createImageFromNumpySeq, getObjects, createOriginalFileFromFileObj), numpy,
and the documented semantics of the server."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")

import Ice  # noqa: E402
import omero  # noqa: E402
from omero.model import FileAnnotationI, OriginalFileI, PlateAnnotationLinkI, PlateI  # noqa: E402
from omero.rtypes import rstring  # noqa: E402

from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble  # noqa: E402


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


def test_raw_planes_are_big_endian_and_limited(server, conn):
    truth = _stack(1, 1, 1, 4, 5) + 1000
    img = conn.createImageFromNumpySeq(iter([truth[0, 0, 0]]), "be")
    rps = conn.c.sf.createRawPixelsStore()
    rps.setPixelsId(img.getPrimaryPixels().getId(), True)
    raw = rps.getPlane(0, 0, 0)
    assert raw == truth[0, 0, 0].astype(">u2").tobytes()
    with pytest.raises(omero.ApiUsageException):
        rps.getPlane(1, 0, 0)
    small = ServerDouble(users={"a": "b"}, max_plane_size=3).register("small.test", 4064)
    try:
        c2 = GatewayDouble("a", "b", host="small.test", port=4064)
        assert c2.connect()
        with pytest.raises(omero.ApiUsageException, match="max_plane"):
            c2.createImageFromNumpySeq(iter([truth[0, 0, 0]]), "big")
    finally:
        small.unregister()


def test_sessions_logins_and_a_dead_server(server):
    assert GatewayDouble("alice", "wrong", host="double.test", port=4064).connect() is False
    assert GatewayDouble("nobody", "pw", host="double.test", port=4064).connect() is False
    c = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert c.connect()
    key = c.getSessionId()
    other = GatewayDouble(host="double.test", port=4064)
    assert other.connect(sUuid=key) and other.getEventContext().userName == "alice"
    assert GatewayDouble(host="double.test", port=4064).connect(sUuid="not-a-session") is False
    server.stop()
    with pytest.raises(Ice.ConnectionLostException):
        c.getObject("Plate", 1)
    with pytest.raises(Ice.ConnectionRefusedException):
        GatewayDouble("alice", "pw", host="double.test", port=4064).connect()
    server.start()
    with pytest.raises(Ice.ConnectionRefusedException):
        GatewayDouble("alice", "pw", host="nowhere.test", port=4064).connect()


def test_wells_rows_columns_are_zero_based_and_fetch_decides_loading(server, conn):
    pid = server.seed_plate("p", {("B03", 0): _stack(1, 1, 1, 2, 2)})
    (w,) = list(conn.getObjects("Well", opts={"plate": pid}))
    assert (w.row, w.column) == (1, 2)
    assert not w._obj.isWellSamplesLoaded()  # not fetched -> unloaded, as from a real server
    (w2,) = list(conn.getObjects("Well", opts={"plate": pid, "load_pixels": True}))
    img = w2._obj.copyWellSamples()[0].getImage()
    assert img.getPrimaryPixels().getSizeX().val == 2
    assert not img.getPrimaryPixels().isChannelsLoaded()
    with pytest.raises(NotImplementedError, match="cannot"):
        conn.getQueryService().findAllByQuery("select count(w) from Well w group by w.row", None)


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
    with pytest.raises(omero.SecurityViolation):
        conn.getUpdateService().saveObject(link, {"omero.group": "-1"})
    # the right way: the file saved in the plate's group too
    conn.SERVICE_OPTS.setOmeroGroup(server.group_id("other"))
    orig = conn.createOriginalFileFromFileObj(io.BytesIO(b"a,b\n"), "x/", "t.csv", 4, mimetype="text/csv")
    ann.file = OriginalFileI(orig.getId(), False)
    conn.getUpdateService().saveObject(link, {"omero.group": str(server.group_id("other"))})
    assert server.file_bytes(orig.getId()) == b"a,b\n"
    assert len(server.objects("PlateAnnotationLink")) == 1


def test_session_times_out_without_keepalive(server):
    server.session_timeout = 0.2
    c = GatewayDouble("alice", "pw", host="double.test", port=4064)
    assert c.connect()
    import time

    time.sleep(0.1)
    assert c.keepAlive()
    time.sleep(0.1)
    assert c.keepAlive()
    time.sleep(0.3)
    with pytest.raises(Ice.ObjectNotExistException):
        c.keepAlive()
