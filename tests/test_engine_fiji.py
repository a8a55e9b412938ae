"""What only the Fiji engine has, on the real Fiji in ../shared/fiji.

Start-up checks run in this process (they fail before any JVM starts); every
Fiji JVM runs in a child process (:class:`RemoteEngine`): the session's
windowed Fiji (direct gateway start), a PyImageJ-started one, a headless one,
and ImageJ 1 on the Fiji's own ij.jar. Oracles: numpy/scipy on the same
pixels, the ImageJ 1 engine, ImageJ's own version strings.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fiji_bridge.engine import EngineUnavailable, MacroError
from fiji_bridge.engine.fiji import check_java, find_fiji, is_path_like
from fiji_bridge.engine.java import find_java_home, heap_option
from fiji_bridge.engine.pyimagej import PyImageJEngine
from fiji_bridge.engine.remote import RemoteEngine

from conftest import FIJI_EXTRA_JARS

pytestmark = [pytest.mark.fiji, pytest.mark.timeout(300)]

HELA = "hela_D03/AS_09125_050116030001_D03f00d{}.tif"


@pytest.fixture(scope="module")
def hela(data_dir: Path) -> np.ndarray:
    """The three real HeLa channels, (3, 512, 512) uint8."""
    import tifffile

    return np.stack([tifffile.imread(data_dir / HELA.format(c)) for c in range(3)])


# -- start-up checks (no JVM) ---------------------------------------------------------------


def _jar(path: Path, java: int) -> None:
    """A jar with one class file compiled for Java ``java``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/A.class", b"\xca\xfe\xba\xbe" + struct.pack(">HH", 0, java + 44) + b"\0" * 16)


def test_a_folder_that_is_not_imagej2_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("FIJI_BRIDGE_IMAGEJ", raising=False)
    with pytest.raises(EngineUnavailable, match="FIJI_BRIDGE_IMAGEJ"):
        PyImageJEngine().start()
    with pytest.raises(EngineUnavailable, match="not a directory"):
        PyImageJEngine(endpoint=str(tmp_path / "NoFiji.app")).start()
    with pytest.raises(EngineUnavailable, match="no jars/"):
        PyImageJEngine(endpoint=str(tmp_path)).start()
    ij1 = tmp_path / "ImageJ"
    _jar(ij1 / "jars" / "ij-1.54f.jar", 8)
    with pytest.raises(EngineUnavailable, match="plain ImageJ 1: use the imagej1 engine"):
        PyImageJEngine(endpoint=str(ij1)).start()


def test_windows_and_posix_paths_are_folders_maven_coordinates_are_not():
    for p in (r"C:\Fiji.app", "C:/Fiji.app", r"\\server\share\Fiji.app", "/opt/Fiji.app", "./Fiji.app", "~/Fiji.app"):
        assert is_path_like(p), p
    for coords in ("sc.fiji:fiji:2.15.0", "net.imagej:imagej", "sc.fiji:fiji"):
        assert not is_path_like(coords), coords


def test_jars_newer_than_the_jdk_are_refused_naming_both(tmp_path):
    fiji = tmp_path / "Fiji.app"
    _jar(fiji / "jars" / "imagej-2.99.0.jar", 21)
    _jar(fiji / "jars" / "imagej-legacy-2.0.0.jar", 21)
    (fiji / "plugins").mkdir()
    jdk17 = tmp_path / "jdk17"
    (jdk17 / "bin").mkdir(parents=True)
    (jdk17 / "release").write_text('JAVA_VERSION="17.0.15"\n')
    with pytest.raises(EngineUnavailable, match=r"needs Java 21.*is Java 17"):
        check_java(find_fiji(fiji), jdk17)
    (jdk17 / "release").write_text('JAVA_VERSION="21.0.2"\n')
    assert check_java(find_fiji(fiji), jdk17) == 21


def test_bundled_jdk_is_used_when_java_home_is_unset(tmp_path):
    fiji = tmp_path / "Fiji.app"
    java = fiji / "java" / "linux-x64" / "zulu21-jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("")
    assert find_java_home({"PATH": ""}, fiji_root=fiji) == java.parent.parent
    assert find_java_home({"JAVA_HOME": str(java.parent.parent), "PATH": ""}) == java.parent.parent


def test_heap_setting():
    assert heap_option({"FIJI_BRIDGE_JVM_HEAP": "2g"}) == ["-Xmx2g"]
    assert heap_option({}) == []
    with pytest.raises(EngineUnavailable, match="FIJI_BRIDGE_JVM_HEAP"):
        heap_option({"FIJI_BRIDGE_JVM_HEAP": "lots"})


