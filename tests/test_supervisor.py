"""Supervision of the engine worker: hung macros, a JVM that exits, a killed bridge."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import bridge_process, shm_segments
from fiji_bridge.engine.base import MacroError, MacroTimeout

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    with bridge_process(tmp_path_factory.mktemp("sup"), "--no-display") as bp:
        yield bp


@pytest.fixture(scope="module")
def truth(bridge):
    arr = np.random.default_rng(5).integers(0, 4000, (2, 1, 2, 32, 32), dtype=np.uint16)
    with bridge.client() as c:
        c.send_stack(arr, "survivor")
    return arr


def _works_and_stack_intact(bridge, truth):
    with bridge.client() as c:
        res = c.run_macro('getStatistics(a, mean); print("mean " + mean);', stack="survivor", timeout=120)
        np.testing.assert_array_equal(c.get_stack("survivor"), truth)
        return c.status(), res


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_hung_macro_times_out_and_the_next_request_works(bridge, truth):
    with bridge.client() as c:
        before = c.status()["engine"]
        t0 = time.monotonic()
        with pytest.raises(MacroTimeout) as ei:
            c.run_macro("while (true) { x = 1; }", stack="survivor", timeout=2)
        assert time.monotonic() - t0 < 60
        assert "timeout" in str(ei.value).lower() or ei.value.kind == "timeout"
    st, res = _works_and_stack_intact(bridge, truth)
    assert "mean " in res.log
    assert st["engine"]["state"] == "ready"
    assert st["engine"]["restarts"] == before["restarts"] + 1
    assert not _pid_alive(before["pid"]) or before["pid"] == st["engine"]["pid"] is None


def test_system_exit_macro_is_an_engine_error_and_the_bridge_goes_on(bridge, truth):
    with bridge.client() as c:
        before = c.status()["engine"]
        with pytest.raises(MacroError) as ei:
            c.run_macro('call("java.lang.System.exit", "0");', timeout=30)
        assert ei.value.kind == "engine"
        assert "died" in ei.value.message or "exit" in ei.value.message
    st, res = _works_and_stack_intact(bridge, truth)
    assert st["engine"]["restarts"] == before["restarts"] + 1
    assert st["engine"]["pid"] != before["pid"]


def test_requests_queued_behind_a_dying_macro_still_run(bridge, truth):
    out = {}

    def run(name, code):
        try:
            with bridge.client() as c:
                out[name] = c.run_macro(code, timeout=60)
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            out[name] = e

    first = threading.Thread(target=run, args=("first", 'wait(500); call("java.lang.System.exit", "1");'))
    second = threading.Thread(target=run, args=("second", 'print("second");'))
    first.start()
    time.sleep(0.2)
    second.start()  # queued behind the macro that kills the JVM
    first.join(90)
    second.join(90)
    assert isinstance(out["first"], MacroError) and out["first"].kind == "engine"
    assert "second" in out["second"].log


@pytest.mark.timeout(120)
def test_killed_bridge_leaves_no_worker_and_no_shared_memory(tmp_path):
    with bridge_process(tmp_path, "--no-display") as bp:
        with bp.client() as c:
            c.send_stack(np.ones((3, 1, 1, 256, 256), np.uint16), "k")
            worker = c.status()["engine"]["pid"]
            # a macro in flight: the bridge holds a segment for it
            th = threading.Thread(target=lambda: pytest.raises(Exception, c.run_macro, "wait(5000);", stack="k", timeout=30), daemon=True)
            th.start()
            deadline = time.monotonic() + 10
            while not shm_segments(f"fjbs_{bp.proc.pid}_") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert shm_segments(f"fjbs_{bp.proc.pid}_")
            os.kill(bp.proc.pid, signal.SIGKILL)
            bp.proc.wait(10)
            deadline = time.monotonic() + 15
            while (_pid_alive(worker) or shm_segments(f"fjbs_{bp.proc.pid}_")) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _pid_alive(worker), "the engine worker outlived its bridge"
            assert shm_segments(f"fjbs_{bp.proc.pid}_") == [] and shm_segments(f"fjbw_{bp.proc.pid}_") == []


@pytest.mark.timeout(60)
def test_a_new_bridge_reaps_the_runtime_folder_of_a_killed_one(tmp_path):
    import glob
    import tempfile

    with bridge_process(tmp_path, "--no-display") as bp:
        with bp.client() as c:
            c.ping()
        pid = bp.proc.pid
        mine = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "fiji-bridge-*-*"))
                if os.path.exists(os.path.join(d, "owner.pid"))
                and open(os.path.join(d, "owner.pid")).read() == str(pid)]
        assert len(mine) == 1, "the bridge records its pid in its runtime folder"
        os.kill(pid, signal.SIGKILL)
        bp.proc.wait(10)
        assert os.path.isdir(mine[0]), "a SIGKILLed bridge cannot clean up after itself"
    # the next bridge to start reaps it, and leaves live bridges' folders alone
    (tmp_path / "second").mkdir()
    with bridge_process(tmp_path / "second", "--no-display") as bp2:
        with bp2.client() as c:
            c.ping()
        assert not os.path.exists(mine[0])
        live = os.path.join(tempfile.gettempdir())
        assert any(open(os.path.join(d, "owner.pid")).read() == str(bp2.proc.pid)
                   for d in glob.glob(os.path.join(live, "fiji-bridge-*-*"))
                   if os.path.exists(os.path.join(d, "owner.pid")))
