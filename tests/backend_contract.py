"""The virtual-backend contract: one test suite that every store must pass.

This module holds no tests of its own; a store's test module imports it and
provides a ``backend_factory`` fixture::

    # tests/test_backends_xyz.py
    import pytest
    from backend_contract import *  # noqa: F401,F403  (the tests and their fixtures)

    @pytest.fixture
    def backend_factory(tmp_path):
        # each call returns a NEW backend instance over the SAME (initially
        # empty) storage of this test: a new instance has an empty cache, so
        # tests can tell cached metadata from stored metadata
        return lambda: MyStore(tmp_path / "store")

``tests/`` has no ``__init__.py``: pytest's default ``prepend`` import mode
puts it on ``sys.path``, so ``import backend_contract`` works from any test
module there. Optional fixture ``contract_options`` (a dict) switches parts of
the contract a store cannot offer, e.g. ``{"plane_writes": False}`` for a
store that only writes whole fields.

Every expected value comes from the numpy arrays the test wrote (or from the
codec in :mod:`fiji_bridge.components`), never from the store's own output.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable

import numpy as np
import pytest

from fiji_bridge.backends.base import BackendError, NotFound, PlateStructure, VirtualBackend
from fiji_bridge.components import Calibration, ComponentError, PlaneComponents, VirtualPath

# the field shape of the contract plates: T, Z, C, Y, X
SHAPE = (2, 3, 2, 24, 32)
CHANNELS = ("DAPI", "GFP")
CAL = Calibration(pixel_width=0.65, pixel_height=0.65, pixel_depth=2.0, unit="micron")
LAYOUT = {"A01": 2, "B03": 1}  # well -> fields


def make_field(dtype: str, seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Known pixels: random over the dtype's range (a float's full precision)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 1000).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)


class ContractPlate:
    """A plate a test built: the store, its id and the arrays written."""

    def __init__(self, store: VirtualBackend, plate: str, fields: dict[tuple[str, int], np.ndarray]):
        self.store, self.plate, self.fields = store, plate, fields

    def plane_path(self, well: str, site: int, c: int, z: int, t: int) -> str:
        return self.store.path(PlaneComponents(self.plate, well, site, c, z, t))

    def dir(self, well: str | None = None) -> str:
        return f"/{self.store.scheme}/plate_{self.plate}" + (f"/{well}" if well else "")


def build_plate(store: VirtualBackend, dtype: str = "uint16", name: str = "contract") -> ContractPlate:
    plate = store.create_plate(name, provenance={"source": "numpy", "macro": "none.ijm"})
    fields = {}
    seed = 0
    for well, n in LAYOUT.items():
        for site in range(n):
            arr = make_field(dtype, seed)
            seed += 1
            store.save_field(plate, well, site, arr, channel_names=list(CHANNELS), calibration=CAL)
            fields[(well, site)] = arr
    return ContractPlate(store, plate, fields)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def contract_options() -> dict:
    """Override in a store's test module to switch off what it cannot do."""
    return {}


@pytest.fixture
def store(backend_factory: Callable[[], VirtualBackend]) -> VirtualBackend:
    s = backend_factory()
    yield s
    s.close()


@pytest.fixture
def plate(store: VirtualBackend) -> ContractPlate:
    return build_plate(store)


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_contract_field_and_planes_round_trip(backend_factory, dtype):
    writer = backend_factory()
    p = build_plate(writer, dtype=dtype, name=f"rt_{dtype}")
    reader = backend_factory()
    for (well, site), truth in p.fields.items():
        got = reader.load_field(p.plate, well, site)
        assert got.dtype == truth.dtype
        assert got.shape == truth.shape
        np.testing.assert_array_equal(got, truth)
        for t, z, c in [(0, 0, 0), (1, 2, 1), (0, 1, 1), (1, 0, 0)]:
            plane = reader.load(p.plane_path(well, site, c, z, t))
            assert isinstance(plane, np.ndarray) and plane.dtype == truth.dtype
            np.testing.assert_array_equal(plane, truth[t, z, c])


def test_contract_plane_save_into_existing_field(plate, backend_factory, contract_options):
    if not contract_options.get("plane_writes", True):
        pytest.skip("this store writes whole fields only")
    new = make_field("uint16", 99, SHAPE[3:])
    path = plate.plane_path("A01", 1, 1, 2, 0)
    plate.store.save(new, path)
    reader = backend_factory()
    np.testing.assert_array_equal(reader.load(path), new)
    expected = plate.fields[("A01", 1)].copy()
    expected[0, 2, 1] = new
    np.testing.assert_array_equal(reader.load_field(plate.plate, "A01", 1), expected)


