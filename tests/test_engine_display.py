"""Live stacks and rendering: real ImageJ drawing, checked against the pixels
we put in and the LUT colours we asked for."""

from __future__ import annotations

import numpy as np
import pytest

from fiji_bridge.components import Calibration

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(120)]


def _two_channel() -> np.ndarray:
    arr = np.zeros((2, 3, 2, 40, 60), np.uint16)
    arr[:, :, 0, 5:15, 5:25] = 1000  # DAPI block
    arr[:, :, 1, 20:30, 30:50] = 500  # GFP block
    return arr


def test_show_stack_is_a_composite_hyperstack_and_renders_with_luts(ij):
    arr = _two_channel()
    ij.show_stack("plate/A01/s000", arr, channel_names=["DAPI", "GFP"],
                  calibration=Calibration(pixel_width=0.65, pixel_height=0.65))
    try:
        imp = ij._display.stacks["plate/A01/s000"]
        assert imp.isComposite() and imp.isHyperStack()
        assert (imp.getNChannels(), imp.getNSlices(), imp.getNFrames()) == (2, 3, 2)
        assert str(imp.getTitle()) == "plate/A01/s000"
        assert imp.getCalibration().pixelWidth == pytest.approx(0.65)
        rgb = ij.render("plate/A01/s000")
        assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
        assert rgb[10, 10].tolist() == [0, 0, 255]  # DAPI drawn blue at full range
        assert rgb[25, 40].tolist() == [0, 255, 0]  # GFP green
        assert rgb[0, 0].tolist() == [0, 0, 0]
        tiles = ij.render("plate/A01/s000", montage=True)  # DAPI | GFP / composite
        assert tiles.shape == (80, 120, 3)
        assert tiles[10, 10].tolist() == [0, 0, 255] and tiles[25, 60 + 40].tolist() == [0, 255, 0]
        assert tiles[40 + 25, 40].tolist() == [0, 255, 0] and tiles[25, 40].tolist() == [0, 0, 0]
    finally:
        ij.close_stack("plate/A01/s000")
    assert "plate/A01/s000" not in ij.stacks


def test_show_stack_reuses_the_imageplus_and_updates_in_place(ij):
    arr = _two_channel()
    ij.show_stack("k", arr)
    try:
        imp = ij._display.stacks["k"]
        arr2 = arr.copy()
        arr2[1, 2, 1] = 7
        ij.show_stack("k", arr2)
        assert ij._display.stacks["k"] is imp  # same ImagePlus
        stack = imp.getStack()
        idx = imp.getStackIndex(2, 3, 2)
        assert np.asarray(stack.getPixels(idx)).view(np.uint16).reshape(40, 60).tolist() == arr2[1, 2, 1].tolist()
        plane = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
        ij.update_plane("k", 0, 1, 0, plane)
        assert ij._display.stacks["k"] is imp
        got = np.asarray(stack.getPixels(imp.getStackIndex(1, 2, 1))).view(np.uint16).reshape(40, 60)
        assert np.array_equal(got, plane)
        with pytest.raises(ValueError, match="dtype"):
            ij.update_plane("k", 0, 0, 0, plane.astype(np.float32))
        with pytest.raises(IndexError):
            ij.update_plane("k", 5, 0, 0, plane)
        ij.show_stack("k", arr[:, :1])  # a different shape: a new ImagePlus
        assert ij._display.stacks["k"] is not imp
    finally:
        ij.close_stack("k")


def test_render_of_an_array_uses_the_display_range(ij):
    arr = np.zeros((1, 1, 1, 10, 20), np.float32)
    arr[..., :10] = 2.0
    arr[..., 10:] = 4.0
    rgb = ij.render(arr)
    assert rgb.shape == (10, 20, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 15].tolist() == [255, 255, 255]  # grey, min..max
    z = np.stack([np.full((8, 8), v, np.uint8) for v in (0, 100, 200)])[None, :, None]  # 3 z
    tiles = ij.render(z, montage=True)
    assert tiles.shape == (16, 16, 3)
    assert tiles[0, 0, 0] == 0 and tiles[0, 8, 0] == 100 and tiles[8, 0, 0] == 200


# -- channel colours from the channel metadata ---------------------------------------


