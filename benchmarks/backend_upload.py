"""Uploader throughput against the store's own write speed, with and without
injected faults, and planes/s read through the OMERO backend over its test
double (NOT a real server: no network, no disk on the server side).

In one run, alternating (ROUNDS rounds, medians; the machine is shared, so
single numbers wander):

* **submit overhead** when the queue is not full: wall time of ``submit``
  per 128 KB plane, the worker uploading meanwhile;
* **spill path**: N_ITEMS 256x256 uint16 planes (128 KB) through a queue of
  16 into an OME-Zarr store, so nearly all of them are written to the spill
  folder, read back and uploaded; against the same planes written straight
  into an identical store with ``store.save`` (the store's own speed), and
  into a store that writes nothing (the uploader's own ceiling).

``python benchmarks/backend_upload.py --profile`` adds where an item's time
goes (per phase, ms). ``run()`` returns the result lines;
``benchmarks/backend.py`` includes them.
"""

from __future__ import annotations

import collections
import functools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fiji_bridge import upload as upload_module
from fiji_bridge.backends.base import StoreUnavailable, VirtualBackend
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import PlaneComponents
from fiji_bridge.upload import Uploader

N_ITEMS = 200
YX = (256, 256)
ROUNDS = 3


class _Wrapped(VirtualBackend):
    """A real store behind a pass-through; ``save`` may fail (30% of writes,
    and twice for 5 calls in a row) or write nothing at all (``null``)."""

    def __init__(self, inner: VirtualBackend, fail_rate: float = 0.0, drops: tuple[int, ...] = (), seed: int = 0, null: bool = False):
        self.inner, self.scheme, self.fail_rate, self.drops, self.null = inner, inner.scheme, fail_rate, set(drops), null
        self.rng, self.calls, self.down_until, self.lock = np.random.default_rng(seed), 0, -1, threading.Lock()

    def save(self, data, path):  # type: ignore[override]
        with self.lock:
            n, self.calls = self.calls, self.calls + 1
            if n in self.drops:
                self.down_until = n + 5
            if n < self.down_until or self.rng.random() < self.fail_rate:
                raise StoreUnavailable("injected")
        if not self.null:
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


def _store(root: Path) -> tuple[ZarrPlateStore, str, list[str]]:
    store = ZarrPlateStore(root)
    plate = store.create_plate("bench")
    store.save_field(plate, "A01", 0, np.zeros((1, N_ITEMS, 1) + YX, "uint16"))
    return store, plate, [store.path(PlaneComponents(plate, "A01", 0, 0, z, 0)) for z in range(N_ITEMS)]


PLANES = np.random.default_rng(0).integers(0, 65535, (N_ITEMS,) + YX, dtype=np.uint16)


def _direct(root: Path) -> float:
    """items/s of ``store.save`` called in a loop: the store's own speed."""
    store, _, paths = _store(root)
    t0 = time.perf_counter()
    for z in range(N_ITEMS):
        store.save(PLANES[z], paths[z])
    return N_ITEMS / (time.perf_counter() - t0)


def _uploaded(root: Path, *, queue_size: int, fail_rate: float = 0.0, drops: tuple[int, ...] = (), null: bool = False, durable: bool = False) -> tuple[float, list[float], dict]:
    """items/s from the first submit to the end of finalize, the submit times (s), the counters."""
    store, _, paths = _store(root / "store")
    target = _Wrapped(store, fail_rate, drops, null=null) if (fail_rate or drops or null) else store
    up = Uploader(target, queue_size=queue_size, spill_dir=root / "spill", max_retries=100, backoff=(0.001, 0.01), durable=durable)
    submits = []
    t0 = time.perf_counter()
    for z in range(N_ITEMS):
        s = time.perf_counter()
        up.submit(PLANES[z], paths[z])
        submits.append(time.perf_counter() - s)
    rep = up.finalize()
    dt = time.perf_counter() - t0
    assert rep.complete, rep.left
    if not null:
        np.testing.assert_array_equal(ZarrPlateStore(root / "store").load_field("bench", "A01", 0)[0, :, 0], PLANES)
    return N_ITEMS / dt, submits, rep.counters