def test_contract_save_batch_builds_a_field(plate, backend_factory, contract_options):
    if not contract_options.get("plane_writes", True):
        pytest.skip("this store writes whole fields only")
    truth = make_field("uint16", 7)
    paths, datas = [], []
    for t in range(SHAPE[0]):
        for z in range(SHAPE[1]):
            for c in range(SHAPE[2]):
                paths.append(plate.plane_path("C02", 0, c, z, t))
                datas.append(truth[t, z, c])
    plate.store.save_batch(datas, paths)
    reader = backend_factory()
    np.testing.assert_array_equal(reader.load_field(plate.plate, "C02", 0), truth)
    assert reader.plate_structure(plate.plate).fields["C02"] == 1


# ------------------------------------------------------------------ listings


def test_contract_list_files_each_level(plate):
    st = plate.store
    assert plate.dir() in st.list_files(f"/{st.scheme}")
    assert st.list_files(plate.dir()) == sorted(plate.dir(w) for w in LAYOUT)
    t, z, c = SHAPE[:3]
    expected = sorted(
        str(VirtualPath.plane(st.scheme, PlaneComponents(plate.plate, "A01", s, ch, zz, tt)))
        for s in range(LAYOUT["A01"]) for tt in range(t) for zz in range(z) for ch in range(c)
    )
    assert st.list_files(plate.dir("A01")) == expected
    assert len(st.list_files(plate.dir("B03"))) == t * z * c


def test_contract_exists(plate):
    st = plate.store
    assert st.exists(plate.dir())
    assert st.exists(plate.dir("A01"))
    assert st.exists(plate.plane_path("A01", 1, 1, 2, 1))
    assert not st.exists(plate.plane_path("A01", 1, 2, 0, 0))  # channel 2 of 2
    assert not st.exists(plate.plane_path("A01", 2, 0, 0, 0))  # field 2 of 2
    assert not st.exists(plate.plane_path("H12", 0, 0, 0, 0))
    assert not st.exists(plate.dir("H12"))
    assert not st.exists(f"/{st.scheme}/plate_nosuchplate999/A01")
    assert not st.exists(plate.dir() + "/nothing.csv")


# ------------------------------------------------------------ plate structure


def test_contract_plate_structure(plate, backend_factory):
    s = backend_factory().plate_structure(plate.plate)
    assert isinstance(s, PlateStructure)
    assert s.plate == plate.plate
    assert s.wells == tuple(sorted(LAYOUT))
    assert dict(s.fields) == LAYOUT
    assert s.shape == SHAPE
    assert s.dtype == "uint16"
    assert s.channel_names == CHANNELS
    assert s.calibration.pixel_width == pytest.approx(CAL.pixel_width)
    assert s.calibration.pixel_height == pytest.approx(CAL.pixel_height)
    assert s.calibration.pixel_depth == pytest.approx(CAL.pixel_depth)
    assert s.units() == [("A01", 0), ("A01", 1), ("B03", 0)]
    assert s.rows >= 2 and s.columns >= 3


def test_contract_plate_structure_is_cached(plate, backend_factory):
    reader = backend_factory()
    before = reader.metadata_reads
    s1 = reader.plate_structure(plate.plate)
    after_first = reader.metadata_reads
    assert after_first > before, "the first call must read metadata (and count it)"
    s2 = reader.plate_structure(plate.plate)
    for well, site in s1.units():
        reader.load(plate.plane_path(well, site, 0, 0, 0))
    s3 = reader.plate_structure(plate.plate)
    assert reader.metadata_reads == after_first, "later calls must be served from the cache"
    assert s1 == s2 == s3


# ---------------------------------------------------------------- writes


def test_contract_save_field_is_idempotent(plate, backend_factory):
    st = plate.store
    arr = plate.fields[("B03", 0)]
    st.save_field(plate.plate, "B03", 0, arr, channel_names=list(CHANNELS), calibration=CAL)
    st.save_field(plate.plate, "B03", 0, arr, channel_names=list(CHANNELS), calibration=CAL)
    reader = backend_factory()
    s = reader.plate_structure(plate.plate)
    assert s.fields["B03"] == 1
    assert len(reader.list_files(plate.dir("B03"))) == int(np.prod(SHAPE[:3]))
    np.testing.assert_array_equal(reader.load_field(plate.plate, "B03", 0), arr)
    # a different image saved to the same field replaces it
    other = make_field("uint16", 1234)
    st.save_field(plate.plate, "B03", 0, other, channel_names=list(CHANNELS), calibration=CAL)
    reader2 = backend_factory()
    assert reader2.plate_structure(plate.plate).fields["B03"] == 1
    np.testing.assert_array_equal(reader2.load_field(plate.plate, "B03", 0), other)


