"""``fiji-bridge import``: real HCS folders into OME-Zarr and OME-TIFF plates.

Oracle: ``tifffile.imread`` of each source file equals the plane loaded
back from the plate by a fresh store (opened from the reported URI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fiji_bridge.backends import open_plate
from fiji_bridge.backends.ome_tiff import OmeTiffStore
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import PlaneComponents
from fiji_bridge.importer import PATTERNS, FolderImportError, import_folder

ROOT = Path(__file__).resolve().parents[1]


def _cellomics_truth(folder: Path) -> dict[tuple[str, int, int], np.ndarray]:
    """(well, field, raw channel) -> pixels, from the names as the data README states them."""
    out = {}
    for f in sorted(folder.iterdir()):
        stem = f.name.rsplit(".", 1)[0].split("_")[-1]  # e.g. O01f02d2
        well, rest = stem[:3], stem[3:]
        fld, ch = rest[1:].split("d")
        out[(well, int(fld), int(ch))] = tifffile.imread(f)
    return out


def _check(report, truth, channel_order):
    store, pid = open_plate(report.plate_uri)
    assert pid == report.plate
    s = store.plate_structure(pid)
    wells = sorted({w for w, _, _ in truth})
    assert list(s.wells) == wells
    for (well, fld, ch), pixels in truth.items():
        plane = store.load(store.path(PlaneComponents(pid, well, fld, channel_order.index(ch))))
        assert plane.dtype == pixels.dtype
        np.testing.assert_array_equal(plane, pixels)
    return store, s


@pytest.mark.parametrize("kind", ["zarr", "ometiff"])
def test_import_sbs_plate(data_dir, tmp_path, kind):
    src = data_dir / "sbs_plate_O01-O04"
    uri = f"zarr://{tmp_path}/sbs.zarr" if kind == "zarr" else f"ometiff://{tmp_path}/sbs"
    report = import_folder(src, uri)
    assert report.pattern == "cellomics"
    assert report.unplaced == [] and report.missing == []
    assert report.placed == report.files == 12
    assert report.channel_names == ["d2"]
    truth = _cellomics_truth(src)
    store, s = _check(report, truth, [2])
    assert isinstance(store, ZarrPlateStore if kind == "zarr" else OmeTiffStore)
    assert dict(s.fields) == {w: 3 for w in ("O01", "O02", "O03", "O04")}
    assert s.shape == (1, 1, 1, 512, 512) and s.dtype == "uint8"
    assert s.channel_names == ("d2",)
    prov = store.plate_provenance(report.plate)
    assert prov["pattern"] == "cellomics" and prov["source_plate"] == "AS_09047_050428030001"


@pytest.mark.parametrize("kind", ["zarr", "ometiff"])
def test_import_hela_three_channels(data_dir, tmp_path, kind):
    src = data_dir / "hela_D03"
    uri = f"zarr://{tmp_path}/hela.zarr" if kind == "zarr" else f"ometiff://{tmp_path}/hela"
    report = import_folder(src, uri, pattern="cellomics")
    assert report.placed == 3 and not report.unplaced
    _, s = _check(report, _cellomics_truth(src), [0, 1, 2])
    assert s.wells == ("D03",) and s.fields["D03"] == 1
    assert s.channel_names == ("d0", "d1", "d2") and s.size_c == 3


def test_import_imagexpress_with_timepoint_folders_and_z_suffix(data_dir, tmp_path):
    """An ImageXpress folder written here from real pixels: 1-based sites,
    channels, z suffixes and TimePoint_<n> folders become 0-based indices."""
    hela = [tifffile.imread(p) for p in sorted((data_dir / "hela_D03").iterdir())]
    src = tmp_path / "ix"
    truth = {}  # (site0, c0, z0, t0) -> pixels
    for t in (1, 2):
        d = src / f"TimePoint_{t}"
        d.mkdir(parents=True)
        for site in (1, 2):
            for w in (1, 2, 3):
                for z in (1, 2):
                    px = np.ascontiguousarray(np.rot90(hela[w - 1], k=site + z + t))
                    tifffile.imwrite(d / f"Screen_B07_s{site}_w{w}_z{z}.tif", px)
                    truth[(site - 1, w - 1, z - 1, t - 1)] = px
    report = import_folder(src, tmp_path / "ix.zarr")
    assert report.pattern == "imagexpress"
    assert report.placed == len(truth) and not report.unplaced and not report.missing
    assert report.channel_names == ["w1", "w2", "w3"]
    store, pid = open_plate(report.plate_uri)
    s = store.plate_structure(pid)
    assert s.wells == ("B07",) and s.fields["B07"] == 2 and s.shape == (2, 2, 3, 512, 512)
    for (site, c, z, t), px in truth.items():
        np.testing.assert_array_equal(store.load(store.path(PlaneComponents(pid, "B07", site, c, z, t))), px)
    field = store.load_field(pid, "B07", 1)
    np.testing.assert_array_equal(field[1, 0, 2], truth[(1, 2, 0, 1)])


def test_import_reports_stray_files_and_keeps_going(data_dir, tmp_path):
    src = tmp_path / "messy"
    src.mkdir()
    for f in sorted((data_dir / "sbs_plate_O01-O04").iterdir())[:4]:
        shutil.copy(f, src / f.name)
    (src / "notes.txt").write_text("acquisition log")
    (src / "overview.tif").write_bytes((data_dir / "hela_D03" / "AS_09125_050116030001_D03f00d0.tif").read_bytes())
    tifffile.imwrite(src / "AS_09047_050428030001_O02f05d2.TIF", np.zeros((3, 512, 512), np.uint8), photometric="minisblack")  # a stack
    tifffile.imwrite(src / "AS_09047_050428030001_O03f00d2.TIF", np.zeros((512, 512), np.uint16))  # other dtype
    (src / "AS_09047_050428030001_O04f00d2.TIF").write_bytes(b"not a tiff at all")
    report = import_folder(src, f"ometiff://{tmp_path}/out/messy")
    reasons = dict(report.unplaced)
    assert set(reasons) == {
        "notes.txt",
        "overview.tif",
        "AS_09047_050428030001_O02f05d2.TIF",
        "AS_09047_050428030001_O03f00d2.TIF",
        "AS_09047_050428030001_O04f00d2.TIF",
    }
    assert "not a TIFF" in reasons["notes.txt"]
    assert "does not match" in reasons["overview.tif"]
    assert "2-D" in reasons["AS_09047_050428030001_O02f05d2.TIF"]
    assert "uint16" in reasons["AS_09047_050428030001_O03f00d2.TIF"]
    assert "unreadable" in reasons["AS_09047_050428030001_O04f00d2.TIF"]
    assert report.placed == 4
    truth = {k: v for k, v in _cellomics_truth(data_dir / "sbs_plate_O01-O04").items() if k[0] in ("O01", "O02") and k[1] < 3}
    truth = {k: truth[k] for k in list(truth)[:4]}
    _check(report, truth, [2])
    assert "notes.txt" in report.summary()


def test_import_with_a_regex_and_named_channels(data_dir, tmp_path):
    hela = sorted((data_dir / "hela_D03").iterdir())
    src = tmp_path / "custom"
    src.mkdir()
    names = {"DNA": hela[0], "PH3": hela[1], "Cell": hela[2]}
    for ch, f in names.items():
        shutil.copy(f, src / f"well-C4_pos-0_{ch}.tif")
    report = import_folder(src, tmp_path / "custom.zarr", pattern=r"well-(?P<well>[A-H]\d+)_pos-(?P<site>\d+)_(?P<channel>\w+)\.tif")
    assert report.placed == 3 and report.channel_names == ["Cell", "DNA", "PH3"]
    store, pid = open_plate(report.plate_uri)
    assert store.plate_structure(pid).wells == ("C04",)
    for i, ch in enumerate(report.channel_names):
        np.testing.assert_array_equal(store.load(store.path(PlaneComponents(pid, "C04", 0, i))), tifffile.imread(names[ch]))


def test_import_refusals(data_dir, tmp_path):
    with pytest.raises(FolderImportError, match="named groups"):
        import_folder(data_dir / "hela_D03", tmp_path / "x.zarr", pattern=r"(?P<well>\w+)\.tif")
    with pytest.raises(FolderImportError, match="no file"):
        import_folder(data_dir / "hela_D03", tmp_path / "x.zarr", pattern="imagexpress")
    import_folder(data_dir / "hela_D03", tmp_path / "twice.zarr")
    with pytest.raises(Exception, match="exists"):
        import_folder(data_dir / "hela_D03", tmp_path / "twice.zarr")


def test_patterns_do_not_overlap():
    assert PATTERNS["cellomics"].fullmatch("AS_09125_050116030001_D03f00d1.tif")
    assert not PATTERNS["imagexpress"].fullmatch("AS_09125_050116030001_D03f00d1.tif")
    assert PATTERNS["imagexpress"].fullmatch("Plate_1_P24_s9_w4.TIF")
    assert not PATTERNS["cellomics"].fullmatch("Plate_1_P24_s9_w4.TIF")


@pytest.mark.timeout(120)
def test_cli_import(data_dir, tmp_path):
    exe = Path(sys.executable).parent / "fiji-bridge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fiji_bridge.cli"]
    out = tmp_path / "cli.zarr"
    proc = subprocess.run(cmd + ["import", str(data_dir / "hela_D03"), "--plate", str(out)], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "imported 3 of 3 files" in proc.stdout
    st = ZarrPlateStore(tmp_path)
    assert st.plate_structure("cli").channel_names == ("d0", "d1", "d2")
    bad = subprocess.run(cmd + ["import", str(data_dir / "hela_D03"), "--plate", str(out), "--pattern", "(?P<x"], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert bad.returncode == 2 and "bad --pattern" in bad.stderr
