"""Finding Java and ImageJ, choosing the engine, the private Xvfb.

The JVM-free checks run in-process; the display check runs a real engine in
a subprocess (this process already holds its JVM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fiji_bridge.engine import EngineUnavailable, open_engine
from fiji_bridge.engine.java import find_ij_jar, find_java_home
from fiji_bridge.engine.params import apply_args, inject_dialog_options
from fiji_bridge.engine.xvfb import VirtualDisplay

ROOT = Path(__file__).resolve().parents[1]


def test_open_engine_picks_by_environment(monkeypatch):
    monkeypatch.delenv("FIJI_BRIDGE_IMAGEJ", raising=False)
    assert open_engine().name == "imagej1"
    monkeypatch.setenv("FIJI_BRIDGE_IMAGEJ", "/nonexistent/Fiji.app")
    assert open_engine().name == "pyimagej"
    with pytest.raises(ValueError, match="unknown engine kind"):
        open_engine("imagej3")


def test_ij_jar_lookup_order(tmp_path):
    jar = tmp_path / "my-ij.jar"
    jar.write_bytes(b"PK")
    assert find_ij_jar({"FIJI_BRIDGE_IJ_JAR": str(jar)}) == jar
    with pytest.raises(EngineUnavailable, match="FIJI_BRIDGE_IJ_JAR"):
        find_ij_jar({"FIJI_BRIDGE_IJ_JAR": str(tmp_path / "missing.jar")})
    fiji = tmp_path / "Fiji.app"
    (fiji / "jars").mkdir(parents=True)
    (fiji / "jars" / "ij-1.54f.jar").write_bytes(b"PK")
    assert find_ij_jar({"FIJI_BRIDGE_IMAGEJ": str(fiji)}) == fiji / "jars" / "ij-1.54f.jar"


def test_java_home_lookup(tmp_path):
    with pytest.raises(EngineUnavailable, match="no bin/java"):
        find_java_home({"JAVA_HOME": str(tmp_path)})
    with pytest.raises(EngineUnavailable, match="no Java found"):
        find_java_home({"PATH": str(tmp_path)})
    real = find_java_home({"PATH": os.environ.get("PATH", "")})
    assert (real / "bin" / "java").exists()


def test_script_parameter_rewrite_keeps_line_numbers():
    code = '#@ Double sigma (value=2)\n#@ ImagePlus imp\nprint(sigma);\nDialog.create("x");'
    out, arg = apply_args(code, {"sigma": 3})
    lines = out.splitlines()
    assert len(lines) == 4, "one line per header line: ImageJ's line numbers stay right"
    assert lines[0].split("//")[0].strip() in ("sigma = 3;", "sigma = 3.0;") and lines[1].lstrip().startswith("//")
    assert lines[2:] == ["print(sigma);", 'Dialog.create("x");']
    assert arg == ""
    injected = inject_dialog_options(out, 'a=1 b=[x "y"]')
    assert injected.splitlines()[3] == 'call("ij.Macro.setOptions", "a=1 b=[x \\"y\\"]"); Dialog.create("x");'


@pytest.mark.timeout(30)
def test_virtual_display_starts_and_is_reaped():
    d = VirtualDisplay()
    display = d.start()
    pid = d.pid
    assert display.startswith(":") and d.running
    d.stop()
    assert not d.running
    assert not Path(f"/proc/{pid}").exists() or "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.imagej
@pytest.mark.timeout(120)
def test_display_engine_shows_windows_on_private_xvfb_and_leaves_no_xvfb():
    script = textwrap.dedent(
        """
        import json, os, numpy as np
        os.environ.pop("DISPLAY", None)
        from fiji_bridge.engine import open_engine
        ij = open_engine("imagej1", display=True).start()
        ij.show_stack("w", np.zeros((1, 2, 2, 16, 16), np.uint16))
        imp = ij._display.stacks["w"]
        win = imp.getWindow()
        out = {"pid": ij._xvfb.pid, "display": os.environ["DISPLAY"],
               "window": str(win.getClass().getName()) if win is not None else None,
               "showing": bool(win.isShowing()) if win is not None else False,
               "macro": ij.run_macro('print("ok");').log.strip()}
        ij.close()
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["window"] == "ij.gui.StackWindow" and out["showing"]
    assert out["macro"] == "ok"
    status = Path(f"/proc/{out['pid']}/status")
    assert not status.exists(), "Xvfb survived its engine's process"
