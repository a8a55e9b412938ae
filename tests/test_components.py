"""The components codec: well names, plane components, virtual paths.

Oracles: the conventions stated in fiji_bridge/components.py (0-based
indices, row letters + 1-based columns, 3-digit zero padding), checked
exhaustively over every well of a 1536-well plate."""

from __future__ import annotations

import string

import numpy as np
import pytest

from fiji_bridge.components import (
    Calibration,
    ComponentError,
    PlaneComponents,
    VirtualPath,
    format_well,
    normalize_well,
    parse_well,
    stack_key,
)

# 1536-well plate: rows A..AF (32), columns 1..48
ROWS_1536 = list(string.ascii_uppercase) + [f"A{c}" for c in "ABCDEF"]


def test_every_1536_well_round_trips():
    for r, letters in enumerate(ROWS_1536):
        for c in range(48):
            name = f"{letters}{c + 1:02d}"
            assert format_well(r, c) == name
            assert parse_well(name) == (r, c)
            assert normalize_well(f"{letters.lower()}{c + 1}") == name


@pytest.mark.parametrize("bad", ["", "A", "1", "A0", "A-1", "AAA1", "A1B", "Ä1", "A 1", None])
def test_bad_well_names(bad):
    with pytest.raises(ComponentError):
        parse_well(bad)


def test_format_well_refuses_negative():
    with pytest.raises(ComponentError):
        format_well(-1, 0)


def test_plane_components_validate_and_normalise():
    c = PlaneComponents("p1", "b3", site=np.int64(2), channel=np.uint8(1), z=0, t=4.0)
    assert (c.well, c.site, c.channel, c.t) == ("B03", 2, 1, 4)
    assert isinstance(c.site, int) and isinstance(c.channel, int) and isinstance(c.t, int)
    for bad in ({"site": -1}, {"channel": 2.5}, {"z": "x"}, {"t": PlaneComponents.MAX_INDEX + 1}, {"site": True}, {"z": np.bool_(True)}):
        with pytest.raises(ComponentError):
            PlaneComponents("p", "A01", **bad)


def test_plane_components_dict_round_trip():
    c = PlaneComponents("plate9", "H12", 3, 2, 1, 0, channel_name="GFP")
    d = c.to_dict()
    assert d == {"plate": "plate9", "well": "H12", "site": 3, "channel": 2, "z": 1, "t": 0, "channel_name": "GFP"}
    back = PlaneComponents.from_dict(d)
    assert back == c and back.channel_name == "GFP"
    with pytest.raises(ComponentError, match="unknown"):
        PlaneComponents.from_dict({**d, "wavelength": 488})


def test_channel_name_is_not_part_of_the_address():
    assert PlaneComponents("p", "A01", channel=1, channel_name="DAPI") == PlaneComponents("p", "A01", channel=1)


@pytest.mark.parametrize(
    "comps, text",
    [
        (PlaneComponents("12", "A01", 1, 0, 0, 0), "/omero/plate_12/A01/A01_s001_z000_c000_t000.tif"),
        (PlaneComponents("screen_1", "P24", 0, 3, 12, 7), "/omero/plate_screen_1/P24/P24_s000_z012_c003_t007.tif"),
        (PlaneComponents("x", "AF48", 1234, 0, 0, 0), "/omero/plate_x/AF48/AF48_s1234_z000_c000_t000.tif"),
    ],
)
def test_plane_paths_round_trip(comps, text):
    vp = VirtualPath.plane("omero", comps)
    assert str(vp) == text
    back = VirtualPath.parse(text)
    assert back.is_plane and back.components == comps
    assert (back.scheme, back.plate, back.well, back.name) == ("omero", comps.plate, comps.well, text.rsplit("/", 1)[1])
    assert VirtualPath.parse(str(back)) == back


def test_every_index_combination_round_trips():
    for site in (0, 1, 9, 10, 99, 100, 999, 1000):
        for c in (0, 5):
            for z in (0, 999, 1000):
                for t in (0, 17):
                    comps = PlaneComponents("p", "C07", site, c, z, t)
                    assert VirtualPath.parse(str(VirtualPath.plane("zarr", comps))).components == comps


