"""What a macro leaves behind in ImageJ 1, as plain Python data, and the
per-run reset that keeps runs from leaking into each other.

Shared by both engines (PyImageJ's legacy layer has the same ``ij.*`` classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from .base import ImageInfo, MacroError, Roi
from .transfer import J, from_imageplus

__all__ = ["ImageJState", "read_log", "read_rois", "read_tables", "roi_to_python"]


def read_log() -> str:
    return str(J("ij.IJ").getLog() or "")


# -- tables ----------------------------------------------------------------------


def _column(rt: Any, heading: str) -> np.ndarray:
    n = int(rt.size())
    if heading == "Label":
        return np.array([str(rt.getLabel(i) or "") for i in range(n)], dtype=object)
    idx = int(rt.getColumnIndex(heading))
    values = rt.getColumnAsDoubles(idx) if idx >= 0 else None
    nums = np.array(values, dtype=np.float64) if values is not None else np.full(n, np.nan)
    if n and np.isnan(nums).all():
        texts = [rt.getStringValue(idx, i) for i in range(n)] if idx >= 0 else []
        strs = [None if s is None else str(s) for s in texts]
        if any(s not in (None, "", "NaN") for s in strs):
            return np.array(strs, dtype=object)
    return nums


def table_columns(rt: Any) -> dict[str, np.ndarray]:
    """A ResultsTable as {column: 1-D array}; text columns are object arrays."""
    headings = [str(h) for h in (rt.getHeadings() or [])]
    return {h: _column(rt, h) for h in headings if h.strip() and h != " "}


def read_tables(emptied: Iterable[str] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Every ResultsTable: the system one as "Results", others by window title.
    ``emptied``: titles of table windows the reset kept, emptied: left out
    while they are still empty and without columns (as ImageJ's own
    ``saveAs`` leaves such a table out): the run did not fill them."""
    RT, WM = J("ij.measure.ResultsTable"), J("ij.WindowManager")
    tables: dict[str, dict[str, np.ndarray]] = {}
    system = RT.getResultsTable()
    if system is not None and (system.size() > 0 or system.getLastColumn() >= 0):
        tables["Results"] = table_columns(system)
    emptied = set(emptied)
    for title in [str(t) for t in (WM.getNonImageTitles() or [])]:
        if title in ("Log", "Results") or title in tables:
            continue
        rt = RT.getResultsTable(title)
        if rt is not None:
            if title in emptied and rt.size() == 0 and rt.getLastColumn() < 0:
                continue
            tables[title] = table_columns(rt)
    return tables


# -- ROIs --------------------------------------------------------------------------


def roi_to_python(roi: Any, name: Optional[str] = None) -> Roi:
    data = J("ij.io.RoiEncoder").saveAsByteArray(roi)
    raw = np.asarray(data, dtype=np.int8).tobytes() if data is not None else b""
    fp = roi.getFloatPolygon()
    n = int(fp.npoints)
    coords = np.empty((n, 2), dtype=float)
    if n:
        coords[:, 0] = np.asarray(fp.xpoints, dtype=np.float32)[:n]
        coords[:, 1] = np.asarray(fp.ypoints, dtype=np.float32)[:n]
    c, z, t = int(roi.getCPosition()), int(roi.getZPosition()), int(roi.getTPosition())
    if (c, z, t) == (0, 0, 0) and int(roi.getPosition()) > 0:
        z = int(roi.getPosition())
    return Roi(
        name=str(name or roi.getName() or ""),
        type=str(roi.getTypeAsString()).lower(),
        data=raw,
        coordinates=coords,
        position=(c, z, t),
    )


def read_rois(images: Iterable[tuple[str, Any]] = ()) -> list[Roi]:
    """The ROI Manager's ROIs, then each image's own selection."""
    out = []
    rm = J("ij.plugin.frame.RoiManager").getRawInstance()
    if rm is not None:
        for i, roi in enumerate(rm.getRoisAsArray() or []):
            out.append(roi_to_python(roi, str(roi.getName() or f"roi{i + 1}")))
    for title, imp in images:
        roi = imp.getRoi()
        if roi is not None:
            out.append(roi_to_python(roi, str(roi.getName() or f"{title} selection")))
    return out


# -- ImageJ's global state ----------------------------------------------------------


@dataclass
class _Settings:
    measurements: int
    precision: int
    black_background: bool
    do_scaling: bool


