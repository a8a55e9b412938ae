"""The derived plate as the NGFF tools see it: labels and tables of a real
batch (the SBS plate of ../shared/data, nuclei_count through real bridges),
read back with ngio, validated with ome-zarr-models, listed by
napari-ome-zarr's reader; oracles: scipy.ndimage on the masks ImageJ made
and the macro's own Results columns."""

from __future__ import annotations

import csv
import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from fiji_bridge.backends import open_plate
from fiji_bridge.batch import free_port_pair, run_batch
from fiji_bridge.importer import import_folder

ngio = pytest.importorskip("ngio", reason="ngio is not installed (pip install fiji-bridge)")
ndimage = pytest.importorskip("scipy.ndimage")

pytestmark = [pytest.mark.imagej, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
ARGS = {"channel": 1, "sigma": 1.0, "min_size": 30}
EIGHT = np.ones((3, 3), bool)


@pytest.fixture(scope="module")
def bridge():
    from fiji_bridge import BridgeClient

    with BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=180, own=True) as c:
        yield c


def _batch(data_dir, root, bridge, *, wells: str, labels: str):
    src = f"zarr://{root}/sbs.zarr"
    import_folder(data_dir / "sbs_plate_O01-O04", src)
    out = f"zarr://{root}/sbs_nuclei.zarr"
    rep = run_batch(src, "nuclei_count", args=ARGS, out_uri=out, wells=wells, ports=[bridge.port], progress=False,
                    labels=labels, timeout=120)
    assert rep.ok, rep.failures
    return src, rep


@pytest.fixture(scope="module")
def v04(data_dir, tmp_path_factory, bridge):
    root = tmp_path_factory.mktemp("ngff04")
    src, rep = _batch(data_dir, root, bridge, wells="O01,O02", labels="mask=nuclei:objects")
    return root, src, rep


def _csv(rep, title):
    backend, pid = open_plate(rep.derived)
    return list(csv.DictReader(io.StringIO(backend.load(rep.tables[title]))))


def _field_dirs(root):
    return sorted(p for p in (root / "sbs_nuclei.zarr").glob("*/*/*") if p.name.isdigit())


