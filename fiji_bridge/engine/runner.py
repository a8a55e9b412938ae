"""Running one ImageJ 1 macro: on a ``Run$_`` thread, with no dialog left open.

How a run goes:

* The macro runs on a fresh Java thread named ``Run$_fiji_bridge_<n>``: ImageJ
  hands ``Macro.getOptions()`` (the ``dialog_options``) only to such threads,
  so a macro's own ``Dialog.show()`` runs unattended when options are given.
* It runs as a *called* macro (``Interpreter.run(code, arg)``) in batch mode
  that we switch on ourselves: unlike ``runBatchMacro`` this keeps every image
  the macro opened in the batch-mode image table after the run, for
  collection (``runBatchMacro`` keeps only the current one).
* :class:`DialogGuard`, an AWT event listener, watches every window that opens
  while a run is active. A dialog (ImageJ's "Macro Error", ``exit("...")``'s
  message, ``waitForUser``, a command's GenericDialog that got no options,
  "There are no images open" ...) or ImageJ's "Exception" window is read,
  closed (cancelled) and recorded as the run's error, and the interpreter is
  aborted. Nothing modal stays open, so the thread always gets to finish:
  a dialog closed before its thread began to wait in it (AWT's modal loop,
  WaitForUserDialog's monitor) is closed again on each poll until the thread
  has gone on (:func:`_release`).
* Past ``timeout`` the interpreter is aborted, the thread interrupted, and as
  a last resort stopped (``Thread.stop``, still available in Java 17). If it
  survives even that, the engine is marked broken: only a new process helps.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

from .base import MacroError, MacroTimeout
from .transfer import J

__all__ = ["DialogGuard", "MacroRunner", "RunRecord", "stop_interpreter", "window_text"]

_log = logging.getLogger(__name__)
_counter = itertools.count(1)

#: seconds to wait for a thread after abort/interrupt before stopping it
GRACE = 2.0


@dataclass
class Captured:
    """A window that opened during a run and was closed by the guard."""

    kind: str  # "dialog", "exit", "exception", "syntax", "command"
    title: str
    text: str


@dataclass
class RunRecord:
    """What happened in one run (filled partly from the Java thread)."""

    code: str
    argument: str
    image: Any = None
    dialog_options: Optional[str] = None
    #: images of an earlier run kept open (keep_state), put back before ``image``
    kept_images: list[Any] = field(default_factory=list)
    interp: Any = None
    throwable: Optional[str] = None
    error_message: Optional[str] = None
    line: Optional[int] = None
    captured: list[Captured] = field(default_factory=list)
    #: the windows the guard closed in this run (released again by each sweep: :func:`_release`)
    closed: list[Any] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def _field(obj: Any, name: str) -> Any:
    """A (possibly non-public) field of a Java object, through reflection."""
    cls = obj.getClass()
    while cls is not None:
        try:
            f = cls.getDeclaredField(name)
            f.setAccessible(True)
            return f.get(obj)
        except Exception:
            cls = cls.getSuperclass()
    return None


def stop_interpreter(interp: Any) -> None:
    """Make the interpreter stop at its next statement, without waiting
    (``Interpreter.abort`` sleeps, which must not happen on the event thread)."""
    try:
        f = interp.getClass().getDeclaredField("done")
        f.setAccessible(True)
        f.setBoolean(interp, True)
    except Exception:  # pragma: no cover - defensive
        _log.exception("could not stop the interpreter")


def window_text(window: Any) -> str:
    """The visible text of an AWT window: labels, text fields/areas, ImageJ's
    MultiLineLabel, a TextWindow's panel."""
    parts: list[str] = []
    try:
        if isinstance(window, J("ij.text.TextWindow")):
            return str(window.getTextPanel().getText() or "")
    except Exception:  # pragma: no cover - defensive
        pass
    Container = J("java.awt.Container")
    kinds = [
        (J("java.awt.Label"), lambda c: c.getText()),
        (J("java.awt.TextComponent"), lambda c: c.getText()),
        (J("java.awt.Checkbox"), lambda c: c.getLabel()),
        (J("java.awt.Choice"), lambda c: c.getSelectedItem()),
        (J("ij.gui.MultiLineLabel"), lambda c: "\n".join(str(s) for s in (_field(c, "lines") or []) if s)),
    ]

    def walk(c: Any) -> None:
        for klass, get in kinds:
            if isinstance(c, klass):
                try:
                    text = get(c)
                    if text:
                        parts.append(str(text))
                except Exception:  # pragma: no cover - defensive
                    pass
        if isinstance(c, Container):
            for child in c.getComponents():
                walk(child)

    walk(window)
    return "\n".join(p.strip() for p in parts if p.strip())


