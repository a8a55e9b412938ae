"""The Fiji engine: an ImageJ2 gateway (a Fiji.app or Maven endpoint) with
the legacy layer on, running macros exactly as the ImageJ 1 engine does.

Start-up is the only part of its own. The JVM is always started here, offline
(JPype + every jar of ``jars/`` and ``plugins/``, ``-Dplugins.dir``,
``-Dimagej.dir``, the ``--add-opens`` Java 17 needs), then the gateway is made
one of two ways (``start_path``):

* ``"pyimagej"``: ``imagej.init(fiji_dir)`` on the running JVM, which gives
  ``engine.ij.py`` (PyImageJ's converters). PyImageJ imports imglyb, whose
  Java half (imglib2-imglyb, imglib2-unsafe) a stock Fiji does not ship: this
  path is taken only when those jars are in the Fiji or given through
  ``extra_jars=`` / FIJI_BRIDGE_EXTRA_JARS. imglyb's Maven endpoint is dropped
  so nothing is resolved online.
* ``"gateway"``: ``net.imagej.ImageJ()`` directly, when PyImageJ cannot start
  offline. Same ImageJ2, same legacy layer; no ``ij.py``.
* ``"maven"``: Maven coordinates (``sc.fiji:fiji:2.15.0``) go to
  ``imagej.init`` as they are; that needs a network the first time.

Macros run through the inherited runner (a ``Run$_`` thread with the dialog
guard), not ``ij.py.run_macro``. On Linux the engine is non-headless on a
private Xvfb by default, so macros behave as in ImageJ 1; ``headless=True``
(the default on macOS, where AWT cannot run on a plain Python main thread) is
supported with the checks of :mod:`.headless`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .base import EngineUnavailable, MacroError, MacroResult
from .collect import read_tables
from .fiji import FijiInstall, check_java, find_extra_jars, find_fiji, is_path_like
from .imagej1 import ImageJ1Engine
from .java import find_java_home, heap_option, jvm_started, start_jvm
from .transfer import J, to_imageplus

__all__ = ["PyImageJEngine", "START_PATHS"]

START_PATHS = ("auto", "pyimagej", "gateway")


def _default_headless() -> bool:
    env = os.environ.get("FIJI_BRIDGE_HEADLESS", "").strip().lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    return sys.platform == "darwin"


class PyImageJEngine(ImageJ1Engine):
    """Fiji / ImageJ2 with the legacy layer.

    ``endpoint``: a Fiji.app directory (POSIX or Windows path) or Maven
    coordinates (default: FIJI_BRIDGE_IMAGEJ). ``headless``: None = headless
    on macOS only (or FIJI_BRIDGE_HEADLESS=1). ``start``: ``"auto"`` (PyImageJ
    when imglib2-imglyb is available locally, else the direct gateway),
    ``"pyimagej"`` or ``"gateway"``. ``extra_jars``: jars or folders added to
    the class path (default: FIJI_BRIDGE_EXTRA_JARS).
    """

    name = "pyimagej"

    def __init__(
        self,
        endpoint: Optional[str] = None,
        display: bool = False,
        xvfb: Optional[bool] = None,
        java_options: Sequence[str] = (),
        *,
        headless: Optional[bool] = None,
        start: str = "auto",
        extra_jars: Union[None, str, Sequence[Union[str, Path]]] = None,
    ) -> None:
        if start not in START_PATHS:
            raise ValueError(f"unknown start path {start!r}; choose one of {START_PATHS}")
        self.headless = _default_headless() if headless is None else bool(headless)
        if self.headless and display:
            import logging

            logging.getLogger(__name__).warning("a headless Fiji cannot show live windows: display=True ignored")
            display = False
        super().__init__(None, display=display, xvfb=xvfb, java_options=java_options)
        self.endpoint = endpoint or os.environ.get("FIJI_BRIDGE_IMAGEJ")
        self.start_request = start
        self.extra_jars = extra_jars
        self.start_path: Optional[str] = None  # "pyimagej", "gateway" or "maven", once started
        self.install: Optional[FijiInstall] = None
        self.gateway: Any = None  # net.imagej.ImageJ
        self.ij: Any = None  # the same gateway as PyImageJ returns it (with .py) on the pyimagej path

    # -- start-up ------------------------------------------------------------------------

    def _wants_xvfb(self) -> bool:
        if self.headless or not sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
            return False
        return self.xvfb if self.xvfb is not None else not os.environ.get("DISPLAY")

    def _start_display(self) -> None:
        if self._wants_xvfb():
            from .xvfb import VirtualDisplay

            self._xvfb = VirtualDisplay()
            os.environ["DISPLAY"] = self._xvfb.start()

    def _start_jvm(self) -> None:
        if not self.endpoint:
            raise EngineUnavailable(
                "the Fiji engine needs a Fiji: set FIJI_BRIDGE_IMAGEJ (or --imagej) to a Fiji.app directory "
                "or Maven coordinates such as sc.fiji:fiji:2.15.0"
            )
        if ":" in self.endpoint and not is_path_like(self.endpoint):  # group:artifact[:version]
            return self._start_maven()
        install = self.install = find_fiji(self.endpoint)
        java_home = find_java_home(fiji_root=install.root)
        check_java(install, java_home)
        extra = find_extra_jars(self.extra_jars)
        has_imglyb = any(j.name.startswith("imglib2-imglyb-") for j in [*install.imglyb_jars, *extra])
        path = self.start_request
        if path == "auto":
            path = "pyimagej" if has_imglyb and _pyimagej_importable() else "gateway"
        if path == "pyimagej":
            if not has_imglyb:
                raise EngineUnavailable(
                    f"PyImageJ cannot start offline from {install.root}: it needs the imglib2-imglyb and "
                    "imglib2-unsafe jars, which a stock Fiji does not ship; give their folder with "
                    "FIJI_BRIDGE_EXTRA_JARS (or extra_jars=), or use start='gateway'"
                )
        # what is wrong with the request first, then what is wrong with this process
        if jvm_started() and not _has_class("net.imagej.ImageJ"):
            raise EngineUnavailable(
                "this process already runs a JVM without ImageJ2 (a process holds one JVM): start the Fiji "
                "engine in a fresh process, e.g. fiji_bridge.engine.remote.RemoteEngine('pyimagej', endpoint=...)"
            )
        if path == "pyimagej":
            _import_pyimagej()  # before the JVM: imglyb registers its start-up hooks
        self._start_display()
        options = [
            f"-Dplugins.dir={install.root}",
            f"-Dimagej.dir={install.root}",
            f"-Dij.dir={install.root}",
            f"-Djava.awt.headless={'true' if self.headless else 'false'}",
            *self.java_options,
        ]
        start_jvm([*install.jars, *extra], options, java_home=java_home)
        if path == "pyimagej":
            import imagej

            # the JVM is up, so init only makes the gateway (and ij.py)
            self.ij = imagej.init(str(install.root), mode="headless" if self.headless else "interactive")
            self.gateway = self.ij
        else:
            self.gateway = J("net.imagej.ImageJ")()
            self.ij = self.gateway
        self.start_path = path

    def _start_maven(self) -> None:
        """Maven coordinates: PyImageJ resolves them (network needed once)."""
        import scyjava

        _import_pyimagej(drop_imglyb=False)
        java_home = find_java_home()
        os.environ["JAVA_HOME"] = str(java_home)
        scyjava.config.set_java_constraints(fetch="auto")  # a JDK is present: nothing is fetched
        scyjava.config.add_options([*heap_option(), *self.java_options])
        self._start_display()
        import imagej

        self.ij = self.gateway = imagej.init(self.endpoint, mode="headless" if self.headless else "interactive")
        self.start_path = "maven"

    def _init_imagej(self) -> None:
        legacy = None
        try:
            legacy = self.gateway.get("net.imagej.legacy.LegacyService")
        except Exception:
            pass
        if legacy is None or not legacy.isActive():
            raise EngineUnavailable(
                f"{self.endpoint}: ImageJ2 started but its legacy layer (imagej-legacy) is not active, so "
                "ImageJ macros cannot run; use a Fiji.app, or the imagej1 engine for plain ImageJ 1"
            )
        super()._init_imagej()
        if self.headless:
            from .display import LiveDisplay
            from .headless import HeadlessRunner, HeadlessState

            self._runner = HeadlessRunner()
            self._state = HeadlessState()
            self._display = LiveDisplay(False, self._state.protected_ids)

    def _read_log(self) -> str:
        if self.headless and self._runner is not None:
            return getattr(self._runner, "log", "")
        return super()._read_log()

    def close(self) -> None:
        with self._lock:
            started = self._started and not self._closed
        super().close()
        if started and self.gateway is not None:
            # dispose the context now, not from the JVM's exit hook, where its
            # invokeAndWait on the event thread is interrupted and prints a trace
            try:
                self.gateway.context().dispose()
            except Exception:  # pragma: no cover - closing must not fail
                pass

    # -- scripts in other languages than the ImageJ macro language -------------------------------

    def _run_other_script(
        self, code: str, language: str, inputs: dict, timeout: Optional[float], hs: Any, title: Optional[str]
    ) -> MacroResult:
        """A SciJava script through the ScriptService (see :mod:`.scripts`)."""
        from ..macros import MacroArgumentError, MacroParseError, check_args, parse_parameters
        from .runner import RunRecord, interpret
        from .scripts import run_scijava

        try:
            params = parse_parameters(code)
            values: dict[str, Any] = dict(check_args(params, inputs))
        except (MacroArgumentError, MacroParseError) as e:
            line = getattr(e, "line", None)
            raise MacroError(str(e), line if isinstance(line, int) else None, kind="argument") from None
        with self._lock:
            self._require_started()
            assert self._runner and self._state
            if self._runner.broken:
                raise MacroError(self._runner.broken, kind="engine")
            self._state.reset()
            imp = None
            for p in params:
                if p.kind != "image" or p.io not in ("input", "both"):
                    continue
                if hs is None:
                    raise MacroError(f"the script's input {p.name} ({p.java_type}) is an image: pass image= (or stack=)",
                                     p.line or None, kind="argument")
                if imp is None:
                    imp = to_imageplus(hs.array, title or "image", hs.channel_names, hs.calibration)
                short = p.java_type.rsplit(".", 1)[-1].lower()
                values[p.name] = imp if short == "imageplus" else self.gateway.convert().convert(imp, J("net.imagej.Dataset"))
            record = RunRecord(code, "")
            self._runner.guard.run = record  # dialogs a script opens are closed and reported, as for macros
            try:
                outputs, infos, elapsed = run_scijava(self.gateway, code, language, values, timeout)
            finally:
                self._runner.guard.run = None
                self._runner.flush_events()
            err = interpret(record)
            if err is not None:
                raise err
            return MacroResult(
                image_info=infos, tables=read_tables(self._state.emptied_tables), log=self._read_log(), elapsed=elapsed,
                notes=list(hs.notes) if hs else [], outputs=outputs,
            )

    # -- Bio-Formats -------------------------------------------------------------------------------

    def open_image(self, path: Union[str, Path], series: int = 0, timeout: Optional[float] = 300) -> MacroResult:
        """Open ``path`` with Bio-Formats (series ``series``, 0-based) as a
        hyperstack: ``r.images[title]`` (TZCYX) with its dimensions, pixel
        sizes and the channel names of the file's OME metadata."""
        p = Path(os.path.expanduser(str(path))).resolve()
        if not p.is_file():
            raise MacroError(f"image file not found: {p}", kind="argument")
        macro = (f'run("Bio-Formats Importer", "open=[{p}] color_mode=Default view=Hyperstack '
                 f'stack_order=XYCZT series_{int(series) + 1}");')
        r = self.run_macro(macro, timeout=timeout)
        names = _bioformats_channel_names(p, series)
        for title, info in r.image_info.items():
            C = r.images[title].shape[2]
            if len(names) == C and any(names):
                info.channel_names = names
            elif all(_BF_LABEL.match(n or "") for n in info.channel_names):
                info.channel_names = []  # Bio-Formats' generic "c:1/2 z:1/3 - file" labels are no names
        return r

    # -- what is running -------------------------------------------------------------------

    @property
    def imagej2_version(self) -> str:
        self._require_started()
        if self.install and self.install.imagej2_version:
            return self.install.imagej2_version
        v = J("net.imagej.ImageJ")().getClass().getPackage().getImplementationVersion()
        return str(v or "?")

    def status(self) -> dict[str, Any]:
        st = super().status()
        st.update(
            imagej2=self.imagej2_version,
            start=self.start_path,
            pyimagej=hasattr(self.ij, "py"),
            headless=self.headless,
            fiji=str(self.install.root) if self.install else self.endpoint,
        )
        return st


