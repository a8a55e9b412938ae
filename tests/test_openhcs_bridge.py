"""The real bridge as OpenHCS's Fiji viewer, end to end.

``fiji-bridge serve --openhcs-port Q`` runs as a subprocess (real JVM, real
ImageJ 1); the sender is PolyStore 0.6's own ``FijiStreamingBackend``, in
another subprocess (driven as in ``test_openhcs``); pongs are decoded by
zmqruntime. Oracles: the numpy arrays the sender built from fixed seeds,
regenerated here, and OpenHCS's default placement (channel -> C,
z_index -> Z, well/site/timepoint -> T, new T values appended batch by batch).

The bridge gets its own HOME, so the ipc sockets of the receiver
(``~/.openhcs/ipc/openhcs-zmq-<port>.sock``) land in a folder this module
owns and checks for leftovers.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import bridge_process, free_port_pair
from test_openhcs import OPENHCS_MODES, pixels, real_sender, run_sender

pytestmark = [pytest.mark.imagej, real_sender]

STEP = "Normalize"
KEY = f"openhcs/step1-{STEP}"  # the producer (pipeline step 1) names the window
CHANNEL_NAMES = {"1": "DAPI", "2": "GFP"}


def _ports() -> tuple[int, int]:
    """Bridge port P and OpenHCS port Q; P, P+1000, Q, Q+1000 all distinct and free."""
    p = free_port_pair()
    for _ in range(50):
        q = free_port_pair()
        if not {q, q + 1000} & {p, p + 1000}:
            return p, q
    raise RuntimeError("no second free port pair")


class Bridge:
    def __init__(self, bp, openhcs_port: int, home: Path) -> None:
        self.bp = bp
        self.q = openhcs_port
        self.home = home

    @property
    def ipc_dir(self) -> Path:
        return self.home / ".openhcs" / "ipc"

    def ipc_sockets(self) -> list[str]:
        return sorted(p.name for p in self.ipc_dir.glob("*.sock")) if self.ipc_dir.is_dir() else []


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    home = Path(tempfile.mkdtemp(prefix="ohb", dir="/tmp"))  # short: ipc paths must fit ~107 bytes
    p, q = _ports()
    try:
        with bridge_process(
            tmp_path_factory.mktemp("bridge"), "--no-display", "--engine", "imagej1", "--openhcs-port", str(q),
            port=p, env={"HOME": str(home)},
        ) as bp:
            yield Bridge(bp, q, home)
        assert bp.proc.returncode is not None
        # whatever the tests did, the bridge's exit leaves no OpenHCS socket file behind
        assert Bridge(bp, q, home).ipc_sockets() == [], bp.log_text()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _well(well: str, seed0: int) -> list[dict]:
    """One site of ``well``: 2 channels x 2 z, shuffled (order must not matter)."""
    items = [
        {"path": f"{well}_s1_w{ch}_z{z:03d}_t1.tif", "seed": seed0 + 10 * z + ch, "shape": [24, 32], "dtype": "uint16",
         "metadata": {"well": well, "site": 1, "channel": ch, "z_index": z, "timepoint": 1}}
        for z in (1, 2) for ch in (1, 2)
    ]
    return [items[i] for i in np.random.default_rng(seed0).permutation(len(items))]


MEANS = textwrap.dedent(
    """
    Stack.getDimensions(w, h, nc, nz, nt);
    print("dims " + w + " " + h + " " + nc + " " + nz + " " + nt + " bits " + bitDepth());
    total = 0;
    for (t = 1; t <= nt; t++) for (z = 1; z <= nz; z++) for (c = 1; c <= nc; c++) {
        Stack.setPosition(c, z, t);
        getStatistics(area, mean);
        total += mean;
        print("mean " + t + " " + z + " " + c + " " + d2s(mean, 6));
    }
    print("all " + d2s(total / (nc * nz * nt), 6));
    """
)


@pytest.mark.timeout(150)
def test_polystore_batches_become_a_bridge_hyperstack(bridge):
    batches = [_well("A01", 100), _well("B02", 200)]  # second well in a second batch -> T 1
    out = run_sender({
        "port": bridge.q, "transport": "tcp", "ipc_dir": str(bridge.home), "ack_port": 0,
        "modes": OPENHCS_MODES, "names": {"channel": CHANNEL_NAMES}, "step": STEP, "batches": batches,
    })
    # the sender saw success for both batches and a success ack for each of the 8 images
    assert out["polystore"].startswith("0.6") and out["errors"] == [], out["stderr"][-2000:]
    assert len(out["acks"]) == 8 and {a["status"] for a in out["acks"]} == {"success"}
    assert {(a["viewer_type"], a["viewer_port"]) for a in out["acks"]} == {("fiji", bridge.q)}
    # shared memory: every block the sender made is gone (it unlinked them after the reply)
    assert len(out["created"]) == 8 and out["left"] == []
    assert not [n for n in out["created"] if os.path.exists(f"/dev/shm/{n}")]
    assert "leaked shared_memory" not in out["stderr"]

    # the oracle: T from (well, site, timepoint) in order of arrival, Z and C sorted
    truth = np.zeros((2, 2, 2, 24, 32), np.uint16)
    for t, b in enumerate(batches):
        for item in b:
            md = item["metadata"]
            truth[t, md["z_index"] - 1, md["channel"] - 1] = pixels(item)

    with bridge.bp.client(timeout=30) as c:
        deadline = time.monotonic() + 10  # the sender's replies already mean stored; be lenient
        while KEY not in c.list_stacks() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.list_stacks() == [KEY]
        info = c.stack_info(KEY)
        assert info.shape == truth.shape and info.dtype == "uint16"
        assert info.missing == [] and info.planes == 8
        assert info.channel_names == ["DAPI", "GFP"]
        got = c.get_stack(KEY)
        assert got.dtype == np.uint16 and got.shape == truth.shape
        assert np.array_equal(got, truth)

        res = c.run_macro(MEANS, stack=KEY, timeout=60)
    lines = res.log.splitlines()
    assert "dims 32 24 2 2 2 bits 16" in lines, res.log
    seen = {}
    for line in lines:
        if line.startswith("mean "):
            t, z, ch, m = line.split()[1:]
            seen[(int(t) - 1, int(z) - 1, int(ch) - 1)] = float(m)
    assert len(seen) == 8, res.log
    for (t, z, ch), m in seen.items():
        assert m == pytest.approx(truth[t, z, ch].mean(dtype=np.float64), abs=1e-5), (t, z, ch)
    (all_line,) = [ln for ln in lines if ln.startswith("all ")]
    assert float(all_line.split()[1]) == pytest.approx(truth.mean(dtype=np.float64), abs=1e-5)


@pytest.mark.timeout(60)
def test_openhcs_control_port_answers_and_shutdown_spares_the_bridge(bridge):
    from zmqruntime.config import TransportMode, ZMQConfig
    from zmqruntime.messages import ServerRole
    from zmqruntime.transport import request_control_ping

    # OpenHCS finds its viewer over tcp or ipc (its Unix default); both answer a pong
    q, cq = bridge.q, bridge.q + 1000
    assert bridge.ipc_sockets() == sorted([f"openhcs-zmq-{q}.sock", f"openhcs-zmq-{cq}.sock"])
    cfg = ZMQConfig(ipc_socket_dir=str(bridge.ipc_dir), ipc_socket_prefix="openhcs-zmq", app_name="openhcs")
    for mode in (TransportMode.TCP, TransportMode.IPC):
        pong = request_control_ping(q, mode, host="127.0.0.1", config=cfg, timeout_ms=5000)
        assert pong is not None, f"no pong over {mode}"
        assert pong.server_role is ServerRole.VIEWER and pong.ready and pong.server_type == "fiji"
        assert (pong.port, pong.control_port) == (q, cq)
        assert pong.process_identity is not None and pong.process_identity.pid == bridge.bp.proc.pid

    ctx = zmq.Context.instance()

    def control(msg: dict) -> dict:
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
        s.connect(f"tcp://127.0.0.1:{cq}")
        try:
            s.send(pickle.dumps(msg))
            return pickle.loads(s.recv())
        finally:
            s.close()

    with bridge.bp.client(timeout=30) as c:
        raw = control({"type": "ping"})
        assert raw["type"] == "pong" and raw["bridge"]["server"] == "fiji-bridge"
        assert raw["bridge"]["stacks"] == c.list_stacks()

        # OpenHCS closing "its viewer" stops the stand-in only
        stacks = c.list_stacks()
        assert control({"type": "shutdown"})["type"] == "shutdown_ack"
        deadline = time.monotonic() + 10
        while bridge.ipc_sockets() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.ipc_sockets() == []  # the receiver removed its socket files
        assert c.ping()["type"] == "pong"  # the bridge's own control port
        assert c.status()["openhcs"]["running"] is False
        assert c.list_stacks() == stacks  # the planes OpenHCS sent stay in the bridge
        for port in (q, cq):  # OpenHCS may start a viewer there again
            with zmq.Context.instance().socket(zmq.REP) as s:
                s.setsockopt(zmq.LINGER, 0)
                s.bind(f"tcp://127.0.0.1:{port}")
        assert bridge.bp.proc.poll() is None
