"""What an ImageJ 1 engine run costs beyond the macro's own work, and that
cutting it kept the behaviour: real ImageJ, a real JVM and Xvfb.

* On the engine's private Xvfb the text windows kept between runs (Log,
  Results, a macro's tables) do not draw; oracle: AWT's own paint events,
  counted by a listener on the event thread, with a window that does draw
  (a fresh one) as the control; their text is still what the macro wrote.
* A finished run's record (its input image, its interpreter) is not held
  by the Java side: oracle: a weak reference, after a Python-only collection.
* The ImageJ 1 engine starts its JVM without scyjava and without a
  ``java -version`` child process: oracle: the child processes the start
  spawned, recorded in a fresh interpreter, and a macro that runs there.
* The private Xvfb comes up while the JVM starts (launch, then wait):
  oracle: an X client (xdpyinfo) on the display it reports.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import weakref

import numpy as np
import pytest

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(120)]


class _PaintCounter:
    """Counts AWT paint events by the title of the window they are for."""

    def __init__(self) -> None:
        from jpype import JImplements, JOverride

        from fiji_bridge.engine.transfer import J

        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        counter = self
        Swing, Window = J("javax.swing.SwingUtilities"), J("java.awt.Window")

        @JImplements("java.awt.event.AWTEventListener")
        class Listener:
            @JOverride
            def eventDispatched(self, event):  # on the event thread
                try:
                    src = event.getSource()
                    win = src if isinstance(src, Window) else Swing.getWindowAncestor(src)
                    title = str(win.getTitle()) if win is not None else "?"
                    with counter._lock:
                        counter.counts[title] = counter.counts.get(title, 0) + 1
                except Exception:
                    pass

        self._listener = Listener()
        self._toolkit = J("java.awt.Toolkit").getDefaultToolkit()
        self._toolkit.addAWTEventListener(self._listener, J("java.awt.AWTEvent").PAINT_EVENT_MASK)

    def close(self) -> None:
        self._toolkit.removeAWTEventListener(self._listener)


def _drain_event_thread() -> None:
    """Wait until the event thread has handled everything queued so far (twice:
    a repaint queued while handling the first batch is handled by the second)."""
    from fiji_bridge.engine.collect import on_event_thread

    for _ in range(2):
        on_event_thread(lambda: None)


FILL = ('print("hello from the macro"); setResult("A", 0, 1); setResult("A", 1, 2); updateResults(); '
        'Table.create("Kept"); Table.set("B", 0, 3, "Kept"); Table.update("Kept");')


def test_kept_text_windows_do_not_draw_on_the_private_screen_but_keep_their_text(ij):
    if getattr(ij, "_xvfb", None) is None:
        pytest.skip("this engine draws on a real DISPLAY: its windows draw as ImageJ's do")
    from fiji_bridge.engine.transfer import J

    # the first run builds the windows; the reset before the second one
    # empties them, keeps them and stops them drawing (hiding their parts
    # once exposes what lay beneath: a few paints then, none afterwards)
    ij.run_macro(FILL)
    ij.run_macro(FILL)
    counter = _PaintCounter()
    try:
        _drain_event_thread()
        counter.counts.clear()
        r = ij.run_macro(FILL + ' Table.create("Fresh"); Table.set("C", 0, 4, "Fresh"); Table.update("Fresh"); '
                                'print(isOpen("Results") + " " + isOpen("Kept") + " " + isOpen("Log"));')
        _drain_event_thread()
        counts = dict(counter.counts)
    finally:
        counter.close()
    assert counts.get("Fresh", 0) > 0, f"the control window drew nothing: {counts}"  # the listener sees paints
    assert {t: n for t, n in counts.items() if t in ("Log", "Results", "Kept")} == {}, counts
    # the quiet windows are open and showing, and hold what the macro wrote
    assert r.tables["Results"]["A"].tolist() == [1.0, 2.0]
    assert r.tables["Kept"]["B"].tolist() == [3.0] and r.tables["Fresh"]["C"].tolist() == [4.0]
    assert "hello from the macro" in r.log and r.log.strip().endswith("1 1 1")
    WM = J("ij.WindowManager")
    for title in ("Log", "Results", "Kept"):
        win = WM.getWindow(title)
        assert win is not None and win.isShowing(), title
    assert "hello from the macro" in str(WM.getWindow("Log").getTextPanel().getText())
    # the next run still starts from empty tables and an empty Log
    nothing = ij.run_macro('print(nResults + " " + Table.size("Kept"));')
    assert nothing.log.strip() == "0 0" and "Results" not in nothing.tables and "Kept" not in nothing.tables


def test_a_finished_run_holds_nothing_of_its_record(ij):
    """The record of a run (input image, interpreter) is freed by Python's
    own reference counting once the caller drops it: the finished Java
    thread, which lives until a Java GC, does not keep it."""
    from fiji_bridge.engine.runner import RunRecord
    from fiji_bridge.engine.transfer import to_imageplus

    imp = to_imageplus(np.zeros((1, 1, 1, 256, 256), np.uint16), "held")
    record = RunRecord("run(\"Invert\");", "", imp, None)
    ref = weakref.ref(record)
    ij._runner.run(record, 30)
    ij._state.end_batch_mode(ij._state.open_images())
    ij._state.reset()
    del record, imp
    gc.collect()  # Python's collector only: no Java GC ran
    assert ref() is None


def test_imagej1_jvm_starts_without_scyjava_or_a_java_version_child(tmp_path):
    """A fresh interpreter starts the ImageJ 1 engine: no ``java`` child
    process was spawned (scyjava would start two to ask ``java -version``),
    scyjava was not even imported, and a macro runs."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        spawned = []
        orig = subprocess.Popen.__init__
        def init(self, args, *a, **k):
            spawned.append(os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args)))
            orig(self, args, *a, **k)
        subprocess.Popen.__init__ = init
        from fiji_bridge.engine import open_engine
        eng = open_engine("imagej1").start()
        r = eng.run_macro('print(2 + 3);')
        print("SPAWNED", ",".join(spawned))
        print("SCYJAVA", "scyjava" in sys.modules)
        print("LOG", r.log.strip())
        sys.stdout.flush()
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, cwd=str(tmp_path),
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])})
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in ("SPAWNED", "SCYJAVA", "LOG"))
    assert lines.get("LOG") == "5", out.stdout + out.stderr
    assert "java" not in lines.get("SPAWNED", "").split(","), lines
    assert lines.get("SCYJAVA") == "False"


@pytest.mark.timeout(60)
def test_a_launched_virtual_display_serves_x_clients_once_waited_for():
    import shutil

    from fiji_bridge.engine.xvfb import VirtualDisplay

    if shutil.which("xdpyinfo") is None:
        pytest.skip("no xdpyinfo to check the display with")
    d = VirtualDisplay()
    d.launch()
    try:
        assert d.running and d.display is None  # not waited for yet
        display = d.wait()
        assert display.startswith(":") and d.wait() == display and d.start() == display
        out = subprocess.run(["xdpyinfo", "-display", display], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and "1600x1200" in out.stdout
    finally:
        d.stop()
    assert not d.running
    again = d.start()  # a stopped display starts anew, with its own number
    try:
        assert d.running and subprocess.run(["xdpyinfo", "-display", again], capture_output=True, timeout=20).returncode == 0
    finally:
        d.stop()
