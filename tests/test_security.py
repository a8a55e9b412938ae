"""CurveZMQ: no listening beyond loopback without keys; with keys only key holders get in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# --------------------------------------------------------------------------- the per-user secret


def test_secret_is_created_private_and_atomically(tmp_path, monkeypatch):
    from fiji_bridge.security import ensure_secret

    path = tmp_path / "d" / "secret"
    monkeypatch.setenv("FIJI_BRIDGE_SECRET_FILE", str(path))
    first = ensure_secret()
    assert ensure_secret() == first and len(first) == 64 and int(first, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left


def test_secret_file_others_could_touch_is_refused(tmp_path):
    from fiji_bridge.security import ensure_secret

    loose = tmp_path / "loose"
    loose.write_text("a" * 64)
    loose.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod go-rwx"):
        ensure_secret(loose)
    target = tmp_path / "target"
    target.write_text("b" * 64)
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SecurityError, match="not a link"):
        ensure_secret(tmp_path / "link")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecurityError, match="not a regular file"):
        ensure_secret(fifo)  # and does not block
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.write_text("c" * 64)
        foreign.chmod(0o600)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(SecurityError, match="belongs to uid 65534"):
            ensure_secret(foreign)


def test_bridge_admits_only_peers_with_the_secret(tmp_path, monkeypatch):
    import zmq

    from conftest import bridge_process

    with bridge_process(tmp_path, "--no-display", wait_engine=False) as bp:
        with bp.client(timeout=5) as c:
            st = c.status()
            assert st["auth"]["mode"] == "secret" and st["auth"]["refused"] == 0
        # a peer that knows no secret (NULL mechanism): not one message is read
        ctx = zmq.Context()
        try:
            for port in (bp.port, bp.port + 1000):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.connect(f"tcp://127.0.0.1:{port}")
                s.send_multipart([b"", b'{"type": "ping", "id": 1}'])
                assert s.poll(1500) == 0
                s.close(0)
        finally:
            ctx.term()
        # a client with another secret: a clear error, at once
        other = tmp_path / "other" / "secret"
        monkeypatch.setenv("FIJI_BRIDGE_SECRET_FILE", str(other))
        t0 = time.monotonic()
        with pytest.raises(BridgeError, match="refused this user's secret") as ei:
            BridgeClient.connect(bp.port, timeout=10)
        assert ei.value.code == "unauthorized" and time.monotonic() - t0 < 5
        with pytest.raises(BridgeError, match="refused"):
            BridgeClient.connect_or_spawn(bp.port, timeout=10)  # and spawns nothing
        monkeypatch.delenv("FIJI_BRIDGE_SECRET_FILE")
        with bp.client(timeout=5) as c:
            assert c.status()["auth"]["refused"] >= 2


# --------------------------------------------------------------------------- save_to roots


def test_save_roots_admit_plates_below_the_roots_only(tmp_path, monkeypatch):
    from fiji_bridge.security import SaveRoots

    monkeypatch.delenv("OMERO_HOST", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    roots = SaveRoots([str(root), "omero://omero.example.org"])
    for ok in (f"{root}/p.zarr", f"zarr://{root}/sub/p.zarr", f"ometiff://{root}/p", "omero://alice@omero.example.org:4064/plate/3"):
        roots.check(ok)
    for bad in (f"{tmp_path}/p.zarr", f"zarr://{root}/../p.zarr", f"{root}/escape/p.zarr", f"{root}/.hidden/p.zarr", "/etc/cron.d/p", "omero://elsewhere.example/plate/1"):
        with pytest.raises(SecurityError, match="--allow-save-to"):
            roots.check(bad)
    default = SaveRoots()
    default.check(str(tmp_path / "p.zarr"))  # the temporary folder
    with pytest.raises(SecurityError):
        default.check("/etc/p.zarr")
    with pytest.raises(SecurityError):
        default.check(str(Path.home() / ".ssh" / "p.zarr"))


@pytest.mark.timeout(60)
def test_a_client_tells_a_stranger_squatting_the_port_and_gives_nothing_away():
    """Someone else listens on the port (NULL, or CURVE with keys of their
    own): the client's handshake fails (unauthorized) and the stranger
    receives not one message (the secret never travels)."""
    import zmq

    ctx = zmq.Context()
    try:
        for kind in ("null", "curve"):
            port = free_port_pair()
            squat = ctx.socket(zmq.ROUTER)
            squat.linger = 0
            if kind == "curve":
                pub, sec = zmq.curve_keypair()
                squat.curve_server, squat.curve_publickey, squat.curve_secretkey = True, pub, sec
            squat.bind(f"tcp://127.0.0.1:{port}")
            t0 = time.monotonic()
            with pytest.raises(BridgeError) as ei:
                BridgeClient.connect(port, timeout=5)
            assert ei.value.code == "unauthorized" and time.monotonic() - t0 < 4, (kind, ei.value)
            assert squat.poll(500) == 0, kind
            squat.close(0)
    finally:
        ctx.destroy(linger=0)
