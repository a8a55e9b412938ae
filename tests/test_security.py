"""CurveZMQ: no listening beyond loopback without keys; with keys only key holders get in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port_pair
from fiji_bridge.client import BridgeClient, BridgeError
from fiji_bridge.security import SecurityError, check_bind, create_keys, is_loopback

pytestmark = pytest.mark.timeout(120)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.3.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.7")


def test_check_bind_refuses_without_keys(tmp_path):
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", None, ipc=True)
    with pytest.raises(SecurityError, match="fiji-bridge keys"):
        check_bind("0.0.0.0", None)
    with pytest.raises(SecurityError, match="no server key pair"):
        check_bind("0.0.0.0", tmp_path)


def test_serve_on_all_interfaces_without_keys_refuses_to_start():
    port = free_port_pair()
    r = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "serve", "--host", "0.0.0.0", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0" in r.stderr and "CurveZMQ" in r.stderr


def test_keys_command_writes_a_usable_pair(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "keys", "-o", str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for f in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (tmp_path / "k" / f).is_file()
    assert oct((tmp_path / "k" / "server.key_secret").stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.imagej
def test_curve_bridge_admits_only_key_holders(tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys)
    port = free_port_pair()
    log = open(tmp_path / "bridge.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fiji_bridge.cli", "serve", "--host", "0.0.0.0", "--port", str(port), "--keys", str(keys), "--no-display"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = BridgeClient.connect(port, timeout=2, keys=keys)
                break
            except BridgeError:
                assert proc.poll() is None, (tmp_path / "bridge.log").read_text()
                assert time.monotonic() < deadline
        with c:
            assert c.status()["secure"] is True
            c.send_plane(np.full((4, 4), 3, np.uint8), "secret")
            c.flush()
            assert c.get_stack("secret").max() == 3
        # no keys, or someone else's keys: no answer at all
        with pytest.raises(BridgeError):
            BridgeClient.connect(port, timeout=2)
        other = tmp_path / "other"
        create_keys(other)
        (other / "server.key").write_bytes((keys / "server.key").read_bytes())
        with pytest.raises(BridgeError):
            BridgeClient.connect(port, timeout=2, keys=other)
        with BridgeClient.connect(port, timeout=5, keys=keys) as c:
            c.shutdown()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
