"""The ImageJ 1 engine's class data sharing archive (fiji_bridge.engine.cds):
made at run time by this machine's JVM, used by the next start, and never
in the way: an archive that is truncated, garbage or made for another
class path still lets the engine start and run. Real JVMs, each in a
fresh interpreter (a process holds one JVM); oracles: the files the JVM
wrote, /proc/<pid>/maps of the child, a macro's own output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fiji_bridge.engine.cds import archive_key, cds_dir, plan_archive
from fiji_bridge.engine.java import find_ij_jar, find_java_home

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from fiji_bridge.engine import open_engine
    eng = open_engine("imagej1").start()
    a = eng._archive
    mapped = a is not None and str(a.path) in open("/proc/self/maps").read()
    r = eng.run_macro('print(6 * 7);')
    eng.close()  # a recording JVM writes its archive here
    print("STATE " + json.dumps({"use": bool(a and a.use), "mapped": mapped, "log": r.log.strip(),
                                  "path": str(a.path) if a else None}))
    sys.stdout.flush()
    os._exit(0)
    """
)


def _child(cache: Path) -> dict:
    env = {**os.environ, "FIJI_BRIDGE_CDS": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=150, env=env, cwd=str(cache.parent))
    states = [line[6:] for line in out.stdout.splitlines() if line.startswith("STATE ")]
    assert states, f"the engine did not run (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(states[-1])


def _whole_on_disk(archive: Path) -> bool:
    import hashlib

    meta = json.loads(archive.with_suffix(".json").read_text())
    data = archive.read_bytes()
    return len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Path]:
    """A cache directory after one engine start recorded an archive: (dir, archive)."""
    cache = tmp_path_factory.mktemp("cds") / "cache"
    first = _child(cache)
    assert first["use"] is False and first["log"] == "42"
    archive = Path(first["path"])
    assert archive.is_file() and _whole_on_disk(archive)
    return cache, archive


def test_the_next_start_maps_the_recorded_archive(recorded):
    cache, archive = recorded
    second = _child(cache)
    assert second == {"use": True, "mapped": True, "log": "42", "path": str(archive)}
    assert _whole_on_disk(archive)  # used, not rewritten or damaged


def _copy(recorded, tmp_path) -> tuple[Path, Path]:
    cache, archive = recorded
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    return mine, mine / archive.name


def test_a_truncated_archive_is_not_used_and_is_recorded_again(recorded, tmp_path):
    """A truncated archive crashes a JDK 17 JVM that maps it (SIGBUS); its
    .json no longer matches, so it is never passed to the JVM."""
    cache, archive = _copy(recorded, tmp_path)
    data = archive.read_bytes()
    archive.chmod(0o644)
    archive.write_bytes(data[: len(data) // 3])
    state = _child(cache)
    assert state["use"] is False and state["log"] == "42"
    assert _whole_on_disk(archive)  # recorded anew when that engine closed


def test_garbage_the_jvm_refuses_is_deleted_and_the_engine_runs(recorded, tmp_path):
    """Garbage with a .json that matches it (what no hash can catch): the
    JVM refuses it and starts without (-Xshare:auto); the engine deletes it."""
    import hashlib

    cache, archive = _copy(recorded, tmp_path)
    junk = os.urandom(200_000)
    archive.chmod(0o644)
    archive.write_bytes(junk)
    archive.with_suffix(".json").write_text(json.dumps({"size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}))
    state = _child(cache)
    assert state["use"] is True and state["mapped"] is False and state["log"] == "42"
    assert not archive.exists() and not archive.with_suffix(".json").exists()


def test_an_archive_of_another_class_path_under_this_name_still_lets_the_engine_run(recorded, tmp_path):
    """A real archive, of a JVM that loaded ImageJ from another class path,
    under this one's name (names follow the class path, so only tampering
    puts it there): the JVM's own check refuses its classes ("APP classpath
    mismatch") and the engine starts and runs as without one."""
    import hashlib

    cache, archive = _copy(recorded, tmp_path)
    other, jar = tmp_path / "other.jsa", tmp_path / "elsewhere" / "ij.jar"
    jar.parent.mkdir()
    shutil.copy(find_ij_jar(), jar)
    java = find_java_home() / "bin" / "java"
    (tmp_path / "empty.ijm").write_text("x = 1;")
    subprocess.run([str(java), "-Djava.awt.headless=true", f"-XX:ArchiveClassesAtExit={other}", "-cp", str(jar),
                    "ij.ImageJ", "-batch", str(tmp_path / "empty.ijm")], capture_output=True, timeout=60, check=True)
    data = other.read_bytes()
    archive.chmod(0o644)
    archive.write_bytes(data)
    archive.with_suffix(".json").write_text(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    state = _child(cache)
    assert state["use"] is True and state["log"] == "42"


def test_archive_name_follows_the_jars_and_cds_is_off_unless_asked(tmp_path):
    """A changed jar (size or time) gives another archive name: a stale
    archive is never picked. Unset, empty, 0 or off: no archive at all."""
    jar = tmp_path / "ij.jar"
    shutil.copy(find_ij_jar(), jar)
    home = find_java_home()
    before = archive_key(home, [jar])
    assert archive_key(home, [jar]) == before
    os.utime(jar, ns=(jar.stat().st_atime_ns, jar.stat().st_mtime_ns + 10**9))
    assert archive_key(home, [jar]) != before
    for value in (None, "", "0", "off"):
        env = {} if value is None else {"FIJI_BRIDGE_CDS": value}
        assert cds_dir(env) is None and plan_archive(home, [jar], env) is None
    assert cds_dir({"FIJI_BRIDGE_CDS": "1", "XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fiji-bridge" / "cds"
    planned = plan_archive(home, [jar], {"FIJI_BRIDGE_CDS": str(tmp_path / "c")})
    assert planned is not None and planned.use is False and "-XX:+RecordDynamicDumpInfo" in planned.jvm_options()