def test_contract_tables_round_trip_and_listing(plate, backend_factory):
    st = plate.store
    cols = {"label": ["a", "b", "c"], "area": [10, 20, 35], "mean": [1.5, 2.25, 1e-3]}
    path = st.save_table(plate.plate, "results", cols)
    assert path == plate.dir() + "/results.csv"
    wpath = st.save_table(plate.plate, "cells", "x,y\n1,2\n", well="A01")
    assert wpath == plate.dir("A01") + "/cells.csv"
    jpath = plate.dir("A01") + "/summary.json"
    doc = {"macro": "blur.ijm", "count": 3, "values": [1.5, 2.5], "nested": {"ok": True}}
    st.save(doc, jpath)

    reader = backend_factory()
    rows = list(csv.reader(io.StringIO(reader.load(path))))
    assert rows[0] == list(cols)
    assert [r[0] for r in rows[1:]] == cols["label"]
    assert [int(r[1]) for r in rows[1:]] == cols["area"]
    assert [float(r[2]) for r in rows[1:]] == cols["mean"]
    assert reader.load(wpath) == "x,y\n1,2\n"
    assert reader.load(jpath) == doc
    assert path in reader.list_files(plate.dir())
    well_files = reader.list_files(plate.dir("A01"))
    assert wpath in well_files and jpath in well_files
    assert reader.exists(path) and reader.exists(jpath)


def test_contract_provenance_is_readable(store, backend_factory):
    prov = {"source_plate": "plate_7", "macro": "nuclei.ijm", "args": "sigma=2", "fiji_bridge": "0.1.0"}
    pid = store.create_plate("derived", provenance=prov)
    got = backend_factory().plate_provenance(pid)
    assert {k: str(v) for k, v in got.items() if k in prov} == prov


def test_contract_create_plate_like(plate, backend_factory):
    src = plate.store.plate_structure(plate.plate)
    pid = plate.store.create_plate("derived_like", like=src, provenance={"source_plate": plate.plate})
    assert pid != plate.plate
    mask = (plate.fields[("B03", 0)][:, :, :1] > 30000).astype("uint8")
    plate.store.save_field(pid, "B03", 0, mask, channel_names=["mask"])
    s = backend_factory().plate_structure(pid)
    assert s.wells == ("B03",) and s.shape == mask.shape and s.dtype == "uint8"
    assert s.channel_names == ("mask",)
    np.testing.assert_array_equal(backend_factory().load_field(pid, "B03", 0), mask)
    # the source plate is untouched
    np.testing.assert_array_equal(backend_factory().load_field(plate.plate, "B03", 0), plate.fields[("B03", 0)])


# ---------------------------------------------------------------- errors


def test_contract_not_found(plate):
    st = plate.store
    with pytest.raises(NotFound):
        st.plate_structure("nosuchplate999")
    with pytest.raises(NotFound):
        st.load(plate.plane_path("H12", 0, 0, 0, 0))
    with pytest.raises(NotFound):
        st.load(plate.plane_path("A01", 5, 0, 0, 0))
    with pytest.raises(NotFound):
        st.load(plate.plane_path("A01", 0, 7, 0, 0))  # channel out of range
    with pytest.raises(NotFound):
        st.load_field(plate.plate, "A01", 9)
    with pytest.raises(NotFound):
        st.load_field(plate.plate, "G07", 0)
    with pytest.raises(NotFound):
        st.load(plate.dir() + "/missing.csv")
    with pytest.raises(NotFound):
        st.list_files(plate.dir("H12"))


def test_contract_component_errors(plate):
    st = plate.store
    with pytest.raises(ComponentError):
        st.load(f"/{st.scheme}/notaplate/A01/x.tif")
    with pytest.raises(ComponentError):
        st.load("/otherscheme/plate_1/A01/A01_s000_z000_c000_t000.tif")
    with pytest.raises(ComponentError):
        st.load(f"/{st.scheme}/plate_{plate.plate}/Q9Z/whatever.csv")
    with pytest.raises(ComponentError):
        st.save_field(plate.plate, "not-a-well", 0, plate.fields[("A01", 0)])
    # nothing was written by the failed calls
    assert st.plate_structure(plate.plate).wells == tuple(sorted(LAYOUT))


def test_contract_bad_data_is_refused(plate):
    st = plate.store
    good = plate.fields[("A01", 0)]
    with pytest.raises(BackendError, match="5-D"):
        st.save_field(plate.plate, "A01", 0, good[0])
    with pytest.raises(BackendError, match="uint16|pixel type|dtype"):
        st.save_field(plate.plate, "B05", 0, good.astype("float32"))
    with pytest.raises(BackendError, match="shape|size"):
        st.save_field(plate.plate, "B05", 0, good[:, :, :, :10])
    with pytest.raises(BackendError):
        st.save(np.zeros((5, 5), "uint16"), plate.plane_path("A01", 0, 0, 0, 0))
    with pytest.raises(BackendError):
        st.save(np.zeros((2, 24, 32), "uint16"), plate.plane_path("A01", 0, 0, 0, 0))
    # the plate still holds what was written before
    np.testing.assert_array_equal(st.load_field(plate.plate, "A01", 0), good)
    assert "B05" not in st.plate_structure(plate.plate).wells


def _all_contract_tests() -> list[str]:
    return sorted(k for k in globals() if k.startswith("test_contract_"))


def _summary() -> dict[str, Any]:  # pragma: no cover - for humans
    return {"tests": _all_contract_tests(), "shape": SHAPE, "layout": LAYOUT}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(_summary(), indent=1))