def test_pyimagej_start_without_imglyb_jars_says_what_to_give(fiji_dir, monkeypatch):
    monkeypatch.delenv("FIJI_BRIDGE_EXTRA_JARS", raising=False)
    with pytest.raises(EngineUnavailable, match="FIJI_BRIDGE_EXTRA_JARS"):
        PyImageJEngine(endpoint=str(fiji_dir), start="pyimagej").start()


def test_the_real_fiji_folder_is_recognised(fiji_dir):
    inst = find_fiji(fiji_dir)
    assert inst.imagej2_version == "2.14.0" and inst.legacy_version == "1.2.0"
    assert not any("win" in p.parent.name or "macosx" in p.parent.name for p in inst.jars)


# -- the running Fiji ----------------------------------------------------------------------------


def test_fiji_runs_non_headless_with_the_legacy_layer_and_reports_both_versions(fiji_engine):
    st = fiji_engine.status()
    assert st["engine"] == "pyimagej" and st["start"] == "gateway"
    assert st["headless"] is False and st["display"]
    # under the legacy layer IJ.getVersion() is "<ImageJ2>/<ImageJ 1>"
    ij2, ij1 = st["version"].split("/")
    assert (st["imagej2"], st["imagej1"]) == (ij2, ij1)
    assert ij2 == "2.14.0" and ij1.startswith("1.54")


def _local_mean_threshold(img: np.ndarray, radius: int, c: float) -> np.ndarray:
    """Auto Local Threshold "Mean" by hand: white where pixel > mean of the
    circular neighbourhood (ImageJ's RankFilters circle, edges repeated) - c."""
    from scipy import ndimage

    r2 = radius * radius + 1
    k = np.array([[dx * dx + dy * dy <= r2 for dx in range(-radius, radius + 1)] for dy in range(-radius, radius + 1)])
    mean = ndimage.correlate(img.astype(np.float64), k / k.sum(), mode="nearest")
    return img.astype(np.float64) > mean - c


AUTO_LOCAL = 'run("Auto Local Threshold", "method=Mean radius=7 parameter_1=0 parameter_2=0 white");'


def test_auto_local_threshold_matches_a_numpy_local_mean(fiji_engine, hela):
    img = hela[0]
    r = fiji_engine.run_macro(AUTO_LOCAL, image=img, dims="YX", title="dna")
    out = r.images["dna"][0, 0, 0]
    assert set(np.unique(out)) <= {0, 255}
    expected = _local_mean_threshold(img, 7, 0)
    agree = np.mean((out == 255) == expected)
    assert agree > 0.999, agree


def test_3d_objects_counter_counts_like_scipy_label_in_3d(fiji_engine, hela):
    from scipy import ndimage

    stack = hela  # three real planes as Z: cells overlap across them
    thr, min_size = 60, 10
    macro = f"""
    run("3D OC Options", "volume nb_of_obj._voxels dots_size=5 font_size=10 redirect_to=none");
    run("3D Objects Counter", "threshold={thr} slice=1 min.={min_size} max.={stack.size} statistics summary");
    """
    r = fiji_engine.run_macro(macro, image=stack, dims="ZYX", title="cells")
    # 3D OC 2.0.1 puts its statistics in the Results table (older ones in "Statistics for ...")
    stats = [t for name, t in r.tables.items() if name.startswith("Statistics") or name == "Results"]
    assert stats, f"no statistics table; tables: {list(r.tables)}; log: {r.log}"
    labels, n = ndimage.label(stack >= thr, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    expected = int(np.sum(sizes >= min_size))
    assert 10 < expected
    assert len(next(iter(stats[0].values()))) == expected
    assert f"{expected} objects detected" in r.log
    # the voxel counts too, as a multiset
    volume = next((v for k, v in stats[0].items() if k.lower().startswith(("nb of obj", "voxels"))), None)
    assert volume is not None, list(stats[0])
    assert sorted(volume.astype(int).tolist()) == sorted(sizes[sizes >= min_size].tolist())


def test_colocalization_macro_gives_the_same_results_on_fiji_and_imagej1(fiji_engine, ij, hela):
    macro = Path(__file__).resolve().parents[1] / "macros" / "colocalization.ijm"
    stack = hela[None, None, :2]  # T Z C Y X: DNA and PH3
    a = fiji_engine.run_macro(macro, image=stack, args={"threshold_method": "Otsu"})
    b = ij.run_macro(macro, image=stack, args={"threshold_method": "Otsu"})
    assert a.results.keys() == b.results.keys() and "Pearson" in a.results
    for col in a.results:
        np.testing.assert_array_equal(a.results[col], b.results[col], err_msg=col)
    x, y = hela[0].astype(float).ravel(), hela[1].astype(float).ravel()
    assert a.results["Pearson"][0] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-4)