def _release(w: Any) -> None:
    """Let a thread still blocked in a window the guard closed go on.

    A modal dialog shown from the macro thread can be closed before that
    thread's ``Dialog.show`` has made its modal loop: AWT's close then finds
    no loop to end, and the thread enters one that nothing ends (seen here
    about once in 150 dialog runs, a macro held to its timeout). Hiding the
    closed dialog again ends the loop it is in by now (``Dialog.hide`` exits
    the loop of an invisible, disposed dialog too). ImageJ's
    WaitForUserDialog waits on a monitor instead, which a ``close()``
    before the wait would leave waiting: it gets another ``close()``."""
    try:
        if isinstance(w, J("ij.gui.WaitForUserDialog")):
            w.close()
        if isinstance(w, J("java.awt.Dialog")):
            w.setVisible(False)
    except Exception:  # pragma: no cover - defensive
        pass


def _close_window(w: Any) -> None:
    """Cancel and dispose a window: a GenericDialog reads WINDOW_CLOSING as
    Cancel; ImageJ's WaitForUserDialog and TextWindow have their own close()
    (WaitForUserDialog waits on a monitor that only close() notifies)."""
    WindowEvent = J("java.awt.event.WindowEvent")
    try:
        w.dispatchEvent(WindowEvent(w, WindowEvent.WINDOW_CLOSING))
    except Exception:  # pragma: no cover - defensive
        pass
    try:
        if isinstance(w, (J("ij.gui.WaitForUserDialog"), J("ij.text.TextWindow"))):
            w.close()
        if w.isDisplayable():
            w.dispose()
    except Exception:  # pragma: no cover - defensive
        pass


class DialogGuard:
    """Closes every dialog (and ImageJ's "Exception" window) that opens
    while a run is active, and records it as that run's error."""

    def __init__(self) -> None:
        from jpype import JImplements, JOverride

        self.run: Optional[RunRecord] = None
        self._lock = threading.Lock()
        guard = self

        @JImplements("java.awt.event.AWTEventListener")
        class _Listener:
            @JOverride
            def eventDispatched(self, event: Any) -> None:  # on the AWT event thread
                try:
                    if event.getID() == J("java.awt.event.WindowEvent").WINDOW_OPENED:
                        guard.handle(event.getWindow())
                except Exception:  # never let Python errors reach the EDT
                    _log.exception("dialog guard failed")

        self._listener = _Listener()
        Toolkit, AWTEvent = J("java.awt.Toolkit"), J("java.awt.AWTEvent")
        Toolkit.getDefaultToolkit().addAWTEventListener(self._listener, AWTEvent.WINDOW_EVENT_MASK)

    @staticmethod
    def is_blocking(w: Any) -> bool:
        """A window that needs a user (a dialog) or reports a Java exception."""
        if isinstance(w, J("java.awt.Dialog")):
            return True
        return isinstance(w, J("ij.text.TextWindow")) and str(w.getTitle()) == "Exception"

    def handle(self, w: Any) -> bool:
        """Close ``w`` if a run is active and it is blocking; True if handled."""
        with self._lock:
            run = self.run
            if run is None or not self.is_blocking(w) or not w.isShowing():
                return False
            title = str(w.getTitle() or "")
            text = window_text(w)
            if isinstance(w, J("ij.text.TextWindow")):
                kind = "exception"
            elif isinstance(w, J("ij.gui.MessageDialog")) and title == "Macro":
                kind = "exit"  # exit("...") shows its message in a "Macro" MessageDialog
            else:
                kind = "dialog"
            run.captured.append(Captured(kind, title, text))
            run.closed.append(w)
        _close_window(w)
        if run.interp is not None and kind != "exit":
            stop_interpreter(run.interp)
        return True

    def sweep(self, wait: Optional[float] = None) -> None:
        """Close blocking windows the listener may have missed (polling
        fallback), and release the run's thread from the ones closed before
        (:func:`_release`).

        Runs on the AWT event thread: closing a window from another thread can
        deadlock against the event queue. ``wait``: block (up to that many
        seconds) until the sweep ran; since the event thread works in order,
        every window event queued before it has then been handled too.
        """
        done = threading.Event() if wait is not None else None
        J("java.awt.EventQueue").invokeLater(_sweep_class()(self, done))
        if done is not None:
            done.wait(wait)


