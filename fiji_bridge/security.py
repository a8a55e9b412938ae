"""Who may talk to a bridge: a per-user secret on this host, CurveZMQ keys beyond it.

A macro is arbitrary code run as the bridge's user, so every peer of both
channels (control and data) must prove it may do that:

* **On this host** (127.0.0.1 / ::1 / ipc, the default) a per-user secret:
  32 random bytes (hex) in :func:`secret_path` (``$FIJI_BRIDGE_SECRET_FILE``,
  else ``~/.cache/fiji-bridge/secret`` of the account), a 0600 file in a
  folder only this user can write to, created on first use by whichever
  side comes first (bridge or client; atomically, so two never disagree).
  The secret itself never travels: both sides derive CurveZMQ key pairs
  from it (:func:`secret_keys`, BLAKE2b with a per-role personalisation),
  the bridge is a CURVE server with the derived server key and its ZAP
  handler admits only the derived client key (compared in constant time).
  So the handshake authenticates both ends: a peer without the secret (another
  local account, a program that does not know the file) fails it and not
  one of its messages reaches the bridge; and a client that meets a
  *stranger's* server on the port (someone squatting it) fails it too,
  without giving anything away. :class:`~fiji_bridge.client.BridgeClient`
  turns a failed handshake into a ``BridgeError`` with code
  ``unauthorized``.
* **Beyond this host** CurveZMQ with key files (below), which replace the
  secret. ``fiji-bridge keys -o DIR`` makes::

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

import hashlib
import hmac
import ipaddress
import os
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import zmq
import zmq.auth

__all__ = [
    "SecurityError",
    "is_loopback",
    "check_bind",
    "create_keys",
    "keys_command",
    "ServerAuth",
    "apply_client_keys",
    "apply_client_secret",
    "secret_path",
    "ensure_secret",
    "secret_keys",
    "HANDSHAKE_FAILED",
    "SaveRoots",
]


#: socket-monitor events of a failed handshake: no secret, other keys, not a bridge of ours
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class SecurityError(RuntimeError):
    """Refusing an unsafe configuration (non-loopback bind without keys, missing
    key files, a secret file others could read or write)."""


# --------------------------------------------------------------------------- the per-user secret


def _home() -> Path:
    try:
        import pwd

        return Path(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError):
        return Path.home()


def secret_path() -> Path:
    """The per-user secret file: ``$FIJI_BRIDGE_SECRET_FILE``, else
    ``<home>/.cache/fiji-bridge/secret`` with the home directory of the
    account (from the password database, not ``$HOME``: a bridge started
    with another ``HOME`` or ``XDG_*`` must still find the same secret)."""
    env = os.environ.get("FIJI_BRIDGE_SECRET_FILE")
    if env:
        return Path(env).expanduser()
    return _home() / ".cache" / "fiji-bridge" / "secret"


def _check_private(st: os.stat_result, path: Path, what: str, mask: int = 0o077) -> None:
    if st.st_uid != os.geteuid():
        raise SecurityError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): remove it or set FIJI_BRIDGE_SECRET_FILE")
    if st.st_mode & mask:
        raise SecurityError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):o}: others could read or change it; `chmod go-rwx {path}` (and restart the bridges of this user)")


def _read_secret(path: Path) -> Optional[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SecurityError(f"cannot read the bridge secret {path}: {e} (it must be a regular file, not a link)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"the bridge secret {path} is not a regular file")
        _check_private(st, path, "the bridge secret")
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(text) < 32:
        raise SecurityError(f"the bridge secret {path} is empty or too short; delete it (a new one is made on the next start) and restart the bridges of this user")
    return text


def ensure_secret(path: Optional[Union[str, Path]] = None) -> str:
    """This user's secret, created (0600; a new folder 0700) if there is none yet.

    Creation is atomic (written to a private temporary file, then
    hard-linked into place, which fails if another process won the race),
    so a bridge and a client starting together always agree. Raises
    :class:`SecurityError` when the file or its folder is not private to
    this user."""
    p = Path(path) if path is not None else secret_path()
    found = _read_secret(p)
    if found is not None:
        return found
    try:
        return _create_secret(p)
    except OSError as e:
        raise SecurityError(f"cannot create the bridge secret {p}: {e}; set FIJI_BRIDGE_SECRET_FILE to a file in a private, writable folder") from None


def _create_secret(p: Path) -> str:
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # others may list the folder, never write to it (they could swap the file)
    # (a sticky folder such as /tmp is fine: others cannot rename or remove our file)
    dst = os.stat(p.parent)
    _check_private(dst, p.parent, "the folder of the bridge secret", mask=0 if dst.st_mode & stat.S_ISVTX else 0o022)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, p)
    except FileExistsError:
        pass  # another process made it first: use theirs
    except OSError:  # no hard links here (some network file systems): a rename, unless one exists
        if not p.exists():
            os.replace(tmp, p)
    finally:
        if tmp.exists():
            os.unlink(tmp)
    found = _read_secret(p)
    if found is None:
        raise SecurityError(f"the bridge secret {p} vanished while it was being created")
    return found


def secret_keys(secret: str, role: str) -> tuple[bytes, bytes]:
    """The CurveZMQ key pair (public, secret; Z85) that ``role`` ("server" or
    "client") derives from the per-user ``secret``."""
    from zmq.utils import z85

    raw = hashlib.blake2b(secret.encode(), digest_size=32, person=f"fjb-curve-{role}".encode()[:16]).digest()
    sec = z85.encode(raw)
    return zmq.curve_public(sec), sec


def apply_client_secret(sock: zmq.Socket, secret: str) -> None:
    """Make ``sock`` a CURVE client with the keys derived from ``secret``
    (it will talk only to a bridge that derived its keys from the same one)."""
    server_public, _ = secret_keys(secret, "server")
    public, sec = secret_keys(secret, "client")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = sec


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


class _DerivedClient:
    """ZAP credentials provider: admits the one client key derived from the secret."""

    def __init__(self, owner: "ServerAuth", client_public: bytes) -> None:
        self.owner = owner
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self.client_public)
        if not ok:
            self.owner.refused += 1
        return ok


class ServerAuth:
    """CURVE on the bridge's sockets, with a ZAP authenticator thread that
    admits only the client keys in ``DIR/authorized`` (``keys_dir``), or else
    only the client key derived from this user's ``secret``.

    ``refused`` counts the handshakes turned away (see also the bridge's
    handshake monitor)."""

    def __init__(self, ctx: zmq.Context, keys_dir: Optional[Union[str, Path]] = None, secret: Optional[str] = None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.mode = "curve" if keys_dir is not None else "secret"
        self.refused = 0
        if keys_dir is not None:
            sec, auth_dir = _server_files(Path(keys_dir))
            self.public, self.secret = zmq.auth.load_certificate(str(sec))
        elif secret:
            self.public, self.secret = secret_keys(secret, "server")
        else:
            raise SecurityError("a bridge needs either CurveZMQ keys or the per-user secret")
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        if keys_dir is not None:
            self.auth.configure_curve(domain="*", location=str(auth_dir))
        else:
            self.auth.configure_curve_callback(domain="*", credentials_provider=_DerivedClient(self, secret_keys(secret, "client")[0]))

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


# --------------------------------------------------------------------------- where save_to may write


class SaveRoots:
    """The places a peer's ``save_to`` may name (``serve --allow-save-to``).

    ``roots``: folders (a plate may be written anywhere below one, through
    no hidden folder: ``~/.ssh``, ``~/.config`` are never plates) and
    ``omero://host`` entries (OMERO servers the bridge may push to, with the
    credentials of its own environment: never to a host a peer makes up).
    Default: the user's home and the system temporary folder, and the OMERO
    server of the bridge's own ``OMERO_HOST`` if set. Paths are compared
    after resolving links."""

    def __init__(self, roots: Optional[Sequence[str]] = None) -> None:
        entries = list(roots) if roots else [str(_home()), tempfile.gettempdir()]
        if not roots and os.environ.get("OMERO_HOST"):
            entries.append(f"omero://{os.environ['OMERO_HOST']}")
        self.folders: list[Path] = []
        self.omero_hosts: set[str] = set()
        for r in entries:
            r = str(r).strip()
            if r.lower().startswith("omero://"):
                self.omero_hosts.add(r[len("omero://"):].split("/")[0].split("@")[-1].split(":")[0].lower())
            else:
                self.folders.append(Path(os.path.realpath(Path(r).expanduser())))

    def describe(self) -> str:
        parts = [str(f) for f in self.folders] + [f"omero://{h}" for h in sorted(self.omero_hosts)]
        return ", ".join(parts) or "nowhere"

    def check(self, uri: str) -> None:
        """Raise :class:`SecurityError` unless ``uri`` lies inside an allowed root."""
        from .backends.uri import PlateURI, URIError

        try:
            parsed = PlateURI.parse(uri)
        except URIError as e:
            raise SecurityError(str(e)) from None
        hint = f"this bridge writes only to {self.describe()} (start it with --allow-save-to DIR|omero://HOST to allow more)"
        if parsed.scheme == "omero":
            if parsed.host.lower() not in self.omero_hosts:
                raise SecurityError(f"save_to {uri!r}: OMERO server {parsed.host!r} is not allowed; {hint}")
            return
        raw = uri.split("://", 1)[1] if "://" in uri else uri
        target = Path(os.path.realpath(Path(raw).expanduser().absolute()))
        for candidate in (target, target.parent):
            if not any(self._inside(candidate, root) for root in self.folders):
                raise SecurityError(f"save_to {uri!r} (resolved: {candidate}) is outside the allowed folders; {hint}")

    @staticmethod
    def _inside(path: Path, root: Path) -> bool:
        try:
            rel = path.relative_to(root)
        except ValueError:
            return False
        return not any(part.startswith(".") for part in rel.parts)
