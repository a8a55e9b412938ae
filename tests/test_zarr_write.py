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
