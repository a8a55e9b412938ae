"""Uploader throughput with and without injected faults, and planes/s read
through the OMERO backend over its test double (NOT a real server: no
network, no disk on the server side).

``run()`` returns the result lines; ``benchmarks/backend.py`` includes them.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fiji_bridge.backends.base import StoreUnavailable, VirtualBackend
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import PlaneComponents
from fiji_bridge.upload import Uploader

N_ITEMS = 200
YX = (256, 256)


class _Faulty(VirtualBackend):
    """A real store that fails 30% of writes and goes away twice."""

    def __init__(self, inner: VirtualBackend, fail_rate: float, drops: tuple[int, ...] = (), seed: int = 0):
        self.inner, self.scheme, self.fail_rate, self.drops = inner, inner.scheme, fail_rate, set(drops)
        self.rng, self.calls, self.down_until, self.lock = np.random.default_rng(seed), 0, -1, threading.Lock()

    def save(self, data, path):  # type: ignore[override]
        with self.lock:
            n, self.calls = self.calls, self.calls + 1
            if n in self.drops:
                self.down_until = n + 5
            if n < self.down_until or self.rng.random() < self.fail_rate:
                raise StoreUnavailable("injected")
        self.inner.save(data, path)

    def list_files(self, d):  # type: ignore[override]
        return self.inner.list_files(d)

    def load(self, p):  # type: ignore[override]
        return self.inner.load(p)

    def exists(self, p):  # type: ignore[override]
        return self.inner.exists(p)

    def plate_structure(self, p):  # type: ignore[override]
        return self.inner.plate_structure(p)

    def create_plate(self, *a, **k):  # type: ignore[override]
        return self.inner.create_plate(*a, **k)

    def save_field(self, *a, **k):  # type: ignore[override]
        return self.inner.save_field(*a, **k)


def _upload(tmp: Path, label: str, fail_rate: float, drops: tuple[int, ...]) -> str:
    store = ZarrPlateStore(tmp / f"store-{label}")
    plate = store.create_plate("bench")
    store.save_field(plate, "A01", 0, np.zeros((1, N_ITEMS, 1) + YX, "uint16"))
    planes = np.random.default_rng(0).integers(0, 65535, (N_ITEMS,) + YX, dtype=np.uint16)
    target = _Faulty(store, fail_rate, drops) if fail_rate or drops else store
    up = Uploader(target, queue_size=16, spill_dir=tmp / f"spill-{label}", max_retries=100, backoff=(0.001, 0.01))
    t0 = time.perf_counter()
    for z in range(N_ITEMS):
        up.submit(planes[z], store.path(PlaneComponents(plate, "A01", 0, 0, z, 0)))
    rep = up.finalize()
    dt = time.perf_counter() - t0
    assert rep.complete, rep.left
    c = rep.counters
    return (f"uploader -> OME-Zarr, {label}: {N_ITEMS / dt:.0f} items/s ({N_ITEMS} planes {YX[0]}x{YX[1]} uint16, "
            f"{dt:.2f} s; retried {c['retried']}, spilled {c['spilled']})")


def _omero_double_read() -> str:
    try:
        from fiji_bridge.backends.omero import OmeroBackend
        from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble
    except ImportError as e:
        return f"OMERO backend read: skipped ({e})"
    srv = ServerDouble(users={"bench": "bench-pw"}).register("bench.double", 4064)
    try:
        rng = np.random.default_rng(1)
        fields = {(w, s): rng.integers(0, 65535, (1, 3, 2, 1024, 1024), dtype=np.uint16)
                  for w in ("A01", "A02", "B01", "B02") for s in range(2)}
        pid = srv.seed_plate("bench", fields)
        b = OmeroBackend(host="bench.double", user="bench", password="bench-pw", gateway=GatewayDouble, keepalive=0)
        t0 = time.perf_counter()
        n = 0
        for (w, s), arr in fields.items():
            got = b.load_field(str(pid), w, s)
            n += arr.shape[1] * arr.shape[2]
            assert np.array_equal(got, arr)
        dt = time.perf_counter() - t0
        return (f"OMERO backend read over the TEST DOUBLE (not a server): {n / dt:.0f} planes/s "
                f"({n} planes 1024x1024 uint16, big-endian decode, {dt:.2f} s)")
    finally:
        srv.unregister()


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        return [
            _upload(tmp, "no faults", 0.0, ()),
            _upload(tmp, "30% failed writes + 2 connection drops", 0.3, (50, 120)),
            _omero_double_read(),
        ]


if __name__ == "__main__":
    for line in run():
        print(line)
