"""BridgeClient: connect-or-spawn, reuse, two bridges, errors that never hang, the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port_pair
from fiji_bridge.client import BridgeClient, BridgeError

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(180)]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fiji_bridge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_connect_to_nothing_fails_fast():
    port = free_port_pair()
    t0 = time.monotonic()
    with pytest.raises(BridgeError) as ei:
        BridgeClient.connect(port, timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert str(port) in str(ei.value)


def test_a_port_held_by_something_else_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BridgeError) as ei:
            BridgeClient.connect_or_spawn(port=port, timeout=10)
    assert "not answer as a fiji-bridge" in str(ei.value)


def test_spawn_reuse_two_bridges_and_the_cli(tmp_path):
    p1, p2 = free_port_pair(), free_port_pair()
    while p2 in (p1, p1 + 1000) or p1 == p2 + 1000:
        p2 = free_port_pair()
    logs = tmp_path / "logs"
    a = BridgeClient.connect_or_spawn(port=p1, timeout=60, display=False, own=True, log_dir=logs)
    b = BridgeClient.connect_or_spawn(port=p2, timeout=60, display=False, own=True, log_dir=logs)
    try:
        assert a.pid and b.pid and a.pid != b.pid
        assert (logs / f"bridge-{p1}.log").exists()
        # a second connect_or_spawn reuses the running bridge
        with BridgeClient.connect_or_spawn(port=p1, timeout=60) as again:
            assert again.pid is None
            assert again.ping()["pid"] == a.pid
        # each bridge has its own stacks
        ra, rb = np.full((8, 8), 1, np.uint8), np.full((8, 8), 2, np.uint8)
        a.send_plane(ra, "only-a")
        b.send_plane(rb, "only-b")
        a.flush()
        b.flush()
        assert a.list_stacks() == ["only-a"] and b.list_stacks() == ["only-b"]
        # macros run in each bridge's own engine
        assert a.run_macro("print(getPixel(0, 0));", stack="only-a").log.strip() == "1"
        assert b.run_macro("print(getPixel(0, 0));", stack="only-b").log.strip() == "2"

        # the CLI against the running bridge
        r = cli("status", "--port", str(p1), "--json")
        assert r.returncode == 0, r.stderr
        import json

        st = json.loads(r.stdout)
        assert st["pid"] == a.pid and st["stacks"][0]["key"] == "only-a"
        ijm = tmp_path / "double.ijm"
        ijm.write_text('run("Multiply...", "value=2");\nprint("max " + getPixel(0, 0));\n')
        r = cli("run", str(ijm), "--stack", "only-a", "--port", str(p1), "-o", str(tmp_path / "out"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "max 2" in r.stdout
        import tifffile

        (tif,) = list((tmp_path / "out").glob("*.tif"))
        assert np.asarray(tifffile.imread(tif)).max() == 2

        png = tmp_path / "snap.png"
        r = cli("snapshot", "--stack", "only-b", "-o", str(png), "--port", str(p2))
        assert r.returncode == 0, r.stdout + r.stderr
        from PIL import Image

        img = np.asarray(Image.open(png))
        assert img.shape[:2] == (8, 8)

        r = cli("stop", "--port", str(p2))
        assert r.returncode == 0, r.stdout
        b._proc.wait(20)
        with pytest.raises(BridgeError):
            b.ping(timeout=1.0)
    finally:
        a.close()
        b.close()
    assert a._proc.wait(20) == 0


def test_stream_command_streams_a_folder_of_tiffs(tmp_path, data_dir):
    import tifffile

    port = free_port_pair()
    with BridgeClient.connect_or_spawn(port=port, timeout=60, display=False, own=True, log_dir=tmp_path) as c:
        r = cli("stream", str(data_dir / "hela_D03"), "--port", str(port))
        assert r.returncode == 0, r.stdout + r.stderr
        (key,) = c.list_stacks()
        assert key.endswith("D03/s000")
        got = c.get_stack(key)
        files = sorted((data_dir / "hela_D03").glob("*.tif"))
        for ch, f in enumerate(files):
            np.testing.assert_array_equal(got[0, 0, ch], tifffile.imread(f))


def test_a_dead_bridge_gives_an_error_not_a_hang(tmp_path, monkeypatch):
    import fiji_bridge.client

    monkeypatch.setattr(fiji_bridge.client, "PING_TIMEOUT", 3.0)
    port = free_port_pair()
    c = BridgeClient.connect_or_spawn(port=port, timeout=60, display=False, log_dir=tmp_path)
    try:
        c.send_plane(np.zeros((4, 4), np.uint8), "x")
        c.flush()
        os.killpg(c.pid, 9)
        c._proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BridgeError):
            c.run_macro("wait(100000);", timeout=1000)  # long: found dead by its pings
        assert time.monotonic() - t0 < 30
        c.timeout = 3
        with pytest.raises(BridgeError):
            for _ in range(20):  # credits run out, then the wait for acks times out
                c.send_plane(np.zeros((4, 4), np.uint8), "x")
    finally:
        c.close(flush_timeout=0.5)
