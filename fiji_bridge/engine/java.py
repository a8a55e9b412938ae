"""Finding Java and ImageJ 1 on this machine, and starting the JVM offline.

Nothing here downloads anything: scyjava is told to use the system Java only
(``fetch="never"``) and gets no Maven endpoints, so neither a JDK nor jars
are fetched at run time (scyjava 1.12 defaults to ``fetch="always"``, which
would download a JDK through cjdk).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .base import EngineError, EngineUnavailable
from .class_archive import ClassArchive, archive_for
from .fiji import java_feature_version

__all__ = [
    "ADD_OPENS",
    "class_archive_to_write",
    "DEBIAN_IJ_JAR",
    "configure_offline",
    "fiji_of_ij_jar",
    "find_ij_jar",
    "find_java_home",
    "heap_option",
    "jvm_started",
    "start_jvm",
]

#: Debian/Ubuntu's ImageJ 1 (package libij-java)
DEBIAN_IJ_JAR = Path("/usr/share/java/ij.jar")


def find_java_home(env: Optional[Mapping[str, str]] = None, fiji_root: Optional[Path] = None) -> Path:
    """JAVA_HOME if it names a JDK/JRE, else a Fiji.app's bundled ``java/``
    (when ``fiji_root`` is given and has one), else the one behind ``java`` on PATH.

    Raises :class:`EngineUnavailable` naming what is missing.
    """
    env = os.environ if env is None else env
    home = env.get("JAVA_HOME")
    if not home and fiji_root is not None:
        from .fiji import bundled_java

        bundled = bundled_java(Path(fiji_root))
        if bundled is not None:
            return bundled
    if home:
        p = Path(home)
        if (p / "bin" / "java").exists():
            return p
        raise EngineUnavailable(
            f"JAVA_HOME={home} has no bin/java; point it at a JDK (e.g. /usr/lib/jvm/default-java) or unset it"
        )
    java = shutil.which("java", path=env.get("PATH"))
    if not java:
        raise EngineUnavailable(
            "no Java found: set JAVA_HOME or install a JDK (Debian/Ubuntu: apt-get install default-jdk)"
        )
    # /usr/bin/java -> /etc/alternatives/java -> /usr/lib/jvm/java-17-openjdk-amd64/bin/java
    return Path(os.path.realpath(java)).parent.parent


def find_ij_jar(env: Optional[Mapping[str, str]] = None) -> Path:
    """The ImageJ 1 jar to use: FIJI_BRIDGE_IJ_JAR, else a Fiji.app's
    ``jars/ij-*.jar`` when FIJI_BRIDGE_IMAGEJ names a directory, else Debian's
    ``/usr/share/java/ij.jar``."""
    env = os.environ if env is None else env
    explicit = env.get("FIJI_BRIDGE_IJ_JAR")
    if explicit:
        if Path(explicit).is_file():
            return Path(explicit)
        raise EngineUnavailable(f"FIJI_BRIDGE_IJ_JAR={explicit} is not a file")
    fiji = env.get("FIJI_BRIDGE_IMAGEJ")
    tried = []
    if fiji and Path(fiji).is_dir():
        jars = sorted(glob.glob(str(Path(fiji) / "jars" / "ij-*.jar")))
        if jars:
            return Path(jars[-1])
        tried.append(f"{fiji}/jars/ij-*.jar")
    if DEBIAN_IJ_JAR.exists():
        return DEBIAN_IJ_JAR
    tried.append(str(DEBIAN_IJ_JAR))
    raise EngineUnavailable(
        "no ImageJ 1 jar found (tried " + ", ".join(tried) + "): set FIJI_BRIDGE_IJ_JAR to an ij.jar, "
        "FIJI_BRIDGE_IMAGEJ to a Fiji.app, or install libij-java (apt-get install libij-java)"
    )


def fiji_of_ij_jar(jar: Path) -> Optional[Path]:
    """The Fiji.app an ij.jar belongs to (``<Fiji.app>/jars/ij-*.jar`` next to
    ``plugins/``), else None."""
    jar = Path(jar).resolve()
    if jar.parent.name == "jars" and (jar.parent.parent / "plugins").is_dir():
        return jar.parent.parent
    return None


def _use_java_home(java_home: Path) -> None:
    """JAVA_HOME and PATH name ``java_home`` (for JPype and for child processes)."""
    os.environ["JAVA_HOME"] = str(java_home)
    bin_dir = str(java_home / "bin")
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def configure_offline(java_home: Path) -> None:
    """Make scyjava use ``java_home`` and never fetch a JDK or Maven artifacts."""
    import scyjava

    _use_java_home(java_home)
    scyjava.config.set_java_constraints(fetch="never")


def jvm_started() -> bool:
    import jpype

    return bool(jpype.isJVMStarted())


#: what ImageJ 1's and ImageJ2's reflection needs on Java 9+ (harmless on 8's absence of modules)
ADD_OPENS = (
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.desktop/sun.awt=ALL-UNNAMED",
    "--add-opens=java.desktop/sun.awt.X11=ALL-UNNAMED",
    "--add-opens=java.desktop/javax.swing=ALL-UNNAMED",
    "--add-opens=java.desktop/java.awt=ALL-UNNAMED",
)


def heap_option(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """``-Xmx`` from FIJI_BRIDGE_JVM_HEAP (``"4g"``, ``"512m"``), for both engines."""
    env = os.environ if env is None else env
    heap = (env.get("FIJI_BRIDGE_JVM_HEAP") or "").strip()
    if not heap:
        return []
    if not re.fullmatch(r"\d+[kKmMgGtT]?", heap):
        raise EngineUnavailable(f"FIJI_BRIDGE_JVM_HEAP={heap} is not a heap size such as 4g or 512m")
    return [f"-Xmx{heap}"]


def start_jvm(
    classpath: Sequence[Path],
    options: Sequence[str] = (),
    *,
    endpoints: Sequence[str] = (),
    java_home: Optional[Path] = None,
    scyjava_start: bool = True,
) -> None:
    """Start the JVM of this process with ``classpath`` (idempotent).

    ``endpoints`` are Maven coordinates for scyjava (empty for a local
    ImageJ or Fiji: then nothing is resolved from Maven, and Maven
    endpoints other code added, such as imglyb's, are dropped).

    ``scyjava_start=False`` (local jars only, nothing that registers
    scyjava start-up callbacks, as ImageJ 1's engine): JPype starts the
    JVM directly, as scyjava would with the same class path and options
    (``interrupt=True``; JPype shuts the JVM down at exit and frees no
    resources then). This skips what scyjava adds for a JVM it must find
    or fetch: its import (~0.1 s, jgo's mostly) and the two ``java
    -version`` processes it starts to check a JDK this module has already
    found and read the version of (``release``).
    """
    if jvm_started():
        return
    java_home = java_home or find_java_home()
    java = java_feature_version(java_home) or 17
    opts = [*(ADD_OPENS if java >= 9 else ()), *heap_option(), *options]
    opts += _class_archive_options(java_home, classpath, opts)
    if not scyjava_start and not endpoints:
        _start_jpype(java_home, classpath, opts)
        return
    import scyjava

    configure_offline(java_home)
    if not endpoints:
        scyjava.config.endpoints.clear()
    for jar in classpath:
        scyjava.config.add_classpath(str(jar))
    if endpoints:
        scyjava.config.endpoints.extend(endpoints)
    scyjava.config.add_options(opts)
    try:
        scyjava.start_jvm()
    except Exception as e:  # JPype raises plain OSError/RuntimeError here
        raise EngineError(f"could not start the JVM at {java_home}: {e}") from e


#: the class-data archive this process's JVM records, to write at a clean quit
_ARCHIVE_TO_WRITE: Optional[ClassArchive] = None


def _class_archive_options(java_home: Path, classpath: Sequence[Path], opts: Sequence[str]) -> list[str]:
    """The options of this setup's class-data archive (:mod:`.class_archive`)."""
    global _ARCHIVE_TO_WRITE
    archive = archive_for(java_home, classpath, opts)
    if archive is None:
        return []
    _ARCHIVE_TO_WRITE = None if archive.exists else archive
    return archive.jvm_options()


def class_archive_to_write() -> Optional[ClassArchive]:
    """The archive this process's JVM started without and may write
    (:func:`.class_archive.dump`), or None."""
    return _ARCHIVE_TO_WRITE


def _start_jpype(java_home: Path, classpath: Sequence[Path], options: Sequence[str]) -> None:
    """Start the JVM at ``java_home`` through JPype alone (see :func:`start_jvm`)."""
    import jpype
    import jpype.config

    _use_java_home(java_home)
    libjvm = next((p for p in (java_home / "lib" / "server" / "libjvm.so", java_home / "jre" / "lib" / "server" / "libjvm.so")
                   if p.is_file()), None)
    for jar in classpath:
        jpype.addClassPath(str(jar))
    jpype.config.free_resources = False  # as scyjava: freeing them at exit could crash it
    try:
        if libjvm is not None:
            jpype.startJVM(str(libjvm), *options, interrupt=True)
        else:  # another layout (macOS, Windows): JPype finds it from JAVA_HOME
            jpype.startJVM(*options, interrupt=True)
    except Exception as e:  # JPype raises plain OSError/RuntimeError here
        raise EngineError(f"could not start the JVM at {java_home}: {e}") from e
