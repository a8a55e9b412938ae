"""A batch's own engine workers (``--workers N`` without ``--port``): the
same tables, failures, markers and exactly-once outputs as a batch through a
bridge, whose path is the oracle here (and ImageJ alone behind it, see
test_batch.py); real processes, real ImageJ, real OME-Zarr."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fiji_bridge.backends import open_plate
from fiji_bridge.batch import free_port_pair, run_batch
from fiji_bridge.batch_engines import BATCH_JVM_OPTIONS, BatchEngines, java_options_for, spawn_for_batch
from fiji_bridge.synthetic import make_plate, write_plate
from test_batch import PROBE as BASE_PROBE
from test_batch import synthetic  # noqa: F401  (the module's plate: 3 wells, 2 fields, known nuclei)

pytestmark = pytest.mark.imagej

FIJI_BRIDGE = [sys.executable, "-m", "fiji_bridge.cli"]

# test_batch.py's probe (fails in one well, sleeps if asked, projects Z and
# measures), which here also takes its JVM down in a second well
PROBE = BASE_PROBE.replace("wait(delay_ms);", textwrap.dedent("""\
    if (exit_well != "" && indexOf(getTitle(), "_" + exit_well + "_s000") >= 0)
        call("java.lang.System.exit", "3");
    wait(delay_ms);""")).replace("#@ Integer", '#@ String (value="", description="System.exit in this well") exit_well\n#@ Integer')
assert "exit_well" in PROBE and "System.exit" in PROBE


@pytest.fixture(scope="module")
def bridge():
    """One bridge: the path the engine workers must agree with."""
    from fiji_bridge import BridgeClient

    with BridgeClient.connect_or_spawn(port=free_port_pair(), timeout=180, own=True) as c:
        yield c.port


@pytest.fixture(scope="module")
def probe_macro(tmp_path_factory):
    p = tmp_path_factory.mktemp("macros") / "probe.ijm"
    p.write_text(PROBE)
    return p


def texts(report) -> dict[str, str]:
    """Every plate table of a batch, as the CSV text in the store."""
    backend, _ = open_plate(report.derived)
    return {name: backend.load(path) for name, path in report.tables.items()}


def markers(report) -> dict[tuple[str, int], dict]:
    """The unit markers, without what differs between runs by nature."""
    backend, pid = open_plate(report.derived)
    out = {}
    for w, s in backend.plate_structure(pid).units():
        m = backend.load(f"/zarr/plate_{pid}/{w}/fiji_bridge_unit_s{s:03d}.json")
        out[(w, s)] = {k: v for k, v in m.items() if k not in ("elapsed", "worker", "time", "written", "tables")}
        out[(w, s)]["tables"] = sorted(m.get("tables", {}))
    return out


def engine_workers_of(parent: int) -> list[int]:
    """Live engine worker processes whose supervising parent is ``parent``."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fiji_bridge.engine_worker" in cmd and str(parent).encode() in cmd:
            found.append(int(p))
    return found


def test_engine_count_leaves_a_core_to_the_writer(monkeypatch):
    from fiji_bridge.batch_engines import engines_for

    assert engines_for(2, 100, cores=2) == 1
    assert engines_for(8, 100, cores=32) == 8
    assert engines_for(8, 3, cores=32) == 3
    assert engines_for(4, 100, cores=1) == 1
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "5")
    assert engines_for(8, 100) == 4


