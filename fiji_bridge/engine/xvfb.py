"""A private virtual X display (Xvfb) for ImageJ 1 when no DISPLAY exists.

Plain ImageJ 1 builds AWT dialogs for most commands; under
``java.awt.headless=true`` they throw HeadlessException. So the engine gives
AWT a screen of its own: ``Xvfb -displayfd`` picks a free display number, the
server dies with us (parent-death signal, atexit, close()), and no zombie is
left behind. ``launch()`` then ``wait()`` lets the server come up while the
caller does other work (the engine starts its JVM meanwhile); ``start()``
does both.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from typing import Optional

from .base import EngineUnavailable

__all__ = ["VirtualDisplay"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class VirtualDisplay:
    """``with VirtualDisplay() as d: os.environ["DISPLAY"] = d.display``."""

    def __init__(self, screen: str = "1600x1200x24", start_timeout: float = 10.0) -> None:
        self.screen = screen
        self.start_timeout = start_timeout
        self.display: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None
        self._rfd = -1  # the -displayfd pipe between launch() and wait()
        self._deadline = 0.0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        """Start Xvfb on a free display; returns e.g. ``":3"``."""
        if self.running and self.display is not None:
            return self.display
        self.launch()
        return self.wait()

    def launch(self) -> None:
        """Start the server without waiting for it (:meth:`wait` gives its
        display): it comes up (~60 ms) while the caller does other work,
        such as starting a JVM, which needs no display until AWT starts."""
        if self.running:
            return
        self.display = None
        exe = shutil.which("Xvfb")
        if not exe:
            raise EngineUnavailable(
                "no DISPLAY and no Xvfb: install xvfb (apt-get install xvfb) or set DISPLAY"
            )
        rfd, wfd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [exe, "-displayfd", str(wfd), "-screen", "0", self.screen, "-nolisten", "tcp"],
                pass_fds=(wfd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # the parent-death signal follows the *thread* that forks: only
                # safe from the main thread (a worker thread may end before us)
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        self._rfd = rfd
        self._deadline = time.monotonic() + self.start_timeout
        atexit.register(self.stop)

    def wait(self) -> str:
        """The display of the server :meth:`launch` started, once it is up
        (at most ``start_timeout`` seconds after the launch)."""
        if self.display is not None and self.running:
            return self.display
        rfd, self._rfd = self._rfd, -1
        number = b""
        try:
            while rfd >= 0 and not number.endswith(b"\n"):
                left = self._deadline - time.monotonic()
                if left <= 0 or not select.select([rfd], [], [], left)[0]:
                    break
                chunk = os.read(rfd, 16)
                if not chunk:
                    break
                number += chunk
        finally:
            if rfd >= 0:
                os.close(rfd)
        if not number.strip().isdigit():
            self.stop()
            raise EngineUnavailable(f"Xvfb did not start within {self.start_timeout} s")
        self.display = f":{int(number)}"
        return self.display

    def stop(self) -> None:
        """Stop the server and reap it (idempotent)."""
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        atexit.unregister(self.stop)

    def __enter__(self) -> "VirtualDisplay":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
