"""The PyImageJ engine: runs only where a Fiji exists (FIJI_BRIDGE_IMAGEJ names a
Fiji.app directory or a Maven endpoint), in a subprocess (this process's JVM
is ImageJ 1's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fiji_bridge.engine import EngineUnavailable
from fiji_bridge.engine.pyimagej import PyImageJEngine

ROOT = Path(__file__).resolve().parents[1]
FIJI = os.environ.get("FIJI_BRIDGE_IMAGEJ")


def test_missing_fiji_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FIJI_BRIDGE_IMAGEJ", raising=False)
    with pytest.raises(EngineUnavailable, match="FIJI_BRIDGE_IMAGEJ"):
        PyImageJEngine().start()
    with pytest.raises(EngineUnavailable, match="not a directory"):
        PyImageJEngine(endpoint=str(tmp_path / "NoFiji.app")).start()


def arr_first_plane_mean() -> float:
    return float(sum(range(64)) / 64)  # plane (t=0, z=0, c=0) of the arange stack


@pytest.mark.fiji
@pytest.mark.timeout(600)
@pytest.mark.skipif(not FIJI, reason="no Fiji here: set FIJI_BRIDGE_IMAGEJ to a Fiji.app directory or Maven endpoint")
def test_pyimagej_runs_a_macro_on_a_hyperstack_and_reports_errors():
    script = textwrap.dedent(
        """
        import json, numpy as np
        from fiji_bridge.engine import open_engine, MacroError
        arr = np.arange(2 * 3 * 4 * 8 * 8, dtype=np.uint16).reshape(4, 3, 2, 8, 8)
        with open_engine("pyimagej") as ij:
            r = ij.run_macro('Stack.getDimensions(w,h,c,z,t); print(c+" "+z+" "+t); run("Measure");',
                             image=arr, title="hs")
            try:
                ij.run_macro('run("No Such Command");')
                err = None
            except MacroError as e:
                err = e.kind
            print(json.dumps({"log": r.log.strip(), "same": bool((r.images["hs"] == arr).all()),
                              "mean": float(r.results["Mean"][0]), "err": err}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["log"] == "2 3 4" and out["same"]
    assert out["mean"] == pytest.approx(arr_first_plane_mean())
    assert out["err"] == "command"