def test_java_options_share_the_cores(monkeypatch):
    monkeypatch.delenv("JAVA_TOOL_OPTIONS", raising=False)
    jit = list(BATCH_JVM_OPTIONS)
    assert "-XX:+UseParallelGC" in jit
    assert java_options_for(1, cores=32) == jit
    assert java_options_for(2, cores=2) == jit + ["-XX:ActiveProcessorCount=1"]
    assert java_options_for(4, cores=32) == jit + ["-XX:ActiveProcessorCount=8"]
    assert java_options_for(3, cores=2) == jit + ["-XX:ActiveProcessorCount=1"]
    # a collector of the user's: not a second one (the JVM would refuse to start)
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xss4m -XX:+UseSerialGC")
    assert java_options_for(2, cores=2) == [o for o in jit if "GC" not in o] + ["-XX:ActiveProcessorCount=1"]
    monkeypatch.delenv("JAVA_TOOL_OPTIONS")
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_JAVA_OPTIONS", "")
    assert java_options_for(1, cores=4) == []
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_JAVA_OPTIONS", "-Xmx2g -XX:+UseSerialGC")
    assert java_options_for(2, cores=4) == ["-Xmx2g", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=2"]


@pytest.mark.timeout(400)
def test_engine_workers_give_the_tables_of_a_bridge(synthetic, bridge, monkeypatch):
    plate, uri, root = synthetic
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "3")  # two JVMs even on a 2-core machine
    via_bridge = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/b.zarr", ports=[bridge], progress=False)
    one = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/e1.zarr", workers=1, progress=False)
    two = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/e2.zarr", workers=2, progress=False)
    # workers spawned before the batch's imports, as the command line does, then taken over
    spawned = spawn_for_batch(1)
    early_pid = spawned._spawned[0].proc.pid
    pre = run_batch(uri, "nuclei_count", out_uri=f"zarr://{root}/e0.zarr", workers=1, progress=False, spawned=spawned)
    assert pre.ok and f"pid(s) {early_pid}" in pre.workers and not spawned.root.exists()
    assert via_bridge.ok and one.ok and two.ok
    assert one.done == two.done == len(plate.fields)
    assert "1 engine worker" in one.workers and "2 engine worker" in two.workers and "ActiveProcessorCount=1" in two.workers
    want = texts(via_bridge)
    assert set(want) == {"Results", "Results per well", "Counts", "Counts per well"}
    assert texts(one) == want
    assert texts(two) == want
    assert texts(pre) == want
    assert markers(one) == markers(via_bridge) == markers(two)
    # the truth of the synthetic plate, independently of both paths
    backend, pid = open_plate(one.derived)
    counts = list(csv.DictReader(io.StringIO(backend.load(one.tables["Counts"]))))
    # the NGFF copy of a plate table (written by the batch's table writer process) is the CSV's, as ngio reads it
    import ngio

    ngff = ngio.open_ome_zarr_plate(str(backend.plate_dir(pid))).get_table("counts").dataframe.reset_index()
    assert [int(v) for v in ngff["Count"]] == [int(float(r["Count"])) for r in counts]
    assert list(ngff["well"]) == [r["well"] for r in counts]
    # the plate tables assembled from this run's tables in memory are those read back from the store
    from fiji_bridge.batch_tables import assemble

    reread: dict[str, str] = {}
    s = backend.plate_structure(pid)
    assemble(backend, pid, s.units(), {w: i for i, w in enumerate(s.wells)}, [],
             save_table=lambda plate, name, text: reread.setdefault(name, text) and name)
    assert reread == {Path(p).stem: backend.load(p) for p in one.tables.values()}
    truth = plate.truth()
    for r in counts:  # stated tolerance as in test_batch.py: one nucleus per field
        assert abs(int(float(r["Count"])) - truth[(r["well"], int(r["field"]))]) <= 1, r
    prov = backend.plate_provenance(pid)
    assert prov["imagej"] == open_plate(via_bridge.derived)[0].plate_provenance(via_bridge.plate)["imagej"]


@pytest.mark.timeout(400)
def test_failures_and_a_dying_jvm_read_as_through_a_bridge(synthetic, bridge, probe_macro, monkeypatch):
    plate, uri, root = synthetic
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "3")
    args = {"fail_well": "A02", "exit_well": "B01"}
    via_bridge = run_batch(uri, str(probe_macro), args, out_uri=f"zarr://{root}/fb.zarr", ports=[bridge], progress=False)
    for n in (1, 2):
        rep = run_batch(uri, str(probe_macro), args, out_uri=f"zarr://{root}/fe{n}.zarr", workers=n, progress=False)
        assert (rep.done, rep.failed) == (via_bridge.done, via_bridge.failed) == (3, 3)
        kinds = sorted((f["well"], f["field"], f["kind"]) for f in rep.failures)
        assert kinds == [("A02", 0, "exit"), ("A02", 1, "exit"), ("B01", 0, "engine")]
        # after the JVM died, the restarted one ran the next unit
        assert ("B01", 1) not in {(f["well"], f["field"]) for f in rep.failures}
        assert texts(rep) == texts(via_bridge)
        assert markers(rep) == markers(via_bridge)