#: the slice labels Bio-Formats makes when a file names no channels
_BF_LABEL = re.compile(r"^(c:\d+/\d+ ?)?(z:\d+/\d+ ?)?(t:\d+/\d+ ?)?- ")


def _bioformats_channel_names(path: Path, series: int) -> list[str]:
    """Channel names from a file's OME metadata, through Bio-Formats' reader."""
    try:
        meta = J("loci.formats.MetadataTools").createOMEXMLMetadata()
        reader = J("loci.formats.ImageReader")()
        reader.setMetadataStore(meta)
        try:
            reader.setId(str(path))
            return [str(meta.getChannelName(series, c) or "") for c in range(int(meta.getChannelCount(series)))]
        finally:
            reader.close()
    except Exception:  # no Bio-Formats, or a file it reads without OME channels
        return []


def _has_class(name: str) -> bool:
    try:
        J(name)
        return True
    except Exception:
        return False


def _pyimagej_importable() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("imagej") is not None
    except (ImportError, ValueError):
        return False


def _import_pyimagej(drop_imglyb: bool = True) -> None:
    """Import PyImageJ (and imglyb) and drop the Maven endpoint imglyb adds
    (offline, its jars are on the class path instead)."""
    try:
        import imagej  # noqa: F401
        import scyjava
    except ImportError as e:
        raise EngineUnavailable(f"pyimagej is not installed: {e}") from e
    if not drop_imglyb:
        return
    eps = scyjava.config.endpoints
    eps[:] = [e for e in eps if not e.startswith("net.imglib2:imglib2-imglyb")]
