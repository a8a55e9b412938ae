"""Batch macro processing of plates through real bridges (real processes,
real ZeroMQ, real ImageJ), checked against ImageJ alone and known truth."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fiji_bridge.backends import open_plate
from fiji_bridge.batch import BatchError, free_port_pair, run_batch
from fiji_bridge.macros import MacroArgumentError, resolve
from fiji_bridge.synthetic import make_plate, write_plate

pytestmark = pytest.mark.imagej

FIJI_BRIDGE = [sys.executable, "-m", "fiji_bridge.cli"]
IJ_JAR = os.environ.get("FIJI_BRIDGE_IJ_JAR", "/usr/share/java/ij.jar")

# a small macro with a controllable failure and delay: projects Z, measures
PROBE = textwrap.dedent("""\
    // Test macro: max projection and one Measure row per field.
    // Output images: "projection"
    // Output tables: "Results"
    #@ String (value="", description="fail in this well") fail_well
    #@ Integer (value=0, description="sleep per field, ms") delay_ms
    if (fail_well != "" && indexOf(getTitle(), "_" + fail_well + "_") >= 0)
        exit("failing on purpose in well " + fail_well);
    wait(delay_ms);
    input = getImageID();
    run("Z Project...", "projection=[Max Intensity] all");
    rename("projection");
    selectImage(input);
    close();
    selectImage("projection");
    run("Set Measurements...", "area mean min redirect=None decimal=3");
    run("Measure");
    """)


@pytest.fixture(scope="module")
def bridges():
    """Two bridges shared by the module (one JVM start each)."""
    from fiji_bridge import BridgeClient

    clients = []
    try:
        for _ in range(2):
            clients.append(BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=180, own=True))
        yield [c.port for c in clients]
    finally:
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    plate = make_plate(("A01", "A02", "B01"), fields=2, size=160, size_z=3, seed=11,
                       nuclei={"A01": 4, "A02": 8, "B01": 12})
    uri = f"zarr://{root}/syn.zarr"
    write_plate(plate, uri)
    return plate, uri, root


@pytest.fixture(scope="module")
def probe_macro(tmp_path_factory):
    p = tmp_path_factory.mktemp("macros") / "probe.ijm"
    p.write_text(PROBE)
    return p


def table(uri_or_backend, path):
    backend = open_plate(uri_or_backend)[0] if isinstance(uri_or_backend, str) else uri_or_backend
    return list(csv.DictReader(io.StringIO(backend.load(path))))


def table_text(report, name):
    backend, _ = open_plate(report.derived)
    return backend.load(report.tables[name])


# --------------------------------------------------------------------------- synthetic truth


@pytest.mark.timeout(240)
def test_synthetic_plate_counts_match_truth(synthetic, bridges):
    plate, uri, root = synthetic
    rep = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/w1.zarr", ports=bridges[:1], progress=False)
    assert rep.ok and rep.done == len(plate.fields) and rep.failed == 0
    rows = table(rep.derived, rep.tables["Counts"])
    assert [(r["plate"], r["well"], int(r["field"])) for r in rows] == [("syn", w, s) for w, s in sorted(plate.fields)]
    truth = plate.truth()
    for r in rows:
        # stated tolerance: one nucleus per field (the blobs are well separated; exact in practice)
        assert abs(int(float(r["Count"])) - truth[(r["well"], int(r["field"]))]) <= 1, r
    # one Results row per nucleus, the derived plate holds every field's mask
    objects = table(rep.derived, rep.tables["Results"])
    assert len(objects) == sum(int(float(r["Count"])) for r in rows)
    backend, pid = open_plate(rep.derived)
    s = backend.plate_structure(pid)
    assert s.units() == sorted(plate.fields) and s.dtype == "uint8"
    assert backend.plate_provenance(pid)["macro"] == "nuclei_count"
    prov = backend.plate_provenance(pid)
    assert prov["macro_sha256"] == resolve("nuclei_count").sha256 and prov["imagej"] and prov["source_plate"] == "syn"
    # per-well summary: rows and mean count per well
    per_well = {r["well"]: r for r in table(rep.derived, rep.tables["Counts per well"])}
    for w in plate.wells:
        counts = [int(float(r["Count"])) for r in rows if r["well"] == w]
        assert float(per_well[w]["mean_Count"]) == pytest.approx(sum(counts) / len(counts))


@pytest.mark.timeout(300)
def test_two_workers_and_dask_give_the_same_tables(synthetic, bridges):
    plate, uri, root = synthetic
    one = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/cmp1.zarr", ports=bridges[:1], progress=False)
    two = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/cmp2.zarr", ports=bridges, progress=False)
    assert one.ok and two.ok
    for name in ("Results", "Counts", "Counts per well"):
        assert table_text(two, name) == table_text(one, name), name

    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        dk = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/cmpdask.zarr", scheduler=cluster.scheduler_address,
                       progress=False, timeout=120)
    assert dk.ok, dk.failures
    assert "Dask" in dk.workers
    for name in ("Results", "Counts", "Counts per well"):
        assert table_text(dk, name) == table_text(one, name), name


def test_bad_arguments_fail_before_anything_runs(synthetic, tmp_path):
    plate, uri, root = synthetic
    with pytest.raises(MacroArgumentError, match="unknown argument chanel"):
        run_batch(uri, "nuclei_count", args={"chanel": 1}, out_uri=f"zarr://{tmp_path}/x.zarr", progress=False)
    with pytest.raises(MacroArgumentError, match="expected a number"):
        run_batch(uri, "nuclei_count", args={"sigma": "big"}, out_uri=f"zarr://{tmp_path}/x.zarr", progress=False)
    with pytest.raises(BatchError, match="Z99 not in plate"):
        run_batch(uri, "nuclei_count", wells="A01,Z99", out_uri=f"zarr://{tmp_path}/x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()


# --------------------------------------------------------------------------- failures, kill and resume


@pytest.mark.timeout(240)
def test_failing_well_is_reported_and_the_others_complete(synthetic, bridges, probe_macro):
    plate, uri, root = synthetic
    out = f"zarr://{root}/fail.zarr"
    proc = subprocess.run(FIJI_BRIDGE + ["batch", "--plate", uri, "--macro", str(probe_macro), "--arg", "fail_well=A02",
                                         "--out", out, "--port", str(bridges[0])],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 failed" in proc.stdout and "failing on purpose in well A02" in proc.stdout
    backend, pid = open_plate(out)
    fails = table(backend, f"/zarr/plate_{pid}/failures.csv")
    assert [(f["well"], f["field"], f["kind"]) for f in fails] == [("A02", "0", "exit"), ("A02", "1", "exit")]
    assert "failing on purpose" in fails[0]["message"]
    rows = table(backend, f"/zarr/plate_{pid}/results.csv")
    assert sorted((r["well"], int(r["field"])) for r in rows) == [(w, s) for w, s in sorted(plate.fields) if w != "A02"]
    report = backend.load(f"/zarr/plate_{pid}/batch.json")
    assert report["failed"] == 2 and report["done"] == 4


@pytest.mark.timeout(300)
def test_killed_batch_resumes_without_duplicates(tmp_path, bridges, probe_macro):
    plate = make_plate(("A01", "A02", "A03", "A04"), fields=2, size=96, size_z=2, seed=5,
                       nuclei={"A01": 2, "A02": 2, "A03": 2, "A04": 2})
    uri = f"zarr://{tmp_path}/k.zarr"
    write_plate(plate, uri)
    out = f"zarr://{tmp_path}/k_out.zarr"
    cmd = FIJI_BRIDGE + ["batch", "--plate", uri, "--macro", str(probe_macro), "--arg", "delay_ms=700",
                         "--out", out, "--port", str(bridges[1])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    markers = lambda: list((tmp_path / "k_out.zarr" / "tables").rglob("fiji_bridge_unit_s*.json"))  # noqa: E731
    deadline = time.monotonic() + 120
    while len(markers()) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    n_before = len(markers())
    assert 3 <= n_before < len(plate.fields), "the batch should have been killed half-way"

    # resuming twice on purpose: the second one finds everything done
    for attempt in range(2):
        r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, r.stdout + r.stderr
    backend, pid = open_plate(out)
    report = backend.load(f"/zarr/plate_{pid}/batch.json")
    assert report["skipped"] == len(plate.fields) and report["done"] == 0
    rows = table(backend, f"/zarr/plate_{pid}/results.csv")
    # exactly one Measure row per unit, none twice
    assert sorted((r["well"], int(r["field"])) for r in rows) == sorted(plate.fields)
    assert backend.plate_structure(pid).units() == sorted(plate.fields)
    # and the values are those of an uninterrupted run of the same units
    clean = run_batch(uri, str(probe_macro), out_uri=f"zarr://{tmp_path}/k_clean.zarr", ports=bridges[:1], progress=False)
    assert table_text(clean, "Results") == backend.load(f"/zarr/plate_{pid}/results.csv")


def test_existing_derived_plate_needs_resume(synthetic, bridges, probe_macro):
    plate, uri, root = synthetic
    out = f"zarr://{root}/again.zarr"
    run_batch(uri, str(probe_macro), out_uri=out, ports=bridges[:1], progress=False, wells="A01")
    with pytest.raises(BatchError, match="--resume"):
        run_batch(uri, str(probe_macro), out_uri=out, ports=bridges[:1], progress=False, wells="A01")


# --------------------------------------------------------------------------- real plates vs ImageJ alone


def imagej_batch_counts(files: list[Path], bound_code: str, tmp: Path) -> dict[str, int]:
    """Nuclei counts of each file by plain ImageJ in one JVM (``ij.jar -batch``):
    the oracle, independent of fiji-bridge's transfer and engine."""
    macro = tmp / "bound.ijm"
    macro.write_text(bound_code)
    driver = tmp / "driver.ijm"
    lines = ['setBatchMode(true);']
    for f in files:
        lines += [f'open("{f}");', f'runMacro("{macro}");',
                  f'print("COUNT {f.name} " + Table.get("Count", 0, "Counts"));',
                  'while (nImages > 0) { selectImage(nImages); close(); }']
    driver.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["xvfb-run", "-a", "java", "-Xmx1g", "-jar", IJ_JAR, "-batch", str(driver)],
                         capture_output=True, text=True, timeout=240)
    counts = {}
    for line in out.stdout.splitlines():
        if line.startswith("COUNT "):
            _, name, n = line.split()
            counts[name] = int(float(n))
    assert len(counts) == len(files), out.stdout[-2000:] + out.stderr[-2000:]
    return counts