class ImageJState:
    """Open images, tables, ROI Manager, Log and a few global settings,
    reset before each run unless kept.

    Images a run leaves open are held here (``retained``) between runs, out
    of ImageJ's batch-mode table: batch mode must be off between runs, or the
    live display windows would not show.
    """

    #: table windows kept (emptied) from one run to the next, at most
    KEPT_TABLES = 8

    def __init__(self, quiet_windows: bool = False) -> None:
        self.retained: list[Any] = []
        self.protected_ids: set[int] = set()  # live display windows: never touched
        #: titles of table windows the last reset emptied and kept (see :meth:`reset`)
        self.emptied_tables: list[str] = []
        #: the screen is the engine's own (a private Xvfb nobody sees): the
        #: text windows kept between runs (Log, Results, tables) stop drawing
        #: (see :func:`_quiet`)
        self.quiet_windows = quiet_windows
        self._defaults = self._settings()
        self.ensure_roi_manager()

    @staticmethod
    def _settings() -> _Settings:
        Analyzer, Prefs, IC = J("ij.plugin.filter.Analyzer"), J("ij.Prefs"), J("ij.process.ImageConverter")
        return _Settings(
            int(Analyzer.getMeasurements()), int(Analyzer.getPrecision()), bool(Prefs.blackBackground),
            bool(IC.getDoScaling()),
        )

    @staticmethod
    def ensure_roi_manager() -> Any:
        """A hidden ROI Manager instance, so macros (batch mode or not) and
        Analyze Particles' ``add`` put their ROIs where we can read them.
        None when AWT is headless (the ROI Manager is a Frame)."""
        RM = J("ij.plugin.frame.RoiManager")
        rm = RM.getRawInstance()
        if rm is None and not J("java.awt.GraphicsEnvironment").isHeadless():
            rm = RM()
            rm.setVisible(False)
        return rm

    def reset(self) -> None:
        """Close images, clear tables, ROIs and the Log; restore settings."""
        IJ, RT, WM = J("ij.IJ"), J("ij.measure.ResultsTable"), J("ij.WindowManager")
        for imp in self.retained:
            _close(imp)
        self.retained = []
        for i in list(WM.getIDList() or []):
            if int(i) not in self.protected_ids:
                imp = WM.getImage(int(i))
                if imp is not None:
                    _close(imp)
        IJ.log("\\Clear")
        system = RT.getResultsTable()
        TextWindow = J("ij.text.TextWindow")
        results_win = WM.getWindow("Results") if system is not None else None
        if results_win is not None and not isinstance(results_win, TextWindow):
            results_win = None
        # windows to empty and keep (the Results window, up to KEPT_TABLES
        # table windows), emptied together in one visit to the event thread
        keep: list[tuple[Any, Any]] = [(results_win, system)] if results_win is not None else []
        titles: list[str] = []
        others: list[Any] = []  # text windows to close (unless kept)
        quiet: list[Any] = []
        for frame in list(WM.getNonImageWindows() or []):
            title = str(frame.getTitle())
            if title == "ROI Manager" or not isinstance(frame, TextWindow):
                continue
            if title == "Log":
                quiet.append(frame)
            elif title == "Results":
                if results_win is None:
                    others.append(frame)
            elif len(titles) < self.KEPT_TABLES and title not in titles and frame.getResultsTable() is not None:
                keep.append((frame, frame.getResultsTable()))
                titles.append(title)
            else:
                others.append(frame)
        emptied_ok = _empty_windows(keep, quiet if self.quiet_windows else None)
        if results_win is not None:
            kept_results = emptied_ok.pop(0)
            if not kept_results:
                others.append(results_win)
        else:
            kept_results = False
        if system is not None and not kept_results:
            system.reset()
        self.emptied_tables = [t for t, ok in zip(titles, emptied_ok) if ok]
        for (frame, _), ok in zip(keep[len(keep) - len(titles):], emptied_ok):
            if not ok:
                others.append(frame)
        for frame in others:
            frame.close(False)
        rm = self.ensure_roi_manager()
        if rm is not None:
            rm.reset()
        d = self._defaults
        J("ij.plugin.filter.Analyzer").setMeasurements(d.measurements)
        J("ij.plugin.filter.Analyzer").setPrecision(d.precision)
        J("ij.Prefs").blackBackground = d.black_background
        J("ij.process.ImageConverter").setDoScaling(d.do_scaling)

    def open_images(self) -> list[Any]:
        """Images open after a run, in creation order: batch-mode ones and
        shown ones, except the live display windows."""
        Interpreter, WM = J("ij.macro.Interpreter"), J("ij.WindowManager")
        seen: dict[int, Any] = {}
        for i in list(Interpreter.getBatchModeImageIDs() or []):
            imp = Interpreter.getBatchModeImage(int(i))
            if imp is not None:
                seen[int(i)] = imp
        for i in list(WM.getIDList() or []):
            if int(i) not in self.protected_ids and int(i) not in seen:
                imp = WM.getImage(int(i))
                if imp is not None:
                    seen[int(i)] = imp
        return [seen[k] for k in sorted(seen, reverse=True)]  # ids are negative, decreasing

    def end_batch_mode(self, imps: list[Any]) -> None:
        """Take the run's images out of the batch-mode table and switch batch mode off."""
        Interpreter = J("ij.macro.Interpreter")
        for imp in list(Interpreter.getBatchModeImageIDs() or []):
            found = Interpreter.getBatchModeImage(int(imp))
            if found is not None:
                Interpreter.removeBatchModeImage(found)
        Interpreter.batchMode = False
        self.retained = [imp for imp in imps if not _is_closed(imp)]

    def kept_images(self) -> list[Any]:
        """keep_state: the previous run's images (still open), for the next run."""
        return [imp for imp in self.retained if not _is_closed(imp) and imp.getWindow() is None]