def _ij_lut_rgb(colour: str, v: int) -> list[int]:
    """What ImageJ's own LUT for ``colour`` (LUT.createLutFromColor) draws for 8-bit value ``v``."""
    from jpype import JInt

    from fiji_bridge.engine.transfer import J

    rgb = int(J("ij.process.LUT").createLutFromColor(getattr(J("java.awt.Color"), colour)).getRGB(JInt(v)))
    return [(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255]


def _channel_only_planes() -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Two uint8 planes (display range 0..255 as is): channel 0 alone at
    (5, 5) = 200, channel 1 alone at (15, 25) = 120."""
    planes = np.zeros((2, 30, 40), np.uint8)
    planes[0, 2:9, 2:9] = 200
    planes[1, 12:19, 22:29] = 120
    return planes, [(0, 0, 0), (0, 0, 1)]


def test_names_that_arrive_later_recolour_the_live_window(ij):
    """A stream's window is born with placeholder names (ImageJ's order: red,
    green); the real names (DAPI, GFP) then give blue and green, as
    ImageJ's own LUTs for those colours draw them -- but a LUT the user
    chose meanwhile stays."""
    planes, pos = _channel_only_planes()
    key = "stream/colours"
    try:
        ij.update_planes(key, (1, 1, 2, 30, 40), pos, planes, channel_names=["C1", "C2"])
        rgb = ij.render(key)
        assert rgb[5, 5].tolist() == _ij_lut_rgb("red", 200) and rgb[15, 25].tolist() == _ij_lut_rgb("green", 120)
        ij.update_planes(key, (1, 1, 2, 30, 40), pos, planes, channel_names=["DAPI", "GFP"])
        rgb = ij.render(key)
        assert rgb[5, 5].tolist() == _ij_lut_rgb("blue", 200)
        assert rgb[15, 25].tolist() == _ij_lut_rgb("green", 120)
        assert rgb[0, 0].tolist() == [0, 0, 0]
        # the user gives channel 2 a magenta LUT; a rename recolours only channel 1
        from fiji_bridge.engine.transfer import J

        imp = ij._display.stacks[key]
        imp.setChannelLut(J("ij.process.LUT").createLutFromColor(J("java.awt.Color").magenta), 2)
        ij.update_planes(key, (1, 1, 2, 30, 40), pos, planes, channel_names=["mCherry", "Cy3"])
        rgb = ij.render(key)
        assert rgb[5, 5].tolist() == _ij_lut_rgb("red", 200)  # mCherry
        assert rgb[15, 25].tolist() == _ij_lut_rgb("magenta", 120)  # the user's
    finally:
        ij.close_stack(key)


def test_show_stack_with_new_names_recolours(ij):
    planes, _ = _channel_only_planes()
    arr = planes[None, None]  # T Z C Y X
    try:
        ij.show_stack("k2", arr)  # no names: ImageJ's order
        assert ij.render("k2")[5, 5].tolist() == _ij_lut_rgb("red", 200)
        ij.show_stack("k2", arr, channel_names=["Hoechst", "FITC"])  # same shape: the ImagePlus is kept
        rgb = ij.render("k2")
        assert rgb[5, 5].tolist() == _ij_lut_rgb("blue", 200) and rgb[15, 25].tolist() == _ij_lut_rgb("green", 120)
    finally:
        ij.close_stack("k2")


def test_the_demo_montage_uses_the_colours_imagej_renders(ij):
    """The demo's montage tints channel c with the colour ImageJ's composite
    (snapshot) draws channel c in, for the demo plate's own channel names."""
    from fiji_bridge.demo import channel_tints
    from fiji_bridge.synthetic import CHANNEL_NAMES

    planes, _ = _channel_only_planes()
    rgb = ij.render(planes[None, None], channel_names=list(CHANNEL_NAMES))
    tints = channel_tints(CHANNEL_NAMES, 2)
    for c, (y, x, v) in enumerate([(5, 5, 200), (15, 25, 120)]):
        want = [int(v * t) for t in tints[c]]  # the montage's drawing of value v
        assert rgb[y, x].tolist() == want, (CHANNEL_NAMES[c], rgb[y, x].tolist(), want)
def _readback(ij, key: str) -> np.ndarray:
    from fiji_bridge.engine.transfer import from_imageplus

    return from_imageplus(ij._display.stacks[key])[0]


def test_streamed_growth_from_storage_views_is_bit_exact(ij):
    """Planes handed over as views of a stack's storage (as the bridge's
    shared memory is), the stack growing in C, Z and T batch by batch: ImageJ
    holds exactly what numpy holds, zeros where nothing arrived."""
    rng = np.random.default_rng(7)
    storage = np.zeros((4, 4, 2, 48, 64), np.uint16)  # capacity, as a StackStore grows it
    truth = rng.integers(0, 65535, (3, 3, 2, 48, 64), dtype=np.uint16)
    order = [(t, z, c) for t in range(3) for z in range(3) for c in range(2) if (t, z, c) != (1, 2, 0)]
    batches = [order[:1], order[1:4], order[4:9], order[9:]]
    seen: list[tuple[int, int, int]] = []
    try:
        for i, batch in enumerate(batches):
            for p in batch:
                storage[p] = truth[p]
            seen += batch
            shape = tuple(max(p[k] for p in seen) + 1 for k in range(3)) + (48, 64)
            ij.update_planes("grow", shape, batch, [storage[p] for p in batch], ["a", "b"], None, i == 0)
            want = np.zeros(shape, np.uint16)
            for p in seen:
                want[p] = truth[p]
            got = _readback(ij, "grow")
            assert got.shape == want.shape and np.array_equal(got, want), f"after batch {i}"
        ij.sync_windows()  # nothing to show without a display, and nothing breaks
    finally:
        ij.close_stack("grow")


def test_arrays_of_a_closed_stack_are_reused_without_their_old_pixels(ij):
    """The next stack of the same plane size gets the closed one's Java
    arrays: a position nothing was sent to reads zeros, not the old stack's
    pixels; the written one reads exactly what was sent."""
    old = np.full((1, 2, 1, 32, 32), 777, np.uint16)
    ij.update_planes("first", old.shape, [(0, 0, 0), (0, 1, 0)], old[0, :, 0], None, None, True)
    ij.close_stack("first")
    pooled = ij._display._pool.nbytes
    assert pooled >= 2 * 32 * 32 * 2
    new = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    try:
        ij.update_planes("second", (1, 3, 1, 32, 32), [(0, 1, 0)], new[None], None, None, True)
        got = _readback(ij, "second")
        assert np.array_equal(got[0, 1, 0], new)
        assert not got[0, 0].any() and not got[0, 2].any()
        # both old arrays were reused: one under the written plane, one zero-filled
        assert ij._display._pool.nbytes == pooled - 2 * 32 * 32 * 2
    finally:
        ij.close_stack("second")