@pytest.mark.timeout(300)
def test_real_plates_match_imagej_alone(data_dir, tmp_path, bridges):
    cases = [
        ("sbs_plate_O01-O04", "sbs", {"channel": 1, "sigma": 1.0, "min_size": 30}),
        ("hela_D03", "hela", {"channel": 1, "sigma": 2.0, "min_size": 30}),
    ]
    for folder, name, args in cases:
        uri = f"zarr://{tmp_path}/{name}.zarr"
        imp = subprocess.run(FIJI_BRIDGE + ["import", str(data_dir / folder), "--plate", uri],
                             capture_output=True, text=True, timeout=120)
        assert imp.returncode == 0, imp.stdout + imp.stderr
        rep = run_batch(uri, "nuclei_count", args=args, ports=bridges, progress=False)
        assert rep.ok, rep.failures
        got = {(r["well"], int(r["field"])): int(float(r["Count"])) for r in table(rep.derived, rep.tables["Counts"])}
        # the same macro in plain ImageJ on the nuclear channel's TIFF of each field
        files = sorted(p for p in (data_dir / folder).iterdir() if p.suffix.lower() == ".tif"
                       and (name == "sbs" or p.stem.endswith("d0")))
        want = imagej_batch_counts(files, resolve("nuclei_count").bind(args), tmp_path)
        assert len(got) == len(files)
        for f in files:
            stem = f.stem.split("_")[-1]  # O01f02d2
            well, site = stem[:3], int(stem[4:6])
            assert got[(well, site)] == want[f.name], (f.name, got[(well, site)], want[f.name])
        assert min(got.values()) > 0


