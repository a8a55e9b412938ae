"""fiji-bridge standing in for OpenHCS's Fiji viewer.

The sender is the real one: PolyStore's ``FijiStreamingBackend`` (0.6.x from
the test extra; 0.2.x -- what OpenHCS 0.8.6 pins -- when a copy is found,
see ``_polystore02``), run in a subprocess. The oracle for pixels is the
numpy arrays the sender built from fixed seeds, regenerated here; the oracle
for acks and pongs is zmqruntime's own decoding (``ImageAck``,
``PongResponse``), which is strict about fields.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import pytest
import zmq

from fiji_bridge.openhcs import OpenHCSReceiver, RefusedPickle, loads_plain
from fiji_bridge.openhcs.placement import Layout
from fiji_bridge.openhcs.shm import copy_block

ROOT = Path(__file__).resolve().parents[1]

#: the real sender side (test extra: polystore==0.6.3, zmqruntime==0.6.5)
real_sender = pytest.mark.skipif(
    importlib.util.find_spec("polystore") is None or importlib.util.find_spec("zmqruntime") is None,
    reason="needs polystore 0.6.x and zmqruntime 0.6.x (pip install 'fiji-bridge[test]')",
)

# --------------------------------------------------------------------------- helpers

SENDER = r'''
import json, logging, os, sys, threading, time
import numpy as np
from zmqruntime.config import ZMQConfig, TransportMode
from zmqruntime.transport import TransportEndpoint
from zmqruntime.ack_listener import GlobalAckListener
from polystore.fiji_stream import FijiStreamingBackend
from polystore.streaming.viewer_transport import (
    ViewerDisplayConfigABC, ViewerMicroscopeHandlerABC, ViewerMetadataHandlerABC,
    ViewerStreamSource, ViewerStreamSourceIdentity, IndexedViewerStreamSourceMetadata,
    ViewerStreamProducer, ViewerStreamRequest, ExplicitViewerTransportConfig)
from polystore.streaming.identity import StreamProducerIdentity

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
spec = json.loads(sys.stdin.read())

class Display(ViewerDisplayConfigABC):
    COMPONENT_ORDER = tuple(spec["modes"])
    def component_modes(self):
        return spec["modes"]
    def display_payload_extra(self):
        return {"lut": "Grays", "auto_contrast": True}

class Names(ViewerMetadataHandlerABC):
    def get_component_values(self, plate_path, component_name):
        return spec["names"].get(component_name)

class Handler(ViewerMicroscopeHandlerABC):
    parser = None
    metadata_handler = Names()

created = []
def recording(create):
    def create_and_note(data, file_path):
        payload = create(data, file_path)
        created.append(payload["shm_name"])
        return payload
    return create_and_note

acks, lock = [], threading.Lock()
def on_ack(ack):
    with lock:
        acks.append({"image_id": ack.image_id, "status": ack.status, "error": ack.error,
                     "viewer_type": ack.viewer_type, "viewer_port": ack.viewer_port})
GlobalAckListener().register_callback(on_ack)

cfg = ZMQConfig(ipc_socket_dir=spec["ipc_dir"], ipc_socket_prefix="openhcs-zmq", app_name="openhcs",
                shared_ack_port=spec["ack_port"])
mode = TransportMode(spec["transport"])
producer = StreamProducerIdentity.pipeline_output(
    output_kind="main", output_key="main", projection_key="main",
    step_name=spec["step"], pipeline_position=0)
backend = FijiStreamingBackend(cfg)
backend.create_shared_memory_payload = recording(backend.create_shared_memory_payload)
errors, sent = [], 0
for batch in spec["batches"]:
    data = [np.random.default_rng(i["seed"]).integers(0, 50000, i["shape"]).astype(i["dtype"]) for i in batch]
    request = ViewerStreamRequest(
        viewer_transport=TransportEndpoint("localhost", spec["port"], mode),
        display_config=Display(),
        source=ViewerStreamSource(
            identity=ViewerStreamSourceIdentity(Handler(), plate_path="/plate"),
            metadata=IndexedViewerStreamSourceMetadata([i["metadata"] for i in batch])),
        producer=ViewerStreamProducer.from_identity(producer),
        transport_config=ExplicitViewerTransportConfig(cfg),
        images_dir="/plate/images",
    )
    try:
        backend.save_batch(data, [i["path"] for i in batch], stream_request=request)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    sent += len(batch)
deadline = time.time() + 10
while time.time() < deadline and len(acks) < sent:
    time.sleep(0.02)
left = [n for n in created if os.path.exists("/dev/shm/" + n)]
backend.cleanup()
from importlib.metadata import version
import polystore
print(json.dumps({"acks": acks, "errors": errors, "created": created, "left": left,
                  "polystore": getattr(polystore, "__version__", None) or version("polystore")}))
'''


def _polystore02() -> str | None:
    """A directory holding polystore 0.2.x + zmqruntime 0.2.x (OpenHCS 0.8.6's pins),
    put there by ``pip install --target DIR --no-deps polystore==0.2.19
    zmqruntime==0.2.24 arraybridge==0.3.8`` (their other dependencies come
    from the test venv)."""
    for d in (os.environ.get("FIJI_BRIDGE_POLYSTORE02"), Path.home() / ".cache/fiji-bridge/polystore-0.2"):
        if d and (Path(d) / "polystore").is_dir():
            return str(d)
    return None


def run_sender(spec: dict, *, pythonpath: str | None = None, timeout: float = 60) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SENDER], input=json.dumps(spec), capture_output=True, text=True,
        timeout=timeout, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def pixels(item: dict) -> np.ndarray:
    """The oracle: the very array the sender built for ``item``."""
    return np.random.default_rng(item["seed"]).integers(0, 50000, item["shape"]).astype(item["dtype"])


OPENHCS_MODES = {"site": "frame", "channel": "channel", "z_index": "slice", "timepoint": "frame", "well": "frame"}


class DictSink:
    def __init__(self) -> None:
        self.planes: dict[tuple, np.ndarray] = {}
        self.meta: dict[tuple, dict] = {}
        self.rois: list = []

    def __call__(self, key, t, z, c, plane, meta) -> None:
        assert plane.ndim == 2
        self.planes[(key, t, z, c)] = plane.copy()
        self.meta[(key, t, z, c)] = meta

    def take_rois(self, key, rois, meta) -> None:
        self.rois.append((key, rois, meta))


@pytest.fixture
def sink() -> DictSink:
    return DictSink()


@pytest.fixture
def receiver(free_port, sink):
    r = OpenHCSReceiver(free_port, sink, rois_sink=sink.take_rois, legacy_ack_port=None)
    r.start()
    yield r
    r.stop()


def req(url: str, ctx: zmq.Context | None = None) -> zmq.Socket:
    s = (ctx or zmq.Context.instance()).socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.setsockopt(zmq.SNDTIMEO, 10_000)
    s.connect(url)
    return s


def control(r: OpenHCSReceiver, payload: bytes) -> dict:
    s = req(r.control_url)
    try:
        s.send(payload)
        return pickle.loads(s.recv())
    finally:
        s.close()


def send_batch(r: OpenHCSReceiver, msg) -> dict:
    s = req(r.data_url)
    try:
        if isinstance(msg, list) and msg and isinstance(msg[0], bytes):
            s.send_multipart(msg)
        else:
            s.send(msg if isinstance(msg, bytes) else json.dumps(msg).encode())
        return json.loads(s.recv())
    finally:
        s.close()


def new_block(size: int) -> shared_memory.SharedMemory:
    """A block this test owns but does not leave on its resource tracker: the
    receiver under test runs in this same process and untracks what it reads,
    which would otherwise unbalance the tracker (a real sender is another process)."""
    shm = shared_memory.SharedMemory(create=True, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def drop_block(name: str) -> None:
    try:
        shm = shared_memory.SharedMemory(name=name)  # tracked again, untracked by unlink()
    except FileNotFoundError:
        return
    shm.close()
    shm.unlink()


class Blocks:
    """Shared-memory blocks a hand-written sender owns (unlinked at the end)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def put(self, array: np.ndarray, size: int | None = None) -> str:
        shm = new_block(size or array.nbytes)
        if size is None:
            np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
        shm.close()
        self.names.append(shm.name)
        return shm.name

    def close(self) -> None:
        for name in self.names:
            drop_block(name)


@pytest.fixture
def blocks():
    b = Blocks()
    yield b
    b.close()


def item(name: str, array: np.ndarray, **metadata) -> dict:
    return {
        "path": f"{name}.tif",
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "shm_name": name,
        "data_type": "image",
        "metadata": metadata,
    }


def batch(*items, modes=None, names=None) -> dict:
    return {
        "type": "batch",
        "images": list(items),
        "display_config": {"component_modes": modes or OPENHCS_MODES, "component_order": list(modes or OPENHCS_MODES), "lut": "Grays"},
        "timestamp": time.time(),
        "component_names_metadata": names or {},
        "component_value_domain": {},
        "images_dir": None,
    }


# --------------------------------------------------------------------------- real senders


def _plate_items(timepoint: int, seed0: int) -> list[dict]:
    items = []
    for site in (1, 2):
        for z in (1, 2, 3):
            for ch in (1, 2):
                seed = seed0 + site * 100 + z * 10 + ch
                items.append({
                    "path": f"A01_s{site}_w{ch}_z{z:03d}_t{timepoint}.tif",
                    "seed": seed, "shape": [24, 32], "dtype": "uint16",
                    "metadata": {"well": "A01", "site": site, "channel": ch, "z_index": z, "timepoint": timepoint},
                })
    rng = np.random.default_rng(seed0)
    return [items[i] for i in rng.permutation(len(items))]  # any order


def _check_plate(sink: DictSink, batches: list[list[dict]], key: str) -> None:
    everything = [i for b in batches for i in b]
    # T numbers (well, site, timepoint) by first appearance, batch by batch,
    # the new ones of a batch in sorted order; Z and C are single components
    frames: list[tuple] = []
    for b in batches:
        new = {(i["metadata"]["well"], i["metadata"]["site"], i["metadata"]["timepoint"]) for i in b}
        frames += sorted(new - set(frames))
    zs = sorted({i["metadata"]["z_index"] for i in everything})
    cs = sorted({i["metadata"]["channel"] for i in everything})
    assert len(sink.planes) == len(everything)
    for i in everything:
        md = i["metadata"]
        where = (key, frames.index((md["well"], md["site"], md["timepoint"])), zs.index(md["z_index"]), cs.index(md["channel"]))
        assert where in sink.planes, f"{i['path']} not at {where}"
        assert np.array_equal(sink.planes[where], pixels(i)), i["path"]
        assert sink.planes[where].dtype == np.uint16
        assert sink.meta[where]["channel_name"] == {1: "DAPI", 2: "GFP"}[md["channel"]]
        assert sink.meta[where]["components"] == md


@real_sender
@pytest.mark.timeout(90)
def test_real_polystore_sender_places_planes_exactly(receiver, sink, tmp_path):
    """polystore 0.6 -> two batches (t1 then t2), shuffled: 2C x 3Z x (2 sites x 2 t) T."""
    batches = [_plate_items(1, 1000), _plate_items(2, 2000)]
    out = run_sender({
        "port": receiver.port, "transport": "tcp", "ipc_dir": str(tmp_path), "ack_port": 0,
        "modes": OPENHCS_MODES, "names": {"channel": {"1": "DAPI", "2": "GFP"}},
        "step": "Normalize", "batches": batches,
    })
    assert out["polystore"].startswith("0.6") and out["errors"] == []
    _check_plate(sink, batches, "openhcs/step1-Normalize")
    # acks: one per image, decoded by zmqruntime's strict ImageAck, routed to this producer
    sent_ids = {a["image_id"] for a in out["acks"]}
    assert len(out["acks"]) == 24 and len(sent_ids) == 24
    assert {a["status"] for a in out["acks"]} == {"success"}
    assert {(a["viewer_type"], a["viewer_port"]) for a in out["acks"]} == {("fiji", receiver.port)}
    # shared memory: the sender unlinked every block itself (we neither unlinked early
    # nor left one on a resource tracker), and none is left
    assert len(out["created"]) == 24 and out["left"] == []
    assert "Failed to cleanup shared memory" not in out["stderr"]
    assert "leaked shared_memory" not in out["stderr"]
    assert not [n for n in out["created"] if os.path.exists("/dev/shm/" + n)]
    assert receiver.stats()["errors"] == 0


@pytest.fixture
def short_dir():
    """A short directory: ipc socket paths must fit in ~107 bytes (the sender's
    ack socket name carries a UUID)."""
    d = tempfile.mkdtemp(prefix="oh", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@real_sender
@pytest.mark.timeout(90)
def test_real_sender_over_ipc_with_window_mode(free_port, sink, short_dir):
    """OpenHCS's default transport on Unix (ipc); wells in 'window' mode -> one stack per well."""
    ipc = short_dir
    modes = dict(OPENHCS_MODES, well="window")
    items = []
    for well in ("B02", "A01"):
        for ch in (1, 2, 3):
            items.append({"path": f"{well}_w{ch}.tif", "seed": hash((well, ch)) % 10_000, "shape": [16, 20],
                          "dtype": "float32", "metadata": {"well": well, "site": 1, "channel": ch, "z_index": 1, "timepoint": 1}})
    with OpenHCSReceiver(free_port, sink, transport="ipc", ipc_dir=ipc, legacy_ack_port=None) as r:
        assert (ipc / f"openhcs-zmq-{free_port}.sock").exists()
        assert (ipc / f"openhcs-zmq-{free_port + 1000}.sock").exists()
        out = run_sender({"port": free_port, "transport": "ipc", "ipc_dir": str(ipc), "ack_port": 0,
                          "modes": modes, "names": {}, "step": "Segment", "batches": [items]})
    assert out["errors"] == [] and len(out["acks"]) == 6
    assert {k[0] for k in sink.planes} == {"openhcs/step1-Segment/well_A01", "openhcs/step1-Segment/well_B02"}
    for i in items:
        key = f"openhcs/step1-Segment/well_{i['metadata']['well']}"
        got = sink.planes[(key, 0, 0, i["metadata"]["channel"] - 1)]
        assert got.dtype == np.float32 and np.array_equal(got, pixels(i))
        assert sink.meta[(key, 0, 0, i["metadata"]["channel"] - 1)]["channel_name"] is None
    assert out["left"] == []
    # the socket files go with the receiver
    assert not (ipc / f"openhcs-zmq-{free_port}.sock").exists()
    assert not (ipc / f"openhcs-zmq-{free_port + 1000}.sock").exists()


@real_sender
@pytest.mark.timeout(90)
def test_real_polystore_02_sender(free_port, sink, tmp_path):
    """polystore 0.2.x (OpenHCS 0.8.6): no return route; acks go to the shared ack port."""
    path = _polystore02()
    if path is None:
        pytest.skip("polystore 0.2.x not found: pip install --target ~/.cache/fiji-bridge/polystore-0.2 "
                    "--no-deps polystore==0.2.19 zmqruntime==0.2.24 arraybridge==0.3.8")
    with socket.socket() as probe:  # a free port for the 0.2.x shared ack listener
        probe.bind(("127.0.0.1", 0))
        ack_port = probe.getsockname()[1]
    batches = [_plate_items(1, 3000)]
    with OpenHCSReceiver(free_port, sink, legacy_ack_port=ack_port):
        out = run_sender({"port": free_port, "transport": "tcp", "ipc_dir": str(tmp_path), "ack_port": ack_port,
                          "modes": OPENHCS_MODES, "names": {"channel": {"1": "DAPI", "2": "GFP"}},
                          "step": "Normalize", "batches": batches}, pythonpath=path)
    assert out["polystore"].startswith("0.2") and out["errors"] == []
    _check_plate(sink, batches, "openhcs/step1-Normalize")
    assert len(out["acks"]) == 12 and {a["status"] for a in out["acks"]} == {"success"}
    assert out["left"] == [] and "Failed to cleanup shared memory" not in out["stderr"]


@real_sender
@pytest.mark.timeout(60)
def test_real_sender_gets_error_when_the_store_refuses(free_port, tmp_path):
    """A plane the stack store refuses (other YX shape) -> the sender raises, the
    image gets an error ack, the rest of the batch and the stack are intact."""
    from fiji_bridge.hyperstack import StackStore

    store = StackStore()

    def into_store(key, t, z, c, plane, meta):
        store.add_at(key, t, z, c, plane, channel_name=meta["channel_name"])

    md = {"well": "A01", "site": 1, "z_index": 1, "timepoint": 1}
    good = {"path": "ok.tif", "seed": 1, "shape": [10, 12], "dtype": "uint16", "metadata": dict(md, channel=1)}
    bad = {"path": "bad.tif", "seed": 2, "shape": [11, 12], "dtype": "uint16", "metadata": dict(md, channel=2)}
    with OpenHCSReceiver(free_port, into_store, legacy_ack_port=None) as r:
        out = run_sender({"port": free_port, "transport": "tcp", "ipc_dir": str(tmp_path), "ack_port": 0,
                          "modes": OPENHCS_MODES, "names": {}, "step": "S", "batches": [[good, bad]]})
        assert r.running
    assert len(out["errors"]) == 1 and "bad.tif" in out["errors"][0] and "rejected" in out["errors"][0]
    status = {a["status"] for a in out["acks"]}
    assert status == {"success", "error"} and len(out["acks"]) == 2
    assert [a["error"] for a in out["acks"] if a["status"] == "error"][0]
    arr, info = store.snapshot("openhcs/step1-S")
    assert np.array_equal(arr[0, 0, 0], pixels(good))
    assert out["left"] == []


# --------------------------------------------------------------------------- control channel


@real_sender
@pytest.mark.timeout(30)
def test_pong_reads_as_zmqruntime_viewer(receiver):
    from zmqruntime.config import TransportMode, ZMQConfig
    from zmqruntime.messages import ServerRole
    from zmqruntime.transport import request_control_ping

    pong = request_control_ping(receiver.port, TransportMode.TCP, host="127.0.0.1", config=ZMQConfig(), timeout_ms=5000)
    assert pong is not None, "zmqruntime could not read the pong"
    assert pong.server_role is ServerRole.VIEWER and pong.ready
    assert (pong.port, pong.control_port) == (receiver.port, receiver.port + 1000)
    assert pong.server == "fiji-bridge" and pong.server_type == "fiji"
    assert pong.process_identity is not None and pong.process_identity.pid == os.getpid()
    raw = control(receiver, pickle.dumps({"type": "ping"}))
    assert {"type", "port", "control_port", "ready", "server", "server_role"} <= set(raw)
    assert raw["type"] == "pong" and raw["server_role"] == "viewer"


@real_sender
@pytest.mark.timeout(30)
def test_both_transports_serve_one_receiver(free_port, sink, short_dir, blocks):
    """transport='both': OpenHCS reaches the viewer over ipc or tcp, whichever it uses."""
    from zmqruntime.config import TransportMode, ZMQConfig
    from zmqruntime.transport import request_control_ping

    cfg = ZMQConfig(ipc_socket_dir=str(short_dir), ipc_socket_prefix="openhcs-zmq", app_name="openhcs")
    with OpenHCSReceiver(free_port, sink, transport="both", ipc_dir=short_dir, legacy_ack_port=None) as r:
        for mode in (TransportMode.IPC, TransportMode.TCP):
            pong = request_control_ping(free_port, mode, host="127.0.0.1", config=cfg, timeout_ms=5000)
            assert pong is not None and pong.port == free_port, mode
        plane = np.eye(4, dtype=np.uint8)
        ipc_url = [u for u in r.urls(free_port) if u.startswith("ipc://")][0]
        s = req(ipc_url)
        try:
            s.send(json.dumps(batch(item(blocks.put(plane), plane, channel=1))).encode())
            assert json.loads(s.recv()) == {"status": "success"}
        finally:
            s.close()
    assert np.array_equal(sink.planes[("openhcs", 0, 0, 0)], plane)
    assert not list(short_dir.glob("*.sock"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(30)
def test_malicious_pickle_is_refused_and_nothing_runs(receiver, tmp_path):
    marker = tmp_path / "pwned"
    for payload in (
        pickle.dumps({"type": "ping", "x": _Evil(marker)}),
        pickle.dumps(_Evil(marker)),
        pickle.dumps({"type": "ping", "x": _Evil(marker)}, protocol=0),
    ):
        reply = control(receiver, payload)
        assert reply["type"] == "error" and reply["status"] == "error"
        assert "posix.system" in reply["message"] or "os.system" in reply["message"]
    for payload, words in (
        (b"\x00garbage", "cannot decode"),
        (pickle.dumps(["ping"]), "must be a dict"),
        (pickle.dumps({"type": "ping", "s": {1, 2}}), "set"),
        (pickle.dumps({"type": "reboot"}), "unsupported control message type"),
    ):
        reply = control(receiver, payload)
        assert reply["status"] == "error" and words in reply["message"], reply
    time.sleep(0.2)
    assert not marker.exists()
    assert control(receiver, pickle.dumps({"type": "ping"}))["type"] == "pong"


def test_loads_plain_admits_plain_data_only():
    plain = {"type": "x", "n": [1, 2.5, None, True, ("a", b"b")], "d": {"k": "v"}}
    assert loads_plain(pickle.dumps(plain)) == plain
    for bad in (np.int64(3), Path("/"), {"a": frozenset()}, {1: "int key"}):
        with pytest.raises(RefusedPickle):
            loads_plain(pickle.dumps(bad))


@pytest.mark.timeout(30)
def test_shutdown_stops_the_receiver_not_the_process(free_port, sink):
    called = []
    r = OpenHCSReceiver(free_port, sink, on_shutdown=lambda: called.append(1), legacy_ack_port=None)
    r.start()
    reply = control(r, pickle.dumps({"type": "shutdown"}))
    assert reply["status"] == "success" and reply["type"] == "shutdown_ack"
    deadline = time.time() + 5
    while r.running and time.time() < deadline:
        time.sleep(0.02)
    assert not r.running and called == [1]
    r.stop()
    r.stop()  # idempotent
    # both ports are free again: a new receiver binds them
    with OpenHCSReceiver(free_port, sink, legacy_ack_port=None) as again:
        assert control(again, pickle.dumps({"type": "ping"}))["ready"] is True


def test_taken_addresses_and_remote_hosts_are_refused(receiver, sink, tmp_path):
    with pytest.raises(OSError, match="cannot bind"):
        OpenHCSReceiver(receiver.port, sink).start()
    with pytest.raises(ValueError, match="loopback"):
        OpenHCSReceiver(receiver.port, sink, host="0.0.0.0")
    ipc = tmp_path / "ipc"
    with OpenHCSReceiver(receiver.port, sink, transport="ipc", ipc_dir=ipc):
        with pytest.raises(OSError, match="in use"):
            OpenHCSReceiver(receiver.port, sink, transport="ipc", ipc_dir=ipc).start()
        assert (ipc / f"openhcs-zmq-{receiver.port}.sock").exists()


# --------------------------------------------------------------------------- data channel: bad input


@pytest.mark.timeout(60)
def test_bad_batches_get_error_replies_and_serving_goes_on(receiver, sink, blocks):
    plane = np.arange(30, dtype=np.uint16).reshape(5, 6)
    ok = item(blocks.put(plane), plane, well="A01", site=1, channel=1, z_index=1, timepoint=1)
    assert send_batch(receiver, batch(ok)) == {"status": "success"}
    before = {k: v.copy() for k, v in sink.planes.items()}
    small = blocks.put(plane, size=16)
    cases = [
        (b"\xff\xfe not text", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"type": "status"}, "unknown message type"),
        ({"type": "batch"}, "missing 'images'"),
        ([b"{}", b"{}"], "frames"),
        (batch(dict(ok, shm_name="fiji_doesnotexist00")), "does not exist"),
        (batch(dict(ok, shm_name="../../etc/passwd")), "not a shared-memory block name"),
        (batch(dict(ok, shm_name=small)), "too short"),
        (batch(dict(ok, dtype="object")), "not a numeric pixel type"),
        (batch(dict(ok, dtype="uint17")), "unknown dtype"),
        (batch(dict(ok, shape=[5, -6])), "positive integers"),
        (batch(dict(ok, shape=[2, 5, 3])), "plane_component_values"),
        (batch(dict(ok, shape=[1 << 20, 1 << 20])), "too large"),
        (batch(dict(ok, data_type="tracks")), "unsupported data_type"),
        (batch(dict(ok, metadata={"well": {"x": 1}})), "component value"),
        (batch(dict(ok, image_id="i", return_route={"url": "tcp://10.1.2.3:5", "incarnation": "x", "owner": {}})), "loopback"),
        (batch(ok, modes={"channel": "colour"}), "component_modes"),
        (batch(dict(ok, data_type="rois", rois=["bm90IGEgcm9p"])), "ImageJ .roi"),
    ]
    for msg, words in cases:
        reply = send_batch(receiver, msg)
        assert reply["status"] == "error", (msg, reply)
        assert words in reply["message"], (words, reply["message"])
    assert sink.planes.keys() == before.keys()
    for k in before:
        assert np.array_equal(sink.planes[k], before[k])
    assert receiver.stats()["errors"] == len(cases)
    plane2 = plane * 3
    ok2 = item(blocks.put(plane2), plane2, well="A01", site=1, channel=2, z_index=1, timepoint=1)
    assert send_batch(receiver, batch(ok2)) == {"status": "success"}
    assert np.array_equal(sink.planes[("openhcs", 0, 0, 1)], plane2)


@pytest.mark.timeout(30)
def test_refused_batch_still_acks_every_tracked_image(receiver, blocks):
    """A legacy (0.2.x) sender listens on a shared ack port: a batch that fails
    validation still tells it about each image, with the reason."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    ack_port = pull.bind_to_random_port("tcp://127.0.0.1")
    receiver.legacy_ack_port = ack_port
    try:
        plane = np.ones((4, 4), np.uint8)
        good = dict(item(blocks.put(plane), plane, channel=1), image_id="img-good")
        gone = dict(item("fiji_gone0000", plane, channel=2), image_id="img-gone")
        reply = send_batch(receiver, batch(good, gone))
        assert reply["status"] == "error" and "fiji_gone0000" in reply["message"]
        acks = {}
        for _ in range(2):
            assert pull.poll(5000), "ack did not arrive"
            a = pull.recv_json()
            acks[a["image_id"]] = a
        assert set(acks) == {"img-good", "img-gone"}
        for a in acks.values():
            assert a["type"] == "image_ack" and a["viewer_type"] == "fiji" and a["viewer_port"] == receiver.port
            assert a["status"] == "error" and "fiji_gone0000" in a["error"]
        ok = dict(item(blocks.put(plane), plane, channel=3), image_id="img-ok")
        assert send_batch(receiver, batch(ok)) == {"status": "success"}
        assert pull.poll(5000)
        a = pull.recv_json()
        assert (a["image_id"], a["status"], "error" in a) == ("img-ok", "success", False)
    finally:
        pull.close()


# --------------------------------------------------------------------------- placement, ROIs, shm


def _roi_bytes(top: int, left: int, bottom: int, right: int) -> bytes:
    """An ImageJ rectangle .roi (RoiDecoder's 64-byte header)."""
    header = bytearray(64)
    header[0:4] = b"Iout"
    struct.pack_into(">hBxhhhh", header, 4, 228, 1, top, left, bottom, right)
    return bytes(header)


@pytest.mark.timeout(30)
def test_rois_reach_the_roi_sink_in_the_plane_window(receiver, sink, blocks):
    modes = dict(OPENHCS_MODES, well="window")
    plane = np.ones((8, 8), np.uint16)
    rois = [_roi_bytes(1, 2, 5, 6), _roi_bytes(0, 0, 3, 3)]
    msg = batch(
        item(blocks.put(plane), plane, well="C03", site=1, channel=1, z_index=1, timepoint=1),
        {"path": "C03_rois.roi.zip", "data_type": "rois", "rois": [base64.b64encode(r).decode() for r in rois],
         "metadata": {"well": "C03", "site": 1, "channel": 1, "z_index": 1, "timepoint": 1}},
        modes=modes,
    )
    assert send_batch(receiver, msg) == {"status": "success"}
    assert list(sink.planes) == [("openhcs/well_C03", 0, 0, 0)]
    ((key, got, meta),) = sink.rois
    assert key == "openhcs/well_C03" and got == rois and meta["path"] == "C03_rois.roi.zip"


@pytest.mark.timeout(30)
def test_frames_keep_their_index_until_clear_state(receiver, sink, blocks):
    def send(t: int, value: int) -> None:
        p = np.full((3, 3), value, np.uint8)
        assert send_batch(receiver, batch(item(blocks.put(p), p, well="A01", site=1, channel=1, z_index=1, timepoint=t))) == {"status": "success"}

    send(5, 50)
    send(2, 20)  # a smaller timepoint arriving later is appended, not inserted
    assert sink.planes[("openhcs", 0, 0, 0)][0, 0] == 50
    assert sink.planes[("openhcs", 1, 0, 0)][0, 0] == 20
    assert control(receiver, pickle.dumps({"type": "clear_state"}))["type"] == "clear_state_ack"
    send(2, 21)
    assert sink.planes[("openhcs", 0, 0, 0)][0, 0] == 21


@pytest.mark.timeout(30)
def test_a_3d_item_spreads_along_its_declared_component(receiver, sink, blocks):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    it = item(blocks.put(stack), stack, well="A01", site=1, channel=1, timepoint=1)
    it["plane_component_values"] = {"z_index": [3, 1, 2]}
    assert send_batch(receiver, batch(it)) == {"status": "success"}
    for k, z in enumerate([3, 1, 2]):  # z values sorted -> Z index z-1
        assert np.array_equal(sink.planes[("openhcs", 0, z - 1, 0)], stack[k])


def test_layout_from_component_modes():
    d = Layout.from_modes(None)
    assert (d.window, d.channel, d.slice, d.frame) == ((), ("channel",), ("z_index",), ("well", "site", "timepoint"))
    o = Layout.from_modes({"timepoint": "frame", "site": "window", "well": "window", "channel": "frame", "z_index": "channel"})
    assert (o.window, o.channel, o.slice, o.frame) == (("well", "site"), ("z_index",), (), ("timepoint", "channel"))


@pytest.mark.timeout(30)
def test_copy_block_leaves_the_owner_in_charge(blocks):
    """A reader in another process copies a block and exits: the block must
    survive (its resource tracker must not unlink what it does not own)."""
    data = np.random.default_rng(7).integers(0, 255, (6, 7)).astype(np.uint8)
    name = blocks.put(data)
    code = (
        "import sys, numpy as np; from fiji_bridge.openhcs.shm import copy_block;"
        f"a = copy_block({name!r}, (6, 7), np.dtype('uint8')); sys.stdout.write(a.tobytes().hex())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert bytes.fromhex(proc.stdout) == data.tobytes()
    assert "leaked" not in proc.stderr
    assert os.path.exists(f"/dev/shm/{name}"), "the reader's resource tracker unlinked the owner's block"
    assert np.array_equal(copy_block(name, (6, 7), np.dtype("uint8")), data)


FOREIGN = r"""
import sys
from multiprocessing import shared_memory
import numpy as np
name, n = sys.argv[1], int(sys.argv[2])
shm = shared_memory.SharedMemory(create=True, size=n, name=name)
np.frombuffer(shm.buf, np.uint8)[:] = np.arange(n, dtype=np.uint8)
print("ready", flush=True)
sys.stdin.readline()  # hold the block until told
shm.close()
shm.unlink()
"""


@contextlib.contextmanager
def foreign_block(name: str, n: int):
    """A block created, owned and finally unlinked by another process."""
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN, name, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield np.arange(n, dtype=np.uint8)
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(10)
        drop_block(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("grace", [None, 0.2])
def test_a_foreign_processs_block_is_read_but_never_unlinked(free_port, sink, grace):
    """Another process owns the block: copied, then left to it -- by default,
    and even with the opt-in sweep when the name is not a polystore sender's."""
    name = f"psm_{uuid.uuid4().hex[:12]}"
    with foreign_block(name, 48) as data:
        with OpenHCSReceiver(free_port, sink, orphan_grace_s=grace, legacy_ack_port=None) as r:
            assert send_batch(r, batch(item(name, data.reshape(6, 8), channel=1))) == {"status": "success"}
            time.sleep(0.6)  # past the grace period
            assert os.path.exists(f"/dev/shm/{name}")
        assert os.path.exists(f"/dev/shm/{name}")  # nor at stop
        assert np.array_equal(sink.planes[("openhcs", 0, 0, 0)], data.reshape(6, 8))


@pytest.mark.timeout(60)
def test_a_block_that_cannot_be_read_is_left_alone(free_port, sink, blocks):
    """A FIFO and an empty file under sender-like names: refused with an
    error, the bridge keeps serving, and neither is unlinked (Python 3.11's
    SharedMemory attach unlinks what it fails to map)."""
    fifo, empty = f"fiji_{uuid.uuid4().hex[:12]}", f"fiji_{uuid.uuid4().hex[:12]}"
    os.mkfifo(f"/dev/shm/{fifo}", 0o600)
    open(f"/dev/shm/{empty}", "wb").close()
    try:
        good = np.full((3, 3), 5, np.uint8)
        with OpenHCSReceiver(free_port, sink, legacy_ack_port=None) as r:
            for name in (fifo, empty):
                reply = send_batch(r, batch(item(name, good, channel=1)))
                assert reply["status"] == "error" and name in reply["message"], reply
            time.sleep(0.5)
            assert send_batch(r, batch(item(blocks.put(good), good, channel=2))) == {"status": "success"}
        assert os.path.exists(f"/dev/shm/{fifo}") and os.path.exists(f"/dev/shm/{empty}")
    finally:
        for name in (fifo, empty):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")


@pytest.mark.timeout(30)
def test_opt_in_sweep_unlinks_only_the_senders_own_leftovers(free_port, sink):
    """``orphan_grace_s`` (for a sender that leaves blocks to the viewer):
    a ``fiji_`` block of this user's is gone after the grace period; the same
    name owned by another account is not."""
    plane = np.full((4, 4), 9, np.int16)
    names = []
    for _ in range(2):
        shm = shared_memory.SharedMemory(create=True, size=plane.nbytes, name=f"fiji_{uuid.uuid4().hex[:12]}")
        resource_tracker.unregister(shm._name, "shared_memory")
        np.ndarray(plane.shape, plane.dtype, buffer=shm.buf)[...] = plane
        names.append(shm.name.lstrip("/"))
        shm.close()
    mine, theirs = names
    other_uid = 65534 if os.geteuid() == 0 else None
    if other_uid is not None:
        os.chown(f"/dev/shm/{theirs}", other_uid, -1)
    try:
        with OpenHCSReceiver(free_port, sink, orphan_grace_s=0.3, legacy_ack_port=None) as r:
            assert send_batch(r, batch(item(mine, plane, channel=1))) == {"status": "success"}
            assert os.path.exists(f"/dev/shm/{mine}")  # not before the grace period
            if other_uid is not None:
                send_batch(r, batch(item(theirs, plane, channel=2)))
            deadline = time.time() + 5
            while os.path.exists(f"/dev/shm/{mine}") and time.time() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/dev/shm/{mine}")
        if other_uid is not None:
            assert os.path.exists(f"/dev/shm/{theirs}"), "another account's block was unlinked"
        assert np.array_equal(sink.planes[("openhcs", 0, 0, 0)], plane)
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