@lru_cache(maxsize=None)
def _sweep_class() -> Any:
    """The Runnable that sweeps on the event thread (a JPype proxy class,
    built once: making one costs about a millisecond)."""
    from jpype import JImplements, JOverride

    @JImplements("java.lang.Runnable")
    class _Sweep:
        def __init__(self, guard: DialogGuard, done: Optional[threading.Event]) -> None:
            self.guard, self.done = guard, done

        @JOverride
        def run(self) -> None:
            try:
                for w in J("java.awt.Window").getWindows():
                    if w.isShowing():
                        self.guard.handle(w)
                run = self.guard.run
                for w in list(run.closed) if run is not None else ():
                    _release(w)
            except Exception:  # pragma: no cover - defensive
                _log.exception("dialog sweep failed")
            finally:
                if self.done is not None:
                    self.done.set()

    return _Sweep


@lru_cache(maxsize=None)
def _task_class() -> Any:
    """The Runnable a ``Run$_`` thread runs: one macro (built once)."""
    from jpype import JImplements, JOverride

    Interpreter, Macro, WindowManager = J("ij.macro.Interpreter"), J("ij.Macro"), J("ij.WindowManager")

    @JImplements("java.lang.Runnable")
    class _Task:
        def __init__(self, record: RunRecord) -> None:
            self.record = record

        @JOverride
        def run(self) -> None:  # on the Run$_ thread
            record = self.record
            try:
                interp = record.interp
                if record.dialog_options:
                    Macro.setOptions(record.dialog_options)
                Interpreter.batchMode = True
                current = None
                for imp in [*record.kept_images, record.image]:
                    if imp is not None:
                        Interpreter.addBatchModeImage(imp)
                        current = imp
                if current is not None:
                    WindowManager.setTempCurrentImage(current)
                interp.run(record.code, record.argument)
            except Exception as e:  # Java exceptions arrive as Python exceptions
                record.throwable = _describe(e)
            finally:
                try:
                    record.error_message = _str_or_none(record.interp.getErrorMessage())
                    record.line = int(record.interp.getLineNumber())
                    Macro.setOptions(None)
                    WindowManager.setTempCurrentImage(None)
                except Exception:  # pragma: no cover - defensive
                    pass
                # the Java thread keeps this proxy (and JPype its Python
                # side) until a Java GC finds the thread gone: holding the
                # record until then would keep the run's input image and
                # interpreter alive through young collections (copied to the
                # old generation, ~1 ms of GC a run)
                self.record = None
                record.done.set()

    return _Task


