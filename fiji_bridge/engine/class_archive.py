"""A class-data archive for the engine's JVM (HotSpot's dynamic AppCDS).

A JVM that starts ImageJ loads, parses and verifies a few thousand classes
from jars before the first macro is done (ImageJ's menus, then the macro's
commands and filters). HotSpot can map them instead from an archive it wrote
in an earlier run (``-XX:SharedArchiveFile``): measured here on ImageJ 1.53t
and the shipped ``nuclei_count`` macro, a worker's engine start went from
1.0 to 0.8 s and its first macro from 0.75 to 0.6 s.

The archive is one file per setup in the user's cache
(``$FIJI_BRIDGE_CACHE_DIR/cds`` or ``~/.cache/fiji-bridge/cds``), named by a
hash of what decides which classes load from where: the JVM (its home, its
``libjvm`` size and mtime), every class-path entry with its size and
mtime, JPype's version, and the JVM options (``JAVA_TOOL_OPTIONS`` too).
Any change gives another file; a JVM that finds its archive unusable all the
same (another GC, compressed oops switched off by a big heap) says nothing
and loads its classes from the jars as without one.

The first JVM of a setup runs with ``-XX:+RecordDynamicDumpInfo`` and, when
its worker quits cleanly after serving work, writes the archive through the
``VM.cds dynamic_dump`` diagnostic command (JDK 17; ~1.2 s once, at the end
of that first run). One worker of a setup writes it at a time (a lock
file); it is written to a temporary name and renamed in, so no JVM maps a
half-written archive. ``FIJI_BRIDGE_CDS=0`` turns all of this off.
Only HotSpot 17 or newer is asked: other JVMs start as before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = ["ClassArchive", "archive_for", "cache_dir", "dump"]

#: options that choose CDS themselves: with any of them, this module stays out of the way
_USER_CDS = ("-Xshare:", "SharedArchiveFile", "ArchiveClassesAtExit", "DynamicDumpSharedSpaces", "RecordDynamicDumpInfo")
#: the JVM's warnings about archives (classes it cannot archive, an archive it cannot use)
QUIET = "-Xlog:cds*=off"


@dataclass(frozen=True)
class ClassArchive:
    """The archive of one JVM setup: ``path`` is mapped when it exists, else
    recorded for and written by :func:`dump`."""

    path: Path

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def jvm_options(self) -> list[str]:
        """The options that map the archive, or that let this JVM write it."""
        if self.exists:
            return [f"-XX:SharedArchiveFile={self.path}", QUIET]
        return ["-XX:+RecordDynamicDumpInfo", QUIET]


def cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """Where archives are kept: ``$FIJI_BRIDGE_CACHE_DIR/cds``, else
    ``$XDG_CACHE_HOME/fiji-bridge/cds``, else ``~/.cache/fiji-bridge/cds``."""
    env = os.environ if env is None else env
    root = env.get("FIJI_BRIDGE_CACHE_DIR") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fiji-bridge")
    return Path(root) / "cds"


def _hotspot_17(java_home: Path) -> Optional[Path]:
    """The ``libjvm`` of a HotSpot JVM of Java 17 or newer at ``java_home``, else None."""
    from .fiji import java_feature_version

    libjvm = java_home / "lib" / "server" / "libjvm.so"
    if not libjvm.is_file() or (java_feature_version(java_home) or 0) < 17:
        return None
    try:
        release = (java_home / "release").read_text(errors="replace")
    except OSError:
        release = ""
    return None if "openj9" in release.lower() else libjvm


def _stat_key(p: Path) -> str:
    try:
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{p}:missing"


def archive_for(java_home: Path, classpath: Sequence[Path], options: Sequence[str],
                env: Optional[Mapping[str, str]] = None) -> Optional[ClassArchive]:
    """The archive of a JVM at ``java_home`` started with ``classpath`` and
    ``options``, or None where none is used (turned off, not HotSpot 17+,
    CDS chosen by the options, no writable cache)."""
    env = os.environ if env is None else env
    tool_options = env.get("JAVA_TOOL_OPTIONS", "")
    if env.get("FIJI_BRIDGE_CDS", "1").strip() == "0" or any(u in o for o in [*options, tool_options] for u in _USER_CDS):
        return None
    libjvm = _hotspot_17(Path(java_home))
    if libjvm is None:
        return None
    try:
        import jpype

        jpype_version = str(getattr(jpype, "__version__", "?"))
    except ImportError:  # pragma: no cover - every engine has JPype
        jpype_version = "none"
    h = hashlib.sha256()
    for part in [_stat_key(libjvm), f"jpype {jpype_version}", *map(_stat_key, map(Path, classpath)),
                 *options, f"JAVA_TOOL_OPTIONS={tool_options}"]:
        h.update(part.encode() + b"\0")
    d = cache_dir(env)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(d, os.W_OK):
        return None
    return ClassArchive(d / f"{h.hexdigest()[:24]}.jsa")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(lock: Path) -> bool:
    """Create ``lock`` holding this pid; a lock whose process is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and _pid_alive(holder):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def dump(archive: ClassArchive) -> bool:
    """Write ``archive`` from this process's running JVM (started with
    :meth:`ClassArchive.jvm_options` while the archive did not exist):
    whether it now exists. Never raises."""
    if archive.exists:
        return True
    lock = archive.path.with_name(archive.path.name + ".lock")
    if not _take_lock(lock):
        return False  # another worker of the same setup writes it
    for stale in archive.path.parent.glob(f"{archive.path.name}.*.tmp"):  # of a writer killed mid-way
        stale.unlink(missing_ok=True)
    tmp = archive.path.with_name(f"{archive.path.name}.{os.getpid()}.tmp")
    try:
        import jpype

        String = jpype.JClass("java.lang.String")
        server = jpype.JClass("java.lang.management.ManagementFactory").getPlatformMBeanServer()
        name = jpype.JClass("javax.management.ObjectName")("com.sun.management:type=DiagnosticCommand")
        args = jpype.JArray(jpype.JObject)([jpype.JArray(String)(["dynamic_dump", str(tmp)])])
        server.invoke(name, "vmCds", args, jpype.JArray(String)(["[Ljava.lang.String;"]))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            return False
        os.replace(tmp, archive.path)
        return True
    except Exception:  # no JVM, no such command, a full disk: the next run loads from the jars again
        return False
    finally:
        tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
