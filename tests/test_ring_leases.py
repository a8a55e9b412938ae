"""Warm ring segments the bridge lends to producers (fiji_bridge.ring_leases):
real shared memory, real processes, a real bridge over real sockets.

What must hold: a producer's planes land bit-exact whether its slots are
lent or its own; a lease is given back at close and taken back when its
producer dies; a lease goes only to the process that asked (pid and start
time); planes too big for a lent slot, or a second producer while the
first holds the lease, fall back to the producer's own segments; bad lease
requests get an error and the bridge keeps serving; nothing is left in
/dev/shm when the bridge goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import bridge_process, shm_segments
from fiji_bridge.client import BridgeClient, BridgeError
from fiji_bridge.ring_leases import RingLeases, process_start
from fiji_bridge.supervisor import SERVER_PREFIX

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="leases need /proc (Linux)")]

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the pool itself


@pytest.fixture
def leases():
    pool = RingLeases(slots=3, slot_bytes=1 << 20)
    pool.warm()
    yield pool
    pool.close()


def test_a_lease_goes_only_to_the_process_that_asked(leases):
    me, start = os.getpid(), process_start(os.getpid())
    assert start is not None
    assert leases.lease(me, start + 1, 3, 1 << 20) == (None, [])  # a reused pid: another process
    assert leases.lease(me, start, 3, (1 << 20) + 1) == (None, [])  # slots too small for the planes
    lease, names = leases.lease(me, start, 2, 4096)
    assert lease and len(names) == 2 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert leases.status()["leased"] == 2
    lease2, rest = leases.lease(me, start, 5, 4096)  # only one left
    assert len(rest) == 1 and not set(rest) & set(names)
    assert leases.lease(me, start, 1, 4096) == (None, [])  # none left
    assert leases.release(lease) == 2 and leases.release(lease) == 0  # idempotent
    assert leases.release("nonsense") == 0
    assert leases.status()["leased"] == 1


def test_the_lease_of_a_dead_process_is_taken_back(leases):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(100):
            start = process_start(child.pid)
            if start is not None:
                break
            time.sleep(0.01)
        lease, names = leases.lease(child.pid, start, 3, 4096)
        assert len(names) == 3 and leases.reap() == 0  # alive: kept
    finally:
        child.kill()
        child.wait(10)
    assert leases.reap() == 1
    assert leases.status() == {"segments": 3, "leased": 0, "slot_bytes": 1 << 20, "leases": 0}


def test_closing_the_pool_unlinks_lent_segments_too(leases):
    _, names = leases.lease(os.getpid(), process_start(os.getpid()), 1, 4096)
    assert len(shm_segments(f"{SERVER_PREFIX}_{os.getpid()}_rl")) == 3
    leases.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert shm_segments(f"{SERVER_PREFIX}_{os.getpid()}_rl") == []


# --------------------------------------------------------------------------- through a bridge


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    with bridge_process(tmp_path_factory.mktemp("leases"), "--no-display", wait_engine=False) as bp:  # planes need no engine
        with bp.client(timeout=10) as c:
            deadline = time.monotonic() + 60
            while c.status()["memory"]["ring_leases"]["segments"] < 8:
                assert time.monotonic() < deadline, "the bridge did not warm its ring segments"
                time.sleep(0.05)
        yield bp


def _ring(c: BridgeClient):
    return c._planes._streams[False].ring  # the client's main stream


def _planes(n: int, shape=(512, 512), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, (n, *shape), dtype=np.uint16)


def _leased(bridge) -> int:
    with bridge.client(timeout=10) as c:
        return c.status()["memory"]["ring_leases"]["leased"]


def test_a_producer_writes_into_lent_segments_and_its_planes_are_exact(bridge):
    arr = _planes(20)
    with bridge.client(timeout=30) as c:
        pid = c.status()["pid"]
        for t, p in enumerate(arr):
            c.send_plane(p, "lent", t=t)
        c.flush()
        ring = _ring(c)
        assert ring.leased == 8
        assert all(n.startswith(f"{SERVER_PREFIX}_{pid}_rl") for n in ring.names)
        assert c.status()["memory"]["ring_leases"]["leased"] == 8
        np.testing.assert_array_equal(c.get_stack("lent")[:, 0, 0], arr)
        c.close_stack("lent")
    assert _leased(bridge) == 0  # given back at close


def test_a_second_producer_and_oversized_planes_use_their_own_segments(bridge):
    a, b = _planes(10, seed=1), _planes(10, seed=2)
    big = np.random.default_rng(3).integers(0, 65535, (2, 3000, 3000), dtype=np.uint16)  # 18 MB > 16 MiB slots
    with bridge.client(timeout=30) as c1, bridge.client(timeout=30) as c2:
        for t in range(10):
            c1.send_plane(a[t], "first", t=t)
            c2.send_plane(b[t], "second", t=t)
        c1.flush()
        c2.flush()
        assert _ring(c1).leased == 8 and _ring(c2).leased == 0
        assert all(n.startswith(f"fjb_{os.getpid()}_") for n in _ring(c2).names)
        np.testing.assert_array_equal(c1.get_stack("first")[:, 0, 0], a)
        np.testing.assert_array_equal(c2.get_stack("second")[:, 0, 0], b)
        for t in range(2):
            c1.send_plane(big[t], "big", t=t)  # a new, bigger ring: the lease is given back, none fits
        c1.flush()
        assert _ring(c1).leased == 0
        np.testing.assert_array_equal(c1.get_stack("big")[:, 0, 0], big)
        for k in ("first", "second", "big"):
            (c1 if k != "second" else c2).close_stack(k)
    assert _leased(bridge) == 0


PRODUCER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from fiji_bridge.client import BridgeClient
    c = BridgeClient.connect(int(sys.argv[1]), timeout=30)
    for t in range(4):
        c.send_plane(np.full((256, 256), t, np.uint16), "killed", t=t)
    c.flush()
    print(c._planes._streams[False].ring.leased, flush=True)
    time.sleep(60)
""")