MAX_MEMORY = 'print(IJ.maxMemory());'  # the JVM's own -Xmx, as ImageJ reports it


def _heap_mib(engine) -> float:
    return float(engine.run_macro(MAX_MEMORY).log.split()[0]) / 2**20


def test_pyimagej_start_path_with_local_imglyb_jars_gives_the_same_fiji(fiji_dir, fiji_engine, hela, monkeypatch):
    if not FIJI_EXTRA_JARS.is_dir():
        pytest.skip(f"no imglib2-imglyb jars at {FIJI_EXTRA_JARS}")
    monkeypatch.setenv("FIJI_BRIDGE_JVM_HEAP", "700m")  # the child inherits it
    with RemoteEngine("pyimagej", endpoint=str(fiji_dir), extra_jars=str(FIJI_EXTRA_JARS)) as eng:
        st = eng.status()
        r = eng.run_macro(AUTO_LOCAL, image=hela[0], dims="YX", title="dna")
        assert 600 < _heap_mib(eng) <= 700
    assert st["start"] == "pyimagej" and st["pyimagej"] is True  # imagej.init's gateway, with ij.py
    assert st["imagej2"] == fiji_engine.status()["imagej2"]
    same = fiji_engine.run_macro(AUTO_LOCAL, image=hela[0], dims="YX", title="dna")
    np.testing.assert_array_equal(r.images["dna"], same.images["dna"])


# -- ImageJ 1 on a Fiji's ij.jar ------------------------------------------------------------------


def test_imagej1_on_a_fiji_jar_runs_fiji_ij1_plugins(fiji_dir, ij, hela, monkeypatch):
    jar = sorted((fiji_dir / "jars").glob("ij-*.jar"))[-1]
    with pytest.raises(MacroError) as info:  # Debian's ImageJ 1 has no Auto Local Threshold
        ij.run_macro(AUTO_LOCAL, image=hela[0], dims="YX")
    assert info.value.kind == "command"
    monkeypatch.setenv("FIJI_BRIDGE_JVM_HEAP", "700m")
    with RemoteEngine("imagej1", ij_jar=str(jar)) as ij1:
        assert 600 < _heap_mib(ij1) <= 700  # one heap setting for both engines
        st = ij1.status()
        assert st["engine"] == "imagej1" and st["fiji"] == str(fiji_dir.resolve())
        assert "/" not in st["version"]  # no ImageJ2 here
        r = ij1.run_macro(AUTO_LOCAL, image=hela[0], dims="YX", title="dna")
    out = r.images["dna"][0, 0, 0]
    assert np.mean((out == 255) == _local_mean_threshold(hela[0], 7, 0)) > 0.999


# -- headless (an explicit option) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def headless(fiji_dir):
    with RemoteEngine("pyimagej", endpoint=str(fiji_dir), headless=True) as eng:
        yield eng


HEADLESS_BAD = {
    # what the legacy layer only prints, headless, must still fail, with the kind it has on a screen
    "syntax": ("x = ;\n", "syntax"),
    "unknown command": ('print("a");\nrun("No Such Command 123");', "command"),
    "exit with message": ('print("before");\nexit("stop here");', "exit"),
    "plugin exception": ('newImage("a", "8-bit", 10, 10, 1);\nrun("Bin...", "x=0 y=0 bin=Average");', "exception"),
    "no image": ('run("Invert");', "syntax"),
    "command without options": ('newImage("a", "8-bit", 10, 10, 1); run("Gaussian Blur...");', "dialog"),
    "own dialog": ('Dialog.create("P"); Dialog.addNumber("n", 3); Dialog.show();', "dialog"),
    "waitForUser": ('waitForUser("click OK");', "dialog"),
    # what headless cannot do at all
    "ROI Manager": ('newImage("a", "8-bit", 10, 10, 1); makeRectangle(1, 1, 3, 3); roiManager("add");', "headless"),
    "named table": ('Table.create("Stats"); Table.set("v", 0, 1);', "headless"),
    "particle summary": ('newImage("a", "8-bit white", 20, 20, 1); setThreshold(0, 128); '
                         'run("Analyze Particles...", "summarize");', "headless"),
}


