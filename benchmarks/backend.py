"""Benchmark: reading a plate from the local stores (planes/s, MB/s).

Builds a plate of 4 wells x 4 fields x 2 channels x 5 z of 1024x1024 uint16
(160 planes, 320 MiB) in a temporary folder, in the OME-Zarr store (NGFF 0.4,
Blosc-lz4, one chunk per plane) and in the OME-TIFF store (uncompressed),
then reads it back with a fresh store instance:

* ``load``        plane by plane through virtual paths (what streaming does)
* ``load_field``  one TZCYX array per field (what batch work units do)

Pixels are real microscopy (the HeLa and SBS images of ../shared/data,
tiled and scaled to 16 bits) when present, so compression behaves as on real
data; otherwise smooth synthetic images with noise. The files were just
written, so reads come from the OS page cache: these are the stores' CPU
costs, not disk speed. Then the OMERO write path over the test double
(:func:`bench_omero_write`: setPlane vs full-width strips vs pyramid tiles).
If ``benchmarks/backend_upload.py`` exists, its
``run()`` lines (the uploader figures) are printed after ours.

Usage: ``python benchmarks/backend.py [--wells 4 --fields 4 --c 2 --z 5 --size 1024]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fiji_bridge.backends.ome_tiff import OmeTiffStore  # noqa: E402
from fiji_bridge.backends.zarr_plate import ZarrPlateStore  # noqa: E402
from fiji_bridge.components import Calibration, PlaneComponents  # noqa: E402

DATA = Path(os.environ.get("FIJI_BRIDGE_TEST_DATA", ROOT.parent / "shared" / "data"))


def source_planes(n: int, size: int) -> list[np.ndarray]:
    """``n`` different 16-bit planes of ``size`` x ``size``."""
    import tifffile

    files = sorted(DATA.glob("*/*.tif")) + sorted(DATA.glob("*/*.TIF"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if files:
            img = tifffile.imread(files[i % len(files)]).astype(np.uint16) * 257
            reps = (-(-size // img.shape[0]), -(-size // img.shape[1]))
            plane = np.tile(np.roll(img, 37 * i, axis=1), reps)[:size, :size]
        else:
            yy, xx = np.mgrid[:size, :size]
            plane = (20000 + 15000 * np.sin(xx / (40 + i)) * np.cos(yy / 55)).astype(np.uint16)
            plane += rng.integers(0, 500, plane.shape, dtype=np.uint16)
        out.append(np.ascontiguousarray(plane))
    return out


def bench_store(name: str, make, wells: list[str], fields: int, c: int, z: int, size: int) -> list[str]:
    planes = source_planes(c * z, size)
    field = np.stack(planes).reshape(1, z, c, size, size)
    mb_field = field.nbytes / 2**20
    n_fields = len(wells) * fields
    n_planes = n_fields * c * z
    lines = []

    store = make()
    pid = store.create_plate("bench")
    t0 = time.perf_counter()
    for w in wells:
        for f in range(fields):
            store.save_field(pid, w, f, field, channel_names=[f"ch{i}" for i in range(c)], calibration=Calibration(0.65, 0.65, 2.0))
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} save_field : {n_fields / dt:8.1f} fields/s  {n_planes / dt:8.1f} planes/s  {n_fields * mb_field / dt:8.1f} MB/s")

    reader = make()
    t0 = time.perf_counter()
    s = reader.plate_structure(pid)
    dt_meta = time.perf_counter() - t0
    paths = [reader.path(PlaneComponents(pid, w, f, ch, zz, 0)) for w, f in s.units() for zz in range(s.size_z) for ch in range(s.size_c)]
    t0 = time.perf_counter()
    total = 0
    for p in paths:
        total += reader.load(p).nbytes
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} load       : {len(paths) / dt:8.1f} planes/s  {total / 2**20 / dt:8.1f} MB/s  ({len(paths)} planes)")

    reader2 = make()
    reader2.plate_structure(pid)
    t0 = time.perf_counter()
    total = 0
    for w, f in s.units():
        total += reader2.load_field(pid, w, f).nbytes
    dt = time.perf_counter() - t0
    lines.append(f"{name:8s} load_field : {n_planes / dt:8.1f} planes/s  {total / 2**20 / dt:8.1f} MB/s  ({n_fields} fields)")
    lines.append(f"{name:8s} structure  : {dt_meta * 1000:8.1f} ms first call ({reader.metadata_reads} metadata reads), cached after")
    store.close(), reader.close(), reader2.close()
    return lines


def bench_omero_write(planes: int = 8) -> list[str]:
    """The OMERO write path over the test double (omero-py's model objects and
    rtypes, every call pickled both ways as over Ice; the double enforces the
    server's rules): ``setPlane`` of whole planes, full-width strips (ROMIO,
    planes above the backend's plane budget) and 256x256 tiles (a pyramid,
    above 3192^2 px), then reading the planes back."""
    try:
        from fiji_bridge.backends.omero import OmeroBackend
        from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble
    except ImportError as e:  # no omero-py
        return [f"omero    (skipped: {e})"]
    cases = [  # label, plane side, backend plane budget
        ("warm-up    64^2", 64, 16 * 2**20),  # imports, the strict surface's attribute tables (not reported)
        ("setPlane 1024^2", 1024, 16 * 2**20),
        ("strips   3000^2", 3000, 16 * 2**20),  # 17.2 MiB > 16 MiB: strips of 2796 rows
        ("strips   1024^2", 1024, 256 * 2**10),  # forced: 128-row strips
        ("tiles    3300^2", 3300, 16 * 2**20),  # 10.9 Mpx > 3192^2: a pyramid, 169 tiles per plane
    ]
    lines = []
    for label, side, budget in cases:
        srv = ServerDouble(users={"bench": "bench-pw"}).register("bench-write.double", 4064)
        try:
            b = OmeroBackend(host="bench-write.double", user="bench", password="bench-pw", gateway=GatewayDouble,
                             keepalive=0, plane_bytes=budget, summaries=False)
            field = np.stack(source_planes(planes, side)).reshape(1, planes, 1, side, side)
            pid = b.create_plate("bench")
            t0 = time.perf_counter()
            b.save_field(pid, "A01", 0, field)
            dt = time.perf_counter() - t0
            r = OmeroBackend(host="bench-write.double", user="bench", password="bench-pw", gateway=GatewayDouble,
                             keepalive=0, plane_bytes=budget)
            t1 = time.perf_counter()
            back = r.load_field(pid, "A01", 0)
            dr = time.perf_counter() - t1
            assert np.array_equal(back, field)
            calls = srv.counters["rps.setPlane"] + srv.counters["rps.setTile"]
            if label.startswith("warm-up"):
                continue
            lines.append(f"omero    {label}: write {planes / dt:7.1f} planes/s {field.nbytes / 2**20 / dt:7.1f} MB/s "
                         f"({calls // planes} calls/plane), read {planes / dr:7.1f} planes/s")
            b.close(), r.close()
        finally:
            srv.unregister()
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--c", type=int, default=2)
    ap.add_argument("--z", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args(argv)
    wells = [f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}" for i in range(a.wells)]
    print(f"== local plate stores: {a.wells} wells x {a.fields} fields x {a.c} C x {a.z} Z of {a.size}x{a.size} uint16")
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        for name, make in (
            ("zarr", lambda: ZarrPlateStore(Path(tmp) / "zarr")),
            ("ometiff", lambda: OmeTiffStore(Path(tmp) / "tiff")),
        ):
            for line in bench_store(name, make, wells, a.fields, a.c, a.z, a.size):
                print(line, flush=True)
    print("== OMERO write path (test double, uint16 planes)")
    for line in bench_omero_write():
        print(line, flush=True)
    upload = Path(__file__).with_name("backend_upload.py")
    if upload.exists():
        spec = importlib.util.spec_from_file_location("backend_upload", upload)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        print("== uploader")
        for line in mod.run():
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
