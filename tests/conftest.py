"""Shared fixtures. Test modules own their own fixtures; add here only what
several modules need, and only by appending."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every test bridge with a live display warms 64 MiB, not the default 1 GiB
# (seconds and GBs per bridge start); tests/test_stack_memory.py checks the warm path
os.environ.setdefault("FIJI_BRIDGE_WARM", "64m")
#: real microscopy images (see ../shared/data/README.md); never copied into the repo
DATA_DIR = Path(os.environ.get("FIJI_BRIDGE_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real test images not found at {DATA_DIR} (set FIJI_BRIDGE_TEST_DATA)")
    return DATA_DIR


from fiji_bridge.client import free_port_pair  # noqa: E402,F401  (tests import it from here)


@pytest.fixture
def free_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="session")
def ij():
    """One ImageJ 1 engine in the test process (a process holds one JVM)."""
    from fiji_bridge.engine import open_engine

    try:
        eng = open_engine("imagej1")
        eng.start()
    except Exception as e:  # pragma: no cover - the reason is in the skip
        pytest.skip(f"ImageJ 1 engine unavailable: {e}")
    yield eng
    eng.close()


# --------------------------------------------------------------------------- bridge processes
# (used by test_server*, test_client*, test_supervisor, test_security)

import contextlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402


@dataclass
class BridgeProcess:
    port: int
    proc: subprocess.Popen
    log: Path

    def client(self, **kw):
        from fiji_bridge.client import BridgeClient

        return BridgeClient.connect(self.port, **kw)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def bridge_process(tmp_dir: Path, *args: str, port: int = 0, env: dict | None = None, wait_engine: bool = True, timeout: float = 120.0):
    """Run ``fiji-bridge serve`` as a subprocess; always terminated on exit
    (shutdown request, then SIGTERM, then SIGKILL of its process group)."""
    from fiji_bridge.client import BridgeClient, BridgeError

    port = port or free_port_pair()
    log = Path(tmp_dir) / f"bridge-{port}.log"
    cmd = [sys.executable, "-m", "fiji_bridge.cli", "serve", "--port", str(port), *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})
    bp = BridgeProcess(port, proc, log)
    try:
        deadline = time.monotonic() + timeout
        with BridgeClient(port, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"bridge exited with {proc.returncode}:\n{bp.log_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bridge not ready in {timeout} s:\n{bp.log_text()}")
                try:
                    st = c.status() if wait_engine else c.ping(timeout=0.5)
                except BridgeError:
                    time.sleep(0.2)
                    continue
                if not wait_engine or st["engine"]["state"] == "ready":
                    break
                if st["engine"]["state"].startswith("failed"):
                    raise RuntimeError(f"engine failed: {st['engine']}\n{bp.log_text()}")
                time.sleep(0.2)
        yield bp
    finally:
        if proc.poll() is None:
            try:
                with BridgeClient(port, timeout=3) as c:
                    c.shutdown()
                proc.wait(15)
            except Exception:
                pass
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def shm_segments(prefix: str = "fjb") -> list[str]:
    try:
        return sorted(e for e in os.listdir("/dev/shm") if e.startswith(prefix))
    except OSError:
        return []


# --------------------------------------------------------------------------- Fiji
# (used by test_engine_contract, test_engine_fiji, test_batch)

#: a real, stock Fiji.app (see ../shared/fiji/README.md); never copied into the repo
FIJI_DIR = Path(os.environ.get("FIJI_BRIDGE_TEST_FIJI", ROOT.parent / "shared" / "fiji" / "Fiji.app"))
#: the imglib2-imglyb jars PyImageJ needs offline (a stock Fiji lacks them)
FIJI_EXTRA_JARS = FIJI_DIR.parent / "extra"


@pytest.fixture(scope="session")
def fiji_dir() -> Path:
    if not (FIJI_DIR / "jars").is_dir():
        pytest.skip(f"no Fiji at {FIJI_DIR} (set FIJI_BRIDGE_TEST_FIJI to a Fiji.app)")
    return FIJI_DIR


@pytest.fixture(scope="session")
def fiji_engine(fiji_dir):
    """One Fiji engine (direct gateway start, non-headless on a private Xvfb)
    in a child process, shared by the whole session."""
    from fiji_bridge.engine.remote import RemoteEngine

    eng = RemoteEngine("pyimagej", endpoint=str(fiji_dir), start="gateway")
    eng.start()
    yield eng
    eng.close()


@pytest.fixture(scope="session", params=["imagej1", "fiji"])
def engine(request):
    """The engine contract's subject: ImageJ 1 (in-process) and Fiji (child process)."""
    return request.getfixturevalue("ij" if request.param == "imagej1" else "fiji_engine")


def pytest_sessionfinish(session, exitstatus):
    session.config._fiji_bridge_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without shutting the in-process JVM down (the ``ij`` fixture's):
    JPype's shutdown of a JVM that ran AWT can crash the interpreter's exit
    now and then (SIGSEGV after every test passed), which would turn a green
    run red. Every report is written by now; the exit status is pytest's."""
    import sys

    jpype = sys.modules.get("jpype")
    status = getattr(config, "_fiji_bridge_status", None)
    if status is not None and jpype is not None and jpype.isJVMStarted():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
