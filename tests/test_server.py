"""The bridge end to end: a real bridge process, real sockets, real ImageJ.

One bridge is shared by the tests of this module (a JVM takes seconds)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import bridge_process, shm_segments
from fiji_bridge.client import BridgeError, PlanesRejected
from fiji_bridge.engine.base import MacroError
from fiji_bridge.protocol import ErrorCode
from fiji_bridge.security import apply_client_secret, ensure_secret

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    with bridge_process(tmp_path_factory.mktemp("bridge"), "--no-display") as bp:
        yield bp


@pytest.fixture
def client(bridge):
    with bridge.client(timeout=30) as c:
        yield c


MEASURE_CHANNELS = textwrap.dedent(
    """
    getDimensions(w, h, nc, nz, nt);
    for (i = 1; i <= nc; i++) {
        Stack.setChannel(i);
        getStatistics(area, mean, min, max);
        setResult("Mean", i - 1, mean);
        setResult("Max", i - 1, max);
    }
    updateResults();
    print("dims " + w + " " + h + " " + nc + " " + nz + " " + nt);
    """
)


def test_hela_channels_stream_into_a_three_channel_stack(client, data_dir):
    import tifffile

    files = sorted((data_dir / "hela_D03").glob("*d[0-2].tif"))
    assert len(files) == 3
    planes = [np.asarray(tifffile.imread(f)) for f in files]
    names = ["DNA", "PH3", "Cell"]
    for c, (p, n) in enumerate(zip(planes, names)):
        assert client.send_plane(p, plate="hela", well="D03", site=0, channel=c, channel_name=n, pixel_size=0.65)
    client.flush()
    key = "hela/D03/s000"
    assert key in client.list_stacks()
    info = client.stack_info(key)
    assert info.shape == (1, 1, 3) + planes[0].shape and not info.missing
    assert info.channel_names == names
    np.testing.assert_array_equal(client.get_stack(key)[0, 0], np.stack(planes))
    # what ImageJ sees: per-channel statistics against numpy on the same pixels
    res = client.run_macro(MEASURE_CHANNELS, stack=key, timeout=60)
    np.testing.assert_allclose(res.results["Mean"], [p.mean() for p in planes], rtol=1e-6)
    np.testing.assert_array_equal(res.results["Max"], [p.max() for p in planes])
    assert f"dims {planes[0].shape[1]} {planes[0].shape[0]} 3 1 1" in res.log


def test_shuffled_czt_planes_assemble_exactly(client):
    rng = np.random.default_rng(42)
    truth = rng.integers(0, 65535, (4, 3, 2, 48, 64), dtype=np.uint16)
    order = [(t, z, c) for t in range(4) for z in range(3) for c in range(2)]
    rng.shuffle(order)
    for t, z, c in order:
        client.send_plane(truth[t, z, c], "shuffled", channel=c, z=z, t=t)
    client.flush()
    np.testing.assert_array_equal(client.get_stack("shuffled"), truth)
    # ImageJ agrees on dims and on a pixel addressed by (c, z, t)
    code = 'Stack.getDimensions(w, h, c, z, t); print("dims " + c + " " + z + " " + t); Stack.setPosition(2, 3, 4); print("px " + getPixel(5, 7));'
    res = client.run_macro(code, stack="shuffled")
    assert "dims 2 3 4" in res.log
    assert f"px {truth[3, 2, 1, 7, 5]}" in res.log


def test_missing_planes_are_listed(client):
    client.send_plane(np.ones((8, 8), np.uint8), "gappy", channel=1, z=0, t=2)
    client.flush()
    info = client.stack_info("gappy")
    assert info.shape[:3] == (3, 1, 2)
    assert (2, 0, 1) not in info.missing and (0, 0, 0) in info.missing and len(info.missing) == 5


def test_inline_transport_gives_the_same_stack(bridge):
    rng = np.random.default_rng(3)
    truth = rng.random((2, 1, 3, 20, 30)).astype(np.float32)
    with bridge.client(transport="inline") as c:
        c.send_stack(truth, "inline-stack", channel_names=["a", "b", "c"])
        assert c._planes.shm_ok is False
        np.testing.assert_array_equal(c.get_stack("inline-stack"), truth)


def test_macro_on_an_array_returns_images_and_tables(client):
    arr = np.zeros((40, 50), np.uint8)
    arr[10:20, 10:30] = 200
    res = client.run_macro('run("Invert"); run("Measure");', array=arr, dims="YX")
    (img,) = res.images.values()
    np.testing.assert_array_equal(img.reshape(40, 50), 255 - arr)
    assert res.results["Mean"][0] == pytest.approx(255 - arr.mean())


def test_rejected_plane_is_reported_and_the_stack_unharmed(client):
    truth = np.full((16, 16), 7, np.uint16)
    client.send_plane(truth, "strict")
    client.flush()
    client.send_plane(np.zeros((16, 16), np.uint8), "strict", channel=1)  # other dtype
    client.send_plane(np.zeros((8, 16), np.uint16), "strict", channel=1)  # other YX shape
    with pytest.raises(PlanesRejected) as ei:
        client.flush()
    assert len(ei.value.rejected) == 2 and {r["code"] for r in ei.value.rejected} == {ErrorCode.REJECTED}
    np.testing.assert_array_equal(client.get_stack("strict"), truth[None, None, None])


def test_two_producers_into_one_bridge(bridge, tmp_path):
    prog = textwrap.dedent(
        f"""
        import sys, numpy as np
        from fiji_bridge.client import BridgeClient
        ch = int(sys.argv[1])
        with BridgeClient.connect({bridge.port}) as c:
            for t in range(5):
                c.send_plane(np.full((32, 32), 100 * ch + t, np.uint16), "two-producers", channel=ch, t=t)
            c.flush()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", prog, str(ch)]) for ch in (0, 1)]
    assert [p.wait(60) for p in procs] == [0, 0]
    with bridge.client() as c:
        got = c.get_stack("two-producers")
    assert got.shape == (5, 1, 2, 32, 32)
    for ch in (0, 1):
        for t in range(5):
            assert (got[t, 0, ch] == 100 * ch + t).all()


