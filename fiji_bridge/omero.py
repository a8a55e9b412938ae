"""Find, or start, the OMERO server fiji-bridge talks to.

``InstanceManager(...).ensure()`` = check -> connect -> start -> wait:

* :meth:`InstanceManager.check` — is an OMERO answering at host:port? A TCP
  connect, then a BlitzGateway login attempt: a login, or a login refused
  for its credentials, proves it; ``connect()`` returning False for any
  other reason (``getLastError()``: a server still starting, a non-OMERO
  listener, DNS) does not;
* :meth:`InstanceManager.connect` — an :class:`~fiji_bridge.backends.omero.OmeroBackend`;
* :meth:`InstanceManager.start` — ``docker compose -f omero/docker-compose.yml up -d``
  (OMERO.server, OMERO.web, PostgreSQL; passwords from the environment);
* :meth:`InstanceManager.wait` — until the server answers, or a timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from .backends.base import StoreUnavailable

__all__ = ["InstanceError", "InstanceManager"]

log = logging.getLogger(__name__)

DEFAULT_COMPOSE = Path(__file__).resolve().parents[1] / "omero" / "docker-compose.yml"


class InstanceError(StoreUnavailable):
    """No OMERO answers and none could be started; the message says why."""


class InstanceManager:
    """Check for, connect to, or start a local OMERO (see the module doc)."""

    def __init__(
        self,
        compose_file: os.PathLike | str = "omero/docker-compose.yml",
        host: str = "localhost",
        port: int = 4064,
        timeout: float = 600.0,
        *,
        user: Optional[str] = None,
        password: Optional[str] = None,
        gateway: Any = None,
    ) -> None:
        path = Path(compose_file)
        if not path.is_absolute() and not path.exists():
            path = DEFAULT_COMPOSE.parents[1] / path  # relative to the repository
        self.compose_file = path
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.user = user or os.environ.get("OMERO_USER") or "root"
        self._password = password
        self.gateway = gateway

    def __repr__(self) -> str:
        return f"InstanceManager({self.host}:{self.port}, compose_file={str(self.compose_file)!r})"

    def _password_value(self) -> Optional[str]:
        return self._password or os.environ.get("OMERO_PASSWORD") or os.environ.get("OMERO_ROOT_PASSWORD")

    # -- check / connect ------------------------------------------------------------

    def port_open(self, timeout: float = 2.0) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def check(self, timeout: float = 2.0) -> bool:
        """True when an OMERO server answers at host:port and can create
        sessions: a login succeeds, or is refused for the credentials
        (``Glacier2.PermissionDeniedException``). ``connect()`` returns False
        for much else (a non-OMERO listener, a server still starting, DNS or
        timeout errors: omero-py ``BlitzGateway.connect``), so False alone
        proves nothing: ``getLastError()`` decides."""
        if not self.port_open(timeout):
            return False
        try:
            from .backends.omero import _default_gateway

            factory = self.gateway or _default_gateway()
        except Exception as e:  # no omero-py: the open port is all we can tell
            log.info("omero-py unavailable (%s); %s:%s accepts connections", e, self.host, self.port)
            return True
        gw = factory(self.user, self._password_value() or "", host=self.host, port=self.port)
        try:
            if gw.connect():
                return True
            err = gw.getLastError()
            try:
                import Glacier2

                denied = isinstance(err, Glacier2.PermissionDeniedException)
            except ImportError:  # pragma: no cover - comes with zeroc-ice
                denied = False
            if not denied:
                log.info("%s:%s answers TCP but OMERO cannot log in yet (%s)", self.host, self.port,
                         type(err).__name__ if err is not None else "no error")
            return denied
        except Exception as e:  # Ice errors: something listens, but it is not (yet) OMERO
            log.info("%s:%s answers TCP but not OMERO yet (%s)", self.host, self.port, type(e).__name__)
            return False
        finally:
            try:
                gw.close()
            except Exception:
                pass

    def connect(self, **kwargs: Any) -> Any:
        """An OmeroBackend for this server (credentials from the environment)."""
        from .backends.omero import OmeroBackend

        kwargs.setdefault("gateway", self.gateway)
        return OmeroBackend(host=self.host, port=self.port, user=self.user, password=self._password, **kwargs)

    # -- start / wait -------------------------------------------------------------------

    def start(self) -> None:
        """``docker compose -f <compose_file> up -d``."""
        docker = shutil.which("docker")
        if docker is None:
            raise InstanceError(
                f"no OMERO answers at {self.host}:{self.port} and docker is not installed, so it cannot be "
                f"started from {self.compose_file}: install Docker (with the compose plugin) or point "
                "OMERO_HOST/OMERO_PORT at a running server")
        if not self.compose_file.is_file():
            raise InstanceError(f"compose file {self.compose_file} not found")
        missing = [v for v in ("OMERO_ROOT_PASSWORD", "OMERO_DB_PASSWORD") if not os.environ.get(v)]
        if missing:
            raise InstanceError(f"set {' and '.join(missing)} before starting OMERO (no default passwords)")
        cmd = [docker, "compose", "-f", str(self.compose_file), "up", "-d"]
        log.info("starting OMERO: %s", " ".join(cmd))
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise InstanceError(f"`{' '.join(cmd)}` did not finish within {self.timeout:.0f} s") from None
        if r.returncode != 0:
            raise InstanceError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-2000:]}")

    def wait(self, timeout: Optional[float] = None, interval: float = 2.0) -> None:
        """Until the server answers; :class:`InstanceError` after ``timeout`` s."""
        limit = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        while True:
            if self.check(timeout=min(2.0, max(0.1, limit))):
                return
            if time.monotonic() >= deadline:
                raise InstanceError(f"OMERO did not answer at {self.host}:{self.port} within {limit:.0f} s")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def ensure(self, **kwargs: Any) -> Any:
        """check -> connect, else start -> wait -> connect."""
        if not self.check():
            self.start()
            self.wait()
        return self.connect(**kwargs)
