"""The OME-Zarr store's field writer against ome-zarr-py's own
``write_image`` (the oracle): the same NGFF metadata, the same array
metadata, the same pixels read back by zarr, in NGFF 0.4 and 0.5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from fiji_bridge.backends.zarr_plate import ZarrPlateStore, _omero_meta, _scale_units
from fiji_bridge.components import Calibration

CAL = Calibration(pixel_width=0.65, pixel_height=0.65, pixel_depth=2.0, unit="micron", frame_interval=3.0, time_unit="s")


def _meta(d: Path) -> dict:
    """Every metadata document under ``d`` (relative path -> JSON)."""
    return {str(p.relative_to(d)): json.loads(p.read_text()) for p in sorted(d.rglob("*"))
            if p.name in (".zattrs", ".zarray", ".zgroup", "zarr.json")}


def _chunks(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()
                  and p.name not in (".zattrs", ".zarray", ".zgroup", "zarr.json"))


@pytest.mark.parametrize("fmt", [2, 3])
def test_field_writes_what_ome_zarr_py_writes(tmp_path, fmt):
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(fmt)
    field = rng.integers(0, 4000, (2, 3, 2, 96, 80), dtype=np.uint16)  # TZCYX
    field[1, 2, 1] = 0  # an empty plane: no chunk, reads as the fill value
    st = ZarrPlateStore(tmp_path / "ours", zarr_format=fmt)
    pid = st.create_plate("p")
    st.save_field(pid, "B03", 1, field, name="img", channel_names=["dna", "gfp"], calibration=CAL)
    ours = tmp_path / "ours" / "p.zarr" / "B" / "3" / "1"

    # the oracle: ome-zarr-py's write_image with the same options, as the store used it before
    tczyx = np.ascontiguousarray(field.transpose(0, 2, 1, 3, 4))
    theirs = tmp_path / "theirs"
    group = zarr.open_group(str(theirs), mode="w", zarr_format=fmt)
    scale, units = _scale_units(CAL)
    write_image(tczyx, group, scale_factors=[], axes=list("tczyx"), scale=scale, axes_units=units, name="img",
                storage_options={"chunks": (1, 1, 1, 96, 80), "compressor": st._compressor()},
                omero=_omero_meta(tczyx, ["dna", "gfp"], "img"))
    assert _meta(ours) == _meta(theirs)
    assert _chunks(ours) == _chunks(theirs)
    np.testing.assert_array_equal(zarr.open_array(str(ours / "s0"), mode="r")[...], tczyx)
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "ours").load_field(pid, "B03", 1), field)


def test_big_planes_take_zarrs_own_writer(tmp_path):
    field = np.arange(5000 * 64, dtype=np.uint16).reshape(1, 1, 1, 64, 5000)  # wider than one chunk
    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("p")
    st.save_field(pid, "A01", 0, field)
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path).load_field(pid, "A01", 0), field)


@pytest.mark.parametrize("fmt", [2, 3])
def test_next_fields_of_a_kind_match_ome_zarr_py_too(tmp_path, fmt):
    """The second and later fields of one shape take the array metadata zarr
    wrote for the first (no call into zarr): still what ome-zarr-py writes."""
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(10 + fmt)
    st = ZarrPlateStore(tmp_path / "ours", zarr_format=fmt)
    pid = st.create_plate("p")
    fields = [rng.integers(0, 60000, (1, 2, 3, 64, 48), dtype=np.uint16) for _ in range(3)]
    for s, f in enumerate(fields):
        st.save_field(pid, "A02", s, f, name=f"img{s}", channel_names=["a", "b", "c"], calibration=CAL)
    for s, f in enumerate(fields):
        ours = tmp_path / "ours" / "p.zarr" / "A" / "2" / str(s)
        tczyx = np.ascontiguousarray(f.transpose(0, 2, 1, 3, 4))
        group = zarr.open_group(str(tmp_path / f"theirs{s}"), mode="w", zarr_format=fmt)
        scale, units = _scale_units(CAL)
        write_image(tczyx, group, scale_factors=[], axes=list("tczyx"), scale=scale, axes_units=units, name=f"img{s}",
                    storage_options={"chunks": (1, 1, 1, 64, 48), "compressor": st._compressor()},
                    omero=_omero_meta(tczyx, ["a", "b", "c"], f"img{s}"))
        assert _meta(ours) == _meta(tmp_path / f"theirs{s}")
        assert _chunks(ours) == _chunks(tmp_path / f"theirs{s}")
        np.testing.assert_array_equal(zarr.open_array(str(ours / "s0"), mode="r")[...], tczyx)


@pytest.mark.parametrize("fmt", [2, 3])
def test_well_and_plate_metadata_are_ome_zarr_pys(tmp_path, fmt):
    """Wells and the plate as ome-zarr-py's write_well_metadata and
    write_plate_metadata make them for the same wells (every row letter and
    column number up to the last, as our plates have them)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    st = ZarrPlateStore(tmp_path / "ours", zarr_format=fmt)
    pid = st.create_plate("p")
    plane = np.ones((1, 1, 1, 16, 16), np.uint16)
    for well, site in (("B03", 1), ("B03", 0), ("A01", 0), ("B03", 2)):
        st.save_field(pid, well, site, plane)
    d = tmp_path / "ours" / "p.zarr"
    fmt_ = FormatV04() if fmt == 2 else FormatV05()
    theirs = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w", zarr_format=fmt)
    write_plate_metadata(theirs, ["A", "B"], ["1", "2", "3"], ["A/1", "B/3"], fmt=fmt_, name="p", field_count=3)
    for w, images in (("A/1", ["0"]), ("B/3", ["0", "1", "2"])):
        write_well_metadata(theirs.require_group(w), images, fmt=fmt_)
    meta_ours, meta_theirs = _meta(d), _meta(tmp_path / "theirs.zarr")
    root = ".zattrs" if fmt == 2 else "zarr.json"
    ours_root = meta_ours.pop(root)
    extra = (ours_root if fmt == 2 else ours_root["attributes"]).pop("fiji_bridge")  # our own key beside NGFF's
    assert extra["name"] == "p"
    assert ours_root == meta_theirs.pop(root)
    for w in ("A/1", "B/3"):
        assert meta_ours[f"{w}/{root}"] == meta_theirs[f"{w}/{root}"]
    # and ome-zarr-py's reader finds every field of the plate
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader

    nodes = list(Reader(parse_url(str(d)))())
    assert nodes and any(isinstance(spec, Plate) for spec in nodes[0].specs)