def _comparison(tmp: Path) -> list[str]:
    direct, spill, null, overhead, journal = [], [], [], [], []
    spilled = 0
    for r in range(ROUNDS):  # alternate, so a busy spell on the shared machine hits all of them
        direct.append(_direct(tmp / f"direct-{r}"))
        rate, _, counters = _uploaded(tmp / f"spill-{r}", queue_size=16)
        spill.append(rate)
        spilled = counters["spilled"]
        null.append(_uploaded(tmp / f"null-{r}", queue_size=16, null=True)[0])
        _, submits, counters = _uploaded(tmp / f"free-{r}", queue_size=N_ITEMS + 1)
        assert counters["spilled"] == 0
        overhead.extend(submits)
        journal.extend(_uploaded(tmp / f"durable-{r}", queue_size=N_ITEMS + 1, durable=True)[1])
    med = statistics.median
    d, s = med(direct), med(spill)
    us = sorted(x * 1e6 for x in overhead)
    ju = sorted(x * 1e6 for x in journal)
    return [
        f"store's own write (OME-Zarr store.save, {YX[0]}x{YX[1]} uint16 = 128 KB planes): {d:.0f} items/s "
        f"({1000 / d:.2f} ms/plane; median of {ROUNDS}, {', '.join(f'{x:.0f}' for x in direct)})",
        f"uploader spill path -> the same store: {s:.0f} items/s = {s / d:.2f}x the store's own "
        f"({spilled}/{N_ITEMS} items spilled; {', '.join(f'{x:.0f}' for x in spill)})",
        f"uploader spill path -> a store that writes nothing: {med(null):.0f} items/s (the uploader's own ceiling)",
        f"uploader submit overhead, queue not full: median {med(us):.0f} us, p99 {us[int(0.99 * (len(us) - 1))]:.0f} us, "
        f"max {us[-1]:.0f} us per item ({len(us)} submits, the worker uploading meanwhile)",
        f"  with durable=True (every item journalled to disk at submit, fsynced): median {med(ju):.0f} us, "
        f"p99 {ju[int(0.99 * (len(ju) - 1))]:.0f} us",
    ]


def _faults(tmp: Path) -> str:
    rate, _, c = _uploaded(tmp / "faults", queue_size=16, fail_rate=0.3, drops=(50, 120))
    return (f"uploader -> OME-Zarr, 30% failed writes + 2 connection drops: {rate:.0f} items/s "
            f"(retried {c['retried']}, spilled {c['spilled']}; every plane checked in the store)")


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


def profile(tmp: Path) -> list[str]:
    """Where an item's time goes on the spill path (wall ms per call, per phase;
    the producer's submit and the worker's phases overlap)."""
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    saved = {}

    def wrap(owner, name):
        f = getattr(owner, name)
        saved[(owner, name)] = f

        @functools.wraps(f)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
                calls[name] += 1

        setattr(owner, name, timed)

    for name in ("_submit", "_spill", "_upload", "_apply", "_mark_done", "_finish"):
        wrap(Uploader, name)
    for name in ("_read_spill", "_remove_spill"):
        wrap(upload_module, name)
    try:
        rate = _uploaded(tmp / "profile", queue_size=16)[0]
    finally:
        for (owner, name), f in saved.items():
            setattr(owner, name, f)
    return [f"profile of one spill-path run ({rate:.0f} items/s):"] + [
        f"  {name:13s} {calls[name]:4d} calls {spent[name] / calls[name] * 1000:6.2f} ms each" for name in spent
    ]


def run(with_profile: bool = False) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines = _comparison(tmp) + [_faults(tmp), _omero_double_read()]
        if with_profile:
            lines += profile(tmp)
        return lines


if __name__ == "__main__":
    for line in run(with_profile="--profile" in sys.argv):
        print(line, flush=True)
