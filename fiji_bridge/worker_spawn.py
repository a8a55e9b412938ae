"""Starting an engine worker process: its command line, endpoint, log and heartbeat file.

This module needs the standard library alone, so a batch
(``fiji-bridge batch``) can start its workers before its own imports
(numpy, zmq, the plate stores: about 0.3 s before the first JVM could
start otherwise). The :class:`~fiji_bridge.supervisor.EngineSupervisor`
then takes each one over (:meth:`~fiji_bridge.supervisor.EngineSupervisor.adopt`):
it binds the ipc socket the worker connects to (ZeroMQ lets a peer connect
before the other end binds: the worker's connection goes through once the
socket is there) and supervises it like a worker it started itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["SpawnedWorker", "spawn_worker", "worker_endpoint", "worker_log"]


@dataclass(frozen=True)
class SpawnedWorker:
    """A worker process that was started and is not supervised yet."""

    proc: subprocess.Popen
    endpoint: str
    heartbeat_path: Path
    #: the supervisor's count of workers started in ``runtime_dir`` (1 for the first)
    generation: int


def worker_endpoint(runtime_dir: Path, generation: int) -> str:
    """The ipc endpoint of the ``generation``-th worker of ``runtime_dir``."""
    return f"ipc://{runtime_dir}/worker-{generation}.sock"


def worker_log(runtime_dir: Path) -> Path:
    """The log every worker of ``runtime_dir`` appends its output to."""
    return Path(runtime_dir) / "engine-worker.log"


def spawn_worker(runtime_dir: Path, generation: int, *, engine: str = "auto", display: bool = False,
                 env: Optional[dict[str, str]] = None) -> SpawnedWorker:
    """Start ``python -m fiji_bridge.engine_worker`` for ``runtime_dir``;
    its output goes to :func:`worker_log`. Returns at once: the worker's
    imports and JVM start while the caller goes on."""
    runtime_dir = Path(runtime_dir)
    endpoint = worker_endpoint(runtime_dir, generation)
    heartbeat = runtime_dir / f"heartbeat-{generation}"
    heartbeat.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "fiji_bridge.engine_worker",
        "--endpoint", endpoint,
        "--engine", engine,
        "--parent", str(os.getpid()),
        "--heartbeat", str(heartbeat),
    ]
    if display:
        cmd.append("--display")
    with open(worker_log(runtime_dir), "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, close_fds=True,
                                env=env)
    return SpawnedWorker(proc, endpoint, heartbeat, generation)