def test_a_killed_producer_s_lease_goes_to_the_next_one(bridge):
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(bridge.port)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "8"
        assert _leased(bridge) == 8
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    arr = _planes(8, seed=4)
    with bridge.client(timeout=30) as c:
        for t, p in enumerate(arr):
            c.send_plane(p, "after", t=t)
        c.flush()
        assert _ring(c).leased == 8  # taken back from the dead producer at this lease request
        np.testing.assert_array_equal(c.get_stack("after")[:, 0, 0], arr)
        assert c.get_stack("killed")[3, 0, 0].max() == 3  # its planes arrived before it died
        c.close_stack("after")
        c.close_stack("killed")


@pytest.mark.parametrize("fields", [
    {},
    {"pid": 1, "start": 0, "slots": 0, "slot_bytes": 10},
    {"pid": -3, "start": 0, "slots": 1, "slot_bytes": 10},
    {"pid": "x", "start": 0, "slots": 1, "slot_bytes": 10},
    {"pid": 1, "start": 0, "slots": 1, "slot_bytes": True},
])
def test_bad_lease_requests_are_refused_and_the_bridge_serves_on(bridge, fields):
    with bridge.client(timeout=10) as c:
        with pytest.raises(BridgeError, match="field"):
            c._call("lease_ring", **fields)
        with pytest.raises(BridgeError, match="lease"):
            c._call("release_ring", lease="")
        assert c._call("release_ring", lease="no-such-lease")[0]["released"] == 0
        assert c.ping()["ok"]


def test_nothing_is_left_in_shared_memory_when_the_bridge_goes(tmp_path):
    with bridge_process(tmp_path, "--no-display", wait_engine=False) as bp:
        with bp.client(timeout=10) as c:
            pid = c.ping()["pid"]
            deadline = time.monotonic() + 60
            while c.status()["memory"]["ring_leases"]["segments"] < 8:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            c.send_plane(np.ones((64, 64), np.uint16), "x")
            c.flush()
            assert _ring(c).leased == 8
        assert len(shm_segments(f"{SERVER_PREFIX}_{pid}_rl")) == 8
    assert shm_segments(f"{SERVER_PREFIX}_{pid}_rl") == []
