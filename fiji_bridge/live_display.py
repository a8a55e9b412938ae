"""Scheduling of live Fiji windows: which stack's planes go to the engine, when.

The bridge's loop tells a :class:`LiveDisplay` what changed (:meth:`mark`),
what went away (:meth:`forget`) and when the engine (re)started
(:meth:`engine_ready`); :meth:`flush` then pushes changed planes to the
engine worker's windows, at most :data:`DISPLAY_HZ` times per second and
stack (planes arriving in between coalesce), one worker request each and at
most :data:`STAGING_BYTES` per request. A growing stack's window is built
once its shape settles (:data:`DISPLAY_SETTLE_S`, at most
:data:`DISPLAY_SETTLE_MAX_S` late). An engine that answers "unavailable"
turns the display off (:attr:`error`); a window whose update fails is built
anew, three times, then given up.

It owns no socket and no thread: it runs inside the bridge's loop, on the
bridge's :class:`~fiji_bridge.hyperstack.StackStore` and
:class:`~fiji_bridge.supervisor.EngineSupervisor`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Optional

import numpy as np

from .hyperstack import StackNotFound, StackStore
from .supervisor import EngineSupervisor, WorkerJob

__all__ = ["LiveDisplay", "DISPLAY_HZ", "DISPLAY_SETTLE_S", "DISPLAY_SETTLE_MAX_S", "STAGING_BYTES"]

log = logging.getLogger("fiji_bridge.server")

#: live window updates per second and stack, at most
DISPLAY_HZ = 20.0
#: a stack whose shape differs from its window's waits until its shape has
#: been stable this long (planes streaming in grow it index by index) ...
DISPLAY_SETTLE_S = 0.1
#: ... but never longer than this after the first pending change
DISPLAY_SETTLE_MAX_S = 1.0
#: most bytes of planes one display push carries to the engine worker
STAGING_BYTES = 256 << 20


class LiveDisplay:
    """The live windows of one bridge (inactive when ``enabled`` is False)."""

    def __init__(self, store: StackStore, sup: EngineSupervisor, enabled: bool) -> None:
        self.store = store
        self.sup = sup
        self.enabled = enabled
        self.error: Optional[str] = None
        self._dirty: dict[str, Optional[set]] = {}  # key -> changed (t, z, c), None = all
        self._shown: dict[str, tuple] = {}  # key -> shape of its window
        self._last_push: dict[str, float] = {}
        # key -> (shape last seen, when it last changed, when it first differed from the window's)
        self._settling: dict[str, tuple[tuple, float, float]] = {}
        self._more: set[str] = set()  # stacks whose last push was capped: the rest goes next
        self._failures: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return self.enabled and self.error is None

    @property
    def windows(self) -> list[str]:
        return sorted(self._shown)

    @property
    def pending(self) -> list[str]:
        return sorted(self._dirty)

    def is_current(self, key: str) -> bool:
        """Whether ``key``'s window exists and shows every plane received."""
        return self.enabled and key in self._shown and key not in self._dirty

    def engine_ready(self) -> None:
        """A (re)started engine has no windows: show every stack again."""
        self._shown.clear()
        if self.active:
            for k in self.store.keys():
                self._dirty[k] = None

    def mark(self, key: str, tzc: tuple[int, int, int]) -> None:
        """Plane ``tzc`` of stack ``key`` changed."""
        if not self.active:
            return
        cur = self._dirty.get(key, set())
        if cur is None:
            return
        if key not in self._shown:
            self._dirty[key] = None
            return
        cur.add(tzc)
        self._dirty[key] = cur

    def forget(self, key: str) -> None:
        """Stack ``key`` was closed: drop its pending pushes and close its window."""
        self._dirty.pop(key, None)
        self._last_push.pop(key, None)
        self._settling.pop(key, None)
        self._more.discard(key)
        if not self.enabled:
            return
        self.sup.drop_display_jobs(key)
        self.sup.drop_staging(key)  # a job in flight keeps its own mapping
        if self._shown.pop(key, None) is not None:
            self.sup.submit(WorkerJob("close_stack", {"key": key}, timeout=30.0, kind="display"))

    def poll_ms(self) -> int:
        """How long the loop may sleep: 50 ms, less when a throttled push
        falls due sooner (so a window is never up to 50 ms late)."""
        if not self._dirty or not self.sup.ready or self.sup.busy:
            return 50
        now = time.monotonic()
        due = min(self._last_push.get(k, 0.0) + 1.0 / DISPLAY_HZ for k in self._dirty)
        return max(1, min(50, int((due - now) * 1000) + 1))

    def flush(self) -> None:
        """Push what changed in the stacks to their ImageJ windows.

        The changed planes are copied into the stack's staging segment and
        the worker copies them into the hyperstack's own pixel arrays (grown
        in place as the stack grows). A push is capped at STAGING_BYTES; the
        rest follows at once.
        """
        if not self._dirty or not self.sup.ready or self.sup.busy or self.sup.queue:
            return
        now = time.monotonic()
        for key in list(self._dirty):
            if key not in self._more and now - self._last_push.get(key, 0.0) < 1.0 / DISPLAY_HZ:
                continue
            try:
                stack = self.store.get(key)
            except StackNotFound:
                self._dirty.pop(key, None)
                continue
            shape = stack.shape
            if not self._settled(key, shape, now):
                continue  # still growing: build the window once, at its settled shape
            planes = self._dirty.pop(key)
            self._more.discard(key)
            fresh = planes is None
            if fresh:
                positions = [(int(t), int(z), int(c)) for t, z, c in np.argwhere(stack.present)]
            else:
                positions = sorted(planes)
            per_plane = shape[3] * shape[4] * stack.dtype.itemsize
            cap = max(1, STAGING_BYTES // per_plane)
            if len(positions) > cap:
                self._dirty[key] = set(positions[cap:])
                self._more.add(key)
                positions = positions[:cap]
            try:
                seg = self.sup.staging(key, len(positions), stack.yx, stack.dtype, reserve=min(cap, shape[0] * shape[1] * shape[2]))
            except OSError as e:
                log.warning("display update of %s skipped: %s", key, e)
                self._dirty[key] = None if fresh else set(positions) | (self._dirty.get(key) or set())
                continue
            arr = stack.array
            for i, (t, z, c) in enumerate(positions):
                np.copyto(seg.array[i], arr[t, z, c])
            names = [n or f"C{i + 1}" for i, n in enumerate(stack.channel_names)]
            cal = stack.calibration
            body = {
                "key": key, "shape": list(shape), "positions": [list(p) for p in positions],
                "staging": seg.desc(), "channel_names": names,
                "calibration": cal.to_dict() if cal.is_set else None, "fresh": fresh,
            }
            self._last_push[key] = now
            self._shown[key] = shape
            self.sup.submit(WorkerJob("update_planes", body, timeout=60.0, done=functools.partial(self._done, key), kind="display"))

    def _settled(self, key: str, shape: tuple, now: float) -> bool:
        """Whether a push may go now as far as the stack's shape is concerned.

        A new window, or a window whose stack grew, costs ImageJ a re-layout
        (new CompositeImage, new arrays), so while planes keep growing a stack
        the push waits for its shape to hold still DISPLAY_SETTLE_S, at most
        DISPLAY_SETTLE_MAX_S: a fast stream builds its window once, a slow
        acquisition still shows each new plane promptly."""
        if self._shown.get(key) == shape:
            self._settling.pop(key, None)
            return True
        seen, changed, first = self._settling.get(key, (None, now, now))
        if seen != shape:
            self._settling[key] = (shape, now, first)
            return now - first >= DISPLAY_SETTLE_MAX_S
        if now - changed >= DISPLAY_SETTLE_S or now - first >= DISPLAY_SETTLE_MAX_S:
            self._settling.pop(key, None)
            return True
        return False

    def _done(self, key: str, reply: dict, get: Any) -> None:
        if reply.get("ok"):
            return
        err = reply.get("error") or {}
        if err.get("code") == "unavailable":
            self.error = err.get("message", "the engine has no live display")
            log.warning("live display off: %s", self.error)
            self._dirty.clear()
        elif err.get("code") not in ("cancelled", "shutting_down"):
            fails = self._failures[key] = self._failures.get(key, 0) + 1
            log.warning("display update of %s failed (%s)%s", key, err.get("message"), "; showing it anew" if fails <= 3 else "; giving up on its window")
            if self._shown.pop(key, None) is not None and key in self.store and fails <= 3:
                self._dirty[key] = None
