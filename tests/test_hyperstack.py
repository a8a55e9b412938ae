"""Hyperstack assembly: planes placed by their components, checked against
the numpy arrays they were cut from."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from fiji_bridge.components import Calibration, PlaneComponents
from fiji_bridge.hyperstack import (
    AxisMapping,
    Hyperstack,
    PlaneRejected,
    StackError,
    StackInfo,
    StackNotFound,
    StackStore,
)

RNG = np.random.default_rng(1234)


def _stack(t=4, z=3, c=2, y=17, x=23, dtype=np.uint16) -> np.ndarray:
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    if info is not None:
        return RNG.integers(info.min, info.max, size=(t, z, c, y, x), endpoint=True, dtype=dtype)
    return RNG.standard_normal((t, z, c, y, x)).astype(dtype)


def _positions(shape):
    t, z, c = shape[:3]
    return [(ti, zi, ci) for ti in range(t) for zi in range(z) for ci in range(c)]


def test_shuffled_2c_3z_4t_is_assembled_exactly():
    truth = _stack(4, 3, 2)
    order = _positions(truth.shape)
    random.Random(7).shuffle(order)
    store = StackStore()
    for t, z, c in order:
        comps = PlaneComponents(plate="p1", well="C04", site=2, channel=c, z=z, t=t,
                                channel_name=f"ch{c}")
        key, *tzc = store.add_plane(truth[t, z, c], comps)
        assert key == "p1/C04/s002" and tuple(tzc) == (t, z, c)
    arr, info = store.snapshot("p1/C04/s002")
    assert arr.shape == truth.shape and arr.dtype == truth.dtype
    np.testing.assert_array_equal(arr, truth)
    assert info.shape == (4, 3, 2, 17, 23)
    assert info.planes == 24 and info.missing == [] and info.version == 24
    assert info.channel_names == ["ch0", "ch1"]
    assert store.keys() == ["p1/C04/s002"] and len(store) == 1 and "p1/C04/s002" in store


def test_growth_one_index_at_a_time_is_amortised():
    stack = Hyperstack("g", "float32", (8, 9))
    planes = RNG.standard_normal((300, 8, 9)).astype(np.float32)
    buffers = set()
    for t in range(300):
        stack.add(t, 0, 0, planes[t])
        buffers.add(id(stack._data))  # each distinct storage buffer = one reallocation
        assert stack.shape == (t + 1, 1, 1, 8, 9)
    np.testing.assert_array_equal(stack.array[:, 0, 0], planes)
    # doubling: 1, 2, 4, ..., 512 -> about log2(300) + 1 buffers, not 300
    assert len(buffers) <= 11
    # growth along Z and C too, one index at a time, in the other direction
    for c in range(1, 5):
        stack.add(0, 0, c, planes[c])
    for z in range(1, 6):
        stack.add(0, z, 4, planes[z])
    assert stack.shape == (300, 6, 5, 8, 9)
    np.testing.assert_array_equal(stack.array[0, 0, 1:5], planes[1:5])
    np.testing.assert_array_equal(stack.array[0, 1:6, 4], planes[1:6])
    assert not stack.array[1:, 1:].any()  # missing planes read as zeros


def test_missing_planes_are_listed():
    truth = _stack(3, 2, 3, 5, 6, np.uint8)
    sent = [p for p in _positions(truth.shape) if hash(p) % 3]  # leave some out
    sent.append((2, 1, 2))  # make sure the far corner is there: dims are full
    store = StackStore()
    for t, z, c in sent:
        store.add_at("m", t, z, c, truth[t, z, c])
    info = store.info("m")
    expected_missing = sorted(set(_positions(truth.shape)) - set(sent))
    assert expected_missing, "the test must leave planes out"
    assert sorted(info.missing) == expected_missing
    assert info.planes == len(set(sent))
    arr, _ = store.snapshot("m")
    for t, z, c in expected_missing:
        assert not arr[t, z, c].any()
    for t, z, c in set(sent):
        np.testing.assert_array_equal(arr[t, z, c], truth[t, z, c])
    np.testing.assert_array_equal(store.get("m").present,
                                  np.isin(np.arange(18), [t * 6 + z * 3 + c for t, z, c in sent])
                                  .reshape(3, 2, 3))


def test_wrong_dtype_or_shape_is_rejected_and_stack_unchanged():
    truth = _stack(2, 1, 2, 10, 12)
    store = StackStore()
    for t, z, c in _positions(truth.shape):
        store.add_at("k", t, z, c, truth[t, z, c])
    before, info_before = store.snapshot("k")

    with pytest.raises(PlaneRejected, match=r"dtype float32 but the stack is uint16.*astype\('uint16'\)"):
        store.add_at("k", 0, 0, 0, np.ones((10, 12), np.float32))
    with pytest.raises(PlaneRejected, match=r"YX shape \(10, 13\) but the stack is \(10, 12\)"):
        store.add_at("k", 3, 0, 0, np.ones((10, 13), np.uint16))  # would also grow T
    with pytest.raises(PlaneRejected, match="dtype"):
        store.add_plane(np.ones((10, 12), np.int32), PlaneComponents(t=5), key="k")
    with pytest.raises(PlaneRejected, match="2-D"):
        store.add_at("k", 0, 0, 0, np.ones((2, 10, 12), np.uint16))
    with pytest.raises(PlaneRejected, match="not supported"):
        store.add_at("k2", 0, 0, 0, np.ones((10, 12), np.int8))
    with pytest.raises(PlaneRejected, match="not supported"):
        store.add_at("k2", 0, 0, 0, np.ones((10, 12), bool))
    with pytest.raises(PlaneRejected, match="not supported"):
        store.add_at("k2", 0, 0, 0, np.array([["a", "b"]], dtype=object))
    with pytest.raises(PlaneRejected, match="out of range"):
        store.add_at("k", -1, 0, 0, truth[0, 0, 0])
    with pytest.raises(PlaneRejected, match="out of range"):
        store.add_at("k", 0, PlaneComponents.MAX_INDEX + 1, 0, truth[0, 0, 0])
    with pytest.raises(PlaneRejected, match="integer"):
        store.add_at("k", 0, 1.5, 0, truth[0, 0, 0])

    after, info_after = store.snapshot("k")
    np.testing.assert_array_equal(after, before)
    assert info_after == info_before  # same dims, version, missing, names
    assert "k2" not in store  # a refused first plane creates no stack


def test_plane_replacement_and_accepted_variants():
    store = StackStore()
    a = _stack(1, 1, 1, 6, 7)[0, 0, 0]
    b = a[::-1].copy()
    store.add_at("r", 0, 0, 0, a)
    store.add_at("r", 0, 0, 0, b)  # same spot: replaced
    store.add_at("r", 1, 0, 0, a[None])  # (1, Y, X) is squeezed
    store.add_at("r", 2, 0, 0, a.astype(">u2"))  # big-endian: same values
    store.add_at("r", 3, 0, 0, np.asfortranarray(b))  # any memory layout
    arr, info = store.snapshot("r")
    assert info.planes == 4 and info.version == 5
    np.testing.assert_array_equal(arr[:, 0, 0], np.stack([b, a, a, b]))
    assert arr.dtype == np.dtype("uint16") and arr.flags.c_contiguous
    arr[:] = 0  # a snapshot is a copy
    assert store.get("r").array.any()


def test_channel_names_and_calibration():
    store = StackStore()
    cal = Calibration(pixel_width=0.65, pixel_height=0.65, pixel_depth=2.0, unit="micron")
    plane = np.zeros((4, 4), np.float32)
    store.add_plane(plane, PlaneComponents(well="A1", channel=2, channel_name="GFP"), calibration=cal)
    store.add_plane(plane, PlaneComponents(well="A1", channel=0, channel_name="DAPI"))
    info = store.info("A01/s000")
    assert info.channel_names == ["DAPI", None, "GFP"]
    assert info.calibration == cal
    assert info.shape == (1, 1, 3, 4, 4)
    assert sorted(info.missing) == [(0, 0, 1)]


def test_openhcs_mapping_wells_and_sites_on_t_with_labels():
    modes = {"well": "frame", "site": "frame", "channel": "channel",
             "z_index": "slice", "timepoint": "frame"}
    mapping = AxisMapping.from_modes(modes)
    assert mapping.t == ("well", "site", "t") and mapping.c == ("channel",) and mapping.z == ("z",)
    assert mapping.window == ("plate",)
    wells, sites, channels = ["B02", "A01", "C03"], [0, 1], [0, 1, 2]
    planes = {}
    arrival = [(w, s, ch) for w in wells for s in sites for ch in channels]
    random.Random(3).shuffle(arrival)
    store = StackStore()
    for w, s, ch in arrival:
        planes[w, s, ch] = RNG.integers(0, 4000, (9, 11), dtype=np.uint16)
        key, t, z, c = store.add_plane(
            planes[w, s, ch], PlaneComponents(plate="run", well=w, site=s, channel=ch), mapping=mapping
        )
        assert key == "run" and c == ch and z == 0
    arr, info = store.snapshot("run")
    labels = info.axis_labels["t"]
    assert info.axis_components == {"t": ["well", "site", "t"]}
    assert sorted(map(tuple, labels)) == sorted((w, s, 0) for w in wells for s in sites)
    # the numbering is by first appearance in the stream
    first_seen = list(dict.fromkeys((w, s, 0) for w, s, _ in arrival))
    assert [tuple(lab) for lab in labels] == first_seen
    assert info.shape == (6, 1, 3, 9, 11) and info.missing == []
    for t, (w, s, _) in enumerate(labels):
        for ch in channels:
            np.testing.assert_array_equal(arr[t, 0, ch], planes[w, s, ch])
    # a JSON round trip keeps the labels
    again = StackInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info


def test_axis_mapping_validation_and_round_trip():
    m = AxisMapping(t=["site", "t"], window=["plate", "well"])
    assert m.t == ("site", "t") and m.window == ("plate", "well")
    assert AxisMapping.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert AxisMapping.from_dict(None) == AxisMapping()
    assert AxisMapping.from_modes({"site": "window"}) == AxisMapping()
    # order given: wells before timepoints before sites
    m2 = AxisMapping.from_modes({"well": "frame", "site": "frame"}, order=["well", "timepoint", "site"])
    assert m2.t == ("well", "t", "site")
    with pytest.raises(StackError, match="unknown component 'zz'"):
        AxisMapping(z=("zz",))
    with pytest.raises(StackError, match="both C and T"):
        AxisMapping(t=("channel", "t"))
    with pytest.raises(StackError, match="expected one of"):
        AxisMapping.from_modes({"well": "tile"})
    with pytest.raises(StackError, match="unknown axis mapping keys"):
        AxisMapping.from_dict({"q": ["t"]})
    # the window key of a non-default window
    comps = PlaneComponents(plate="p", well="D7", site=3, channel=1)
    assert AxisMapping(window=("well", "channel")).window_key(comps) == "D07/c001"
    assert AxisMapping(window=()).window_key(comps) == "default"


def test_single_integer_component_axis_uses_its_value():
    # sites of one well on T: the index IS the site number (no labels)
    mapping = AxisMapping(t=("site",), window=("plate", "well"))
    store = StackStore()
    for site in (4, 1):
        store.add_plane(np.full((3, 3), site, np.uint8), PlaneComponents(well="A2", site=site), mapping=mapping)
    arr, info = store.snapshot("A02")
    assert info.shape[0] == 5 and info.axis_labels == {}
    assert arr[4, 0, 0, 0, 0] == 4 and arr[1, 0, 0, 0, 0] == 1
    assert sorted(info.missing) == [(0, 0, 0), (2, 0, 0), (3, 0, 0)]


def test_add_stack_whole_and_replace():
    truth = _stack(3, 2, 2, 8, 8, np.float64)
    store = StackStore()
    store.add_stack("s", truth, channel_names=["a", "b"], calibration=Calibration(pixel_width=1.5))
    original = truth.copy()
    truth[0, 0, 0, 0, 0] = 99.0  # the store made a copy
    arr, info = store.snapshot("s")
    np.testing.assert_array_equal(arr, original)
    assert info.planes == 12 and info.missing == [] and info.channel_names == ["a", "b"]
    assert info.calibration.pixel_width == 1.5
    # planes can still be added (grows Z)
    store.add_at("s", 0, 2, 1, truth[0, 0, 0])
    assert store.info("s").shape == (3, 3, 2, 8, 8)
    # replace by a smaller one of another dtype
    small = _stack(1, 1, 1, 4, 4, np.uint8)
    store.add_stack("s", small)
    arr, info = store.snapshot("s")
    np.testing.assert_array_equal(arr, small)
    assert info.dtype == "uint8" and info.version > 1
    with pytest.raises(PlaneRejected, match="5-D"):
        store.add_stack("bad", small[0])
    assert "bad" not in store


def test_memory_cap_refuses_absurd_index_without_memoryerror():
    store = StackStore(max_bytes=64 << 20)
    plane = np.ones((2048, 2048), np.uint16)
    store.add_plane(plane, PlaneComponents(well="A1", t=0))
    with pytest.raises(PlaneRejected, match="memory cap") as exc:
        store.add_plane(plane, PlaneComponents(well="A1", t=90_000))
    assert "t=90000" in str(exc.value)
    info = store.info("A01/s000")
    assert info.shape == (1, 1, 1, 2048, 2048) and info.planes == 1
    # near the cap, growth falls back from doubling to the exact size
    for t in range(1, 7):
        store.add_plane(plane, PlaneComponents(well="A1", t=t))
    assert store.info("A01/s000").shape[0] == 7
    assert store.nbytes <= store.max_bytes
    with pytest.raises(PlaneRejected, match="memory cap"):
        store.add_stack("big", np.zeros((8, 1, 1, 2048, 2048), np.uint16))
    # closing frees the budget
    store.close("A01/s000")
    assert store.nbytes == 0
    store.add_stack("big", np.zeros((7, 1, 1, 2048, 2048), np.uint16))
    with pytest.raises(StackNotFound, match="no stack 'A01/s000'; known stacks: 'big'"):
        store.close("A01/s000")
    with pytest.raises(KeyError):
        store.get("nope")
    store.clear()
    assert len(store) == 0 and store.nbytes == 0
    # a standalone stack without a cap turns an impossible allocation into PlaneRejected
    lone = Hyperstack("lone", "float64", (50_000, 50_000))
    with pytest.raises(PlaneRejected):
        lone.add(100_000, 100_000, 0, np.zeros((1, 1)))  # shape check comes first
    lone2 = Hyperstack("lone2", "float64", (4096, 4096))
    with pytest.raises(PlaneRejected, match="memory"):
        lone2.add(100_000, 100_000, 100_000, np.zeros((4096, 4096)))


@pytest.mark.timeout(60)
def test_thread_safety_many_threads_adding():
    truth = {k: _stack(5, 3, 2, 16, 16) for k in ("a", "b")}
    jobs = [(k, p) for k in truth for p in _positions(truth[k].shape)]
    random.Random(11).shuffle(jobs)
    store = StackStore()
    errors = []
    snapshots = []

    def worker(part):
        try:
            for key, (t, z, c) in part:
                comps = PlaneComponents(plate=key, channel=c, z=z, t=t)
                store.add_plane(truth[key][t, z, c], comps, key=key)
                arr, info = store.snapshot(key)  # consistent while others write
                snapshots.append((key, arr, info))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::6],)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for key, want in truth.items():
        arr, info = store.snapshot(key)
        np.testing.assert_array_equal(arr, want)
        assert info.planes == 30 and info.version == 30
    # every intermediate snapshot shows exactly the planes it claims
    for key, arr, info in snapshots:
        assert arr.shape == info.shape
        missing = set(info.missing)
        for pos in _positions(arr.shape):
            if pos in missing:
                assert not arr[pos].any()
            else:
                np.testing.assert_array_equal(arr[pos], truth[key][pos])


def test_components_as_dict_and_bad_components():
    store = StackStore()
    key, t, z, c = store.add_plane(np.zeros((2, 2), np.int16),
                                   {"plate": "p", "well": "b3", "site": 1, "z": 2})
    assert (key, t, z, c) == ("p/B03/s001", 0, 2, 0)
    with pytest.raises(PlaneRejected, match="components"):
        store.add_plane(np.zeros((2, 2), np.int16), {"well": "B3", "t": -1})
    with pytest.raises(PlaneRejected, match="components"):
        store.add_plane(np.zeros((2, 2), np.int16), {"colour": 1})
    with pytest.raises(StackError, match="stack key"):
        store.add_at("", 0, 0, 0, np.zeros((2, 2), np.int16))