@pytest.mark.parametrize("name", list(HEADLESS_BAD))
def test_headless_failures_are_macro_errors_of_the_right_kind(headless, name):
    code, kind = HEADLESS_BAD[name]
    with pytest.raises(MacroError) as info:
        headless.run_macro(code, timeout=30)
    assert info.value.kind == kind, info.value
    if name == "exit with message":
        assert info.value.message == "stop here" and info.value.log.strip() == "before"
    if name == "unknown command":
        assert info.value.line == 2 and "No Such Command 123" in info.value.message
    if name == "plugin exception":
        assert "ArithmeticException" in info.value.message
    assert headless.run_macro('print(6*7);').log.strip() == "42"


def test_headless_runs_real_work_with_its_log(headless, hela):
    st = headless.status()
    assert st["headless"] is True and st["start"] == "gateway"
    r = headless.run_macro('run("Set Measurements...", "area mean redirect=None decimal=3"); run("Measure"); '
                           'print("mean " + getResult("Mean", 0)); exit;', image=hela[0], dims="YX")
    assert r.results["Mean"][0] == pytest.approx(hela[0].mean(), rel=1e-6)
    assert r.log.strip().startswith("mean ")
    r = headless.run_macro(AUTO_LOCAL, image=hela[0], dims="YX", title="dna")
    assert np.mean((r.images["dna"][0, 0, 0] == 255) == _local_mean_threshold(hela[0], 7, 0)) > 0.999


# -- SciJava scripts -------------------------------------------------------------------------------

BSH_IMAGE = """#@ ImagePlus imp
#@ Double offset (value=0.5)
#@output Double mean
#@output Integer width
#@output Boolean big
#@output ImagePlus inverted
#@output ij.measure.ResultsTable table
import ij.measure.ResultsTable;
mean = imp.getStatistics().mean + offset;
width = imp.getWidth();
big = width > 100;
inverted = imp.duplicate();
inverted.getProcessor().invert();
table = new ResultsTable();
for (i = 0; i < 3; i++) { table.incrementCounter(); table.addValue("row", i); table.addValue("sq", i * i); }
"""


def test_beanshell_script_takes_an_image_and_returns_typed_outputs(fiji_engine, hela):
    img = hela[1]
    r = fiji_engine.run_script(BSH_IMAGE, language="bsh", inputs={"offset": 2}, image=img, dims="YX")
    out = r.outputs
    assert out["mean"] == pytest.approx(img.mean() + 2, rel=1e-9)
    assert out["width"] == img.shape[1] and isinstance(out["width"], int)
    assert out["big"] is True
    assert out["inverted"].shape == (1, 1, 1) + img.shape
    np.testing.assert_array_equal(out["inverted"][0, 0, 0], 255 - img)
    assert r.image_info["inverted"].dtype == "uint8"
    assert out["table"]["sq"].tolist() == [0.0, 1.0, 4.0]


def test_script_language_from_the_file_extension_and_a_dataset_input(fiji_engine, tmp_path, hela):
    p = tmp_path / "sum.bsh"
    p.write_text("#@ Dataset ds\n#@output Long n\nn = ds.size();\n")
    r = fiji_engine.run_script(p, image=hela[:2], dims="CYX")
    assert r.outputs["n"] == hela[:2].size
    clj = fiji_engine.run_script("#@ Integer n\n#@output Integer m\n(def m (* n 3))", language="clj", inputs={"n": 14})
    assert clj.outputs["m"] == 42


@pytest.mark.parametrize("code,language,inputs,kind,match", [
    ("x = 1;", "cobol", {}, "argument", "unknown script language 'cobol'.*BeanShell"),
    ("println(1)", "groovy", {}, "argument", "unknown script language 'groovy'"),
    ("#@ Integer n\n#@output Integer m\nm = n;", "bsh", {}, "argument", "missing argument n"),
    ("#@ ImagePlus imp\n#@output Integer w\nw = imp.getWidth();", "bsh", {}, "argument", "is an image"),
    ("x = 1;\ny = 2;\nz = nothing_here.call();\n", "bsh", {}, "exception", "nothing_here"),
])
def test_script_errors_are_macro_errors(fiji_engine, code, language, inputs, kind, match):
    with pytest.raises(MacroError, match=match) as info:
        fiji_engine.run_script(code, language=language, inputs=inputs)
    assert info.value.kind == kind
    if kind == "exception":
        assert info.value.line == 3
    assert fiji_engine.run_script("#@output Integer m\nm = 6 * 7;", language="bsh").outputs["m"] == 42


