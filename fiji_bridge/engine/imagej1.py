"""The ImageJ 1 engine: an ij.jar in a JPype JVM, macros as data, no dialogs.

``ImageJ1Engine`` puts together the pieces of this package:

* :mod:`.java` finds Java and the ij.jar and starts the JVM offline;
* :mod:`.xvfb` gives AWT a private screen when there is no DISPLAY;
* :mod:`.transfer` moves pixels in bulk (numpy <-> ImagePlus);
* :mod:`.runner` runs a macro on a ``Run$_`` thread and turns every dialog,
  error and hang into a :class:`MacroError`;
* :mod:`.collect` reads images, tables, ROIs and the Log, and resets ImageJ
  between runs;
* :mod:`.display` keeps live hyperstack windows and renders them.

The PyImageJ engine (:mod:`.pyimagej`) reuses all of it over Fiji's legacy layer.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..components import Calibration
from .base import DIMS, Engine, EngineError, ImageLike, MacroError, MacroResult
from .collect import ImageJState, collect_images, read_log, read_rois, read_tables
from .display import LiveDisplay
from .fiji import plugin_classpath
from .java import fiji_of_ij_jar, find_ij_jar, start_jvm
from .params import apply_args, inject_dialog_options
from .runner import MacroRunner, RunRecord
from .transfer import J, normalize_image, to_imageplus
from .xvfb import VirtualDisplay

__all__ = ["ImageJ1Engine", "macro_variable", "read_macro"]


def macro_variable(interp: Any, param: Any) -> Any:
    """The value of an ImageJ macro variable after a run, typed by its
    ``#@output`` declaration (numbers, booleans; anything else as a string)."""
    name = param.name
    try:
        if param.kind in ("int", "float"):
            v = float(interp.getVariable(name))
            return int(v) if param.kind == "int" and v.is_integer() else v
        if param.kind == "boolean":
            text = interp.getStringVariable(name)
            return str(text).lower() == "true" if text is not None else bool(interp.getVariable(name))
        text = interp.getStringVariable(name)
        if text is None:
            v = float(interp.getVariable(name))
            return int(v) if v.is_integer() else v
        return str(text)
    except Exception as e:
        raise MacroError(f"output {name}: the macro did not set it ({e})", kind="argument") from None


def read_macro(code_or_path: Union[str, Path]) -> str:
    """Macro source from a path (a ``Path``, or a one-line string naming an
    existing ``.ijm``/``.txt`` file) or the string itself."""
    if isinstance(code_or_path, Path):
        return code_or_path.read_text()
    text = str(code_or_path)
    if "\n" not in text and text.strip().lower().endswith((".ijm", ".txt", ".mac")):
        p = Path(text.strip()).expanduser()
        if p.is_file():
            return p.read_text()
        raise MacroError(f"macro file not found: {p}", kind="argument")
    return text


