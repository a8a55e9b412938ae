"""Class data sharing (AppCDS) for the ImageJ 1 engine's JVM: the classes a
run loads (ImageJ's, AWT's, JPype's), parsed, verified and laid out once
by this machine's own JVM, then mapped by each later start instead of
loaded again (JDK 17's dynamic archives: ``-XX:+RecordDynamicDumpInfo``,
then ``VM.cds dynamic_dump``, then ``-XX:SharedArchiveFile``). Measured
here: ~0.17 s of CPU off a worker's start and first nuclei unit (of ~1.1 s),
mapped without relocation; relocated (JDK 17's default) it saved nothing.

Contract:

* On only where asked: ``FIJI_BRIDGE_CDS`` = ``1``/``on`` (the cache
  directory ``$XDG_CACHE_HOME/fiji-bridge/cds``) or a directory; unset,
  empty, ``0`` or ``off``: no archive is read or written. A batch turns it
  on for its engine workers unless the variable is set.
* An archive is made at run time on this machine, never fetched: a JVM
  that found none records what it loads and, when its engine closes
  cleanly, writes the archive (a temporary file, then renamed) and beside
  it a ``.json`` with its size and SHA-256. Its name is a hash of what it
  depends on: the JDK (real path, ``release``), every class path entry
  (real path, size, modification time) and JPype (version, its jar).
  A new JDK, ij.jar or JPype gives a new name, so a stale archive is never
  picked; the newest few are kept.
* An archive is used only when its ``.json`` says it is whole (same size,
  same SHA-256): a truncated archive crashes a JDK 17 JVM as it maps it
  (SIGBUS), checked here with ``-XX:+VerifySharedSpaces`` too. What the
  JVM checks itself (header, class path, base archive) makes it start
  without the archive's classes (``-Xshare:auto``, a warning in the
  worker's log); an archive the started JVM did not even map (garbage)
  is deleted, and the next start records a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = ["ClassArchive", "cds_dir", "plan_archive"]

_log = logging.getLogger(__name__)

#: archives kept in the cache directory (the newest; one per JDK/jar combination)
KEEP = 4
#: a temporary file older than this is a dump that never finished
STALE_TMP_S = 600


def cds_dir(env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The archive directory ``FIJI_BRIDGE_CDS`` asks for, or None (off)."""
    env = os.environ if env is None else env
    value = (env.get("FIJI_BRIDGE_CDS") or "").strip()
    if value.lower() in ("", "0", "off", "no", "false"):
        return None
    if value.lower() in ("1", "on", "yes", "true"):
        cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(cache) / "fiji-bridge" / "cds"
    return Path(value).expanduser()


def _stat_line(p: Path) -> str:
    try:
        st = p.stat()
        return f"{p.resolve()} {st.st_size} {st.st_mtime_ns}"
    except OSError:
        return f"{p} missing"


def archive_key(java_home: Path, classpath: Sequence[Path]) -> str:
    """A hash of what an archive depends on (see the module doc)."""
    import jpype

    java_home = Path(java_home).resolve()
    try:
        release = (java_home / "release").read_text(errors="replace")
    except OSError:
        release = ""
    parts = [str(java_home), release, f"jpype {jpype.__version__}",
             _stat_line(Path(jpype.__file__).resolve().parent.parent / "org.jpype.jar")]
    parts += [_stat_line(Path(p)) for p in classpath]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)


