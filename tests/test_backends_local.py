"""The local plate stores: the backend contract on OME-Zarr (NGFF 0.4 and
0.5) and OME-TIFF, plus what only local stores promise (files readable by
other tools, plate URIs, several writer processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from backend_contract import *  # noqa: F401,F403 - the contract tests and fixtures
from backend_contract import CAL, CHANNELS, LAYOUT, SHAPE, build_plate, make_field
from fiji_bridge.backends import BackendError, PlateURI, URIError, open_plate, open_store
from fiji_bridge.backends.ome_tiff import OmeTiffStore, imagej1_hyperstack_macro
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import Calibration, PlaneComponents

ROOT = Path(__file__).resolve().parents[1]

STORES = {
    "zarr-ngff0.4": lambda root: ZarrPlateStore(root),
    "zarr-ngff0.5": lambda root: ZarrPlateStore(root, zarr_format=3),
    "ometiff": lambda root: OmeTiffStore(root),
}


@pytest.fixture(params=sorted(STORES))
def backend_factory(request, tmp_path):
    make = STORES[request.param]
    return lambda: make(tmp_path / "store")


# ------------------------------------------------------------ OME-Zarr on disk


def test_zarr_plate_is_ngff_0_4_hcs_by_default(tmp_path):
    st = ZarrPlateStore(tmp_path)
    p = build_plate(st, name="screen")
    d = tmp_path / "screen.zarr"
    attrs = json.loads((d / ".zattrs").read_text())
    plate = attrs["plate"]
    assert plate["version"] == "0.4"
    assert sorted(w["path"] for w in plate["wells"]) == ["A/1", "B/3"]
    assert [r["name"] for r in plate["rows"]][:2] == ["A", "B"]
    assert "3" in [c["name"] for c in plate["columns"]]
    well = json.loads((d / "A" / "1" / ".zattrs").read_text())["well"]
    assert [im["path"] for im in well["images"]] == ["0", "1"]
    img = json.loads((d / "A" / "1" / "1" / ".zattrs").read_text())
    ms = img["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == list("tczyx")
    assert len(ms["datasets"]) == 1
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[2:] == pytest.approx([CAL.pixel_depth, CAL.pixel_height, CAL.pixel_width])
    assert [c["label"] for c in img["omero"]["channels"]] == list(CHANNELS)
    # the pixels as zarr itself reads them: TCZYX of what we saved as TZCYX
    raw = zarr.open_array(str(d / "A" / "1" / "1" / ms["datasets"][0]["path"]), mode="r")
    assert raw.metadata.zarr_format == 2
    np.testing.assert_array_equal(raw[:], p.fields[("A01", 1)].transpose(0, 2, 1, 3, 4))


def test_zarr_plate_reads_with_ome_zarr_reader(tmp_path):
    """ome-zarr-py's own reader (what napari-ome-zarr uses) sees our plate."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader

    st = ZarrPlateStore(tmp_path)
    p = build_plate(st, name="screen")
    nodes = list(Reader(parse_url(str(tmp_path / "screen.zarr")))())
    plate_nodes = [n for n in nodes if n.specs and any(isinstance(s, Plate) for s in n.specs)]
    assert plate_nodes, "ome-zarr did not recognise an HCS plate"
    spec = next(s for s in plate_nodes[0].specs if isinstance(s, Plate))
    assert sorted(spec.well_paths) == ["A/1", "B/3"]
    img_nodes = list(Reader(parse_url(str(tmp_path / "screen.zarr" / "B" / "3" / "0")))())
    data = np.asarray(img_nodes[0].data[0])
    np.testing.assert_array_equal(data, p.fields[("B03", 0)].transpose(0, 2, 1, 3, 4))


def test_zarr_reads_a_plate_written_by_ome_zarr_alone(tmp_path):
    """A foreign NGFF plate (written with ome-zarr directly, ``s0`` levels,
    several resolutions, CZYX axes, no fiji_bridge metadata) is readable."""
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    root = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=2)
    write_plate_metadata(root, ["A", "B"], ["1", "2"], ["B/2"], name="foreign plate")
    wg = root.require_group("B/2")
    write_well_metadata(wg, [{"path": "0"}, {"path": "1"}])
    truth = {}
    for f in range(2):
        czyx = make_field("uint16", 50 + f, (2, 3, 64, 64))
        write_image(czyx, wg.require_group(str(f)), scale_factors=[2], axes=["c", "z", "y", "x"])
        truth[f] = czyx
    st, pid = open_plate(tmp_path / "foreign.zarr")
    s = st.plate_structure(pid)
    assert (s.name, s.wells, dict(s.fields), s.shape) == ("foreign plate", ("B02",), {"B02": 2}, (1, 3, 2, 64, 64))
    for f, czyx in truth.items():
        np.testing.assert_array_equal(st.load_field(pid, "B02", f)[0], czyx.transpose(1, 0, 2, 3))
    plane = st.load(st.path(PlaneComponents(pid, "B02", 1, channel=1, z=2)))
    np.testing.assert_array_equal(plane, truth[1][1, 2])