class ImageJ1Engine(Engine):
    """ImageJ 1.x from an ij.jar (Debian's, a Fiji.app's or FIJI_BRIDGE_IJ_JAR).

    ``display``: show live stacks as windows on the DISPLAY (the real one, or
    the private Xvfb started when there is none). ``xvfb``: ``None`` = start
    a private Xvfb only when DISPLAY is unset; True/False force it.
    """

    name = "imagej1"

    def __init__(
        self,
        ij_jar: Optional[Union[str, Path]] = None,
        display: bool = False,
        xvfb: Optional[bool] = None,
        java_options: Sequence[str] = (),
    ) -> None:
        self.ij_jar = Path(ij_jar) if ij_jar else None
        self.display = display
        self.xvfb = xvfb
        self.java_options = list(java_options)
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._xvfb: Optional[VirtualDisplay] = None
        self._runner: Optional[MacroRunner] = None
        self._state: Optional[ImageJState] = None
        self._display: Optional[LiveDisplay] = None
        self.fiji_dir: Optional[Path] = None  # the Fiji.app whose ij.jar and plugins run here

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "ImageJ1Engine":
        with self._lock:
            if self._closed:
                raise EngineError("this engine was closed; a JVM cannot be restarted in one process")
            if self._started:
                return self
            self._start_jvm()
            self._init_imagej()
            self._started = True
            return self

    def _start_display(self) -> None:
        self._launch_display()
        self._await_display()

    def _launch_display(self) -> None:
        """Start the private Xvfb (when wanted) without waiting for it."""
        want = self.xvfb if self.xvfb is not None else not os.environ.get("DISPLAY")
        if want:
            self._xvfb = VirtualDisplay()
            self._xvfb.launch()

    def _await_display(self) -> None:
        if self._xvfb is not None:
            os.environ["DISPLAY"] = self._xvfb.wait()  # before AWT reads it (_init_imagej)

    def _start_jvm(self) -> None:
        jar = self.ij_jar or find_ij_jar()
        classpath, options = [jar], list(self.java_options)
        fiji = fiji_of_ij_jar(jar)
        if fiji is not None:
            # a Fiji's ij.jar: its plugins/ and jars/ too, so pure ImageJ 1
            # plugins (Auto Threshold, ...) run without ImageJ2
            classpath = [jar, *(j for j in plugin_classpath(fiji) if j != jar)]
            options = [f"-Dplugins.dir={fiji}", f"-Dij.dir={fiji}", *options]
        self.fiji_dir = fiji
        self._launch_display()  # Xvfb comes up while the JVM starts (no AWT before _init_imagej)
        start_jvm(classpath, options, scyjava_start=False)  # local jars, no scyjava callbacks: JPype starts it
        self._await_display()

    def _init_imagej(self) -> None:
        """ImageJ's hidden main instance (error reporting and macros need one)
        and the run machinery."""
        IJ, ImageJ = J("ij.IJ"), J("ij.ImageJ")
        if IJ.getInstance() is None and not J("java.awt.GraphicsEnvironment").isHeadless():
            ImageJ(ImageJ.NO_SHOW)
        self._runner = MacroRunner()
        # on the engine's private Xvfb nobody sees a window: text windows need not draw
        self._state = ImageJState(quiet_windows=self._xvfb is not None)
        self._display = LiveDisplay(self.display, self._state.protected_ids)

    def _read_log(self) -> str:
        """The Log of the run that just ended."""
        return read_log()

    def close(self) -> None:
        """Close windows, images and tables. The private Xvfb stays up until the
        process exits (after the JVM): AWT keeps its X connection for the JVM's
        lifetime and would take the process down if the server vanished."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._started:
                if self._xvfb:
                    self._xvfb.stop()
                return
            try:
                if self._display:
                    self._display.close_all()
                if self._state:
                    self._state.reset()
                for w in J("java.awt.Window").getWindows():
                    if w.isDisplayable():
                        w.dispose()
                # ImageJ's shared filter pool (Gaussian Blur...) has non-daemon
                # threads that keep the JVM, and so the process, alive for minutes
                pool = J("ij.util.ThreadUtil").threadPoolExecutor
                if pool is not None:
                    pool.shutdown()
            except Exception:  # pragma: no cover - closing must not fail
                pass

    @property
    def version(self) -> str:
        self._require_started()
        return str(J("ij.IJ").getVersion())

    @property
    def imagej1_version(self) -> str:
        """ImageJ 1's own version (``"1.54f"``), also under Fiji's legacy layer."""
        self._require_started()
        return str(J("ij.ImageJ").VERSION)

    def status(self) -> dict[str, Any]:
        """What runs here: engine kind, versions, display."""
        self._require_started()
        return {
            "engine": self.name,
            "version": self.version,
            "imagej1": self.imagej1_version,
            "display": self.display_name,
            "headless": bool(J("java.awt.GraphicsEnvironment").isHeadless()),
            "fiji": str(self.fiji_dir) if self.fiji_dir else None,
        }

    def open_dialogs(self) -> list[str]:
        """Titles of dialogs showing now (a run must leave none)."""
        Dialog = J("java.awt.Dialog")
        return [str(w.getTitle()) for w in J("java.awt.Window").getWindows() if w.isShowing() and isinstance(w, Dialog)]

    @property
    def broken(self) -> Optional[str]:
        """Why this engine cannot run macros any more (None if it can)."""
        return self._runner.broken if self._runner else None

    @property
    def display_name(self) -> Optional[str]:
        """The X display ImageJ draws on (``":3"``), None when headless."""
        return os.environ.get("DISPLAY")

    def _require_started(self) -> None:
        if self._closed:
            raise EngineError("engine closed")
        if not self._started:
            raise EngineError("engine not started: call start() or use `with open_engine() as ij:`")

    # -- macros -------------------------------------------------------------------------

    def run_macro(
        self,
        code_or_path: Union[str, Path],
        image: Optional[ImageLike] = None,
        dims: str = DIMS,
        args: Optional[Union[str, Mapping[str, Any]]] = None,
        dialog_options: Optional[str] = None,
        timeout: Optional[float] = 60,
        *,
        title: Optional[str] = None,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
        outputs: Optional[list[str]] = None,
        keep_state: bool = False,
    ) -> MacroResult:
        code, argument = apply_args(read_macro(code_or_path), args)
        if dialog_options:
            code = inject_dialog_options(code, dialog_options)
        hs = normalize_image(image, dims, channel_names, calibration) if image is not None else None
        return self._run(code, argument, hs, dialog_options, timeout, title, outputs, keep_state)

    def _run(
        self,
        code: str,
        argument: str,
        hs: Any,
        dialog_options: Optional[str],
        timeout: Optional[float],
        title: Optional[str],
        outputs: Optional[list[str]],
        keep_state: bool,
        variables: Sequence[Any] = (),
    ) -> MacroResult:
        """One macro run on the runner; ``variables``: ``#@output``
        parameters whose values are read from the interpreter afterwards."""
        with self._lock:
            self._require_started()
            assert self._runner and self._state
            if self._runner.broken:
                raise MacroError(self._runner.broken, kind="engine")
            state = self._state
            kept = state.kept_images() if keep_state else []
            if not keep_state:
                state.reset()
            imp = None
            if hs is not None:
                imp = to_imageplus(hs.array, title or "image", hs.channel_names, hs.calibration)
            record = RunRecord(code, argument, imp, dialog_options, kept_images=kept)
            try:
                elapsed = self._runner.run(record, timeout)
                imps = state.open_images()
                images, infos, named = collect_images(imps, outputs)
                result = MacroResult(
                    images=images,
                    image_info=infos,
                    tables=read_tables(state.emptied_tables),
                    log=self._read_log(),
                    rois=read_rois(named),
                    elapsed=elapsed,
                    notes=list(hs.notes) if hs else [],
                    outputs={p.name: macro_variable(record.interp, p) for p in variables},
                )
            finally:
                if not self._runner.broken:
                    state.end_batch_mode(state.open_images())
            return result

    def open_image(self, path: Union[str, Path], series: int = 0, timeout: Optional[float] = 300) -> MacroResult:
        """Open ``path`` with ImageJ 1's own readers (``open()``); multi-series
        and OME dimensions need Fiji's Bio-Formats (the Fiji engine)."""
        p = Path(os.path.expanduser(str(path))).resolve()
        if not p.is_file():
            raise MacroError(f"image file not found: {p}", kind="argument")
        if series:
            raise MacroError("series other than the first need Bio-Formats: use the Fiji engine", kind="argument")
        literal = str(p).replace("\\", "\\\\").replace('"', '\\"')
        return self.run_macro(f'open("{literal}");', timeout=timeout)

    # -- scripts ---------------------------------------------------------------------------------

    def run_script(
        self,
        code_or_path: Union[str, Path],
        language: Optional[str] = None,
        inputs: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = 60,
        *,
        image: Optional[ImageLike] = None,
        dims: str = DIMS,
        title: Optional[str] = None,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
        dialog_options: Optional[str] = None,
    ) -> MacroResult:
        """Run a script with ``#@`` inputs and ``#@output`` outputs (see
        :mod:`.scripts`); ``result.outputs`` maps output names to values.
        ImageJ 1 runs ImageJ macros only; other languages need Fiji."""
        from ..macros import parse_parameters
        from .scripts import IJM, language_of, read_script

        code, ext = read_script(code_or_path)
        lang = language_of(language, ext)
        hs = normalize_image(image, dims, channel_names, calibration) if image is not None else None
        if lang != IJM:
            return self._run_other_script(code, lang, dict(inputs or {}), timeout, hs, title)
        try:
            variables = [p for p in parse_parameters(code) if p.io in ("output", "both")]
        except ValueError as e:
            raise MacroError(str(e), getattr(e, "line", None), kind="argument") from None
        bound, argument = apply_args(code, dict(inputs or {}))
        if dialog_options:
            bound = inject_dialog_options(bound, dialog_options)
        return self._run(bound, argument, hs, dialog_options, timeout, title, None, False, variables)

    def _run_other_script(
        self, code: str, language: str, inputs: dict, timeout: Optional[float], hs: Any, title: Optional[str]
    ) -> MacroResult:
        raise MacroError(
            f"the ImageJ 1 engine runs ImageJ macros (.ijm) only; {language!r} scripts need Fiji: "
            "point the bridge at a Fiji.app (FIJI_BRIDGE_IMAGEJ=/path/to/Fiji.app or --imagej)",
            kind="argument",
        )

    # -- live display -----------------------------------------------------------------------

    def show_stack(
        self,
        key: str,
        array: np.ndarray,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        with self._lock:
            self._require_started()
            assert self._display
            self._display.show_stack(key, array, channel_names, calibration)

    def update_plane(self, key: str, t: int, z: int, c: int, plane: np.ndarray) -> None:
        with self._lock:
            self._require_started()
            assert self._display
            self._display.update_plane(key, t, z, c, plane)

    def update_planes(
        self,
        key: str,
        shape: Sequence[int],
        positions: Sequence[Sequence[int]],
        planes: np.ndarray,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
        fresh: bool = False,
        ranges: Optional[Sequence[Optional[Sequence[float]]]] = None,
    ) -> None:
        """Streaming update of a live stack: bring it to ``shape`` (TZCYX) and
        write ``planes[i]`` at ``positions[i]`` = (t, z, c), in place (see
        :meth:`LiveDisplay.update_planes`; ``ranges[i]``: plane i's (min,
        max) when known). Not part of :class:`Engine`: an optional fast path
        the bridge uses when an engine has it."""
        with self._lock:
            self._require_started()
            assert self._display
            self._display.update_planes(key, shape, positions, planes, channel_names, calibration, fresh, ranges)

    def sync_windows(self, limit: Optional[int] = None) -> int:
        """Show, rebuild or redraw the live windows that are due (see
        :meth:`LiveDisplay.sync_windows`); how many were done."""
        with self._lock:
            return self._display.sync_windows(limit) if self._display else 0

    @property
    def windows_due(self) -> bool:
        return bool(self._display and self._display.windows_due)

    def close_stack(self, key: str) -> None:
        with self._lock:
            self._require_started()
            assert self._display
            self._display.close_stack(key)

    def render(self, key_or_array: Union[str, np.ndarray], **kw: Any) -> np.ndarray:
        """RGB uint8 (Y, X, 3) of a live stack or a TZCYX array, as ImageJ draws
        it; keywords: ``montage``, ``t``, ``z``, ``channel_names``."""
        with self._lock:
            self._require_started()
            assert self._display
            return self._display.render(key_or_array, **kw)

    @property
    def stacks(self) -> list[str]:
        """Keys of the live stacks."""
        return list(self._display.stacks) if self._display else []
