"""The macro library: `#@` parsing, argument checking, binding, and every
library macro run in real ImageJ (the session `ij` engine) on real and
synthetic pixels, checked against numpy on the same pixels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from fiji_bridge.macros import (
    MacroArgumentError,
    MacroNotFound,
    MacroParseError,
    bind,
    check_args,
    library,
    parse_parameters,
    resolve,
)
from fiji_bridge.synthetic import make_field

HEADER = """\
// a test macro
#@ Integer (label="Channel", value=2, min=1, max=4, description="which channel") channel
#@ Double(value=1.5) sigma
#@ String (choices={"Otsu", "Default", "Triangle"}, value="Default") method
#@ Boolean watershed
#@ String (label="Name") name
#@ File (style="directory") folder
#@ ImagePlus imp
#@output Double result
#@ LogService log
print(channel + " " + sigma);
"""


# --------------------------------------------------------------------------- parsing


def test_parse_parameters_reads_types_defaults_attributes():
    ps = {p.name: p for p in parse_parameters(HEADER)}
    assert list(ps) == ["channel", "sigma", "method", "watershed", "name", "folder", "imp", "result", "log"]
    ch = ps["channel"]
    assert (ch.kind, ch.default, ch.min, ch.max, ch.label, ch.description, ch.line) == (
        "int", 2, 1.0, 4.0, "Channel", "which channel", 2)
    assert ps["sigma"].kind == "float" and ps["sigma"].default == 1.5
    assert ps["method"].choices == ("Otsu", "Default", "Triangle") and ps["method"].default == "Default"
    assert ps["watershed"].kind == "boolean" and ps["watershed"].effective_default is False
    assert ps["folder"].kind == "file" and ps["folder"].style == "directory"
    assert not ps["imp"].is_argument and ps["imp"].kind == "image"
    assert ps["result"].io == "output" and not ps["result"].is_argument
    assert not ps["log"].is_argument


@pytest.mark.parametrize(
    "line",
    [
        "#@ Double",  # no name
        "#@ Double (value=1 sigma",  # unbalanced
        "#@ Integer (value=abc) n",  # default of the wrong type
        "#@ Double (value) x",  # attribute without value
    ],
)
def test_malformed_header_is_a_parse_error_naming_the_line(line):
    with pytest.raises(MacroParseError, match="line 2"):
        parse_parameters("// x\n" + line + "\n")


def test_duplicate_parameter_is_an_error():
    with pytest.raises(MacroParseError, match="declared twice"):
        parse_parameters("#@ Double a\n#@ Integer a\n")


# --------------------------------------------------------------------------- arguments


def test_check_args_converts_and_fills_defaults():
    ps = parse_parameters(HEADER)
    v = check_args(ps, {"channel": "3", "sigma": "0.5", "watershed": "yes", "name": 7, "folder": "/tmp"})
    assert v == {"channel": 3, "sigma": 0.5, "method": "Default", "watershed": True, "name": "7", "folder": "/tmp"}
    assert isinstance(v["channel"], int) and isinstance(v["sigma"], float)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"chanel": 1, "name": "x", "folder": "/"}, r"unknown argument chanel.*channel, sigma"),
        ({"channel": "two", "name": "x", "folder": "/"}, r"channel='two': expected an integer"),
        ({"channel": 1.5, "name": "x", "folder": "/"}, r"expected an integer"),
        ({"sigma": "wide", "name": "x", "folder": "/"}, r"sigma='wide': expected a number"),
        ({"watershed": "maybe", "name": "x", "folder": "/"}, r"expected true or false"),
        ({"method": "Otsu2", "name": "x", "folder": "/"}, r"not one of Otsu, Default, Triangle"),
        ({"channel": 9, "name": "x", "folder": "/"}, r"above the maximum 4"),
        ({"channel": 0, "name": "x", "folder": "/"}, r"below the minimum 1"),
        ({"name": "x"}, r"missing argument folder"),
        ({"imp": "x", "name": "x", "folder": "/"}, r"unknown argument imp"),
    ],
)
def test_check_args_rejects_bad_arguments_before_running(args, match):
    with pytest.raises(MacroArgumentError, match=match):
        check_args(parse_parameters(HEADER), args)


def test_bind_keeps_line_numbers_and_quotes_strings():
    code = bind(HEADER, {"name": 'say "hi"\\ now', "folder": "/tmp/x"})
    lines, orig = code.splitlines(), HEADER.splitlines()
    assert len(lines) == len(orig)
    assert lines[1].startswith("channel = 2;")
    assert lines[2].startswith("sigma = 1.5;")
    assert lines[3].startswith('method = "Default";')
    assert lines[4].startswith("watershed = false;")
    assert lines[5].startswith('name = "say \\"hi\\"\\\\ now";')
    assert lines[7].startswith("// #@ ImagePlus") and lines[8].startswith("// #@output")
    assert lines[-1] == orig[-1]
    assert not any(l.lstrip().startswith("#@") for l in lines)


def test_bound_values_reach_plain_imagej(ij):
    code = bind(HEADER, {"channel": 3, "sigma": 0.25, "watershed": True, "name": 'q"uo\\te', "folder": "/tmp"})
    code = code.replace('print(channel + " " + sigma);',
                        'print("V:" + channel + "|" + sigma + "|" + method + "|" + watershed + "|" + name);')
    r = ij.run_macro(code)
    assert 'V:3|0.25|Default|1|q"uo\\te' in r.log


# --------------------------------------------------------------------------- library


def test_library_has_the_documented_macros_with_outputs():
    lib = library()
    for name in ("z_projection", "background_subtraction", "nuclei_count", "channel_intensity", "colocalization"):
        assert name in lib, f"{name} missing from {sorted(lib)}"
        m = resolve(name)
        assert m.description, name
        assert all(p.description for p in m.arguments), name
        assert m.check() is not None  # every argument has a default
    assert resolve("nuclei_count").output_images == ("mask",)
    assert resolve("nuclei_count").output_tables == ("Results", "Counts")
    assert resolve("nuclei_count.ijm").path == lib["nuclei_count"]
    assert resolve(str(lib["z_projection"])).name == "z_projection"


def test_unknown_macro_lists_the_library():
    with pytest.raises(MacroNotFound, match="nuclei_count"):
        resolve("no_such_macro")


def test_macros_command_lists_library_and_parameters():
    out = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "macros"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("nuclei_count", "colocalization", "z_projection"):
        assert name in out.stdout
    one = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "macros", "nuclei_count"], capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    for word in ("threshold_method", "Otsu", "watershed", "min_size", "mask", "Counts"):
        assert word in one.stdout
    bad = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "macros", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no macro" in bad.stdout


# --------------------------------------------------------------------------- running the library


@pytest.fixture(scope="module")
def field5d():
    """A synthetic 2-channel, 3-Z, 2-T uint16 field (TZCYX)."""
    f = make_field(12, size=128, size_z=3, size_t=2, seed=7)
    return f


def run(ij, name, image, **args):
    return ij.run_macro(resolve(name).bind(args), image=image, dims="TZCYX", timeout=120)


@pytest.mark.parametrize("method, fn", [
    ("max", np.max), ("mean", np.mean), ("min", np.min), ("sum", np.sum), ("median", np.median),
    ("sd", lambda a, axis, keepdims: np.std(a, axis=axis, ddof=1, keepdims=keepdims))])
def test_z_projection_equals_numpy(ij, field5d, method, fn):
    a = field5d.array
    r = run(ij, "z_projection", a, method=method)
    assert list(r.images) == ["projection"]
    got = r.images["projection"]
    want = fn(a.astype(np.float64), axis=1, keepdims=True)
    assert got.shape == want.shape == (2, 1, 2, 128, 128)
    if method in ("max", "min"):
        assert got.dtype == a.dtype
        np.testing.assert_array_equal(got, want.astype(a.dtype))
    else:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_background_subtraction_flattens_background(ij, field5d):
    a = field5d.array
    r = run(ij, "background_subtraction", a, radius=20)
    out = r.images["background_subtracted"]
    assert out.shape == a.shape and out.dtype == a.dtype
    # the flat background (~200) is removed; nuclei keep most of their signal
    nuc = a[0, 1, 0] > 800
    assert np.median(out[0, 1, 0][~nuc]) < 0.25 * np.median(a[0, 1, 0][~nuc])
    assert out[0, 1, 0][nuc].mean() > 0.6 * (a[0, 1, 0][nuc].mean() - 200)
    assert np.all(out <= a)


def test_channel_intensity_equals_numpy(ij, field5d):
    a = field5d.array
    r = run(ij, "channel_intensity", a)
    t = r.tables["Results"]
    assert len(t["Mean"]) == 2 * 2  # channels x frames
    for i, (c, f) in enumerate(zip(t["Channel"].astype(int), t["Frame"].astype(int))):
        px = a[f - 1, :, c - 1].astype(np.float64)
        np.testing.assert_allclose(t["Mean"][i], px.mean(), rtol=1e-9)
        assert t["Min"][i] == px.min() and t["Max"][i] == px.max()
        np.testing.assert_allclose(t["IntDen"][i], px.sum(), rtol=1e-9)
        np.testing.assert_allclose(t["StdDev"][i], px.std(ddof=1), rtol=1e-6)
        assert t["Voxels"][i] == px.size
    assert not r.images  # the input is closed, nothing else left open


def test_channel_intensity_on_real_hela_channels(ij, data_dir):
    d = data_dir / "hela_D03"
    a = np.stack([tifffile.imread(d / f"AS_09125_050116030001_D03f00d{c}.tif") for c in range(3)])
    r = ij.run_macro(resolve("channel_intensity").bind({}), image=a, dims="CYX")
    t = r.tables["Results"]
    np.testing.assert_allclose(t["Mean"], a.reshape(3, -1).mean(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(t["Max"], a.reshape(3, -1).max(axis=1))


def test_colocalization_equals_numpy(ij, field5d):
    a = field5d.array
    r = run(ij, "colocalization", a, threshold_method="Otsu")
    t = r.tables["Results"]
    assert len(t["Pearson"]) == 2
    for i in range(2):
        x = a[i, :, 0].astype(np.float64).ravel()
        y = a[i, :, 1].astype(np.float64).ravel()
        np.testing.assert_allclose(t["Pearson"][i], np.corrcoef(x, y)[0, 1], rtol=1e-5)
        ta, tb = t["ThresholdA"][i], t["ThresholdB"][i]
        assert ta == int(ta) and x.min() < ta < x.max()
        ma, mb = x >= ta, y >= tb
        np.testing.assert_allclose(t["M1"][i], x[ma & mb].sum() / x[ma].sum(), rtol=1e-5)
        np.testing.assert_allclose(t["M2"][i], y[ma & mb].sum() / y[mb].sum(), rtol=1e-5)
        np.testing.assert_allclose(t["Overlap"][i], (ma & mb).sum() / (ma | mb).sum(), rtol=1e-5)
    assert t["Pearson"][0] > 0.2  # the cell signal surrounds every nucleus


def test_colocalization_fixed_thresholds_on_real_hela(ij, data_dir):
    d = data_dir / "hela_D03"
    chans = [tifffile.imread(d / f"AS_09125_050116030001_D03f00d{c}.tif") for c in range(3)]
    a = np.stack(chans)  # CYX
    r = ij.run_macro(resolve("colocalization").bind(
        {"channel_a": 1, "channel_b": 3, "threshold_method": "fixed", "threshold_a": 40, "threshold_b": 30}),
        image=a, dims="CYX")
    t = r.tables["Results"]
    x, y = a[0].astype(float).ravel(), a[2].astype(float).ravel()
    np.testing.assert_allclose(t["Pearson"][0], np.corrcoef(x, y)[0, 1], rtol=1e-5)
    ma, mb = x >= 40, y >= 30
    np.testing.assert_allclose(t["M1"][0], x[ma & mb].sum() / x[ma].sum(), rtol=1e-5)


def test_colocalization_refuses_one_channel(ij):
    from fiji_bridge.engine import MacroError

    with pytest.raises(MacroError, match="channels 1 and 2"):
        ij.run_macro(resolve("colocalization").bind({}), image=np.zeros((16, 16), np.uint8), dims="YX")


def test_nuclei_count_on_synthetic_field_finds_the_truth(ij):
    f = make_field(15, size=192, size_z=3, seed=3)
    r = run(ij, "nuclei_count", f.array, channel=1)
    counts = r.tables["Counts"]
    assert counts["Count"][0] == f.n_nuclei
    res = r.tables["Results"]
    assert len(res["Area"]) == f.n_nuclei
    # every true centre is within 3 px of one measured centroid
    xy = np.stack([res["Y"], res["X"]], axis=1)
    d = np.sqrt(((f.centers[:, None, :] - xy[None]) ** 2).sum(-1)).min(axis=1)
    assert d.max() < 3, d
    mask = r.images["mask"]
    assert mask.shape == (1, 1, 1, 192, 192) and set(np.unique(mask)) == {0, 255}
    # the mask's area is the objects' total area
    assert (mask > 0).sum() == res["Area"].sum()


def test_nuclei_count_on_real_hela_matches_numpy_on_its_mask(ij, data_dir):
    img = tifffile.imread(data_dir / "hela_D03" / "AS_09125_050116030001_D03f00d0.tif")
    r = ij.run_macro(resolve("nuclei_count").bind({"min_size": 30}), image=img, dims="YX")
    res, mask = r.tables["Results"], r.images["mask"][0, 0, 0]
    n = int(r.tables["Counts"]["Count"][0])
    assert n == len(res["Area"]) > 50
    assert res["Area"].min() >= 30
    # per-object means are the image's pixels under the mask: the totals agree
    np.testing.assert_allclose((res["Mean"] * res["Area"]).sum(), img[mask > 0].astype(float).sum(), rtol=1e-9)


def test_nuclei_count_bad_channel_is_a_clear_macro_error(ij, field5d):
    from fiji_bridge.engine import MacroError

    with pytest.raises(MacroError, match="channel 5 does not exist"):
        run(ij, "nuclei_count", field5d.array, channel=5)