# --------------------------------------------------------------------------- a derived plate on OMERO (test double)


def _omero_server(monkeypatch, host, drop_before=None, stop_after_plate=False):
    """The OMERO double answering omero://<host>; it can drop every
    connection just before the n-th call of some methods, or go away for
    good right after the derived plate is created."""
    pytest.importorskip("omero", reason="omero-py is not installed (pip install fiji-bridge[omero])")
    import pickle

    from fiji_bridge.testing.omero_double import ServerDouble

    class Faulty(ServerDouble):
        calls: dict = {}

        def handle(self, blob):
            method = pickle.loads(blob)[2]
            n = self.calls[method] = self.calls.get(method, 0) + 1
            if drop_before and n in drop_before.get(method, ()):
                self.drop_connections()  # this call and the next ones on the connection are lost
            out = super().handle(blob)
            if stop_after_plate and method == "saveAndReturnObject":
                self.stop()
            return out

    monkeypatch.setenv("FIJI_BRIDGE_OMERO_GATEWAY", "fiji_bridge.testing.omero_double:GatewayDouble")
    monkeypatch.setenv("OMERO_PASSWORD", "pw")
    return Faulty(users={"u": "pw"}).register(host, 4064)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    plate = make_plate(("A01", "B02"), fields=1, size=96, size_z=2, seed=3, nuclei={"A01": 2, "B02": 3})
    uri = f"zarr://{root}/tiny.zarr"
    write_plate(plate, uri)
    return plate, uri, root


