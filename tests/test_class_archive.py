"""The engine JVM's class-data archive (:mod:`fiji_bridge.engine.class_archive`):
which setups get one, and, on the real JVM and ImageJ 1, that the first
batch writes it, the next maps ImageJ's classes from it, and the outputs are
those of a batch without it (the oracle: ``FIJI_BRIDGE_CDS=0``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fiji_bridge.engine.class_archive import ClassArchive, archive_for, cache_dir, dump
from fiji_bridge.engine.java import find_java_home
from fiji_bridge.synthetic import make_plate, write_plate

FIJI_BRIDGE = [sys.executable, "-m", "fiji_bridge.cli"]
IJ_JAR = Path("/usr/share/java/ij.jar")


def _java_home() -> Path:
    try:
        return find_java_home()
    except Exception as e:  # pragma: no cover - the reason is in the skip
        pytest.skip(f"no Java here: {e}")


def test_cache_dir_follows_the_environment(tmp_path):
    assert cache_dir({"FIJI_BRIDGE_CACHE_DIR": str(tmp_path)}) == tmp_path / "cds"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fiji-bridge" / "cds"


def test_an_archive_names_its_setup(tmp_path):
    home = _java_home()
    jar = tmp_path / "ij.jar"
    jar.write_bytes(b"not really a jar, but a file with a size and an mtime")
    env = {"FIJI_BRIDGE_CACHE_DIR": str(tmp_path / "cache")}
    a = archive_for(home, [jar], ["-Xmx1g"], env)
    if a is None:
        pytest.skip(f"the JVM at {home} is not HotSpot 17+: no archive is used there")
    assert a.path.parent == tmp_path / "cache" / "cds" and not a.exists
    assert archive_for(home, [jar], ["-Xmx1g"], env) == a  # the same setup, the same file
    assert archive_for(home, [jar], ["-Xmx2g"], env) != a  # other options
    assert archive_for(home, [jar], ["-Xmx1g"], {**env, "JAVA_TOOL_OPTIONS": "-XX:TieredStopAtLevel=1"}) != a
    os.utime(jar, ns=(0, 12345))
    assert archive_for(home, [jar], ["-Xmx1g"], env) != a  # a jar replaced
    assert a.jvm_options()[0] == "-XX:+RecordDynamicDumpInfo"
    a.path.write_bytes(b"x")
    assert a.jvm_options()[0] == f"-XX:SharedArchiveFile={a.path}"


def test_no_archive_where_it_is_off_or_chosen_by_the_user(tmp_path):
    home = _java_home()
    env = {"FIJI_BRIDGE_CACHE_DIR": str(tmp_path)}
    assert archive_for(home, [], [], {**env, "FIJI_BRIDGE_CDS": "0"}) is None
    assert archive_for(home, [], ["-Xshare:off"], env) is None
    assert archive_for(home, [], [], {**env, "JAVA_TOOL_OPTIONS": "-XX:SharedArchiveFile=/x.jsa"}) is None
    assert archive_for(tmp_path, [], [], env) is None  # not a JVM at all


@pytest.mark.timeout(60)
def test_dump_without_a_jvm_writes_nothing_and_frees_its_lock(tmp_path):
    code = ("import sys; from pathlib import Path; from fiji_bridge.engine.class_archive import ClassArchive, dump; "
            "print(dump(ClassArchive(Path(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.jsa")], capture_output=True, text=True, timeout=50)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(60)
def test_a_dead_writers_lock_and_half_archive_are_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    (tmp_path / "x.jsa.lock").write_text(str(dead.pid))
    (tmp_path / f"x.jsa.{dead.pid}.tmp").write_bytes(b"half an archive")
    code = ("import sys; from pathlib import Path; from fiji_bridge.engine.class_archive import ClassArchive, dump; "
            "print(dump(ClassArchive(Path(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.jsa")], capture_output=True, text=True, timeout=50)
    assert r.stdout.strip() == "False", r.stdout + r.stderr  # no JVM here to write one
    assert not list(tmp_path.iterdir())


def test_a_live_lock_is_left_to_its_writer(tmp_path):
    a = ClassArchive(tmp_path / "x.jsa")
    lock = tmp_path / "x.jsa.lock"
    lock.write_text(str(os.getppid()))  # a live process: it writes the archive
    assert dump(a) is False and lock.exists() and not a.exists


def _batch(tmp_path: Path, uri: str, name: str, env: dict) -> Path:
    out = tmp_path / f"{name}.zarr"
    r = subprocess.run(FIJI_BRIDGE + ["batch", "--plate", uri, "--macro", "nuclei_count", "--arg", "channel=1",
                                      "--out", f"zarr://{out}", "--workers", "1"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _tables(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.rglob("*.csv"))}


@pytest.mark.imagej
@pytest.mark.timeout(600)
def test_first_batch_writes_the_archive_and_the_next_maps_imagej_from_it(tmp_path):
    if not IJ_JAR.is_file():
        pytest.skip(f"ImageJ 1 not at {IJ_JAR} (Debian's libij-java)")
    home = _java_home()
    if archive_for(home, [], [], {"FIJI_BRIDGE_CACHE_DIR": str(tmp_path / "probe")}) is None:
        pytest.skip(f"the JVM at {home} is not HotSpot 17+: no archive is used there")
    shutil.rmtree(tmp_path / "probe", ignore_errors=True)
    plate = make_plate(("A01", "A02"), fields=2, size=128, size_z=2, seed=3, nuclei={"A01": 5, "A02": 7})
    uri = f"zarr://{tmp_path}/src.zarr"
    write_plate(plate, uri)
    log = tmp_path / "classload.log"
    env = dict(os.environ, FIJI_BRIDGE_CACHE_DIR=str(tmp_path / "cache"),
               JAVA_TOOL_OPTIONS=f"-Xlog:class+load=info:file={log}")
    env.pop("FIJI_BRIDGE_IMAGEJ", None)

    oracle = _tables(_batch(tmp_path, uri, "oracle", {**env, "FIJI_BRIDGE_CDS": "0"}))
    assert not (tmp_path / "cache" / "cds").exists() or not list((tmp_path / "cache" / "cds").glob("*.jsa"))

    first = _tables(_batch(tmp_path, uri, "first", env))
    archives = list((tmp_path / "cache" / "cds").glob("*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 1 << 20, archives
    assert not list((tmp_path / "cache" / "cds").glob("*.tmp")) and not list((tmp_path / "cache" / "cds").glob("*.lock"))
    assert "ij.ImageJ source: jar:" in log.read_text() or "ij.ImageJ source: file:" in log.read_text()

    second = _tables(_batch(tmp_path, uri, "second", env))
    loaded = log.read_text()
    assert re.search(r"ij\.ImageJ source: shared objects file \(top\)", loaded), "ImageJ was not mapped from the archive"
    assert re.search(r"ij\.plugin\.filter\.ParticleAnalyzer source: shared objects file \(top\)", loaded), \
        "the macro's classes were not archived"
    assert list((tmp_path / "cache" / "cds").glob("*.jsa")) == archives  # mapped, not written again
    assert first == oracle and second == oracle and any("count" in k for k in oracle)


@pytest.mark.imagej
@pytest.mark.timeout(300)
def test_a_worker_writing_its_archive_is_waited_for_not_killed(tmp_path, monkeypatch):
    """The supervisor gives a quitting worker ``timeout`` seconds, then kills
    it, unless it says it writes its archive (~1.2 s for ImageJ 1 here):
    with a quit timeout shorter than that, the archive is written all the same."""
    from fiji_bridge.batch import run_batch
    from fiji_bridge.supervisor import EngineSupervisor

    if not IJ_JAR.is_file():
        pytest.skip(f"ImageJ 1 not at {IJ_JAR} (Debian's libij-java)")
    home = _java_home()
    if archive_for(home, [], [], {"FIJI_BRIDGE_CACHE_DIR": str(tmp_path / "probe")}) is None:
        pytest.skip(f"the JVM at {home} is not HotSpot 17+: no archive is used there")
    monkeypatch.setenv("FIJI_BRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FIJI_BRIDGE_IMAGEJ", raising=False)
    close = EngineSupervisor.close
    monkeypatch.setattr(EngineSupervisor, "close", lambda self, timeout=5.0: close(self, 0.3))
    plate = make_plate(("A01",), fields=1, size=96, size_z=1, seed=4, nuclei={"A01": 3})
    write_plate(plate, f"zarr://{tmp_path}/s.zarr")
    rep = run_batch(f"zarr://{tmp_path}/s.zarr", "nuclei_count", {"channel": 1}, out_uri=f"zarr://{tmp_path}/o.zarr",
                    workers=1, progress=False)
    assert rep.done == 1
    archives = list((tmp_path / "cache" / "cds").glob("*.jsa"))
    assert len(archives) == 1 and archives[0].stat().st_size > 1 << 20, list((tmp_path / "cache" / "cds").iterdir())