def test_imagej1_refuses_other_languages_naming_fiji(ij):
    with pytest.raises(MacroError, match="need Fiji") as info:
        ij.run_script("x = 1;", language="bsh")
    assert info.value.kind == "argument"


# -- the bridge and batch on Fiji ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fiji_bridge(fiji_dir, tmp_path_factory):
    from conftest import bridge_process

    with bridge_process(tmp_path_factory.mktemp("fiji-bridge"), "--imagej", str(fiji_dir), timeout=240) as bp:
        yield bp


def test_bridge_on_fiji_reports_versions_and_runs_scripts_and_macros(fiji_bridge, hela):
    with fiji_bridge.client(timeout=120) as c:
        st = c.status()["engine"]
        assert st["state"] == "ready" and st["engine"] == "pyimagej"
        assert st["imagej2"] == "2.14.0" and st["imagej1"].startswith("1.54") and st["headless"] is False
        r = c.run_script(BSH_IMAGE, language="bsh", inputs={"offset": 1}, array=hela[1], dims="YX", timeout=60)
        assert r.outputs["mean"] == pytest.approx(hela[1].mean() + 1, rel=1e-9)
        np.testing.assert_array_equal(r.outputs["inverted"][0, 0, 0], 255 - hela[1])
        assert r.outputs["table"]["sq"].tolist() == [0.0, 1.0, 4.0] and r.outputs["big"] is True
        with pytest.raises(MacroError, match="cobol") as info:
            c.run_script("x = 1;", language="cobol")
        assert info.value.kind == "argument"
        with pytest.raises(MacroError) as info:
            c.run_script("x = 1;\ny = nothing_here.call();", language="bsh")
        assert info.value.kind == "exception" and info.value.line == 2
        # a streamed stack as the script's image input, by key
        for ch in range(3):
            assert c.send_plane(hela[ch], plate="hela", well="D03", site=0, channel=ch, channel_name=f"c{ch}")
        c.flush()
        s = c.run_script("#@ Dataset ds\n#@ ImagePlus imp\n#@output Long n\n#@output Integer channels\n"
                         "n = ds.size(); channels = imp.getNChannels();", language="bsh", stack="hela/D03/s000")
        assert (s.outputs["n"], s.outputs["channels"]) == (hela.size, 3)
        m = c.run_macro(AUTO_LOCAL, array=hela[0], dims="YX", title="dna")
        assert np.mean((m.images["dna"][0, 0, 0] == 255) == _local_mean_threshold(hela[0], 7, 0)) > 0.999


@pytest.mark.timeout(600)
def test_fiji_batch_gives_the_imagej1_batch_tables(fiji_bridge, data_dir, tmp_path):
    import csv
    import io
    import subprocess
    import sys

    from fiji_bridge import BridgeClient
    from fiji_bridge.backends import open_plate
    from fiji_bridge.batch import free_port_pair, run_batch

    uri = f"zarr://{tmp_path}/sbs.zarr"
    imp = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "import", str(data_dir / "sbs_plate_O01-O04"), "--plate", uri],
                         capture_output=True, text=True, timeout=120)
    assert imp.returncode == 0, imp.stdout + imp.stderr
    args = {"channel": 1, "sigma": 1.0, "min_size": 30}

    def tables(rep):
        backend, _ = open_plate(rep.derived)
        return {name: list(csv.DictReader(io.StringIO(backend.load(path)))) for name, path in rep.tables.items()}

    env_fiji = os.environ.pop("FIJI_BRIDGE_IMAGEJ", None)  # the ImageJ 1 bridge spawned here
    try:
        with BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=180, own=True) as ij1:
            want = run_batch(uri, "nuclei_count", args=args, out_uri=f"zarr://{tmp_path}/ij1.zarr", ports=[ij1.port], progress=False)
            assert ij1.status()["engine"]["engine"] == "imagej1"
    finally:
        if env_fiji is not None:
            os.environ["FIJI_BRIDGE_IMAGEJ"] = env_fiji
    got = run_batch(uri, "nuclei_count", args=args, out_uri=f"zarr://{tmp_path}/fiji.zarr", ports=[fiji_bridge.port], progress=False)
    assert want.ok and got.ok, (want.failures, got.failures)
    a, b = tables(got), tables(want)
    assert a.keys() == b.keys() and a["Counts"]
    assert len(a["Counts"]) == 12  # 4 wells x 3 fields
    for name in a:
        assert a[name] == b[name], name


