"""Macro outputs back to a plate store: save_result on a real ImageJ result,
and `run_macro(..., save_to=URI)` through a real bridge."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from fiji_bridge.backends import open_plate
from fiji_bridge.macros import resolve
from fiji_bridge.outputs import OutputError, save_result
from fiji_bridge.synthetic import make_field

pytestmark = pytest.mark.imagej


def rows(backend, path):
    return list(csv.DictReader(io.StringIO(backend.load(path))))


def test_save_result_writes_images_and_tables_at_the_field(ij, tmp_path):
    f = make_field(6, size=128, size_z=3, seed=4)
    r = ij.run_macro(resolve("nuclei_count").bind({}), image=f.array, dims="TZCYX", title="src_B03_s002")
    uri = f"zarr://{tmp_path}/derived.zarr"
    paths = save_result(r, uri, well="b3", site=2, source={"plate": "src"})
    backend, pid = open_plate(uri)
    # the mask is the field B03/2 of the derived plate, pixel for pixel
    np.testing.assert_array_equal(backend.load_field(pid, "B03", 2), r.images["mask"])
    assert "/zarr/plate_derived/B03/B03_s002_z000_c000_t000.tif" in paths
    # tables beside it, plate/well/field first, one row per nucleus
    res = rows(backend, "/zarr/plate_derived/B03/results_s002.csv")
    assert list(res[0])[:3] == ["plate", "well", "field"]
    assert {(x["plate"], x["well"], x["field"]) for x in res} == {("src", "B03", "2")}
    assert len(res) == f.n_nuclei == int(float(rows(backend, "/zarr/plate_derived/B03/counts_s002.csv")[0]["Count"]))
    np.testing.assert_allclose([float(x["Area"]) for x in res], r.tables["Results"]["Area"])


def test_save_result_second_image_goes_to_a_sibling_plate(ij, tmp_path):
    a = (np.arange(2 * 32 * 32) % 251).astype(np.uint8).reshape(2, 32, 32)
    r = ij.run_macro('rename("first"); run("Duplicate...", "title=second duplicate"); run("Invert", "stack");',
                     image=a, dims="CYX")
    uri = f"zarr://{tmp_path}/two.zarr"
    save_result(r, uri, well="A01", site=0)
    b, pid = open_plate(uri)
    np.testing.assert_array_equal(b.load_field(pid, "A01", 0), r.images["first"])
    np.testing.assert_array_equal(b.load_field(f"{pid}_second", "A01", 0), 255 - a[None, None])


def test_save_result_needs_a_well_and_a_plate(ij, tmp_path):
    r = ij.run_macro('newImage("x", "8-bit black", 8, 8, 1);')
    with pytest.raises(OutputError, match="no well"):
        save_result(r, f"zarr://{tmp_path}/p.zarr", well="", site=0)
    with pytest.raises(OutputError, match="names a store"):
        save_result(r, f"zarr://{tmp_path}/", well="A01", site=0)


@pytest.mark.timeout(180)
def test_run_macro_save_to_from_the_bridge(tmp_path, free_port):
    """A stack streamed with plate/well/site components: the bridge itself
    writes the macro's outputs to the derived plate at that well and field."""
    from fiji_bridge import BridgeClient

    f = make_field(5, size=96, size_z=2, seed=9)
    uri = f"zarr://{tmp_path}/from_bridge.zarr"
    with BridgeClient.connect_or_spawn(port=free_port, timeout=180, own=True) as c:
        arr = f.array
        for z in range(arr.shape[1]):
            for ch in range(arr.shape[2]):
                c.send_plane(arr[0, z, ch], plate="live", well="C04", site=1, channel=ch, z=z)
        c.flush()
        key = c.list_stacks()[0]
        r = c.run_macro(resolve("z_projection").bind({"method": "max"}), stack=key, save_to=uri)
    backend, pid = open_plate(uri)
    np.testing.assert_array_equal(backend.load_field(pid, "C04", 1), arr.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(r.images["projection"], arr.max(axis=1, keepdims=True))
    assert any("C04" in p for p in getattr(r, "saved", []))


@pytest.mark.timeout(120)
def test_save_result_to_omero_goes_through_the_uploader(ij, tmp_path, monkeypatch):
    """A remote store gets an uploader: a dropped connection is retried, and a
    server that stays away leaves the outputs in the local fallback store."""
    pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")
    from fiji_bridge.backends.omero import OmeroBackend
    from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble

    monkeypatch.setenv("FIJI_BRIDGE_SPILL_DIR", str(tmp_path / "spill"))
    a = (np.arange(2 * 32 * 32) % 251).astype(np.uint8).reshape(2, 32, 32)
    r = ij.run_macro('run("Invert", "stack"); run("Set Measurements...", "area mean redirect=None decimal=3"); '
                    'run("Measure");', image=a, dims="ZYX")
    srv = ServerDouble(users={"u": "pw"}).register("outputs.test", 4064)
    try:
        b = OmeroBackend(host="outputs.test", user="u", password="pw", gateway=GatewayDouble, keepalive=0)
        pid = b.create_plate("derived")
        srv.drop_connections()
        paths = save_result(r, "omero://outputs.test/plate/x", well="A01", site=0, backend=b, plate=pid)
        np.testing.assert_array_equal(b.load_field(pid, "A01", 0)[0, :, 0], 255 - a)  # numpy's invert
        assert f"/omero/plate_{pid}/A01/results_s000.csv" in paths
        srv.stop()  # the server goes away for good
        paths = save_result(r, "omero://outputs.test/plate/x", well="B02", site=0, backend=b, plate=pid,
                            upload_timeout=60)
    finally:
        srv.unregister()
    assert paths and all("saved in the local fallback store" in p for p in paths)
    fb, fpid = open_plate(f"zarr://{tmp_path}/spill/fallback/omero_outputs_test_4064/{pid}.zarr")
    np.testing.assert_array_equal(fb.load_field(fpid, "B02", 0)[0, :, 0], 255 - a)
    assert rows(fb, f"/zarr/plate_{fpid}/B02/results_s000.csv")[0]["well"] == "B02"
