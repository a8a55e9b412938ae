"""A local Fiji / ImageJ2 installation: what is in it, and whether this Java can run it.

Nothing here starts a JVM. :func:`find_fiji` looks at a folder the way the
Fiji launcher does (``jars/`` and ``plugins/``, platform sub-folders of other
systems left out) and refuses, with :class:`EngineUnavailable`, a folder that
is not an ImageJ2 installation with the legacy layer (plain ImageJ 1 folders
included: those go to the ImageJ 1 engine). :func:`check_java` compares the
class-file version of the installation's core jars with the JDK that would
run them. :func:`find_extra_jars` gathers jars given outside the Fiji (the
imglib2-imglyb jars PyImageJ needs, which a stock Fiji does not ship).
"""

from __future__ import annotations

import glob
import os
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .base import EngineUnavailable

__all__ = [
    "FijiInstall",
    "bundled_java",
    "check_java",
    "class_file_java",
    "find_extra_jars",
    "find_fiji",
    "is_path_like",
    "java_feature_version",
    "plugin_classpath",
]

#: sub-folders of jars/ and plugins/ that hold other platforms' natives
_OTHER_PLATFORMS = re.compile(r"^(win|macosx|macos|linux)(32|64|-arm64|-x64|-aarch64)?$", re.I)
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def is_path_like(endpoint: str) -> bool:
    """True if ``endpoint`` names a folder rather than Maven coordinates
    (``sc.fiji:fiji:2.15.0``): POSIX paths, ``~``, ``.``, and Windows paths
    such as ``C:\\Fiji.app`` or ``\\\\server\\share\\Fiji.app``."""
    s = endpoint.strip()
    return bool(
        s.startswith(("/", ".", "~")) or _WINDOWS_PATH.match(s) or os.sep in s or "/" in s or "\\" in s
        or Path(s).is_dir()
    )


def _this_platform() -> str:
    if sys.platform.startswith("win"):
        return "win64"
    if sys.platform == "darwin":
        return "macosx"
    return "linux64"


def _jars_under(folder: Path) -> list[Path]:
    """Every ``*.jar`` under ``folder``, skipping other platforms' sub-folders."""
    out: list[Path] = []
    if not folder.is_dir():
        return out
    mine = _this_platform()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _OTHER_PLATFORMS.match(d) or d == mine)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".jar"))
    return out


def _one(jars: Sequence[Path], pattern: str) -> Optional[Path]:
    rx = re.compile(pattern)
    found = sorted(j for j in jars if rx.match(j.name))
    return found[-1] if found else None


def _version_of(jar: Optional[Path], prefix: str) -> Optional[str]:
    if jar is None:
        return None
    return jar.name[len(prefix):-len(".jar")] or None


@dataclass
class FijiInstall:
    """A checked ImageJ2/Fiji folder."""

    root: Path
    jars: list[Path]  # every jar of jars/ and plugins/ (class path order)
    imagej2_jar: Path
    legacy_jar: Path
    ij_jar: Optional[Path]
    is_fiji: bool  # has Fiji's own plugins (fiji-*.jar), not only ImageJ2
    imglyb_jars: list[Path] = field(default_factory=list)  # imglib2-imglyb / -unsafe if shipped

    @property
    def imagej2_version(self) -> Optional[str]:
        return _version_of(self.imagej2_jar, "imagej-")

    @property
    def legacy_version(self) -> Optional[str]:
        return _version_of(self.legacy_jar, "imagej-legacy-")


def find_fiji(path: Union[str, Path]) -> FijiInstall:
    """Check that ``path`` is an ImageJ2/Fiji installation; raise
    :class:`EngineUnavailable` saying what is wrong otherwise."""
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise EngineUnavailable(f"{path} is not a directory (expected a Fiji.app folder)")
    root = root.resolve()
    jars = _jars_under(root / "jars") + _jars_under(root / "plugins")
    if not jars:
        raise EngineUnavailable(f"{root} is not a Fiji/ImageJ2 installation: it has no jars/ or plugins/ with jars")
    imagej2 = _one(jars, r"^imagej-2[\d.]*[-\w]*\.jar$")
    legacy = _one(jars, r"^imagej-legacy-[\d.]+[-\w]*\.jar$")
    missing = [name for name, jar in (("imagej-2.*.jar (ImageJ2)", imagej2), ("imagej-legacy-*.jar", legacy)) if jar is None]
    if missing or imagej2 is None or legacy is None:
        hint = ""
        if _one(jars, r"^ij(-[\d.]+\w*)?\.jar$"):
            hint = "; it looks like plain ImageJ 1: use the imagej1 engine with FIJI_BRIDGE_IJ_JAR=<its ij.jar>"
        raise EngineUnavailable(f"{root} is not an ImageJ2/Fiji installation: no {' and no '.join(missing)} in jars/{hint}")
    return FijiInstall(
        root=root,
        jars=jars,
        imagej2_jar=imagej2,
        legacy_jar=legacy,
        ij_jar=_one(jars, r"^ij-[\d.]+\w*\.jar$"),
        is_fiji=_one(jars, r"^fiji-[\d.]+.*\.jar$") is not None or (root / "plugins").is_dir(),
        imglyb_jars=[j for j in jars if j.name.startswith(("imglib2-imglyb-", "imglib2-unsafe-"))],
    )


