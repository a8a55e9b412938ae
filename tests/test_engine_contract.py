"""The engine contract, on both engines: ImageJ 1 and Fiji (ImageJ2 + legacy).

Every test runs once per engine (ids ``[imagej1]`` / ``[fiji]``, from the
session ``engine`` fixture in conftest): ImageJ 1 in this process, Fiji in a
child process (a process holds one JVM) behind :class:`RemoteEngine`.
Oracles: numpy/scipy on the same pixels, ImageJ's own reports from inside a
macro (getThreshold, Stack.getDimensions, getPixel), and the input arrays.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fiji_bridge.components import Calibration
from fiji_bridge.engine import MacroError, MacroTimeout

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(120)]

HELA = "hela_D03/AS_09125_050116030001_D03f00d{}.tif"


def _log_numbers(log: str) -> list[list[float]]:
    return [[float(x) for x in line.split()] for line in log.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hela_dna(data_dir: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(data_dir / HELA.format(0))


# -- real analysis against an independent computation ------------------------------


def test_nuclei_count_and_means_match_scipy(engine, hela_dna):
    from scipy import ndimage

    macro = """
    setAutoThreshold("Otsu dark");
    getThreshold(lower, upper);
    print(lower + " " + upper);
    run("Set Measurements...", "area mean redirect=None decimal=3");
    run("Analyze Particles...", "size=20-Infinity pixel display clear add");
    """
    r = engine.run_macro(macro, image=hela_dna, dims="YX", title="DNA")
    lower, upper = _log_numbers(r.log)[0]
    # independent: the same threshold, 8-connected components, same size filter
    mask = (hela_dna >= lower) & (hela_dna <= upper)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 20) + 1
    means = ndimage.mean(hela_dna.astype(float), labels, keep)
    res = r.tables["Results"]
    assert 20 < len(keep) < 500  # a real field of HeLa nuclei
    assert len(res["Area"]) == len(keep)
    # the particle analyzer scans in raster order, as scipy labels: same order
    np.testing.assert_array_equal(res["Area"], sizes[keep - 1])
    np.testing.assert_allclose(res["Mean"], means, rtol=1e-6)
    assert len(r.rois) == len(keep)  # one ROI per nucleus in the ROI Manager
    assert {roi.type for roi in r.rois} <= {"traced", "polygon", "freehand"}


def test_measure_on_calibrated_image_reports_calibrated_area(engine, hela_dna):
    cal = Calibration(pixel_width=0.5, pixel_height=0.5, unit="micron")
    r = engine.run_macro('run("Set Measurements...", "area mean"); run("Measure");', image=hela_dna, dims="YX",
                     calibration=cal)
    res = r.results
    assert res["Area"][0] == pytest.approx(hela_dna.size * 0.25)
    assert res["Mean"][0] == pytest.approx(hela_dna.mean(), rel=1e-9)
    assert r.image_info["image"].calibration.pixel_width == pytest.approx(0.5)


# -- hyperstacks --------------------------------------------------------------------


def test_hyperstack_round_trips_bit_for_bit_and_has_its_dimensions(engine):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(4, 3, 2, 40, 50), dtype=np.uint16)  # T Z C Y X
    macro = """
    Stack.getDimensions(w, h, c, z, t);
    print(w + " " + h + " " + c + " " + z + " " + t);
    print(is("composite") + " " + bitDepth());
    Stack.setPosition(2, 3, 4);
    print(getPixel(7, 5));
    """
    r = engine.run_macro(macro, image=arr, dims="TZCYX", channel_names=["DAPI", "GFP"], title="hs")
    lines = _log_numbers(r.log)
    assert lines[0] == [50, 40, 2, 3, 4]
    assert lines[1] == [1, 16]
    assert lines[2] == [arr[3, 2, 1, 5, 7]]  # c=2 z=3 t=4, 1-based in ImageJ
    out = r.images["hs"]
    assert out.dtype == np.uint16 and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert r.image_info["hs"].channel_names == ["DAPI", "GFP"]


@pytest.mark.parametrize("dims,shape", [("YX", (30, 20)), ("CYX", (3, 30, 20)), ("XYZ", (20, 30, 5)),
                                        ("ZCYXT", (2, 3, 30, 20, 2))])
def test_any_dims_order(engine, dims, shape):
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    r = engine.run_macro("", image=arr, dims=dims)
    out = r.images["image"]
    expected = arr
    for ax in "TZCYX":
        if ax not in dims:
            expected = expected[..., None]
            dims = dims + ax
    expected = np.transpose(expected, [dims.index(a) for a in "TZCYX"])
    assert out.shape == expected.shape and np.array_equal(out, expected)


@pytest.mark.parametrize(
    "dtype,out_dtype,note",
    [(np.uint8, np.uint8, None), (np.uint16, np.uint16, None), (np.float32, np.float32, None),
     (np.int16, np.float32, "int16"), (np.int32, np.float32, "int32"), (np.float64, np.float32, "float64"),
     (bool, np.uint8, "bool")],
)
def test_dtypes_in_and_out(engine, dtype, out_dtype, note):
    rng = np.random.default_rng(1)
    if dtype is bool:
        arr = rng.integers(0, 2, size=(16, 24)).astype(bool)
        expected = arr.astype(np.uint8) * 255
    else:
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        lo, hi = (max(info.min, -30000), min(info.max, 30000)) if info else (-1e3, 1e3)
        arr = (rng.uniform(lo, hi, size=(16, 24))).astype(dtype)
        expected = arr.astype(out_dtype)
    r = engine.run_macro("print(bitDepth());", image=arr, dims="YX")
    out = r.images["image"][0, 0, 0]
    assert out.dtype == out_dtype
    assert np.array_equal(out, expected)
    assert float(r.log.split()[0]) == {np.uint8: 8, np.uint16: 16, np.float32: 32}[out_dtype]
    if note:
        assert any(note in n for n in r.notes)
    else:
        assert r.notes == []


def test_rgb_comes_back_as_three_uint8_channels(engine):
    macro = 'newImage("rgb", "RGB black", 8, 6, 1); setColor(10, 200, 30); fillRect(2, 1, 3, 2);'
    r = engine.run_macro(macro)
    out = r.images["rgb"]
    assert out.shape == (1, 1, 3, 6, 8) and out.dtype == np.uint8
    assert r.image_info["rgb"].converted_from == "RGB"
    assert out[0, 0, :, 1, 2].tolist() == [10, 200, 30]
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 0]


def test_outputs_select_images_and_missing_output_is_an_error(engine):
    macro = 'newImage("a", "8-bit white", 4, 4, 1); newImage("b", "16-bit black", 5, 5, 2);'
    r = engine.run_macro(macro, outputs=["b"])
    assert list(r.images) == ["b"] and r.images["b"].shape == (1, 2, 1, 5, 5)
    with pytest.raises(MacroError, match="not open"):
        engine.run_macro(macro, outputs=["nope"])


def test_z_project_and_gaussian_blur_against_numpy(engine):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 4000, size=(5, 32, 32), dtype=np.uint16)
    r = engine.run_macro('run("Z Project...", "projection=[Max Intensity]");', image=arr, dims="ZYX", outputs=["MAX_image"])
    assert np.array_equal(r.images["MAX_image"][0, 0, 0], arr.max(axis=0))


# -- tables, log, ROIs ------------------------------------------------------------------


def test_custom_table_with_text_column(engine):
    macro = """
    Table.create("Stats");
    Table.set("name", 0, "first"); Table.set("value", 0, 1.5);
    Table.set("name", 1, "second"); Table.set("value", 1, -2);
    Table.update;
    """
    r = engine.run_macro(macro)
    t = r.tables["Stats"]
    assert t["name"].dtype == object and list(t["name"]) == ["first", "second"]
    assert t["value"].tolist() == [1.5, -2.0]


def test_rois_from_manager_and_image_selection(engine):
    macro = """
    newImage("r", "8-bit black", 100, 80, 1);
    makeRectangle(10, 20, 30, 15); roiManager("add"); roiManager("select", 0); roiManager("rename", "box");
    makeOval(50, 10, 20, 20); roiManager("add");
    makePolygon(1, 1, 9, 1, 5, 7);
    """
    r = engine.run_macro(macro)
    names = [roi.name for roi in r.rois]
    assert names[0] == "box" and len(r.rois) == 3
    box = r.rois[0]
    assert box.type == "rectangle"
    assert box.coordinates.min(axis=0).tolist() == [10, 20] and box.coordinates.max(axis=0).tolist() == [40, 35]
    assert box.data[:4] == b"Iout"  # the ImageJ .roi magic
    assert r.rois[1].type == "oval"
    poly = r.rois[2]
    assert poly.type == "polygon" and poly.coordinates.tolist() == [[1, 1], [9, 1], [5, 7]]


# -- errors are data ---------------------------------------------------------------------

BAD = {
    "syntax": ("x = ;\n", "syntax"),
    "unknown command": ('print("a");\nrun("No Such Command 123");', "command"),
    "exit with message": ('exit("stop here");', "exit"),
    "plugin exception": ('newImage("a", "8-bit", 10, 10, 1);\nrun("Bin...", "x=0 y=0 bin=Average");', "exception"),
    "own dialog": ('Dialog.create("Params"); Dialog.addNumber("n", 3); Dialog.show();', "dialog"),
    "waitForUser": ('waitForUser("click OK");', "dialog"),
    "non-blocking dialog": ('Dialog.createNonBlocking("P"); Dialog.addNumber("n", 3); Dialog.show();', "dialog"),
    "command dialog": ('newImage("a", "8-bit", 10, 10, 1); run("Gaussian Blur...");', "dialog"),
    "no image": ('run("Invert");', "syntax"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_macro_raises_quickly_and_engine_keeps_working(engine, name):
    code, kind = BAD[name]
    t0 = time.perf_counter()
    with pytest.raises(MacroError) as info:
        engine.run_macro(code, timeout=30)
    assert time.perf_counter() - t0 < 10
    err = info.value
    assert err.kind == kind, err
    assert err.message
    if kind == "exit":
        assert err.message == "stop here"
    if name == "unknown command":
        assert err.line == 2 and "No Such Command 123" in err.message
        assert err.log.strip() == "a"
    if name == "plugin exception":
        assert "ArithmeticException" in err.message
    assert engine.open_dialogs() == []  # no dialog left open
    assert engine.run_macro('print(6*7);').log.strip() == "42"


#: dialogs whose closing can race their thread's wait in them (AWT's modal loop, WaitForUserDialog's monitor)
RACY = ["unknown command", "exit with message", "own dialog", "waitForUser", "syntax"]


@pytest.mark.timeout(240)
def test_no_dialog_holds_a_macro_to_its_timeout(engine):
    """Closing a dialog can come before its thread waits in it; without the
    guard's second close (runner._release) about 1 run in 100 of these sat
    in a closed dialog until its timeout."""
    slow = []
    for i in range(150):
        name = RACY[i % len(RACY)]
        t0 = time.perf_counter()
        with pytest.raises(MacroError) as info:
            engine.run_macro(BAD[name][0], timeout=20)
        if time.perf_counter() - t0 > 5 or info.value.kind != BAD[name][1]:
            slow.append((i, name, round(time.perf_counter() - t0, 1), info.value.kind))
    assert slow == []
    assert engine.open_dialogs() == []


def test_exit_without_message_is_a_normal_end(engine):
    r = engine.run_macro('print("before"); exit; print("after");')
    assert r.log.strip() == "before"


@pytest.mark.timeout(60)
def test_timeout_aborts_and_engine_recovers(engine):
    t0 = time.perf_counter()
    with pytest.raises(MacroTimeout) as info:
        engine.run_macro("i = 0; while (true) { i++; }", timeout=1)
    assert info.value.kind == "timeout"
    assert time.perf_counter() - t0 < 8
    assert engine.broken is None
    assert engine.run_macro('print("alive");').log.strip() == "alive"


@pytest.mark.timeout(60)
def test_timeout_in_java_code_stops_the_thread(engine):
    # StackReducer loops forever with reduction=0: a hang inside Java, not the macro
    with pytest.raises(MacroTimeout):
        engine.run_macro('newImage("a", "8-bit", 10, 10, 5); run("Reduce...", "reduction=0");', timeout=1)
    assert engine.broken is None
    assert engine.run_macro('print("alive");').log.strip() == "alive"


# -- arguments and dialogs --------------------------------------------------------------------


def test_string_argument(engine):
    assert engine.run_macro("print(getArgument());", args="hello world").log.strip() == "hello world"


def test_mapping_argument_without_parameters_is_key_value(engine):
    r = engine.run_macro('a = getArgument(); print(a);', args={"sigma": 2, "name": "x y"})
    assert r.log.strip() == "sigma=2 name=[x y]"


def test_script_parameters_filled_from_args_and_defaults(engine):
    macro = """#@ Double sigma (label="Sigma", value=1.5)