@pytest.mark.timeout(400)
def test_killed_cli_batch_leaves_no_jvm_and_resumes_exactly_once(tmp_path, probe_macro):
    plate = make_plate(("A01", "A02", "A03", "A04"), fields=2, size=96, size_z=2, seed=5,
                       nuclei={"A01": 2, "A02": 2, "A03": 2, "A04": 2})
    uri = f"zarr://{tmp_path}/k.zarr"
    write_plate(plate, uri)
    out = f"zarr://{tmp_path}/k_out.zarr"
    cmd = FIJI_BRIDGE + ["batch", "--plate", uri, "--macro", str(probe_macro), "--arg", "delay_ms=700",
                         "--out", out, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = lambda: list((tmp_path / "k_out.zarr" / "tables").rglob("fiji_bridge_unit_s*.json"))  # noqa: E731
    deadline = time.monotonic() + 150
    while len(done()) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = engine_workers_of(proc.pid)
    assert workers, "the batch runs its own engine worker"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    n_before = len(done())
    assert 3 <= n_before < len(plate.fields), "the batch should have been killed half-way"
    deadline = time.monotonic() + 20  # the worker watches its parent: it goes, with its JVM
    while engine_workers_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not engine_workers_of(proc.pid)
    assert not [s for s in os.listdir("/dev/shm") if s.startswith((f"fjbs_{proc.pid}_", f"fjbw_{proc.pid}_"))]

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    backend, pid = open_plate(out)
    report = backend.load(f"/zarr/plate_{pid}/batch.json")
    assert report["skipped"] == n_before and report["done"] == len(plate.fields) - n_before
    rows = list(csv.DictReader(io.StringIO(backend.load(f"/zarr/plate_{pid}/results.csv"))))
    assert sorted((r["well"], int(r["field"])) for r in rows) == sorted(plate.fields)  # each unit once
    clean = run_batch(uri, str(probe_macro), out_uri=f"zarr://{tmp_path}/k_clean.zarr", workers=1, progress=False)
    assert texts(clean)["Results"] == backend.load(f"/zarr/plate_{pid}/results.csv")


@pytest.mark.timeout(120)
def test_engines_close_their_processes_and_segments(monkeypatch):
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "4")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with BatchEngines(2) as engines:
        pids = [s.pid for s in engines.sups]
        deadline = time.monotonic() + 30  # between fork and exec a child still shows this process's environment
        while not all(b"fiji_bridge.engine_worker" in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids):
            assert time.monotonic() < deadline, "the engine workers did not start"
            time.sleep(0.02)
        environ = [Path(f"/proc/{p}/environ").read_bytes().split(b"\0") for p in pids]
        want = b"-XX:ActiveProcessorCount=2"
        assert all(any(e.startswith(b"JAVA_TOOL_OPTIONS=") and want in e for e in env) for env in environ)
        assert all(b"OPENBLAS_NUM_THREADS=1" in env for env in environ)  # no BLAS thread pool in a worker
        assert all(any(e.startswith(b"JAVA_TOOL_OPTIONS=") and b"-XX:+UseParallelGC" in e for e in env) for env in environ)
        root = engines.root
    assert not root.exists()
    for p in pids:
        assert not Path(f"/proc/{p}").exists() or b"zombie" in Path(f"/proc/{p}/status").read_bytes().lower()
    assert not [s for s in os.listdir("/dev/shm") if s.startswith((f"fjbs_{os.getpid()}_", f"fjbw_{os.getpid()}_"))]
    json.dumps(engines.describe())