@dataclass
class ClassArchive:
    """The archive of one JVM start: ``use`` it (it was whole) or ``record``
    one (call :meth:`dump` before the JVM ends)."""

    path: Path
    use: bool

    @property
    def meta(self) -> Path:
        return self.path.with_suffix(".json")

    def jvm_options(self) -> list[str]:
        if self.use:
            # mapped where it was laid out: JDK 17 relocates every archive by
            # default (ArchiveRelocationMode=1), which here cost what the
            # archive saves; 0 relocates only when that address is taken
            return [f"-XX:SharedArchiveFile={self.path}", "-Xshare:auto",
                    "-XX:+UnlockDiagnosticVMOptions", "-XX:ArchiveRelocationMode=0"]
        # the dump lists every class it leaves out ("Not linked"): hundreds of lines
        return ["-XX:+RecordDynamicDumpInfo", "-Xlog:cds=off"]

    def check_mapped(self) -> bool:
        """After the JVM started with ``use``: whether it mapped the archive
        (Linux: /proc/self/maps). One it did not map is deleted."""
        if not self.use:
            return False
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: cannot tell, keep it
            return True
        if str(self.path) in maps:
            return True
        _log.warning("the JVM did not use the class archive %s: deleting it (the next start records a new one)", self.path)
        self.discard()
        return False

    def discard(self) -> None:
        for p in (self.meta, self.path):
            try:
                p.unlink()
            except OSError:
                pass

    def dump(self) -> bool:
        """Write the archive of the classes this JVM has loaded (recording
        starts only): to a temporary file, then its ``.json``, then renamed
        in place. Nothing when another JVM wrote it meanwhile. True if written."""
        if self.use or _whole(self.path):
            return False
        from jpype import JArray, JClass, JString

        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            server = JClass("java.lang.management.ManagementFactory").getPlatformMBeanServer()
            name = JClass("javax.management.ObjectName")("com.sun.management:type=DiagnosticCommand")
            args = JArray(JClass("java.lang.Object"))([JArray(JString)(["dynamic_dump", str(tmp)])])
            out = str(server.invoke(name, "vmCds", args, JArray(JString)(["[Ljava.lang.String;"])))
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise RuntimeError(f"the JVM wrote no archive: {out.strip()}")
            meta = {"size": tmp.stat().st_size, "sha256": _sha256(tmp)}
            meta_tmp = self.meta.with_name(f"{self.meta.name}.tmp-{os.getpid()}")
            meta_tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.path)  # the archive first: its .json then names a whole file
            os.replace(meta_tmp, self.meta)
            _log.info("class archive %s written in %.2f s (%d bytes)", self.path, time.perf_counter() - t0, meta["size"])
            _prune(self.path.parent)
            return True
        except Exception as e:  # an archive that could not be written costs only start-up time
            _log.warning("could not write the class archive %s: %s", self.path, e)
            for p in self.path.parent.glob(f"*.tmp-{os.getpid()}"):
                try:
                    p.unlink()
                except OSError:
                    pass
            return False


def _whole(path: Path) -> bool:
    """The archive at ``path`` and its ``.json`` agree (size, SHA-256)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if path.stat().st_size != int(meta["size"]):
            return False
        return _sha256(path) == str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prune(directory: Path) -> None:
    """Keep the newest :data:`KEEP` archives; drop temporary files of dumps that never finished."""
    now = time.time()
    try:
        archives = sorted(directory.glob("ij1-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in archives[KEEP:]:
            ClassArchive(old, True).discard()
        for tmp in directory.glob("*.tmp-*"):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
    except OSError:  # pragma: no cover - another process pruned meanwhile
        pass


def plan_archive(java_home: Path, classpath: Sequence[Path], env: Optional[Mapping[str, str]] = None) -> Optional[ClassArchive]:
    """The archive for a JVM about to start (None when CDS is off): one to
    use if a whole one exists, else one to record. A broken one (its
    ``.json`` disagrees) is deleted first."""
    directory = cds_dir(env)
    if directory is None:
        return None
    try:
        path = directory.resolve() / f"ij1-{archive_key(java_home, classpath)}.jsa"
    except Exception as e:  # pragma: no cover - defensive
        _log.warning("no class archive: %s", e)
        return None
    if _whole(path):
        return ClassArchive(path, True)
    if path.exists() and path.with_suffix(".json").exists():
        ClassArchive(path, True).discard()  # both there but disagreeing: damaged
    return ClassArchive(path, False)