def test_directory_and_table_paths():
    assert VirtualPath.parse("/zarr/plate_p1") == VirtualPath("zarr", "p1")
    assert VirtualPath.parse("/zarr/plate_p1/") == VirtualPath("zarr", "p1")
    assert VirtualPath.parse("/zarr/plate_p1/b2") == VirtualPath("zarr", "p1", "B02")
    t = VirtualPath.parse("/zarr/plate_p1/results.csv")
    assert (t.well, t.name, t.is_plane) == (None, "results.csv", False)
    w = VirtualPath.parse("/zarr/plate_p1/a01/cells.json")
    assert (w.well, w.name, w.is_plane) == ("A01", "cells.json", False)
    assert str(w) == "/zarr/plate_p1/A01/cells.json"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/zarr",
        "/zarr/p1/A01",  # no plate_ prefix
        "/zarr/plate_/A01",
        "/zarr/plate_p/A01/x/y.tif",  # too deep
        "/zarr/plate_p/A01/B02_s000_z000_c000_t000.tif",  # plane outside its well
        "/zarr/plate_p/A01_s000_z000_c000_t000.tif",  # plane at plate level
        "/zarr/plate_p/Q9Z/whatever.csv",  # bad well folder
    ],
)
def test_malformed_paths(bad):
    with pytest.raises(ComponentError):
        VirtualPath.parse(bad)


def test_plane_path_needs_plate_and_well():
    with pytest.raises(ComponentError):
        VirtualPath.plane("zarr", PlaneComponents("", "A01"))
    with pytest.raises(ComponentError):
        VirtualPath.plane("zarr", PlaneComponents("p", ""))


def test_stack_keys():
    assert stack_key("p1", "A01", 2) == "p1/A01/s002"
    assert PlaneComponents("p1", "a1", 2, 1, 1, 1).stack_key == "p1/A01/s002"
    assert stack_key() == "default"
    assert stack_key("", "", 3) == "s003"
    assert stack_key("p", "", None) == "p"
    # planes of one field share a key; another site does not
    a, b = PlaneComponents("p", "A01", 0, 0, 0, 0), PlaneComponents("p", "A01", 0, 2, 5, 1)
    assert a.stack_key == b.stack_key != PlaneComponents("p", "A01", 1).stack_key


def test_calibration_round_trip():
    c = Calibration(0.325, 0.325, 1.5, "micron", 30.0, "s")
    assert Calibration.from_dict(c.to_dict()) == c
    assert Calibration.from_dict(None) == Calibration() and not Calibration().is_set
    assert Calibration.from_dict({"pixel_width": 2.0, "extra": 1}).pixel_width == 2.0


def test_store_colours_are_the_colours_fiji_draws(tmp_path):
    """One rule for channel colours: the OME-Zarr ``omero`` metadata holds
    the LUT colour the engine gives each channel (oracle: java.awt.Color's
    RGB of the colour the rule names, and the rule's name hints)."""
    import numpy as np

    from fiji_bridge.backends.zarr_plate import ZarrPlateStore
    from fiji_bridge.colours import RGB, channel_colours

    assert channel_colours(["DAPI", "GFP"], 2) == ["blue", "green"]
    assert channel_colours(["Cy5", "x", "y"], 3) == ["magenta", "red", "green"]
    assert channel_colours(["DNA"], 1) == ["gray"]
    store = ZarrPlateStore(tmp_path / "z")
    pid = store.create_plate("p")
    store.save_field(pid, "A01", 0, np.zeros((1, 1, 2, 8, 8), np.uint16), channel_names=["DNA", "GFP"])
    import json

    attrs = json.loads((store.plate_dir(pid) / "A" / "1" / "0" / ".zattrs").read_text())
    got = [ch["color"] for ch in attrs["omero"]["channels"]]
    assert got == ["%02X%02X%02X" % RGB["blue"], "%02X%02X%02X" % RGB["green"]] == ["0000FF", "00FF00"]