@pytest.mark.timeout(600)
def test_ngio_lists_and_reads_labels_and_tables(v04, bridge):
    root, src, rep = v04
    plate = ngio.open_ome_zarr_plate(str(root / "sbs_nuclei.zarr"))
    images = plate.get_images(max_workers=1)
    assert sorted(images) == [f"O/{c}/{f}" for c in (1, 2) for f in range(3)]
    results = _csv(rep, "Results")  # the macro's Results columns, as the batch saved them
    counts = {(r["well"], int(r["field"])): int(float(r["Count"])) for r in _csv(rep, "Counts")}
    src_backend, src_id = open_plate(src)
    for path, img in images.items():
        _, col, fld = path.split("/")
        well, site = f"O{int(col):02d}", int(fld)
        assert img.list_labels() == ["nuclei"]
        assert set(img.list_tables()) == {"FOV_ROI_table", "nuclei_ROI_table", "nuclei_features", "counts"}
        # the field image is the source field (the mask became the label)
        np.testing.assert_array_equal(np.asarray(img.get_image().get_array()).reshape(512, 512),
                                      src_backend.load_field(src_id, well, site).reshape(512, 512))
        lab = np.asarray(img.get_label("nuclei").get_array()).reshape(512, 512)
        # oracle: scipy's connected components of the label's foreground
        cc, n = ndimage.label(lab > 0, structure=EIGHT)
        assert n == lab.max() == counts[(well, site)] > 0
        np.testing.assert_array_equal(np.unique(lab), np.arange(n + 1))
        areas = ndimage.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))
        feats = img.get_feature_table("nuclei_features").dataframe
        assert list(feats.index) == list(range(1, n + 1))
        mine = [r for r in results if (r["well"], int(r["field"])) == (well, site)]
        assert len(mine) == n
        # the feature table holds ImageJ's columns, row i for label i: its Area is that label's pixel count
        np.testing.assert_allclose(feats["Area"].to_numpy(float), [float(r["Area"]) for r in mine])
        np.testing.assert_allclose(feats["Area"].to_numpy(float), areas)
        np.testing.assert_allclose(feats["Mean"].to_numpy(float), [float(r["Mean"]) for r in mine], rtol=1e-6)
        # masking ROI boxes: ngio's own computation on the stored label is the oracle
        ours = img.get_masking_roi_table("nuclei_ROI_table")
        theirs = img.get_label("nuclei").build_masking_roi_table()
        assert ours.reference_label == "nuclei"
        o = ours.dataframe.sort_index()
        t = theirs.dataframe.sort_index()
        for c in ("x_micrometer", "y_micrometer", "len_x_micrometer", "len_y_micrometer"):
            np.testing.assert_allclose(o[c].to_numpy(float), t[c].to_numpy(float))
        cnt = img.get_table("counts").dataframe
        assert list(cnt["Count"]) == [counts[(well, site)]] and list(cnt["well"]) == [well]
        fov = img.get_roi_table("FOV_ROI_table").rois()
        assert len(fov) == 1 and fov[0].get("x").length == 512 and fov[0].get("y").length == 512
    # plate level: the concatenated tables and the per-well summaries
    assert {"results", "results_per_well", "counts", "counts_per_well"} <= set(plate.list_tables())
    res = plate.get_table("results").dataframe
    assert len(res) == len(results) == sum(counts.values())
    assert {"plate", "well", "field"} <= set(res.columns)
    assert sorted(set(res["well"])) == ["O01", "O02"]
    np.testing.assert_allclose(res["Area"].to_numpy(float), [float(r["Area"]) for r in results])
    assert list(res["field"]) == [int(r["field"]) for r in results]
    # ngio's own concatenation of the per-field feature tables has the same rows as our plate table
    cat = plate.concatenate_image_tables("nuclei_features", max_workers=1).dataframe
    assert len(cat) == len(res)
    np.testing.assert_allclose(np.sort(cat["Area"].to_numpy(float)), np.sort(res["Area"].to_numpy(float)))
    pw = plate.get_table("counts_per_well").dataframe
    for _, row in pw.iterrows():
        vals = [v for (w, _), v in counts.items() if w == row["well"]]
        assert row["fields"] == len(vals)
        assert row["mean_Count"] == pytest.approx(np.mean(vals))


@pytest.mark.timeout(600)
def test_the_label_is_what_imagej_masked(v04, bridge):
    """The same macro run directly on one field: its mask, labelled by scipy,
    is the stored label image."""
    root, src, rep = v04
    from fiji_bridge.macros import resolve

    backend, pid = open_plate(src)
    field = backend.load_field(pid, "O02", 1)
    res = bridge.run_macro(resolve("nuclei_count").bind(ARGS), array=field, dims="TZCYX", timeout=120,
                           title="sbs_O02_s001")
    mask = np.asarray(res.images["mask"]).reshape(512, 512)
    assert set(np.unique(mask)) <= {0, 255}
    want, n = ndimage.label(mask > 0, structure=EIGHT)
    img = ngio.open_ome_zarr_container(str(root / "sbs_nuclei.zarr" / "O" / "2" / "1"))
    got = np.asarray(img.get_label("nuclei").get_array()).reshape(512, 512)
    np.testing.assert_array_equal(got, want)
    assert n == len(res.results["Area"])
    np.testing.assert_allclose(img.get_feature_table("nuclei_features").dataframe["Area"].to_numpy(float),
                               np.asarray(res.results["Area"], float))


VALIDATE = """
import json, sys, zarr
from ome_zarr_models.{v} import HCS, Image
from ome_zarr_models.{v}.image_label import ImageLabel
hcs = HCS.from_zarr(zarr.open_group(sys.argv[1], mode="r"))  # wells, images, labels, all checked
out = {{"wells": hcs.n_wells, "labels": {{}}}}
for d in sys.argv[2:]:
    img = Image.from_zarr(zarr.open_group(d, mode="r"))
    attrs = img.labels.attributes if img.labels is not None else None
    names = list(getattr(attrs, "ome", attrs).labels) if attrs is not None else []  # 0.5: under "ome"
    for n in names:
        ImageLabel.from_zarr(zarr.open_group(d + "/labels/" + n, mode="r"))
    out["labels"][d] = names
print(json.dumps(out))
"""