def test_zarr_v3_plate_is_ngff_0_5(tmp_path):
    st = ZarrPlateStore(tmp_path, zarr_format=3)
    build_plate(st, name="v3")
    meta = json.loads((tmp_path / "v3.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["attributes"]["ome"]["version"] == "0.5"
    # a default (v2) store reads it too
    assert ZarrPlateStore(tmp_path).plate_structure("v3").shape == SHAPE


def test_zarr_plane_save_grows_a_field(tmp_path):
    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("grow")
    a = make_field("uint16", 1, (32, 32))
    b = make_field("uint16", 2, (32, 32))
    st.save(a, st.path(PlaneComponents(pid, "A01", 0, channel=0)))
    st.save(b, st.path(PlaneComponents(pid, "A01", 0, channel=2, z=1)))
    fresh = ZarrPlateStore(tmp_path)
    f = fresh.load_field(pid, "A01", 0)
    assert f.shape == (1, 2, 3, 32, 32)
    np.testing.assert_array_equal(f[0, 0, 0], a)
    np.testing.assert_array_equal(f[0, 1, 2], b)
    assert not f[0, 1, 0].any() and not f[0, 0, 2].any()
    assert len(fresh.plate_structure(pid).channel_names) == 3


def test_writers_in_two_processes_register_every_field(tmp_path):
    """Metadata updates hold a plate lock: concurrent writers lose nothing."""
    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("par")
    code = textwrap.dedent(
        f"""
        import sys, numpy as np
        from fiji_bridge.backends.zarr_plate import ZarrPlateStore
        st = ZarrPlateStore({str(tmp_path)!r})
        k = int(sys.argv[1])
        for i in range(6):
            well = "ABCDEF"[i] + str(k + 1)
            st.save_field({pid!r}, well, 0, np.full((1, 1, 1, 16, 16), 10 * k + i, np.uint16))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    s = ZarrPlateStore(tmp_path).plate_structure(pid)
    assert len(s.wells) == 12
    for k in range(2):
        for i in range(6):
            well = f"{'ABCDEF'[i]}{k + 1:02d}"
            assert int(ZarrPlateStore(tmp_path).load_field(pid, well, 0).max()) == 10 * k + i


# ------------------------------------------------------------ OME-TIFF on disk


def test_ometiff_field_files_carry_ome_metadata(tmp_path):
    st = OmeTiffStore(tmp_path)
    p = build_plate(st, name="tiffs")
    f = tmp_path / "tiffs" / "A01_s001.ome.tif"
    with tifffile.TiffFile(f) as tif:
        assert tif.is_ome
        s = tif.series[0]
        assert s.axes == "TZCYX" and s.shape == SHAPE
        np.testing.assert_array_equal(s.asarray(), p.fields[("A01", 1)])
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert [c["Name"] for c in ome["Channel"]] == list(CHANNELS)
    assert (ome["SizeT"], ome["SizeZ"], ome["SizeC"]) == SHAPE[:3]
    assert ome["PhysicalSizeX"] == pytest.approx(CAL.pixel_width)
    assert ome["PhysicalSizeZ"] == pytest.approx(CAL.pixel_depth)
    assert ome["DimensionOrder"] == "XYCZT"
    assert json.loads((tmp_path / "tiffs" / "plate.json").read_text())["fiji_bridge"]["provenance"]["macro"] == "none.ijm"


def test_ometiff_folder_without_plate_json_is_a_plate(tmp_path):
    d = tmp_path / "loose"
    d.mkdir()
    a = make_field("uint8", 3, (1, 1, 3, 20, 20))
    tifffile.imwrite(d / "C05_s000.ome.tif", a, ome=True, metadata={"axes": "TZCYX", "Channel": {"Name": ["r", "g", "b"]}})
    st, pid = open_plate(d)
    assert isinstance(st, OmeTiffStore) and pid == "loose"
    s = st.plate_structure(pid)
    assert s.wells == ("C05",) and s.channel_names == ("r", "g", "b")
    np.testing.assert_array_equal(st.load_field(pid, "C05", 0), a)


@pytest.mark.timeout(120)
def test_ometiff_opens_in_imagej1_with_all_planes(tmp_path):
    """ImageJ 1 itself (ij.jar, no Bio-Formats) opens a field file: it sees
    T*Z*C planes in T, Z, C order, and Stack to Hyperstack gives the dims."""
    ij_jar = Path("/usr/share/java/ij.jar")
    if not ij_jar.is_file():
        pytest.skip("ij.jar (libij-java) not installed")
    st = OmeTiffStore(tmp_path)
    arr = make_field("uint16", 11)
    pid = st.create_plate("ij1")
    st.save_field(pid, "B02", 0, arr, channel_names=list(CHANNELS), calibration=CAL)
    f = tmp_path / "ij1" / "B02_s000.ome.tif"
    t, z, c = SHAPE[:3]
    macro = tmp_path / "check.ijm"
    macro.write_text(
        f'open("{f}");\n'
        'n = nSlices; v1 = getPixel(3, 5);\n'
        f'setSlice({(1 * z + 2) * c + 1 + 1}); v2 = getPixel(7, 2);\n'  # t=1, z=2, c=1 (1-based slice)
        f'{imagej1_hyperstack_macro(c, z, t)}\n'
        'Stack.getDimensions(w, h, cc, zz, tt);\n'
        'Stack.setPosition(2, 3, 2); v3 = getPixel(7, 2);\n'
        'print("RESULT " + n + " " + v1 + " " + v2 + " " + cc + " " + zz + " " + tt + " " + v3);\n'
    )
    # ImageJ 1's open() needs AWT: run it on a private virtual display
    cmd = ["java", "-cp", str(ij_jar), "ij.ImageJ", "-batch", str(macro)]
    if not os.environ.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            pytest.skip("no DISPLAY and no xvfb-run")
        cmd = ["xvfb-run", "-a"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    line = next((ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, f"ImageJ printed no result: {proc.stdout}\n{proc.stderr}"
    n, v1, v2, cc, zz, tt, v3 = (int(float(x)) for x in line.split()[1:])
    assert n == t * z * c
    assert v1 == arr[0, 0, 0, 5, 3]
    assert v2 == arr[1, 2, 1, 2, 7]
    assert (cc, zz, tt) == (c, z, t)
    assert v3 == arr[1, 2, 1, 2, 7]


# ------------------------------------------------------------ URIs, open_plate


@pytest.mark.parametrize(
    "text, expected",
    [
        ("zarr:///data/plates/screen1.zarr", PlateURI("zarr", "/data/plates", "screen1")),
        ("zarr:///data/plates/", PlateURI("zarr", "/data/plates", "")),
        ("ometiff:///data/tiffs/screen1", PlateURI("ometiff", "/data/tiffs", "screen1")),
        ("omero://alice@omero.example.org:4064/plate/51", PlateURI("omero", "", "51", "omero.example.org", 4064, "alice")),
        ("omero://omero.example.org/plate/7", PlateURI("omero", "", "7", "omero.example.org")),
        ("omero://omero.example.org", PlateURI("omero", host="omero.example.org")),
    ],
)
def test_plate_uri_parse_and_round_trip(text, expected):
    u = PlateURI.parse(text)
    assert u == expected
    assert str(u) == text
    assert PlateURI.parse(str(u)) == u


@pytest.mark.parametrize("bad", ["", "http://x/plate/1", "zarr://relative/p.zarr", "omero://host/plate/", "omero://a@b@c/plate/1"])
def test_plate_uri_refuses_malformed(bad):
    with pytest.raises(URIError):
        PlateURI.parse(bad)


def test_plain_paths_pick_the_store(tmp_path):
    st, pid = open_plate(tmp_path / "new.zarr")
    assert isinstance(st, ZarrPlateStore) and st.root == tmp_path and pid == "new"
    st, pid = open_plate(str(tmp_path / "fresh"))  # not existing: a zarr plate fresh.zarr
    assert isinstance(st, ZarrPlateStore) and pid == "fresh"
    OmeTiffStore(tmp_path).create_plate("tiffplate")
    st, pid = open_plate(tmp_path / "tiffplate")
    assert isinstance(st, OmeTiffStore) and pid == "tiffplate"
    assert isinstance(open_store(f"ometiff://{tmp_path}/"), OmeTiffStore)
    with pytest.raises(BackendError, match="scheme"):
        open_store("s3://bucket/p.zarr")


def test_omero_uri_without_omero_py_names_the_extra():
    try:
        import omero  # noqa: F401
        import fiji_bridge.backends.omero  # noqa: F401

        pytest.skip("omero-py and the OMERO backend are installed here")
    except ImportError:
        pass
    with pytest.raises(BackendError, match=r"fiji-bridge\[omero\]"):
        open_plate("omero://localhost/plate/1")


def test_create_plate_refuses_an_existing_plate(tmp_path):
    st = ZarrPlateStore(tmp_path)
    st.create_plate("once")
    with pytest.raises(BackendError, match="exists"):
        st.create_plate("once")


def test_refresh_sees_fields_written_by_another_instance(tmp_path):
    a, b = ZarrPlateStore(tmp_path), ZarrPlateStore(tmp_path)
    pid = a.create_plate("shared")
    a.save_field(pid, "A01", 0, make_field("uint8", 1, (1, 1, 1, 8, 8)))
    assert b.plate_structure(pid).wells == ("A01",)
    a.save_field(pid, "A02", 0, make_field("uint8", 2, (1, 1, 1, 8, 8)))
    # b's cache is stale, but a read of the new field re-reads once and finds it
    np.testing.assert_array_equal(b.load_field(pid, "A02", 0), make_field("uint8", 2, (1, 1, 1, 8, 8)))
    assert b.plate_structure(pid).wells == ("A01", "A02")