# -- Bio-Formats -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ome_tiff(tmp_path_factory):
    """An OME-TIFF with T, Z and C written by the project's own OmeTiffStore."""
    from fiji_bridge.backends.ome_tiff import OmeTiffStore
    from fiji_bridge.components import Calibration

    root = tmp_path_factory.mktemp("ome")
    st = OmeTiffStore(root)
    pid = st.create_plate("bf")
    arr = np.random.default_rng(5).integers(0, 4000, (2, 3, 2, 20, 30), dtype=np.uint16)
    cal = Calibration(pixel_width=0.25, pixel_height=0.3, pixel_depth=1.5, unit="micron")
    st.save_field(pid, "B02", 0, arr, channel_names=["DNA", "GFP"], calibration=cal)
    return root / "bf" / "B02_s000.ome.tif", arr


def test_bioformats_opens_an_ome_tiff_with_its_dimensions_names_and_pixel_sizes(fiji_engine, ome_tiff):
    import tifffile

    path, arr = ome_tiff
    with tifffile.TiffFile(path) as tif:  # the oracle: tifffile's reading of the file
        want = tif.series[0].asarray()
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert want.shape == arr.shape
    r = fiji_engine.open_image(path)
    (title, got), = r.images.items()
    np.testing.assert_array_equal(got, want)
    info = r.image_info[title]
    assert info.channel_names == [c["Name"] for c in pixels["Channel"]] == ["DNA", "GFP"]
    cal = info.calibration
    assert (cal.pixel_width, cal.pixel_height, cal.pixel_depth) == pytest.approx(
        (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"], pixels["PhysicalSizeZ"]))
    # the same through a macro's own Bio-Formats Importer call
    m = fiji_engine.run_macro(f'run("Bio-Formats Importer", "open=[{path}] color_mode=Default view=Hyperstack '
                              'stack_order=XYCZT"); Stack.getDimensions(w, h, c, z, t); print(c + " " + z + " " + t);')
    assert m.log.split() == ["2", "3", "2"]
    np.testing.assert_array_equal(next(iter(m.images.values())), want)


def test_bioformats_opens_the_real_tiffs(fiji_engine, data_dir):
    import tifffile

    for f in (data_dir / HELA.format(1), sorted((data_dir / "sbs_plate_O01-O04").glob("*.TIF"))[0]):
        r = fiji_engine.open_image(f)
        (title, got), = r.images.items()
        with tifffile.TiffFile(f) as tif:
            want = tif.asarray()
            num, den = tif.pages[0].tags["XResolution"].value
            unit = tif.pages[0].tags["ResolutionUnit"].value
        assert got.shape == (1, 1, 1) + want.shape
        np.testing.assert_array_equal(got[0, 0, 0], want)
        info = r.image_info[title]
        assert info.channel_names == []  # these files name no channels
        assert unit == 2  # inch: the pixel size is 25400 um / (pixels per inch)
        assert info.calibration.pixel_width == pytest.approx(25400 / (num / den), rel=1e-6)
        assert info.calibration.unit in ("micron", "µm", "um")
    with pytest.raises(MacroError, match="not found") as info:
        fiji_engine.open_image(data_dir / "no_such.tif")
    assert info.value.kind == "argument"


@pytest.mark.timeout(60)
def test_remote_engine_hands_start_errors_back(tmp_path):
    with pytest.raises(EngineUnavailable, match="not a Fiji/ImageJ2 installation"):
        RemoteEngine("pyimagej", endpoint=str(tmp_path)).start()


@pytest.mark.timeout(600)
def test_demo_on_fiji_counts_the_synthetic_truth(fiji_dir, tmp_path):
    """`make demo FIJI=DIR` = `fiji-bridge demo --imagej DIR`: exit status 0 means
    every field's count is within one nucleus of the synthetic plate's truth."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "demo", "--imagej", str(fiji_dir), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ImageJ2 2.14.0" in proc.stdout and "every field within 1 nucleus" in proc.stdout


def test_fiji_in_a_process_that_already_runs_imagej1_says_to_use_a_fresh_process(fiji_dir, ij):
    with pytest.raises(EngineUnavailable, match="already runs a JVM.*RemoteEngine"):
        PyImageJEngine(endpoint=str(fiji_dir)).start()