class MacroRunner:
    """Runs macros one at a time on ``Run$_`` threads, guarded against dialogs."""

    def __init__(self) -> None:
        self.guard = DialogGuard()
        self.broken: Optional[str] = None

    def flush_events(self, timeout: float = 1.0) -> None:
        """Let the AWT event thread process what is queued (window-opened
        events), sweeping for blocking windows on the way."""
        self.guard.sweep(wait=timeout)

    def run(self, record: RunRecord, timeout: Optional[float]) -> float:
        """Run ``record.code``; raise :class:`MacroError` on failure. Returns elapsed s.

        The input image (and kept images) are put in the batch-mode table and
        made current on the macro thread. Batch mode stays on after the run;
        the caller collects the images and then ends it.
        """
        if self.broken:
            raise MacroError(self.broken, kind="engine")
        record.interp = J("ij.macro.Interpreter")()
        thread = J("java.lang.Thread")(_task_class()(record), f"Run$_fiji_bridge_{next(_counter)}")
        thread.setDaemon(True)
        self.guard.run = record
        t0 = time.perf_counter()
        try:
            thread.start()
            deadline = None if timeout is None else t0 + float(timeout)
            polls = 0
            while not record.done.wait(0.05):
                if deadline is not None and time.perf_counter() > deadline:
                    break
                polls += 1
                # every 0.5 s in case the listener missed a window; every poll once it closed
                # one, whose thread may still be blocked in it (_release)
                if polls % 10 == 0 or record.closed:
                    self.guard.sweep()
            if not record.done.is_set():
                self._stop(thread, record, timeout)
            thread.join(int(GRACE * 1000))
            self.flush_events()  # a last sweep, after every window event of the run
        finally:
            self.guard.run = None
        elapsed = time.perf_counter() - t0
        err = interpret(record)
        if err is not None:
            raise err
        return elapsed

    def _stop(self, thread: Any, record: RunRecord, timeout: Optional[float]) -> None:
        """The run is over time: abort, interrupt, stop; mark broken if nothing works."""
        stop_interpreter(record.interp)
        self.guard.sweep()
        thread.interrupt()
        how = "aborted"
        if not record.done.wait(GRACE):
            how = "stopped"
            try:
                thread.stop()  # deprecated but present in Java 17: throws ThreadDeath there
            except Exception:  # pragma: no cover - Java 20+ throws UnsupportedOperationException
                pass
            if not record.done.wait(GRACE):
                self.broken = (
                    f"a macro ran past its timeout of {timeout} s and its thread could not be stopped; "
                    "this ImageJ is unusable: restart the engine process"
                )
                how = "unstoppable"
        record.captured.insert(0, Captured("timeout", how, f"macro ran longer than {timeout} s ({how})"))


def _describe(e: Exception) -> str:
    """A Java exception's message (or class name), a Python exception's text."""
    get = getattr(e, "getMessage", None)
    if get is None:
        return f"{type(e).__name__}: {e}"
    try:
        msg = get()
        return str(msg) if msg is not None else str(e.getClass().getName())  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - defensive
        return str(e)


def _str_or_none(s: Any) -> Optional[str]:
    return None if s is None else str(s)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def interpret(record: RunRecord) -> Optional[MacroError]:
    """Turn what happened in a run into a MacroError (None = success)."""
    log = str(J("ij.IJ").getLog() or "")
    line = record.line if record.line and record.line > 0 else None
    for cap in record.captured:
        if cap.kind == "timeout":
            return MacroTimeout(cap.text + (f"; last line {line}" if line else ""), line, log)
    if record.error_message:
        msg = record.error_message
        kind = "command" if msg.startswith("Unrecognized command") else "syntax"
        return MacroError(msg, line, log, kind)
    for cap in record.captured:
        if cap.kind == "exit":
            return MacroError(cap.text or "exit() called", line, log, "exit")
        if cap.kind == "exception":
            lines = [ln for ln in cap.text.splitlines() if ln.strip()]
            exc = next((ln.strip() for ln in lines if "Exception" in ln or "Error" in ln), _first_line(cap.text))
            return MacroError(f"exception in a plugin: {exc}", line, log + cap.text, "exception")
        if cap.kind == "dialog":
            text = " | ".join(t for t in cap.text.splitlines() if t.strip())
            hint = (
                "; the macro needs user input: pass dialog_options, or give the command its options"
                if cap.title not in ("No Image",)
                else ""
            )
            what = f"dialog {cap.title!r} opened" + (f": {text}" if text else "")
            return MacroError(what + hint, line, log, "dialog")
    if record.throwable and record.throwable != "Macro canceled":
        return MacroError(f"exception: {record.throwable}", line, log, "exception")
    return None