def test_killed_producer_leaves_no_shared_memory(bridge):
    prog = textwrap.dedent(
        f"""
        import numpy as np, sys
        from fiji_bridge.client import BridgeClient
        c = BridgeClient.connect({bridge.port})
        i = 0
        while True:
            c.send_plane(np.full((512, 512), i % 60000, np.uint16), "killed", t=i % 50)
            i += 1
            if i == 20:
                print("streaming", flush=True)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"streaming"
        with bridge.client() as c:
            lent = c.status()["memory"]["ring_leases"]["leased"]
        # its slots are the bridge's lent segments (fiji_bridge.ring_leases) or its own
        assert lent or shm_segments(f"fjb_{p.pid}_"), "the producer should use shared memory"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 20
    while shm_segments(f"fjb_{p.pid}_") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shm_segments(f"fjb_{p.pid}_") == []
    with bridge.client() as c:
        assert c.ping()["server"] == "fiji-bridge"
        assert c.stack_info("killed").planes >= 1
        while c.status()["memory"]["ring_leases"]["leased"] and time.monotonic() < deadline:
            time.sleep(0.2)  # the bridge takes a dead producer's lease back in its housekeeping
        assert c.status()["memory"]["ring_leases"]["leased"] == 0


def test_live_stream_drops_instead_of_blocking(bridge):
    big = np.zeros((2048, 2048), np.uint16)
    with bridge.client(transport="inline", credits=1) as c:
        sent = sum(c.send_plane(big, "live", t=i % 4, live=True) for i in range(60))
        dropped = c.dropped
        # 60 planes of 8 MB with one credit: the bridge cannot keep up, so some are dropped
        assert sent + dropped == 60 and dropped > 0
        time.sleep(0.5)
        assert c.send_plane(big, "live", t=0, live=True)  # credit is back: carries the drop count
        c.flush()
        st = c.status()
    stream = next(v for k, v in st["streams"].items() if k.endswith("-live"))
    assert stream["dropped"] == dropped
    assert stream["planes"] == sent + 1


def _ctrl(port):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 5000
    apply_client_secret(s, ensure_secret())  # a raw peer of this user
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _ask(sock, *frames):
    sock.send_multipart([b"", *frames])
    reply = sock.recv_multipart()
    return json.loads(reply[-1] if len(reply) == 2 else reply[1])


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"\x00\x9f\x92\x96 garbage"], ErrorCode.BAD_JSON),
        ([b'{"type": "ping"'], ErrorCode.BAD_JSON),
        ([b'{"type": "format_disk", "id": 1}'], ErrorCode.UNKNOWN_TYPE),
        ([b'{"type": "stack_info", "id": 2}'], ErrorCode.MISSING_FIELD),
        ([b'{"type": "stack_info", "id": 3, "key": ["x"]}'], ErrorCode.BAD_FIELD),
        ([b'{"type": "get_stack", "id": 4, "key": "no-such-stack"}'], ErrorCode.NOT_FOUND),
        ([b'{"type": "run_macro", "id": 5, "code": "x=1;", "image": {"shape": [4, 4], "dtype": "uint8", "frame": 0}, "dims": "YX"}', b"\0" * 3], ErrorCode.SHAPE_MISMATCH),
    ],
)
def test_bad_control_messages_get_error_replies(bridge, frames, code):
    s = _ctrl(bridge.port)
    try:
        r = _ask(s, *frames)
        assert r["ok"] is False and r["error"]["code"] == code, r
        assert _ask(s, b'{"type": "ping", "id": 9}')["ok"] is True
    finally:
        s.close()


def _plane_msg(stream="raw", seq=0, **over):
    h = {"type": "plane", "stream": stream, "seq": seq, "shape": [16, 16], "dtype": "uint16", "transport": "inline", "key": "intact", "components": {"channel": 0}}
    h.update(over)
    return json.dumps(h).encode()


@pytest.mark.parametrize(
    "header, payload, code",
    [
        (b"\xde\xad\xbe\xef", b"", ErrorCode.BAD_JSON),
        (_plane_msg(stream=5), b"\0" * 512, ErrorCode.BAD_FIELD),
        (_plane_msg(seq=None), b"\0" * 512, ErrorCode.MISSING_FIELD),
        (_plane_msg(transport="shm"), b"fjb_999999_nosuchsegment_0_0", ErrorCode.BAD_SHM),
        (_plane_msg(), b"\0" * 511, ErrorCode.SHAPE_MISMATCH),
        (_plane_msg(components={"channel": -1}), b"\0" * 512, ErrorCode.BAD_INDEX),
        (_plane_msg(components={"t": 10**12}), b"\0" * 512, ErrorCode.BAD_INDEX),
        (_plane_msg(dtype="uint8", shape=[16, 32]), b"\0" * 512, ErrorCode.REJECTED),
        (_plane_msg(shape=[8, 16]), b"\0" * 256, ErrorCode.REJECTED),
    ],
)
def test_bad_data_messages_get_error_acks_and_stacks_survive(bridge, header, payload, code):
    truth = np.arange(256, dtype=np.uint16).reshape(16, 16)
    with bridge.client() as c:
        c.send_plane(truth, "intact")
        c.flush()
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 5000
    apply_client_secret(s, ensure_secret())
    s.connect(f"tcp://127.0.0.1:{bridge.port + 1000}")
    try:
        s.send_multipart([b"", header, payload])
        ack = json.loads(s.recv_multipart()[-1])
        assert ack["ok"] is False and ack["error"]["code"] == code, ack
        s.send_multipart([b"", b"only-one-frame"])
        assert json.loads(s.recv_multipart()[-1])["error"]["code"] == ErrorCode.BAD_FRAME
    finally:
        s.close()
    with bridge.client() as c:
        np.testing.assert_array_equal(c.get_stack("intact"), truth[None, None, None])


def test_status_answers_while_a_long_macro_runs(bridge):
    done = {}

    def long_macro():
        with bridge.client() as c:
            done["result"] = c.run_macro("wait(3000); print('slept');", timeout=30)

    th = threading.Thread(target=long_macro)
    th.start()
    try:
        with bridge.client() as c:
            deadline = time.monotonic() + 10
            st = c.status()
            while st["engine"]["running"] != "run_macro" and time.monotonic() < deadline:
                time.sleep(0.05)
                st = c.status()
            assert st["engine"]["running"] == "run_macro"
            assert c.ping(timeout=1.0)["ok"]  # at once, not after the macro
            assert th.is_alive()
    finally:
        th.join(30)
    assert "slept" in done["result"].log


def test_macro_errors_come_back_as_macro_error(client):
    with pytest.raises(MacroError) as ei:
        client.run_macro("x = ;\n", timeout=30)
    assert ei.value.kind in ("syntax", "exception", "command")
    assert client.ping()["ok"]


def test_subscribe_takes_planes_from_a_pub_socket(bridge, free_port):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{free_port}")
    plane = np.arange(24 * 24, dtype=np.uint16).reshape(24, 24)
    try:
        with bridge.client() as c:
            c.subscribe(f"tcp://127.0.0.1:{free_port}")
            deadline = time.monotonic() + 15
            while "published" not in c.list_stacks() and time.monotonic() < deadline:
                hdr = {"type": "plane", "stream": "pub", "seq": 0, "shape": [24, 24], "dtype": "uint16", "transport": "inline", "key": "published", "components": {"channel": 1}}
                pub.send_multipart([json.dumps(hdr).encode(), plane.tobytes()])
                time.sleep(0.1)
            got = c.get_stack("published")
            c.unsubscribe(f"tcp://127.0.0.1:{free_port}")
        np.testing.assert_array_equal(got[0, 0, 1], plane)
    finally:
        pub.close()


def test_close_stack_and_clear_state(client):
    client.send_plane(np.ones((4, 4), np.uint8), "to-close")
    client.flush()
    client.close_stack("to-close")
    assert "to-close" not in client.list_stacks()
    with pytest.raises(BridgeError) as ei:
        client.stack_info("to-close")
    assert ei.value.code == ErrorCode.NOT_FOUND


def test_library_macros_run_by_name_with_checked_arguments(client):
    """A library name works in the Python API as in the CLI; its #@ arguments
    are checked before anything reaches the bridge."""
    from fiji_bridge.macros import MacroArgumentError, MacroNotFound

    rng = np.random.default_rng(3)
    stack = rng.integers(0, 4000, size=(1, 4, 2, 32, 40), dtype=np.uint16)  # T Z C Y X
    r = client.run_macro("z_projection", array=stack, args={"method": "max"}, timeout=60)
    (proj,) = [a for t, a in r.images.items() if a.shape[1] == 1]
    np.testing.assert_array_equal(proj[0, 0], stack[0].max(axis=0))  # oracle: numpy's max over Z
    with pytest.raises(MacroArgumentError):
        client.run_macro("z_projection", array=stack, args={"methd": "max"})
    with pytest.raises(MacroArgumentError):
        client.run_macro("nuclei_count", array=stack, args={"channel": "two"})
    with pytest.raises(MacroNotFound):
        client.run_macro("no_such_macro", array=stack)
    assert client.ping()["ok"]
