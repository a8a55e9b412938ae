"""The lifecycle of a bridge process a client starts: spawn, wait, own, stop.

:class:`SpawnedBridge` runs ``fiji-bridge serve`` detached (its own session,
output appended to a log file under :func:`default_log_dir`), waits until it
answers, and stops it when its owner asks. A bridge spawned *owned* is told
its owner's pid (``--parent-pid``): it shuts itself down (engine worker and
private display too) when the owner dies, however it dies, so an owner that
is killed leaves nothing behind. An unowned bridge outlives its spawner on
purpose (the next run reuses its warm JVM).

Also here: :func:`free_port_pair` (ports for a bridge of one's own) and the
port probe used to tell "no bridge" from "something else holds the port".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

from .protocol import DATA_PORT_OFFSET

__all__ = ["SpawnedBridge", "SpawnFailed", "default_log_dir", "free_port_pair", "port_open"]


class SpawnFailed(RuntimeError):
    """The spawned bridge exited while starting, or did not answer in time (``timed_out``)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def default_log_dir() -> Path:
    """Where spawned bridges write their logs: ``$FIJI_BRIDGE_LOG_DIR`` or ``~/.cache/fiji-bridge/logs``."""
    return Path(os.environ.get("FIJI_BRIDGE_LOG_DIR", Path.home() / ".cache" / "fiji-bridge" / "logs"))


class SpawnedBridge:
    """A ``fiji-bridge serve`` child process (see the module doc)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, owned: bool) -> None:
        self.proc = proc
        self.log_path = log_path
        self.owned = owned

    @classmethod
    def start(
        cls,
        port: int,
        host: str = "127.0.0.1",
        *,
        ipc: bool = False,
        engine: str = "auto",
        display: Optional[bool] = None,
        keys: Optional[Union[str, Path]] = None,
        log_dir: Optional[Union[str, Path]] = None,
        owned: bool = False,
    ) -> "SpawnedBridge":
        d = Path(log_dir) if log_dir is not None else default_log_dir()
        d.mkdir(parents=True, exist_ok=True)
        log_path = d / f"bridge-{port}.log"
        cmd = [sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), "--host", host, "--engine", engine]
        if display is not None:
            cmd.append("--display" if display else "--no-display")
        if ipc:
            cmd.append("--ipc")
        if keys is not None:
            cmd += ["--keys", str(keys)]
        if owned:
            cmd += ["--parent-pid", str(os.getpid())]
        with open(log_path, "ab") as logf:
            logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        return cls(proc, log_path, owned)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, ping: Callable[[], object], timeout: float, retry: tuple[type[BaseException], ...]) -> None:
        """Call ``ping`` until it returns (raising ``retry`` means "not yet");
        :class:`SpawnFailed` when the process exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise SpawnFailed(f"the bridge exited with code {code} while starting; see {self.log_path}:\n{log_tail(self.log_path)}")
            try:
                ping()
                return
            except retry:
                continue
        raise SpawnFailed(f"the spawned bridge (pid {self.pid}) did not answer within {timeout:.0f} s; see {self.log_path}", timed_out=True)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait up to ``timeout`` s for the process to end; its exit code, or None."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P (control) and P + DATA_PORT_OFFSET (data) are both free on
    ``host`` right now: for starting a bridge of your own."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p + DATA_PORT_OFFSET >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind((host, p + DATA_PORT_OFFSET))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no free pair of ports P, P+{DATA_PORT_OFFSET} on {host}")


def port_open(host: str, port: int) -> bool:
    """Whether something accepts tcp connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Optional[Path], n: int = 1500) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""