@pytest.mark.timeout(240)
def test_omero_derived_plate_survives_connection_drops(tiny, bridges, probe_macro, tmp_path, monkeypatch):
    plate, uri, root = tiny
    macro = str(probe_macro)
    local = run_batch(uri, macro, out_uri=f"zarr://{tmp_path}/local.zarr", ports=bridges[:1], progress=False)
    srv = _omero_server(monkeypatch, "batch-drops.test",
                        drop_before={"createImage": (2,), "loadAnnotations": (2,)})
    try:
        rep = run_batch(uri, macro, out_uri="omero://u@batch-drops.test:4064/plate/derived", ports=bridges[:1],
                        progress=False, spill_dir=tmp_path / "spill", upload_options={"backoff": (0.01, 0.05)})
        assert rep.ok and rep.done == 2, rep
        assert rep.upload["retried"] >= 2 and rep.upload["fallback"] == 0 and not rep.upload_left
        assert srv.counters["join"] >= 2  # the connection really dropped twice
        backend, pid = open_plate(rep.derived)
        assert pid == rep.plate != "derived"  # OMERO numbered the plate; the report names it
        lb, lpid = open_plate(local.derived)
        # every field once, pixel for pixel as the local run; one image per field
        assert backend.plate_structure(pid).units() == [("A01", 0), ("B02", 0)]
        assert len(srv.objects("Image")) == 2
        for w in ("A01", "B02"):
            np.testing.assert_array_equal(backend.load_field(pid, w, 0), lb.load_field(lpid, w, 0))
            assert [len(v) for v in backend._tables(pid, w).values()] == [1, 1]  # results + marker, once each
        # the same plate tables as the local run
        for name in ("Results", "Results per well"):
            assert table_text(rep, name) == table_text(local, name), name
    finally:
        srv.unregister()


@pytest.mark.timeout(240)
def test_omero_down_outputs_go_to_the_fallback_plate(tiny, bridges, probe_macro, tmp_path, monkeypatch, capsys):
    plate, uri, root = tiny
    macro = str(probe_macro)
    srv = _omero_server(monkeypatch, "batch-down.test", stop_after_plate=True)
    try:
        rep = run_batch(uri, macro, out_uri="omero://u@batch-down.test:4064/plate/derived", ports=bridges[:1],
                        progress=False, spill_dir=tmp_path / "spill",
                        upload_options={"max_retries": 2, "backoff": (0.01, 0.02)})
    finally:
        srv.unregister()
    assert rep.done == 2 and rep.failed == 0 and not rep.ok  # computed, but not on the server
    assert rep.fallback.startswith(f"zarr://{tmp_path / 'spill' / 'fallback'}") and not rep.upload_left
    assert len(rep.fallback_items) == 6  # 2 fields, 2 tables, 2 markers
    fb, pid = open_plate(rep.fallback)
    assert fb.plate_structure(pid).units() == [("A01", 0), ("B02", 0)]
    rows = table(fb, rep.tables["Results"].replace("/omero/", "/zarr/"))
    assert sorted(r["well"] for r in rows) == ["A01", "B02"]
    from fiji_bridge.batch import print_report

    print_report(rep)
    out = capsys.readouterr().out
    assert "SERVER UNAVAILABLE" in out and rep.fallback in out