def plugin_classpath(root: Union[str, Path]) -> list[Path]:
    """The jars of a Fiji.app's ``jars/`` and ``plugins/`` (for the ImageJ 1
    engine pointed at a Fiji)."""
    root = Path(root)
    return _jars_under(root / "jars") + _jars_under(root / "plugins")


def find_extra_jars(spec: Union[None, str, Sequence[Union[str, Path]]], env: Optional[Mapping[str, str]] = None) -> list[Path]:
    """Jars given outside the Fiji: ``spec`` (or FIJI_BRIDGE_EXTRA_JARS) is a
    list, or an ``os.pathsep``-separated string, of jar files and folders."""
    env = os.environ if env is None else env
    if spec is None:
        spec = env.get("FIJI_BRIDGE_EXTRA_JARS") or ""
    items = [s for s in (spec.split(os.pathsep) if isinstance(spec, str) else [str(x) for x in spec]) if s.strip()]
    out: list[Path] = []
    for item in items:
        p = Path(os.path.expanduser(item)).resolve()
        if p.is_dir():
            out.extend(sorted(p.glob("*.jar")))
        elif p.is_file() and p.suffix == ".jar":
            out.append(p)
        else:
            raise EngineUnavailable(f"extra jars: {item} is neither a .jar file nor a folder (FIJI_BRIDGE_EXTRA_JARS)")
    return out


# -- Java versions ----------------------------------------------------------------


def class_file_java(jar: Path, samples: int = 20) -> Optional[int]:
    """The Java release a jar's classes were compiled for (class-file major
    version - 44), the highest over its first ``samples`` classes; None if it
    has no class files. Multi-release ``META-INF/versions`` entries are skipped."""
    best: Optional[int] = None
    try:
        with zipfile.ZipFile(jar) as z:
            n = 0
            for name in z.namelist():
                if not name.endswith(".class") or name.startswith("META-INF/") or name.endswith("module-info.class"):
                    continue
                with z.open(name) as f:
                    head = f.read(8)
                if len(head) == 8 and head[:4] == b"\xca\xfe\xba\xbe":
                    major = struct.unpack(">H", head[6:8])[0]
                    best = max(best or 0, major - 44)
                n += 1
                if n >= samples:
                    break
    except (OSError, zipfile.BadZipFile):
        return None
    return best


def java_feature_version(java_home: Path) -> Optional[int]:
    """The feature release (8, 11, 17, 21...) of the JDK at ``java_home``, from
    its ``release`` file; None if unknown."""
    release = java_home / "release"
    try:
        text = release.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r'^JAVA_VERSION="?([\d._]+)', text, re.M)
    if not m:
        return None
    parts = m.group(1).split(".")
    return int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(parts[0])


def check_java(install: FijiInstall, java_home: Path) -> Optional[int]:
    """Refuse a JDK older than the Fiji's core jars need; returns the Java
    release they need (None if unknown)."""
    core = [install.imagej2_jar, install.legacy_jar] + [j for j in install.jars if j.name.startswith("scijava-common-")][:1]
    needed = max((v for v in (class_file_java(j) for j in core) if v), default=None)
    have = java_feature_version(java_home)
    if needed and have and have < needed:
        raise EngineUnavailable(
            f"{install.root} needs Java {needed} (its {install.imagej2_jar.name} is compiled for Java {needed}), "
            f"but the JDK at {java_home} is Java {have}: install a JDK {needed}+ and set JAVA_HOME to it, "
            f"or use a Fiji.app that bundles one in java/"
        )
    return needed


def bundled_java(root: Path) -> Optional[Path]:
    """A JDK shipped inside a Fiji.app (``java/<platform>/<jdk>/``), if any."""
    base = root / "java"
    if not base.is_dir():
        return None
    exe = "java.exe" if sys.platform.startswith("win") else "java"
    for pattern in ("*/bin/" + exe, "*/*/bin/" + exe, "*/*/jre/bin/" + exe, "*/*/Contents/Home/bin/" + exe):
        for hit in sorted(glob.glob(str(base / pattern)), reverse=True):  # newest name first
            home = Path(hit).parent.parent
            if sys.platform != "darwin" and "macos" in str(home).lower():
                continue
            return home
    return None