#@ String label
#@ Integer count (value=3)
#@ Boolean flag
#@output String result
print(sigma + "|" + label + "|" + count + "|" + flag);
"""
    r = engine.run_macro(macro, args={"label": 'he said "hi"', "count": 7})
    assert r.log.strip() == '1.5|he said "hi"|7|0'
    with pytest.raises(MacroError, match="label") as info:
        engine.run_macro(macro)
    assert info.value.kind == "argument"
    with pytest.raises(MacroError, match="unknown argument bogus"):
        engine.run_macro(macro, args={"label": "a", "bogus": 1})


def test_dialog_options_fill_the_macros_own_dialog(engine):
    macro = """
    run("Gaussian Blur...", "sigma=1");
    Dialog.create("Params"); Dialog.addNumber("threshold", 3); Dialog.addString("name", "x");
    Dialog.show();
    print(Dialog.getNumber() + " " + Dialog.getString());
    """
    img = np.zeros((8, 8), np.uint8)
    r = engine.run_macro(macro, image=img, dims="YX", dialog_options="threshold=17 name=abc")
    assert r.log.strip() == "17.0 abc"  # Dialog.getNumber is a float


# -- state -----------------------------------------------------------------------------------


def test_no_leakage_between_runs_unless_kept(engine):
    first = engine.run_macro('newImage("a", "8-bit", 4, 4, 1); run("Measure"); makeRectangle(0,0,2,2); '
                         'roiManager("add"); print("one"); run("Set Measurements...", "area redirect=None decimal=3");')
    assert first.results["Area"].size == 1 and len(first.rois) == 2
    second = engine.run_macro('print(nImages + " " + nResults + " " + roiManager("count"));')
    assert second.log.strip() == "0 0 0"
    assert second.images == {} and second.tables == {} and second.rois == []
    kept = engine.run_macro('newImage("k", "8-bit", 4, 4, 1); run("Measure");')
    again = engine.run_macro('print(nImages + " " + nResults); run("Measure");', keep_state=True)
    assert again.log.strip() == "1 1"
    assert again.results["Area"].size == 2 and "k" in again.images and kept.images


def test_identical_runs_give_identical_results(engine, hela_dna):
    macro = ('setAutoThreshold("Default dark"); run("Set Measurements...", "area mean centroid redirect=None '
             'decimal=3"); run("Analyze Particles...", "size=10-Infinity pixel display");')
    a = engine.run_macro(macro, image=hela_dna, dims="YX")
    b = engine.run_macro(macro, image=hela_dna, dims="YX")
    assert a.tables.keys() == b.tables.keys()
    for col, values in a.results.items():
        assert np.array_equal(values, b.results[col]), col
    assert a.log == b.log


def test_macro_from_file(engine, tmp_path):
    p = tmp_path / "m.ijm"
    p.write_text('print("from file " + getArgument());')
    assert engine.run_macro(p, args="x").log.strip() == "from file x"
    assert engine.run_macro(str(p), args="y").log.strip() == "from file y"


def test_bad_image_arguments(engine):
    with pytest.raises(MacroError, match="dims") as info:
        engine.run_macro("", image=np.zeros((3, 4, 5)), dims="YX")
    assert info.value.kind == "argument"
    with pytest.raises(MacroError, match="Y and X"):
        engine.run_macro("", image=np.zeros((3, 4)), dims="ZY")
    with pytest.raises(MacroError, match="complex"):
        engine.run_macro("", image=np.zeros((3, 4), complex), dims="YX")


def test_hyperstack_object_input_carries_names_and_calibration(engine):
    from dataclasses import dataclass, field

    @dataclass
    class Stack:
        array: np.ndarray
        channel_names: list = field(default_factory=list)
        calibration: Calibration = field(default_factory=Calibration)

    arr = np.arange(3 * 2 * 6 * 5, dtype=np.uint8).reshape(1, 3, 2, 6, 5)
    hs = Stack(arr, ["DNA", "PH3"], Calibration(pixel_width=0.2, pixel_height=0.3, pixel_depth=1.5))
    r = engine.run_macro('getVoxelSize(w, h, d, unit); print(w + " " + h + " " + d); '
                     'Stack.setChannel(2); print(getInfo("slice.label"));', image=hs, title="obj")
    lines = r.log.strip().splitlines()
    assert [float(x) for x in lines[0].split()] == [0.2, 0.3, 1.5]
    assert lines[1] == "PH3"
    info = r.image_info["obj"]
    assert info.channel_names == ["DNA", "PH3"]
    assert (info.calibration.pixel_width, info.calibration.pixel_height) == (0.2, 0.3)
    assert np.array_equal(r.images["obj"], arr)


# -- scripts (ImageJ macros with #@ inputs and #@output outputs) --------------------------------------


def test_ijm_script_outputs_are_typed_values(engine, tmp_path, hela_dna):
    code = """#@ Integer n