def _empty_windows(windows: list[tuple[Any, Any]], quiet: Optional[list[Any]] = None) -> list[bool]:
    """Empty each ``(window, table)``: reset the table and clear the window,
    keeping the window: ImageJ would build the Results window anew (~10 ms)
    for the next run's first measurement, and a macro's ``Table.create``
    would build a table window and wait up to 200 ms for it to come to the
    front (ImageJ's ``Functions.resetTable``), about 20 ms a run on a
    virtual display. Done on the event thread, which paints the windows
    from their tables (emptying them elsewhere raced that repaint:
    TextCanvas exceptions), in one visit. ``quiet``: also make these
    windows, and the emptied ones, stop drawing (:func:`_quiet`). One flag
    per window: False where it could not be emptied (close it then)."""
    done = [False] * len(windows)
    if not windows and not quiet:
        return done

    def run() -> None:
        for i, (win, rt) in enumerate(windows):
            try:
                rt.reset()
                win.getTextPanel().clear()
                done[i] = True
            except Exception:  # pragma: no cover - then the window is closed as before
                pass
        if quiet is not None:
            for win in [*quiet, *(w for (w, _), ok in zip(windows, done) if ok)]:
                _quiet(win)

    try:
        on_event_thread(run)
    except Exception:  # pragma: no cover - defensive
        pass
    return done


def _quiet(win: Any) -> None:
    """Stop a text window from drawing, on a screen nobody sees: its text
    area and scroll bars are hidden, so ImageJ's updates (every row a
    macro adds to Results, every ``print``) queue no repaint: on the
    engine's Xvfb these repaints cost the event thread and the X server
    ~5 ms a run of the nuclei macro. The window itself stays open and
    showing (``selectWindow``, ``isOpen``, the Log's and the tables' text
    are unchanged); ImageJ's TextPanel keeps its text whether it draws or
    not. On the event thread."""
    try:
        for c in win.getTextPanel().getComponents():
            if c.isVisible():
                c.setVisible(False)
    except Exception:  # pragma: no cover - a window that still draws costs only time
        pass


def on_event_thread(fn: Any) -> None:
    """Run ``fn()`` on AWT's event thread and wait for it (at once when this
    is that thread)."""
    EventQueue = J("java.awt.EventQueue")
    if EventQueue.isDispatchThread():
        fn()
        return
    EventQueue.invokeAndWait(_runnable(fn))


def _runnable(fn: Any) -> Any:
    from jpype import JImplements, JOverride

    global _Call
    if _Call is None:
        @JImplements("java.lang.Runnable")
        class Call:
            def __init__(self, fn: Any) -> None:
                self.fn = fn

            @JOverride
            def run(self) -> None:
                self.fn()

        _Call = Call
    return _Call(fn)


_Call: Any = None


def collect_images(
    imps: list[Any], outputs: Optional[list[str]] = None
) -> tuple[dict[str, np.ndarray], dict[str, ImageInfo], list[tuple[str, Any]]]:
    """Pixels and metadata of ``imps`` (or of the ones titled in ``outputs``).

    Duplicate titles get `` [2]``, `` [3]``... suffixes.
    """
    named: list[tuple[str, Any]] = []
    counts: dict[str, int] = {}
    for imp in imps:
        title = str(imp.getTitle())
        counts[title] = counts.get(title, 0) + 1
        named.append((title if counts[title] == 1 else f"{title} [{counts[title]}]", imp))
    if outputs is not None:
        by_title = dict(named)
        missing = [t for t in outputs if t not in by_title]
        if missing:
            raise MacroError(
                f"output image(s) {missing} not open after the macro; open: {[t for t, _ in named]}",
                kind="argument",
            )
        named = [(t, by_title[t]) for t in outputs]
    images, infos = {}, {}
    for title, imp in named:
        arr, info = from_imageplus(imp, title)
        images[title], infos[title] = arr, info
    return images, infos, named


def _is_closed(imp: Any) -> bool:
    try:
        return imp.getProcessor() is None
    except Exception:  # pragma: no cover - defensive
        return True


def _close(imp: Any) -> None:
    try:
        imp.changes = False
        if imp.getWindow() is not None:
            imp.close()
        else:
            imp.flush()
    except Exception:  # pragma: no cover - defensive
        pass