@pytest.mark.parametrize("fmt", [2, 3])
def test_chunk_reads_equal_zarrs_and_fall_back(tmp_path, fmt):
    """load_field reads the store's own chunks directly: equal to zarr's
    read (missing chunks as the fill value); an array of another layout is
    read by zarr."""
    from fiji_bridge.backends.zarr_chunks import plane_codec, read_planes

    rng = np.random.default_rng(3)
    field = rng.integers(0, 4000, (2, 2, 3, 40, 56), dtype=np.uint16)
    field[0, 1, 2] = 0  # not written
    st = ZarrPlateStore(tmp_path, zarr_format=fmt)
    pid = st.create_plate("p")
    st.save_field(pid, "C04", 0, field)
    arr = zarr.open_array(str(tmp_path / "p.zarr" / "C" / "4" / "0" / "s0"), mode="r")
    np.testing.assert_array_equal(read_planes(arr), arr[...])
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path).load_field(pid, "C04", 0), field)
    other = zarr.create_array(str(tmp_path / "other"), shape=(2, 40, 56), chunks=(1, 20, 56), dtype="uint16",
                              zarr_format=fmt)
    other[...] = field[0, 0, :2]
    assert plane_codec(other) is None and read_planes(other) is None  # two chunks a plane: zarr's business


def test_tables_are_found_by_their_files(tmp_path):
    """A plate's tables are the files under tables/, for any store instance;
    zarr's metadata and ngio's table groups there are not tables; no table
    may take a zarr metadata file's name."""
    from fiji_bridge.components import ComponentError

    st = ZarrPlateStore(tmp_path)
    pid = st.create_plate("p")
    st.save_field(pid, "A01", 0, np.ones((1, 1, 1, 8, 8), np.uint16))
    st.save("a,b\n1,2\n", f"/zarr/plate_{pid}/summary.csv")
    st.save_table(pid, "cells", {"x": [1.0, 2.0]}, well="A01", site=0)
    (tmp_path / "p.zarr" / "tables" / ".zattrs").write_text('{"tables": ["ngio_t"]}')  # ngio's tables group
    (tmp_path / "p.zarr" / "tables" / "ngio_t").mkdir()
    fresh = ZarrPlateStore(tmp_path)
    files = fresh.list_files(f"/zarr/plate_{pid}")
    assert f"/zarr/plate_{pid}/summary.csv" in files
    assert not any("zattrs" in f or "ngio_t" in f for f in files)
    assert f"/zarr/plate_{pid}/A01/cells_s000.csv" in fresh.list_files(f"/zarr/plate_{pid}/A01")
    assert set(fresh.tables(pid)) == {"summary.csv", "A01/cells_s000.csv"}
    assert fresh.load(f"/zarr/plate_{pid}/summary.csv") == "a,b\n1,2\n"
    with pytest.raises(ComponentError, match="zarr's own metadata"):
        fresh.save("{}", f"/zarr/plate_{pid}/zarr.json")
