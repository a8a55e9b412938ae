"""CurveZMQ keys: who may talk to a bridge that listens beyond loopback.

A macro is arbitrary code, so a bridge bound to anything but 127.0.0.1 /
::1 / ipc must authenticate its peers. ``fiji-bridge keys -o DIR`` makes::

    DIR/server.key            server public key   (give to clients)
    DIR/server.key_secret     server key pair     (stays with the bridge)
    DIR/client.key            client public key
    DIR/client.key_secret     client key pair     (give to clients)
    DIR/authorized/client.key the client keys the bridge accepts

The bridge started with ``--keys DIR`` is a CURVE server that accepts the
public keys in ``DIR/authorized``; a client given the same ``keys=DIR``
uses ``client.key_secret`` and ``server.key``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path
from typing import Optional, Union

import zmq
import zmq.auth

__all__ = ["SecurityError", "is_loopback", "check_bind", "create_keys", "keys_command", "ServerAuth", "apply_client_keys"]


class SecurityError(RuntimeError):
    """Refusing an unsafe configuration (non-loopback bind without keys, missing key files)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(h, None))
        except OSError:
            return False


def check_bind(host: str, keys_dir: Optional[Union[str, Path]], *, ipc: bool = False) -> None:
    """Raise :class:`SecurityError` when ``host`` is reachable from other machines and no keys are given."""
    if ipc or is_loopback(host):
        return
    if keys_dir is None:
        raise SecurityError(
            f"refusing to listen on {host}: a bridge runs arbitrary macros, so binding beyond loopback "
            "needs CurveZMQ authentication. Make keys with `fiji-bridge keys -o DIR` and start with "
            "`fiji-bridge serve --host ... --keys DIR` (clients connect with keys=DIR), or bind 127.0.0.1."
        )
    _server_files(Path(keys_dir))


def create_keys(out_dir: Union[str, Path]) -> dict[str, Path]:
    """Make a server and a client key pair in ``out_dir`` (mode 0700); returns the paths."""
    if not zmq.has("curve"):
        raise SecurityError("this libzmq has no CURVE support (rebuild pyzmq with libsodium)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for name in ("server", "client"):
        for suffix in (".key", ".key_secret"):
            p = out / f"{name}{suffix}"
            if p.exists():
                p.unlink()
    server_pub, server_sec = zmq.auth.create_certificates(str(out), "server")
    client_pub, client_sec = zmq.auth.create_certificates(str(out), "client")
    auth = out / "authorized"
    auth.mkdir(exist_ok=True)
    shutil.copy(client_pub, auth / "client.key")
    for p in (server_sec, client_sec):
        os.chmod(p, 0o600)
    return {
        "server_public": Path(server_pub),
        "server_secret": Path(server_sec),
        "client_public": Path(client_pub),
        "client_secret": Path(client_sec),
        "authorized": auth,
    }


def keys_command(out_dir: str) -> int:
    """``fiji-bridge keys``: make the key pairs and say how to use them."""
    try:
        paths = create_keys(out_dir)
    except (SecurityError, OSError) as e:
        print(f"error: {e}")
        return 1
    print(f"wrote CurveZMQ keys to {Path(out_dir).resolve()}")
    print(f"  bridge:  fiji-bridge serve --host 0.0.0.0 --keys {out_dir}")
    print(f"  clients: copy {paths['server_public'].name} and {paths['client_secret'].name} "
          f"into a folder and use BridgeClient.connect(..., keys=FOLDER)")
    return 0


def _server_files(d: Path) -> tuple[Path, Path]:
    sec, auth = d / "server.key_secret", d / "authorized"
    if not sec.is_file():
        raise SecurityError(f"no server key pair at {sec}: run `fiji-bridge keys -o {d}`")
    if not auth.is_dir() or not any(auth.glob("*.key")):
        raise SecurityError(f"no authorized client keys in {auth}: run `fiji-bridge keys -o {d}`")
    return sec, auth


class ServerAuth:
    """CURVE on the bridge's sockets, with a ZAP authenticator thread that
    admits only the client keys in ``DIR/authorized``."""

    def __init__(self, ctx: zmq.Context, keys_dir: Union[str, Path]) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        sec, auth_dir = _server_files(Path(keys_dir))
        self.public, self.secret = zmq.auth.load_certificate(str(sec))
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(auth_dir))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


def apply_client_keys(sock: zmq.Socket, keys_dir: Union[str, Path]) -> None:
    """Make ``sock`` a CURVE client with ``DIR/client.key_secret`` and ``DIR/server.key``."""
    d = Path(keys_dir)
    csec, spub = d / "client.key_secret", d / "server.key"
    for p in (csec, spub):
        if not p.is_file():
            raise SecurityError(f"missing {p}: a client needs client.key_secret and server.key from `fiji-bridge keys`")
    cpub, csecret = zmq.auth.load_certificate(str(csec))
    spublic, _ = zmq.auth.load_certificate(str(spub))
    sock.curve_secretkey = csecret
    sock.curve_publickey = cpub
    sock.curve_serverkey = spublic