@pytest.mark.timeout(120)
def test_jvms_started_before_the_plates_open_stop_when_they_cannot(synthetic, tmp_path, monkeypatch):
    """A batch starts its JVMs before it opens its plates; when the plates
    say no (the derived plate exists, an unknown well), it stops them: no
    JVM and no shared memory is left, and the error is the plates'."""
    from fiji_bridge.batch import BatchError

    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "3")  # two JVMs start: both must go
    _, uri, _ = synthetic
    out = tmp_path / "exists.zarr"
    ZarrPlateStore = type(open_plate(uri)[0])
    ZarrPlateStore(tmp_path).create_plate("exists")
    with pytest.raises(BatchError, match="exists already"):
        run_batch(uri, "nuclei_count", {"channel": 1}, out_uri=f"zarr://{out}", workers=2, progress=False)
    with pytest.raises(BatchError, match="not in plate"):
        run_batch(uri, "nuclei_count", {"channel": 1}, out_uri=f"zarr://{tmp_path}/new.zarr", wells="H12",
                  workers=2, progress=False)
    deadline = time.monotonic() + 10
    while engine_workers_of(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_workers_of(os.getpid()) == []
    assert not [s for s in os.listdir("/dev/shm") if s.startswith((f"fjbs_{os.getpid()}_", f"fjbw_{os.getpid()}_"))]


@pytest.mark.timeout(120)
def test_workers_spawned_early_are_stopped_when_the_batch_cannot_start(synthetic, tmp_path):
    """Workers spawned before the batch's imports (the command line's
    ``spawn_for_batch``) and never supervised are stopped when closed, and
    a batch given them stops them when its arguments are wrong or it runs
    on bridges instead: no worker is left behind."""
    from fiji_bridge.macros import MacroArgumentError

    _, uri, _ = synthetic
    unsupervised = spawn_for_batch(1)
    proc = unsupervised._spawned[0].proc
    unsupervised.close()
    assert proc.poll() is not None and not unsupervised.root.exists()

    given = spawn_for_batch(1)
    proc = given._spawned[0].proc
    with pytest.raises(MacroArgumentError):
        run_batch(uri, "nuclei_count", {"no_such_parameter": 1}, out_uri=f"zarr://{tmp_path}/a.zarr", spawned=given,
                  progress=False)
    assert proc.poll() is not None and not given.root.exists()

    given = spawn_for_batch(1)
    proc = given._spawned[0].proc
    report = run_batch(uri, "nuclei_count", {"channel": 1}, out_uri=f"zarr://{tmp_path}/b.zarr", resume=True,
                       wells="A01", spawned=given, progress=False)  # resume: workers of its own, started later
    assert report.ok and proc.poll() is not None and str(proc.pid) not in report.workers
    assert engine_workers_of(os.getpid()) == []


@pytest.mark.timeout(180)
def test_a_collector_of_the_users_own_is_kept(synthetic, tmp_path, monkeypatch):
    """JAVA_TOOL_OPTIONS choosing a collector: the batch adds none of its own
    (a JVM given two refuses to start) and its units run."""
    _, uri, _ = synthetic
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-XX:+UseSerialGC")
    monkeypatch.delenv("FIJI_BRIDGE_BATCH_JAVA_OPTIONS", raising=False)
    report = run_batch(uri, "nuclei_count", {"channel": 1}, out_uri=f"zarr://{tmp_path}/gc.zarr", wells="A01",
                       workers=1, progress=False)
    assert report.ok and report.done == 2 and "UseParallelGC" not in report.workers


@pytest.mark.timeout(120)
def test_trim_keeps_the_first_workers_and_stops_the_rest(monkeypatch):
    monkeypatch.setenv("FIJI_BRIDGE_BATCH_CORES", "4")
    with BatchEngines(3) as engines:
        pids = [s.pid for s in engines.sups]
        assert engines.trim(1) is engines and engines.n == 1 and [s.pid for s in engines.sups] == pids[:1]
        for p in pids[1:]:
            assert not Path(f"/proc/{p}").exists() or b"zombie" in Path(f"/proc/{p}/status").read_bytes().lower()
        assert Path(f"/proc/{pids[0]}").exists()


_NICE_PROBE = r"""
import json, os
from pathlib import Path
from fiji_bridge.batch_engines import spawn_for_batch, yield_to_workers

def nice(pid, tid=None):
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])

before = os.getpriority(os.PRIO_PROCESS, 0)
engines = spawn_for_batch(1)
after = yield_to_workers()
import threading
seen = {}
t = threading.Thread(target=lambda: seen.update(nice=os.getpriority(os.PRIO_PROCESS, 0)))
t.start(); t.join()
workers = [nice(s.proc.pid) for s in engines._spawned]
engines.close()
print(json.dumps({"before": before, "after": after, "thread_after": seen["nice"], "workers": workers}))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
@pytest.mark.parametrize("setting, step", [(None, 10), ("3", 3), ("0", 0)])
def test_the_batch_writer_steps_back_behind_its_workers(setting, step):
    """``fiji-bridge batch`` lowers its own threads' priority once its workers
    run: they keep theirs, a thread started later inherits the writer's, and
    FIJI_BRIDGE_BATCH_NICE sets the step (0: none). Run in a fresh process,
    since a priority once lowered cannot be raised back."""
    env = {k: v for k, v in os.environ.items() if k != "FIJI_BRIDGE_BATCH_NICE"}
    if setting is not None:
        env["FIJI_BRIDGE_BATCH_NICE"] = setting
    r = subprocess.run([sys.executable, "-c", _NICE_PROBE], capture_output=True, text=True, timeout=100, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = min(19, got["before"] + step)
    assert got["after"] == want and got["thread_after"] == want
    assert got["workers"] == [got["before"]]  # spawned before: at the priority the batch started with