#@ String word (value="fiji")
#@output Integer twice
#@output Double mean
#@output String shout
#@output Boolean odd
twice = n * 2;
getStatistics(area, mean);
shout = toUpperCase(word) + "!";
odd = (n % 2 == 1);
"""
    r = engine.run_script(code, inputs={"n": 21}, image=hela_dna, dims="YX")
    assert r.outputs == {"twice": 42, "mean": pytest.approx(hela_dna.mean(), rel=1e-6), "shout": "FIJI!", "odd": True}
    p = tmp_path / "s.ijm"
    p.write_text(code)
    assert engine.run_script(str(p), inputs={"n": 4, "word": "x"}, image=hela_dna, dims="YX").outputs["shout"] == "X!"
    with pytest.raises(MacroError, match="missing argument n") as info:
        engine.run_script(code)
    assert info.value.kind == "argument"


def test_open_image_reads_a_real_tiff_like_tifffile(engine, data_dir):
    import tifffile

    f = data_dir / HELA.format(2)
    r = engine.open_image(f)
    (title, got), = r.images.items()
    np.testing.assert_array_equal(got[0, 0, 0], tifffile.imread(f))
    with pytest.raises(MacroError, match="not found"):
        engine.open_image(data_dir / "missing.tif")


def test_results_do_not_leak_between_runs_while_the_results_window_is_kept(engine):
    """The Results window stays open between runs (emptied, not rebuilt):
    each run sees only its own measurements, a run that measures nothing
    returns no Results table, and the areas are numpy's."""
    img = np.zeros((1, 1, 1, 128, 128), np.uint16)
    img[0, 0, 0, 10:30, 10:30] = 1000  # 400 px
    img[0, 0, 0, 60:70, 60:110] = 2000  # 500 px
    code = 'setThreshold(500, 65535); run("Convert to Mask"); run("Analyze Particles...", "display");'
    first = engine.run_macro(code, image=img)
    assert sorted(first.tables["Results"]["Area"]) == [400.0, 500.0]
    assert "Results" not in engine.run_macro("x = 1;").tables
    one = img.copy()
    one[0, 0, 0, 60:70, 60:110] = 0
    again = engine.run_macro(code, image=one)
    assert list(again.tables["Results"]["Area"]) == [float((one > 500).sum())]