def validate(plate_dir, field_dirs, version="v04"):
    """The NGFF validator model (ome-zarr-models) in a fresh interpreter:
    importing ngio in the same process breaks its pydantic models."""
    import json
    import subprocess
    import sys

    pytest.importorskip("ome_zarr_models", reason="ome-zarr-models is not installed")
    out = subprocess.run([sys.executable, "-c", VALIDATE.format(v=version), str(plate_dir)] + [str(d) for d in field_dirs],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_plate_validates_and_napari_lists_the_labels(v04):
    root, _, _ = v04
    dirs = _field_dirs(root)
    got = validate(root / "sbs_nuclei.zarr", dirs)
    assert got["wells"] == 2
    assert got["labels"] == {str(d): ["nuclei"] for d in dirs}
    napari_reader = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed")
    field = str(_field_dirs(root)[0])
    reader = napari_reader.napari_get_reader(field)
    assert reader is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = reader(field)
    kinds = [(layer[1].get("name"), layer[2]) for layer in layers]
    assert any(kind == "labels" for _, kind in kinds), kinds
    assert any(kind == "image" for _, kind in kinds), kinds


@pytest.mark.timeout(600)
def test_ngff_05_binary_mask_stays_binary_from_the_command_line(data_dir, tmp_path, bridge):
    """``fiji-bridge batch --labels mask --ngff 0.5``: NGFF 0.5 (zarr v3); a
    mask without ':objects' stays 0/1."""
    import subprocess
    import sys

    src = f"zarr://{tmp_path}/sbs.zarr"
    import_folder(data_dir / "sbs_plate_O01-O04", src)
    cmd = [sys.executable, "-m", "fiji_bridge.cli", "batch", "--plate", src, "--macro", "nuclei_count",
           "--out", f"zarr://{tmp_path}/sbs_nuclei.zarr", "--wells", "O03", "--port", str(bridge.port),
           "--labels", "mask", "--ngff", "0.5", "--labels-to-source"] + [a for k, v in ARGS.items() for a in ("--arg", f"{k}={v}")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "sbs_nuclei.zarr" / "zarr.json").is_file()
    assert (tmp_path / "sbs.zarr" / ".zgroup").is_file()  # the source stays NGFF 0.4 ...
    src_plate = ngio.open_ome_zarr_plate(str(tmp_path / "sbs.zarr"))  # ... with the labels asked for
    for path, img in src_plate.get_images(max_workers=1).items():
        if path.startswith("O/3/"):
            assert img.list_labels() == ["mask"]
            np.testing.assert_array_equal(np.asarray(img.get_label("mask").get_array()),
                                          np.asarray(ngio.open_ome_zarr_container(str(tmp_path / "sbs_nuclei.zarr" / path))
                                                     .get_label("mask").get_array()))
        else:
            assert img.list_labels() == []
    dirs = _field_dirs(tmp_path)
    assert validate(tmp_path / "sbs_nuclei.zarr", dirs, "v05")["labels"] == {str(d): ["mask"] for d in dirs}
    plate = ngio.open_ome_zarr_plate(str(tmp_path / "sbs_nuclei.zarr"))
    assert plate.meta.version == "0.5" if hasattr(plate.meta, "version") else True
    for path, img in plate.get_images(max_workers=1).items():
        assert img.list_labels() == ["mask"]
        lab = np.asarray(img.get_label("mask").get_array())
        assert set(np.unique(lab)) <= {0, 1} and lab.max() == 1
        # no objects asked: no feature table tied to the mask, the Results stay a generic table
        assert "mask_features" not in img.list_tables()
        assert {"FOV_ROI_table", "results", "counts"} <= set(img.list_tables())
        assert len(img.get_table("results").dataframe) == int(img.get_table("counts").dataframe["Count"].iloc[0])
    assert {"results", "counts", "counts_per_well"} <= set(plate.list_tables())



# --------------------------------------------------------------------------- ROIs from the macro

ROI_MACRO = """\
// Test macro: nuclei as ROI Manager ROIs, and their mask (holes included: an outline has none).
// Output images: "mask"
setOption("BlackBackground", true);
input = getImageID();
run("Duplicate...", "title=bin");
run("Gaussian Blur...", "sigma=1");
setAutoThreshold("Otsu dark");
run("Convert to Mask");
run("Set Measurements...", "area mean centroid redirect=None decimal=4");
run("Analyze Particles...", "size=30-Infinity pixel show=Masks display clear include add");
if (is("Inverting LUT")) run("Invert LUT");
rename("mask");
selectImage(input); close();
selectImage("bin"); close();
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["zarr", "ometiff"])
def test_macro_rois_become_roi_tables_and_labels(data_dir, tmp_path, bridge, kind):
    """Analyze Particles' ROIs: an ROI table, a label image painted from
    them (oracle: scipy's components of ImageJ's own mask), and for OME-TIFF
    a .zip that ImageJ's ROI Manager opens."""
    macro = tmp_path / "rois.ijm"
    macro.write_text(ROI_MACRO)
    src = f"zarr://{tmp_path}/sbs.zarr"
    import_folder(data_dir / "sbs_plate_O01-O04", src)
    out = f"{kind}://{tmp_path}/derived" + (".zarr" if kind == "zarr" else "")
    rep = run_batch(src, str(macro), out_uri=out, wells="O04", ports=[bridge.port], progress=False,
                    labels="rois=cells,mask=nuclei:objects", timeout=120)
    assert rep.ok, rep.failures
    backend, pid = open_plate(rep.derived)
    for site in range(3):
        results = [r for r in _csv(rep, "Results") if int(r["field"]) == site]
        n = len(results)
        assert n > 0
        if kind == "zarr":
            img = ngio.open_ome_zarr_container(str(tmp_path / "derived.zarr" / "O" / "4" / str(site)))
            assert img.list_labels() == ["cells", "nuclei"]
            cells = np.asarray(img.get_label("cells").get_array()).reshape(512, 512)
            nuclei = np.asarray(img.get_label("nuclei").get_array()).reshape(512, 512)
            rois = img.get_roi_table("imagej_ROI_table").dataframe
            masking = img.get_masking_roi_table("cells_ROI_table").dataframe.sort_index()
        else:
            import pandas as pd
            import tifffile

            stem = tmp_path / "derived" / f"O04_s{site:03d}"
            cells = tifffile.imread(f"{stem}.cells.labels.ome.tif").reshape(512, 512)
            nuclei = tifffile.imread(f"{stem}.nuclei.labels.ome.tif").reshape(512, 512)
            tables = tmp_path / "derived" / "tables" / "O04"
            rois = pd.read_csv(tables / f"imagej_ROI_table_s{site:03d}.csv").set_index("FieldIndex")
            masking = pd.read_csv(tables / f"cells_ROI_table_s{site:03d}.csv").set_index("label").sort_index()
            # ImageJ's ROI Manager opens the .zip beside the field
            res = bridge.run_macro(f'roiManager("reset"); roiManager("open", "{stem}.rois.zip"); '
                                   f'setResult("n", 0, roiManager("count")); updateResults();', timeout=60)
            assert int(res.results["n"][0]) == n
        # oracle: the mask ImageJ drew, labelled by scipy in raster order (Analyze Particles' order)
        want, k = ndimage.label(nuclei > 0, structure=EIGHT)
        assert k == n == len(rois)
        np.testing.assert_array_equal(cells, want)
        np.testing.assert_allclose(ndimage.sum_labels(np.ones_like(cells), cells, np.arange(1, n + 1)),
                                   [float(r["Area"]) for r in results])
        # the ROI table's boxes are the objects' bounding boxes
        for c in ("x_micrometer", "y_micrometer", "len_x_micrometer", "len_y_micrometer"):
            np.testing.assert_allclose(rois[c].to_numpy(float), masking[c].to_numpy(float))


@pytest.mark.timeout(120)
def test_table_writer_process_writes_what_ngio_reads(tmp_path):
    """AnnData plate tables through the low-priority writer process: ngio
    reads what was sent; it writes once; a child that died leaves the writing
    to the caller's process; ngio's refusal comes back as the error."""
    from fiji_bridge.backends.base import BackendError, ObjectTable
    from fiji_bridge.backends.ngff_tables import TableWriterProcess
    from fiji_bridge.backends.zarr_plate import ZarrPlateStore

    st = ZarrPlateStore(tmp_path, table_backend="anndata")
    pid = st.create_plate("p")
    st.save_field(pid, "A01", 0, np.ones((1, 1, 1, 8, 8), np.uint16))
    cols = {"well": ["A01", "B02"], "Count": [3, 5], "MeanArea": [1.5, float("nan")]}
    w = TableWriterProcess()
    pid_w = w.proc.pid
    assert os.getpriority(os.PRIO_PROCESS, pid_w) == 19
    deadline = time.monotonic() + 60
    while not w.ready():  # ngio imported in the child
        assert time.monotonic() < deadline, "the table writer process never got ready"
        time.sleep(0.05)
    st.save_plate_tables(pid, [ObjectTable("counts", cols)], writer=w)
    status = Path(f"/proc/{pid_w}/status")
    assert w.proc is None and (not status.exists() or b"zombie" in status.read_bytes().lower())  # it wrote and left
    df = ngio.open_ome_zarr_plate(str(tmp_path / "p.zarr")).get_table("counts").dataframe.reset_index()
    assert list(df["well"]) == cols["well"] and list(df["Count"]) == cols["Count"]
    assert df["MeanArea"].iloc[0] == 1.5 and np.isnan(df["MeanArea"].iloc[1])
    with pytest.raises(BackendError, match="already"):
        w.write(tmp_path / "p.zarr", [ObjectTable("again", cols)], plate=True)

    # a child that died, or is not ready yet (a busy machine): the caller's process writes, at once
    dead = TableWriterProcess()
    dead.proc.kill()
    dead.proc.wait()
    st.save_plate_tables(pid, [ObjectTable("other", {"x": [1.0, 2.0]})], writer=dead)
    fresh = TableWriterProcess()
    t0 = time.monotonic()
    st.save_plate_tables(pid, [ObjectTable("third", {"x": [3.0]})], writer=fresh)
    assert time.monotonic() - t0 < 30 and fresh.proc is None
    assert {"other", "third"} <= set(ngio.open_ome_zarr_plate(str(tmp_path / "p.zarr")).list_tables())

    bad = TableWriterProcess()
    while not bad.ready():
        assert time.monotonic() < deadline + 60
        time.sleep(0.05)
    with pytest.raises(BackendError, match="cannot write tables"):  # ngio's refusal, from the child
        bad.write(tmp_path / "not_a_plate", [ObjectTable("t", cols)], plate=True, backend="anndata")

    # parquet tables need no ngio: written here, the child stopped unused
    idle = TableWriterProcess()
    ZarrPlateStore(tmp_path).save_plate_tables(pid, [ObjectTable("fourth", {"x": [4]})], writer=idle)
    assert idle.proc is None
    assert list(ngio.open_ome_zarr_plate(str(tmp_path / "p.zarr")).get_table("fourth").dataframe["x"]) == [4]


GENERIC_COLUMNS = {
    "well": ["A01", "B02", "C03"],
    "field": [0, 1, 2],
    "Count": [3.0, 4.5, float("nan")],
    "n": np.array([1, 2, 3], np.int32),
    "flag": [True, False, True],
    "mixed": [1, "a", 2.5],
    "huge": [1, 2**70, 3],
}


def _ngio_generic(plate_dir: Path, name: str, columns: dict, backend: str) -> None:
    """The oracle: ngio's own GenericTable from the DataFrame pandas makes
    of the columns (object columns as strings)."""
    import pandas as pd
    from ngio.tables import GenericTable

    df = pd.DataFrame({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else list(v) for k, v in columns.items()})
    for k in df.columns:
        if df[k].dtype == object:
            df[k] = df[k].astype(str)
    ngio.open_ome_zarr_plate(str(plate_dir)).add_table(name, GenericTable(df), backend=backend, overwrite=True)


def _tree(d: Path) -> dict:
    """Every file under ``d`` but the tables' data: path -> JSON document."""
    import json

    return {str(p.relative_to(d)): json.loads(p.read_text()) for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith("table.")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("backend", ["parquet", "csv"])
def test_generic_tables_without_ngio_are_what_ngio_writes(tmp_path, zarr_format, backend):
    """Generic tables written with pyarrow alone (a batch's plate tables):
    the same group files as ngio's own, and ngio reads back the same frame
    from both, dtypes included; a second write replaces a table and keeps
    the list of tables in order, next to ngio's own tables."""
    import pandas as pd

    from fiji_bridge.backends.base import ObjectTable
    from fiji_bridge.backends.zarr_plate import ZarrPlateStore

    dirs = {}
    for who in ("ours", "ngio"):
        st = ZarrPlateStore(tmp_path / who, zarr_format=zarr_format, table_backend=backend)
        pid = st.create_plate("p")
        st.save_field(pid, "A01", 0, np.ones((1, 1, 1, 8, 8), np.uint16))
        dirs[who] = (st, pid, tmp_path / who / "p.zarr")
    st, pid, ours = dirs["ours"]
    _, _, theirs = dirs["ngio"]
    _ngio_generic(ours, "first", {"x": [1]}, backend)  # a table ngio wrote before ours
    _ngio_generic(theirs, "first", {"x": [1]}, backend)
    st.save_plate_tables(pid, [ObjectTable("counts", GENERIC_COLUMNS), ObjectTable("other", {"y": [0.5]}),
                               ObjectTable("none", {"x": [], "y": []})])
    _ngio_generic(theirs, "counts", GENERIC_COLUMNS, backend)
    _ngio_generic(theirs, "other", {"y": [0.5]}, backend)
    _ngio_generic(theirs, "none", {"x": [], "y": []}, backend)
    assert _tree(ours / "tables") == _tree(theirs / "tables")
    for name in ("first", "counts", "other"):
        assert (ours / "tables" / name / f"table.{backend}").is_file()
    a, b = (ngio.open_ome_zarr_plate(str(d)) for d in (ours, theirs))
    assert a.list_tables() == b.list_tables() == ["first", "counts", "other", "none"]
    for name in ("counts", "other", "none"):
        pd.testing.assert_frame_equal(a.get_table(name).dataframe, b.get_table(name).dataframe)
    if backend == "parquet":  # CSV has no types: a column of digits reads back as numbers, from ngio's too
        assert a.get_table("counts").dataframe["huge"].tolist()[1] == str(2**70)

    # replaced: new columns, the old file gone, the list unchanged
    st.save_plate_tables(pid, [ObjectTable("counts", {"z": ["q"]})])
    _ngio_generic(theirs, "counts", {"z": ["q"]}, backend)
    assert _tree(ours / "tables") == _tree(theirs / "tables")
    a = ngio.open_ome_zarr_plate(str(ours))
    assert a.list_tables() == ["first", "counts", "other", "none"]
    pd.testing.assert_frame_equal(a.get_table("counts").dataframe,
                                  ngio.open_ome_zarr_plate(str(theirs)).get_table("counts").dataframe)
    assert sorted(p.name for p in (ours / "tables").iterdir() if p.name.startswith(".")) == sorted(
        p.name for p in (theirs / "tables").iterdir() if p.name.startswith("."))  # no temporary folders left


@pytest.mark.timeout(120)
def test_generic_tables_refuse_what_ngio_refuses(tmp_path):
    """A ``tables`` group whose attributes are not ngio's list: ngio refuses
    to add to it, and so does the pyarrow writer; nothing is written."""
    from fiji_bridge.backends.base import BackendError, ObjectTable
    from fiji_bridge.backends.ngff_meta import write_group
    from fiji_bridge.backends.zarr_plate import ZarrPlateStore

    st = ZarrPlateStore(tmp_path, zarr_format=2)
    pid = st.create_plate("p")
    st.save_field(pid, "A01", 0, np.ones((1, 1, 1, 8, 8), np.uint16))
    d = tmp_path / "p.zarr"
    write_group(d / "tables", 2, {"something": "else"})
    with pytest.raises(Exception):
        _ngio_generic(d, "t", {"x": [1]}, "parquet")
    with pytest.raises(BackendError, match="not ngio's list of tables"):
        st.save_plate_tables(pid, [ObjectTable("t", {"x": [1]})])
    assert sorted(p.name for p in (d / "tables").iterdir()) == [".zattrs", ".zgroup"]
