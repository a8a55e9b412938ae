"""Label images, boxes and ROI painting from macro outputs
(fiji_bridge.objects), and the stores' refusals; oracles: scipy.ndimage,
ngio's own computations, hand-made shapes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fiji_bridge.backends.base import BackendError, NotFound, ObjectTable, VirtualBackend
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import Calibration
from fiji_bridge.engine.base import MacroResult, Roi
from fiji_bridge.objects import (LabelSpec, LabelSpecError, declared_labels, object_boxes, parse_label_specs,
                                 polygon_mask, rois_to_labels, to_labels)
from fiji_bridge.outputs import OutputError, save_result

ndimage = pytest.importorskip("scipy.ndimage")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _blobs(seed=0, n=25, size=128):
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)
    for _ in range(n):
        y, x = rng.integers(4, size - 4, 2)
        r = rng.integers(1, 4)
        m[max(y - r, 0):y + r, max(x - r, 0):x + r] = 255
    return m


def test_label_specs():
    assert parse_label_specs("mask") == [LabelSpec("mask", "mask", False)]
    assert parse_label_specs("mask=nuclei:objects, rois=cells") == [LabelSpec("mask", "nuclei", True),
                                                                     LabelSpec("rois", "cells", False)]
    with pytest.raises(LabelSpecError, match="twice"):
        parse_label_specs("a=x,b=x")
    with pytest.raises(LabelSpecError, match="IMAGE"):
        parse_label_specs("mask:cells")
    code = '// Output images: "mask"\n// Output labels: "mask" (objects), "seeds"\nrun("x");'
    assert declared_labels(code) == [LabelSpec("mask", "mask", True), LabelSpec("seeds", "seeds", False)]


def test_binary_masks_stay_binary_unless_objects_are_asked():
    m = np.stack([_blobs(1), _blobs(2)])[:, None, None]  # T=2
    binary = to_labels(m)
    assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 1}
    np.testing.assert_array_equal(binary[:, 0], m[:, 0, 0] > 0)
    objects = to_labels(m, objects=True)
    eight = np.ones((3, 3), bool)
    first, n1 = ndimage.label(m[0, 0, 0] > 0, structure=eight)
    second, n2 = ndimage.label(m[1, 0, 0] > 0, structure=eight)
    np.testing.assert_array_equal(objects[0, 0], first)  # frame 1: 1..n1 in raster order
    np.testing.assert_array_equal(objects[1, 0], np.where(second > 0, second + n1, 0))  # frame 2 continues
    assert objects.max() == n1 + n2
    lab = np.zeros((1, 1, 1, 8, 8), np.uint16)
    lab[..., :2, :2], lab[..., 5:, 5:] = 7, 300
    np.testing.assert_array_equal(to_labels(lab)[:, :, None], lab)  # integer labels kept as they are
    with pytest.raises(LabelSpecError, match="integer"):
        to_labels(np.full((1, 1, 1, 4, 4), 0.5, np.float32))


def test_boxes_match_ngio_and_units_follow_the_calibration(tmp_path):
    ngio = pytest.importorskip("ngio")
    lab = to_labels(_blobs(3)[None, None, None], objects=True)
    cal = Calibration(pixel_width=0.5, pixel_height=0.5, unit="micron")
    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("p")
    st.save_field(pid, "C03", 0, np.zeros((1, 1, 1, 128, 128), np.uint8), calibration=cal)
    st.save_labels(pid, "C03", 0, "blobs", lab)
    boxes = object_boxes(lab, cal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = ngio.open_ome_zarr_container(str(tmp_path / "p.zarr" / "C" / "3" / "0"))
        theirs = img.get_label("blobs").build_masking_roi_table().dataframe.sort_index()
    assert list(theirs.index) == boxes["label"]
    for c in ("x_micrometer", "y_micrometer", "len_x_micrometer", "len_y_micrometer"):
        np.testing.assert_allclose(theirs[c].to_numpy(float), boxes[c])


def test_boxes_of_objects_in_different_frames_are_their_own():
    lab = np.zeros((2, 1, 20, 20), np.uint32)
    lab[0, 0, 2:12, 2:12] = 1  # frame 1
    lab[1, 0, 5:8, 5:9] = 2  # frame 2, over the first one's place
    b = object_boxes(lab)
    assert b["label"] == [1, 2]
    assert (b["x_micrometer"], b["len_x_micrometer"], b["len_y_micrometer"]) == ([2.0, 5.0], [10.0, 4.0], [10.0, 3.0])


def test_polygon_mask_is_pixel_centres_inside():
    rect = np.array([[2, 3], [7, 3], [7, 5], [2, 5]], float)  # ImageJ makeRectangle(2, 3, 5, 2)
    m = polygon_mask(rect, (10, 10))
    want = np.zeros((10, 10), bool)
    want[3:5, 2:7] = True
    np.testing.assert_array_equal(m, want)
    tri = np.array([[0, 0], [8, 0], [0, 8]], float)
    yy, xx = np.mgrid[:10, :10] + 0.5
    np.testing.assert_array_equal(polygon_mask(tri, (10, 10)), (xx + yy < 8))
    rois = [Roi("a", "rectangle", b"", rect, (0, 0, 0)), Roi("p", "point", b"", np.array([[1.0, 1.0]]), (0, 0, 0)),
            Roi("b", "polygon", b"", tri, (0, 2, 0))]
    lab = rois_to_labels(rois, (1, 3, 1, 10, 10))
    assert set(np.unique(lab[0, 0])) == {0, 1} and set(np.unique(lab[0, 1])) == {0, 1, 3}  # z=2 only; points skipped
    np.testing.assert_array_equal(lab[0, 0] == 1, want)


def test_refusals_say_what_to_do(tmp_path):
    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("p")
    with pytest.raises(NotFound):
        st.save_labels(pid, "A01", 0, "x", np.zeros((1, 1, 8, 8), np.uint8))
    with pytest.raises(BackendError, match="no fields yet"):
        st.save_plate_tables(pid, [ObjectTable("t", {"a": [1]})])
    st.save_field(pid, "A01", 0, np.zeros((1, 1, 1, 8, 8), np.uint8))
    with pytest.raises(BackendError, match="does not fit"):
        st.save_labels(pid, "A01", 0, "x", np.zeros((1, 1, 8, 9), np.uint8))
    with pytest.raises(BackendError, match="needs a 'label' column"):
        ObjectTable("t", {"Area": [1]}, kind="feature")
    res = MacroResult(images={"mask": np.zeros((1, 1, 1, 8, 8), np.uint8)})
    with pytest.raises(OutputError, match="no image titled 'nuclei'"):
        save_result(res, "", well="A01", site=1, backend=st, plate=pid, labels="nuclei")
    with pytest.raises(OutputError, match="input field"):
        save_result(res, "", well="A01", site=1, backend=st, plate=pid, labels="mask")

    class Bare(VirtualBackend):  # a store without NGFF support: the defaults
        scheme = "bare"
        list_files = load = save = exists = plate_structure = create_plate = save_field = lambda *a, **k: None

    with pytest.raises(NotImplementedError, match="does not store label images"):
        Bare().save_labels("p", "A01", 0, "x", np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(NotImplementedError, match="typed field tables"):
        Bare().save_field_tables("p", "A01", 0, [])


def test_the_stores_hold_the_same_tables(tmp_path):
    """One result into OME-Zarr (read back by ngio), OME-TIFF CSV and OME-TIFF
    Parquet: the same tables, columns and values."""
    ngio = pytest.importorskip("ngio")
    import pandas as pd

    from fiji_bridge.backends.ome_tiff import OmeTiffStore

    m = _blobs(4)[None, None, None]
    n = int(ndimage.label(m[0, 0, 0] > 0, structure=np.ones((3, 3), bool))[1])
    res = MacroResult(images={"mask": m}, tables={"Results": {"Area": np.arange(n, dtype=float) + 0.5,
                                                              "Label": np.array(["f"] * n, dtype=object)}})
    inp = np.zeros((1, 1, 1, 128, 128), np.uint16)
    stores = {"zarr": ZarrPlateStore(tmp_path / "z"), "csv": OmeTiffStore(tmp_path / "c"),
              "parquet": OmeTiffStore(tmp_path / "p", table_format="parquet")}
    got = {}
    for kind, st in stores.items():
        pid = st.create_plate("d")
        save_result(res, "", well="A01", site=2, backend=st, plate=pid, labels="mask=nuclei:objects", input=inp)
        for t in ("nuclei_features", "nuclei_ROI_table", "FOV_ROI_table"):
            if kind == "zarr":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = ngio.open_ome_zarr_container(str(tmp_path / "z" / "d.zarr" / "A" / "1" / "2"))
                    df = img.get_table(t).dataframe.reset_index()
            elif kind == "csv":
                df = pd.read_csv(tmp_path / "c" / "d" / "tables" / "A01" / f"{t}_s002.csv")
            else:
                df = pd.read_parquet(tmp_path / "p" / "d" / "tables" / "A01" / f"{t}_s002.parquet")
            got[(kind, t)] = df
    for t in ("nuclei_features", "nuclei_ROI_table", "FOV_ROI_table"):
        z = got[("zarr", t)]
        for kind in ("csv", "parquet"):
            o = got[(kind, t)]
            assert sorted(o.columns) == sorted(z.columns), (kind, t)
            pd.testing.assert_frame_equal(o[sorted(o.columns)], z[sorted(z.columns)], check_dtype=False)
    assert len(got[("zarr", "nuclei_features")]) == n