def test_a_kept_table_window_carries_nothing_into_the_next_run(engine):
    """A macro's own table window ("Counts") stays open between runs, emptied
    (so Table.create does not build a window and wait for it): each run sees
    only the rows and columns it wrote, a run that writes none gets no such
    table, and the counts are numpy's."""
    img = np.zeros((1, 1, 1, 64, 64), np.uint16)
    img[0, 0, 0, 5:15, 5:15] = 900
    img[0, 0, 0, 30:40, 30:60] = 900
    code = ('setThreshold(500, 65535); run("Convert to Mask"); run("Analyze Particles...", "clear"); '
            'Table.create("Counts"); Table.set("Count", 0, nResults, "Counts"); Table.set("Mean", 0, 9, "Counts"); Table.update("Counts");')
    first = engine.run_macro(code, image=img)
    assert first.tables["Counts"]["Count"].tolist() == [2.0]
    nothing = engine.run_macro('print(isOpen("Counts") + " " + Table.size("Counts"));')
    assert "Counts" not in nothing.tables and nothing.log.strip().endswith("0")
    one = img.copy()
    one[0, 0, 0, 30:40, 30:60] = 0
    again = engine.run_macro(code.replace('Table.set("Mean", 0, 9, "Counts"); ', ""), image=one)
    assert again.tables["Counts"]["Count"].tolist() == [1.0]
    assert list(again.tables["Counts"]) == ["Count"]  # no column of the first run
    created_empty = engine.run_macro('Table.create("Other"); Table.update("Other");')
    assert "Other" in created_empty.tables and "Counts" not in created_empty.tables
