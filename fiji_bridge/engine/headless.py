"""Macros on a headless Fiji (``java.awt.headless=true``): the same errors as
with a screen, or an error saying what headless cannot do.

Headless, the legacy layer changes what macros do (see the engine section of
README.md): ``print`` and ``exit("...")``'s message go to Java's stdout (there
is no Log window), a command run without its options returns unchanged, a
plugin's exception is only printed, ``roiManager``/``waitForUser`` throw
HeadlessException, ``Table.create`` tables land in "Results", and Analyze
Particles' summary and ROI Manager additions are lost. :class:`HeadlessRunner`
turns all of that back into data:

* before the run, :func:`check_headless` refuses what cannot work headless
  (ROI Manager, named tables, Analyze Particles' ``add``/``summarize``, a
  ``...`` command given no options, ``waitForUser``/``Dialog.show`` without
  dialog options) with a :class:`MacroError` of kind ``"headless"`` or
  ``"dialog"``, instead of a silent success;
* during the run, Java's ``System.out``/``System.err`` are captured: the
  Log is what ``print`` wrote, an ``exit("...")`` message becomes an
  ``"exit"`` error, a printed Java exception an ``"exception"`` error.
"""

from __future__ import annotations

import re
import sys
from typing import Optional

from .base import MacroError
from .collect import ImageJState
from .runner import MacroRunner, RunRecord
from .transfer import J

__all__ = ["HeadlessRunner", "HeadlessState", "check_headless"]

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_RUN_NO_OPTIONS = re.compile(r'\brun\s*\(\s*"([^"]+\.\.\.)"\s*\)')
_EXIT_WITH_MESSAGE = re.compile(r"\bexit\s*\(\s*[^)\s]")
_JAVA_EXCEPTION = re.compile(r"^\s*((?:[a-z]\w*\.)+\w*(?:Exception|Error))(?::\s*(.*))?$", re.M)
#: commands with "..." that run without a dialog (no options needed)
_NO_DIALOG = {"Close All...", "Set Scale...", "Properties..."}


def _code_only(code: str) -> str:
    """The macro without comments and with string literals emptied."""
    code = _COMMENTS.sub(" ", code)
    return _STRINGS.sub('""', code)


def check_headless(code: str, dialog_options: Optional[str] = None) -> None:
    """Refuse, before running, what a headless ImageJ cannot do."""
    bare = _code_only(code)
    if re.search(r"\broiManager\s*\(", bare) or 'run("ROI Manager' in code:
        raise MacroError("the ROI Manager needs a screen: headless Fiji has none (run Fiji non-headless, "
                         "the default on Linux)", kind="headless")
    if re.search(r"\bTable\s*\.\s*(create|rename)\s*\(", bare):
        raise MacroError("named tables (Table.create) need a screen: headless Fiji puts them in \"Results\" "
                         "(use the Results table, or run Fiji non-headless)", kind="headless")
    for m in re.finditer(r'\brun\s*\(\s*"Analyze Particles\.\.\."\s*,\s*"([^"]*)"', code):
        words = set(m.group(1).split())
        if words & {"add", "summarize"}:
            raise MacroError("Analyze Particles' add/summarize need the ROI Manager and a table window: "
                             "headless Fiji drops them silently (run Fiji non-headless)", kind="headless")
    if re.search(r"\bwaitForUser\s*\(", bare):
        raise MacroError("waitForUser needs a user and a screen; not available headless", kind="dialog")
    if re.search(r"\bDialog\s*\.\s*show\s*\(", bare) and not dialog_options:
        raise MacroError("Dialog.show() without dialog_options: the macro needs user input "
                         "(pass dialog_options)", kind="dialog")
    for m in _RUN_NO_OPTIONS.finditer(code):
        if m.group(1) not in _NO_DIALOG:
            raise MacroError(f'run("{m.group(1)}") without options opens a dialog; headless Fiji would skip '
                             f"the command silently: give it its options", kind="dialog")


class _Capture:
    """Java's System.out and System.err redirected into buffers for one run."""

    def __init__(self) -> None:
        System, PrintStream, BAOS = J("java.lang.System"), J("java.io.PrintStream"), J("java.io.ByteArrayOutputStream")
        self._old = (System.out, System.err)
        self._out, self._err = BAOS(), BAOS()
        System.setOut(PrintStream(self._out, True, "UTF-8"))
        System.setErr(PrintStream(self._err, True, "UTF-8"))

    def stop(self) -> tuple[str, str]:
        System = J("java.lang.System")
        System.out.flush()
        System.err.flush()
        System.setOut(self._old[0])
        System.setErr(self._old[1])
        out, err = str(self._out.toString("UTF-8")), str(self._err.toString("UTF-8"))
        if err.strip():  # keep Java's errors visible in the process's stderr too
            sys.stderr.write(err)
        return out, err


def _log_lines(out: str) -> list[str]:
    """stdout lines that ``print`` wrote: ImageJ's own "Macro Error" report,
    tables printed in place of their windows (a `` \\t`` heading, then
    numbered rows) and Log commands such as ``\\Clear`` left out."""
    lines, skip, table = [], False, False
    for ln in out.splitlines():
        if ln.startswith("\\"):
            continue
        if ln.startswith(" \t"):
            table = True
            continue
        if table and re.match(r"^\d+\t", ln):
            continue
        table = False
        if ln.startswith("Macro Error:"):
            skip = True
            continue
        if skip:
            if ln.strip() == "" or ln.startswith(" ") or "<" in ln:
                continue
            skip = False
        lines.append(ln)
    return lines


class HeadlessState(ImageJState):
    """:class:`ImageJState` whose reset prints nothing: headless, clearing
    the Log (``IJ.log("\\Clear")``) would print ``\Clear`` to stdout."""

    def reset(self) -> None:
        cap = _Capture()
        try:
            super().reset()
        finally:
            cap.stop()


class HeadlessRunner(MacroRunner):
    """A :class:`MacroRunner` for a headless ImageJ (see the module docstring).
    ``log`` holds the last run's Log text."""

    def __init__(self) -> None:
        super().__init__()
        self.log = ""

    def run(self, record: RunRecord, timeout: Optional[float]) -> float:
        self.log = ""
        check_headless(record.code, record.dialog_options)
        cap = _Capture()
        error: Optional[MacroError] = None
        elapsed = 0.0
        try:
            elapsed = super().run(record, timeout)
        except MacroError as e:
            error = e
        finally:
            out, err = cap.stop()
        lines = _log_lines(out)
        if error is None and record.throwable == "Macro canceled" and _EXIT_WITH_MESSAGE.search(_code_only(record.code)):
            message = lines.pop() if lines else "exit() called"
            self.log = "\n".join(lines) + ("\n" if lines else "")
            raise MacroError(message, record.line or None, self.log, "exit")
        self.log = "\n".join(lines) + ("\n" if lines else "")
        if error is not None:
            if "HeadlessException" in error.message:
                error = MacroError(f"{error.message}: this needs a screen (run Fiji non-headless)", error.line,
                                   self.log, "headless")
            error.log = self.log
            raise error
        exc = _JAVA_EXCEPTION.search(err) or _JAVA_EXCEPTION.search(out)
        if exc:
            what = exc.group(1) + (f": {exc.group(2)}" if exc.group(2) else "")
            raise MacroError(f"exception in a plugin: {what}", record.line or None, self.log + err, "exception")
        return elapsed
