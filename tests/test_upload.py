"""The uploader under injected faults, with real stores (OME-Zarr on disk and
the OMERO backend over its test double): every item arrives exactly once."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fiji_bridge.backends.base import StoreUnavailable, VirtualBackend
from fiji_bridge.backends.zarr_plate import ZarrPlateStore
from fiji_bridge.components import PlaneComponents
from fiji_bridge.upload import Uploader

ROOT = Path(__file__).resolve().parents[1]
N = 40
YX = (16, 16)


class FlakyStore(VirtualBackend):
    """A real store behind a wrapper that fails ``fail_rate`` of the writes
    (before writing) and goes away for ``drop_len`` calls at ``drops``
    (call numbers), or calls ``on_drop`` there (e.g. the OMERO double's
    ``drop_connections``). Successful writes are counted per path, and
    appended to ``write_log`` when given (counts across processes)."""

    def __init__(self, inner, *, fail_rate=0.0, drops=(), drop_len=4, on_drop=None, down_after=None,
                 seed=0, write_log=None):
        self.inner, self.scheme = inner, inner.scheme
        self.fail_rate, self.drops, self.drop_len, self.on_drop = fail_rate, set(drops), drop_len, on_drop
        self.down_after = down_after
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.down_until = -1
        self.writes = collections.Counter()
        self.write_log = write_log
        self.lock = threading.Lock()

    def save(self, data, path):
        self._gate()
        self.inner.save(data, path)
        self._count(path)

    def save_field(self, plate, well, site, array, **kw):
        self._gate()
        self.inner.save_field(plate, well, site, array, **kw)
        self._count(f"field {plate} {well} {site}")

    def save_table(self, plate, name, table, *, well=None, site=None):
        self._gate()
        path = self.inner.save_table(plate, name, table, well=well, site=site)
        self._count(path)
        return path

    def _gate(self):
        with self.lock:
            n = self.calls
            self.calls += 1
            if n in self.drops:
                if self.on_drop is not None:
                    self.on_drop()
                else:
                    self.down_until = n + self.drop_len
            if n < self.down_until:
                raise StoreUnavailable(f"injected: connection dropped (call {n})")
            if self.down_after is not None and sum(self.writes.values()) >= self.down_after:
                raise StoreUnavailable("injected: server gone")
            if self.rng.random() < self.fail_rate:
                raise StoreUnavailable(f"injected: write {n} failed")

    def _count(self, path):
        with self.lock:
            self.writes[path] += 1
            if self.write_log:
                with open(self.write_log, "a") as f:
                    f.write(path + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    def list_files(self, d):
        return self.inner.list_files(d)

    def load(self, p):
        return self.inner.load(p)

    def exists(self, p):
        return self.inner.exists(p)

    def plate_structure(self, p):
        return self.inner.plate_structure(p)

    def create_plate(self, *a, **k):
        return self.inner.create_plate(*a, **k)



def _planes(seed=1, n=N):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65535, size=(n,) + YX, dtype=np.uint16)


def _zarr_plate(root: Path, n=N):
    store = ZarrPlateStore(root)
    plate = store.create_plate("up")
    store.save_field(plate, "A01", 0, np.zeros((1, n, 1) + YX, "uint16"))
    return store, plate


def _paths(store, plate, n=N):
    return [store.path(PlaneComponents(plate, "A01", 0, 0, z, 0)) for z in range(n)]


@pytest.mark.timeout(120)
def test_faults_every_item_arrives_exactly_once_zarr(tmp_path):
    store, plate = _zarr_plate(tmp_path / "store")
    flaky = FlakyStore(store, fail_rate=0.3, drops=(10, 25), drop_len=5, seed=3)
    planes = _planes()
    up = Uploader(flaky, queue_size=4, spill_dir=tmp_path / "spill", max_retries=60, backoff=(0.001, 0.01))
    paths = _paths(store, plate)
    for z, p in enumerate(paths):
        assert up.submit(planes[z], p)
    assert not up.submit(planes[0], paths[0])  # same key again: not queued twice
    rep = up.finalize(timeout=60)
    assert rep.complete, rep
    assert sorted(rep.uploaded) == sorted(paths)
    assert dict(flaky.writes) == {p: 1 for p in paths}  # exactly once, counted at the store
    assert rep.counters["retried"] > 0 and rep.counters["spilled"] > 0 and rep.counters["skipped"] == 1
    got = ZarrPlateStore(tmp_path / "store").load_field(plate, "A01", 0)
    np.testing.assert_array_equal(got[0, :, 0], planes)
    assert list((tmp_path / "spill" / "items").iterdir()) == []  # nothing left on disk


@pytest.mark.timeout(120)
def test_faults_every_item_arrives_exactly_once_omero_double(tmp_path):
    pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")
    from fiji_bridge.backends.omero import OmeroBackend
    from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble

    srv = ServerDouble(users={"u": "pw"}).register("upload.test", 4064)
    try:
        store = OmeroBackend(host="upload.test", user="u", password="pw", gateway=GatewayDouble, keepalive=0)
        plate = store.create_plate("up")
        n = 24
        store.save_field(plate, "A01", 0, np.zeros((1, n, 1) + YX, "uint16"))
        # the connection really drops twice mid-batch: the backend sees Ice.ConnectionLostException
        flaky = FlakyStore(store, fail_rate=0.3, drops=(6, 15), on_drop=srv.drop_connections, seed=5)
        planes = _planes(n=n)
        paths = _paths(store, plate, n)
        up = Uploader(flaky, queue_size=3, spill_dir=tmp_path / "spill", max_retries=60, backoff=(0.001, 0.01))
        for z, p in enumerate(paths):
            up.submit(planes[z], p)
        rep = up.finalize(timeout=60)
        assert rep.complete, rep
        assert dict(flaky.writes) == {p: 1 for p in paths}
        assert srv.counters["join"] >= 2  # reconnected by session key after each drop
        assert len(srv.objects("Image")) == 1  # no duplicate images
        got = OmeroBackend(host="upload.test", user="u", password="pw", gateway=GatewayDouble,
                           keepalive=0).load_field(plate, "A01", 0)
        np.testing.assert_array_equal(got[0, :, 0], planes)
    finally:
        srv.unregister()


@pytest.mark.timeout(60)
def test_fallback_store_when_the_server_stays_away(tmp_path):
    store, plate = _zarr_plate(tmp_path / "remote", n=6)
    local, plate2 = _zarr_plate(tmp_path / "local", n=6)
    assert plate2 == plate
    down = FlakyStore(store, fail_rate=1.0)
    seen = []
    up = Uploader(down, queue_size=2, spill_dir=tmp_path / "spill", fallback=local, max_retries=3,
                  backoff=(0.001, 0.002), on_fallback=lambda k, e: seen.append(k))
    planes = _planes(n=6)
    paths = _paths(store, plate, 6)
    for z, p in enumerate(paths):
        up.submit(planes[z], p)
    rep = up.finalize(timeout=30)
    assert sorted(rep.fallback) == sorted(paths) == sorted(seen)
    assert rep.uploaded == [] and rep.complete and rep.counters["fallback"] == 6
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "local").load_field(plate, "A01", 0)[0, :, 0], planes)


@pytest.mark.timeout(60)
def test_without_fallback_report_says_what_is_left_and_next_start_uploads_it(tmp_path):
    store, plate = _zarr_plate(tmp_path / "store", n=5)
    planes = _planes(n=5)
    paths = _paths(store, plate, 5)
    up = Uploader(FlakyStore(store, fail_rate=1.0), queue_size=2, spill_dir=tmp_path / "spill", max_retries=2,
                  backoff=(0.001, 0.002))
    for z, p in enumerate(paths):
        up.submit(planes[z], p)
    rep = up.finalize(timeout=30)
    assert not rep.complete
    assert sorted(rep.failed) == sorted(paths) and all("unavailable" in r for r in rep.failed.values())
    counting = FlakyStore(store)
    up2 = Uploader(counting, spill_dir=tmp_path / "spill", backoff=(0.001, 0.002))
    assert up2.counters["recovered"] == 5
    rep2 = up2.finalize(timeout=30)
    assert rep2.complete and sorted(rep2.uploaded) == sorted(paths)
    assert dict(counting.writes) == {p: 1 for p in paths}
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "store").load_field(plate, "A01", 0)[0, :, 0], planes)


@pytest.mark.timeout(120)
def test_sigkill_with_items_spilled_they_arrive_after_restart_exactly_once(tmp_path):
    n = 12
    store, plate = _zarr_plate(tmp_path / "store", n=n)
    planes = _planes(n=n)
    np.save(tmp_path / "planes.npy", planes)
    log = tmp_path / "writes.log"
    child = textwrap.dedent(f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_upload import FlakyStore, _paths
        from fiji_bridge.backends.zarr_plate import ZarrPlateStore
        from fiji_bridge.upload import Uploader
        store = ZarrPlateStore({str(tmp_path / 'store')!r})
        flaky = FlakyStore(store, down_after=3, write_log={str(log)!r})
        up = Uploader(flaky, queue_size=2, spill_dir={str(tmp_path / 'spill')!r}, durable=True,
                      max_retries=10**6, backoff=(0.01, 0.05))
        planes = np.load({str(tmp_path / 'planes.npy')!r})
        for z, p in enumerate(_paths(store, {plate!r}, {n})):
            up.submit(planes[z], p)
        while up.counters["uploaded"] < 3:
            time.sleep(0.01)
        print("SUBMITTED", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SUBMITTED"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = log.read_text().split()
    assert len(first) == 3
    spilled = list((tmp_path / "spill" / "items").glob("*.item"))
    assert len(spilled) == n - 3  # everything not uploaded survived the kill on disk, one file per item
    counting = FlakyStore(ZarrPlateStore(tmp_path / "store"), write_log=log)
    up = Uploader(counting, spill_dir=tmp_path / "spill", backoff=(0.001, 0.002))
    rep = up.finalize(timeout=60)
    assert rep.complete
    paths = _paths(store, plate, n)
    assert sorted(collections.Counter(log.read_text().split()).items()) == sorted((p, 1) for p in paths)
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "store").load_field(plate, "A01", 0)[0, :, 0], planes)


def test_bad_items_are_refused_at_submit(tmp_path):
    store, plate = _zarr_plate(tmp_path / "store", n=1)
    up = Uploader(store)
    with pytest.raises(Exception, match="cannot upload"):
        up.submit(object(), "/zarr/plate_x/a.json")
    assert up.finalize(timeout=5).complete


@pytest.mark.timeout(120)
def test_field_and_table_items_under_faults_arrive_exactly_once_omero_double(tmp_path):
    """Whole fields and tables (the batch's items) over the OMERO double: 30%
    failed writes, the connection dropped twice; each arrives once."""
    pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")
    from fiji_bridge.backends.omero import OmeroBackend
    from fiji_bridge.components import Calibration
    from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble

    srv = ServerDouble(users={"u": "pw"}).register("upload-fields.test", 4064)
    try:
        def backend():
            return OmeroBackend(host="upload-fields.test", user="u", password="pw", gateway=GatewayDouble, keepalive=0)

        store = backend()
        plate = store.create_plate("fields")
        flaky = FlakyStore(store, fail_rate=0.3, drops=(3, 9), on_drop=srv.drop_connections, seed=7)
        rng = np.random.default_rng(2)
        units = [(w, s) for w in ("A01", "B02", "C03") for s in range(2)]
        fields = {u: rng.integers(0, 4000, size=(1, 2, 2) + YX, dtype=np.uint16) for u in units}
        cal = Calibration(pixel_width=0.5, pixel_height=0.5)
        up = Uploader(flaky, queue_size=2, spill_dir=tmp_path / "spill", max_retries=60, backoff=(0.001, 0.01))
        for (w, s), arr in fields.items():
            assert up.submit_field(plate, w, s, arr, channel_names=["DNA", "GFP"], calibration=cal)
            assert up.submit_table(plate, f"results_s{s:03d}", {"well": [w], "sum": [int(arr.sum())]}, well=w)
        assert not up.submit_field(plate, "A01", 0, fields[("A01", 0)])  # same key: not twice
        rep = up.finalize(timeout=60)
        assert rep.complete, rep
        assert rep.counters["retried"] > 0 and rep.counters["spilled"] > 0
        assert sorted(flaky.writes.values()) == [1] * (2 * len(units))  # one write per item at the store
        assert len(srv.objects("Image")) == len(units)  # no duplicate or orphan images
        fresh = backend()
        assert fresh.plate_structure(plate).channel_names == ("DNA", "GFP")
        for (w, s), arr in fields.items():
            np.testing.assert_array_equal(fresh.load_field(plate, w, s), arr)
            text = fresh.load(f"/omero/plate_{plate}/{w}/results_s{s:03d}.csv")
            assert text.splitlines()[1] == f"{w},{int(arr.sum())}"  # numpy on the same pixels
            assert len(fresh._tables(plate, w)[f"results_s{s:03d}.csv"]) == 1  # one FileAnnotation
    finally:
        srv.unregister()


@pytest.mark.timeout(60)
def test_spilled_field_and_table_items_keep_their_arguments_across_a_restart(tmp_path):
    from fiji_bridge.components import Calibration

    store = ZarrPlateStore(tmp_path / "store")
    plate = store.create_plate("restart")
    arr = _planes(n=3).reshape(1, 1, 3, *YX)
    up = Uploader(FlakyStore(store, fail_rate=1.0), spill_dir=tmp_path / "spill", durable=True, max_retries=1,
                  backoff=(0.001, 0.002))
    up.submit_field(plate, "B02", 1, arr, channel_names=["a", "b", "c"], calibration=Calibration(0.25, 0.25))
    up.submit_table(plate, "counts", "well,n\nB02,3\n", well="B02", site=1)
    rep = up.finalize(timeout=30)
    assert sorted(rep.failed) == ["/zarr/plate_restart/B02/B02_s001", "/zarr/plate_restart/B02/counts_s001.csv"]
    up2 = Uploader(store, spill_dir=tmp_path / "spill")  # the next start
    assert up2.counters["recovered"] == 2
    assert up2.finalize(timeout=30).complete
    fresh = ZarrPlateStore(tmp_path / "store")
    np.testing.assert_array_equal(fresh.load_field(plate, "B02", 1), arr)
    s = fresh.plate_structure(plate)
    assert s.channel_names == ("a", "b", "c") and s.calibration.pixel_width == pytest.approx(0.25)
    assert fresh.load("/zarr/plate_restart/B02/counts_s001.csv") == "well,n\nB02,3\n"


@pytest.mark.timeout(60)
def test_an_item_requiring_a_failed_item_is_not_written(tmp_path):
    store = ZarrPlateStore(tmp_path / "store")
    plate = store.create_plate("req")
    up = Uploader(store)
    up.submit_field(plate, "A01", 0, np.zeros((1, 1, 1, 4, 4), "uint16"))
    up.submit_field(plate, "A01", 1, np.zeros((1, 1, 1, 8, 8), "uint16"))  # refused: the plate holds 4x4
    marker = "/zarr/plate_req/A01/marker.json"
    up.submit({"status": "done"}, marker, requires=["/zarr/plate_req/A01/A01_s000", "/zarr/plate_req/A01/A01_s001"])
    rep = up.finalize(timeout=30)
    assert rep.uploaded == ["/zarr/plate_req/A01/A01_s000"]
    assert "requires /zarr/plate_req/A01/A01_s001" in rep.failed[marker]
    assert not store.exists(marker)


class OrderedStore(FlakyStore):
    """Records the order of successful writes."""

    def __init__(self, inner, **kw):
        super().__init__(inner, **kw)
        self.order = []

    def _count(self, path):
        super()._count(path)
        self.order.append(path)


@pytest.mark.timeout(60)
def test_spilled_items_are_written_in_submit_order_and_memory_stays_bounded(tmp_path):
    """A queue of 4 and 60 items: most go through the spill; the store sees
    them in exactly the submit order, and never more than 4 (+ the one in
    hand) are held in memory."""
    n = 60
    store, plate = _zarr_plate(tmp_path / "store", n=n)
    ordered = OrderedStore(store, fail_rate=0.2, seed=5)
    planes = _planes(seed=9, n=n)
    paths = _paths(store, plate, n)
    up = Uploader(ordered, queue_size=4, spill_dir=tmp_path / "spill", max_retries=100, backoff=(0.001, 0.002))
    most = 0
    for z in range(n):
        up.submit(planes[z], paths[z])
        with up._lock:
            in_memory = sum(1 for i in up._pending.values() if i.data is not None)
        most = max(most, in_memory)
    rep = up.finalize(timeout=60)
    assert rep.complete and rep.counters["spilled"] > n // 2
    assert ordered.order == paths
    assert most <= 4 + 1
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "store").load_field(plate, "A01", 0)[0, :, 0], planes)
    assert list((tmp_path / "spill" / "items").iterdir()) == []


@pytest.mark.timeout(60)
def test_a_spill_folder_of_the_earlier_layout_is_still_uploaded(tmp_path):
    """Items spilled by the previous version (a data file plus a JSON
    manifest) and a torn write (a ``.tmp`` never committed) at restart."""
    store, plate = _zarr_plate(tmp_path / "store", n=2)
    planes = _planes(seed=4, n=2)
    items = tmp_path / "spill" / "items"
    items.mkdir(parents=True)
    path = _paths(store, plate, 2)[1]
    np.save(items / "00000000000000000001-000001-abc.npy", planes[1], allow_pickle=False)
    (items / "00000000000000000001-000001-abc.json").write_text(json.dumps(
        {"key": path, "path": path, "kind": "npy", "file": "00000000000000000001-000001-abc.npy", "op": "save",
         "args": {}, "requires": []}))
    (items / "00000000000000000002-000002-def.item.tmp").write_bytes(b'{"key": "/zarr/torn"')
    counting = FlakyStore(store)
    rep = Uploader(counting, spill_dir=tmp_path / "spill").finalize(timeout=30)
    assert rep.complete and rep.uploaded == [path] and counting.writes == {path: 1}
    np.testing.assert_array_equal(ZarrPlateStore(tmp_path / "store").load_field(plate, "A01", 0)[0, 1, 0], planes[1])
    assert list(items.iterdir()) == []
