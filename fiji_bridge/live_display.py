"""Scheduling of live Fiji windows: which stack's planes go to the engine, when.

The bridge's loop tells a :class:`LiveDisplay` what changed (:meth:`mark`),
what went away (:meth:`forget`) and when the engine (re)started
(:meth:`engine_ready`); :meth:`flush` then pushes changed planes to the
engine worker's windows: one worker request per stack with every plane that
changed since its last one, sent as soon as the worker is idle (planes that
arrive while it works coalesce into the next request; there is no fixed
delay). Stacks in shared memory (:class:`~fiji_bridge.stack_memory.SharedStackMemory`)
are read by the worker where they were assembled, so a plane is copied once,
into ImageJ; other stacks go through a staging segment, at most
:data:`STAGING_BYTES` per request. A growing stack's window grows with it
(its Java arrays are kept). An engine that answers "unavailable"
turns the display off (:attr:`error`); a window whose update fails is built
anew, three times, then given up.

It owns no socket and no thread: it runs inside the bridge's loop, on the
bridge's :class:`~fiji_bridge.hyperstack.StackStore` and
:class:`~fiji_bridge.supervisor.EngineSupervisor`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import numpy as np

from .hyperstack import StackNotFound, StackStore
from .supervisor import EngineSupervisor, WorkerJob

__all__ = ["LiveDisplay", "STAGING_BYTES"]

log = logging.getLogger("fiji_bridge.server")

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
        if not self.enabled:
            return
        self.sup.drop_display_jobs(key)
        self.sup.drop_staging(key)  # a job in flight keeps its own mapping
        if self._shown.pop(key, None) is not None:
            body = {"key": key, "released": self.store.memory.released()}  # the worker drops those mappings
            self.sup.submit(WorkerJob("close_stack", body, timeout=30.0, kind="display"))

    def poll_ms(self) -> int:
        """How long the loop may sleep: 50 ms. A push never waits for it: it
        goes when a plane arrives or the worker replies, both of which wake
        the loop."""
        return 50

    def flush(self) -> None:
        """Push what changed in the stacks to their ImageJ windows.

        The worker copies the changed planes from the stack's shared
        storage (else from a staging segment they are copied into, at most
        STAGING_BYTES per push, the rest following at once) into the
        hyperstack's own pixel arrays, which are kept as the stack grows.
        """
        if not self._dirty or not self.sup.ready or self.sup.busy or self.sup.queue:
            return
        for key in list(self._dirty):
            try:
                stack = self.store.get(key)
            except StackNotFound:
                self._dirty.pop(key, None)
                continue
            shape = stack.shape
            planes = self._dirty.pop(key)
            fresh = planes is None
            if fresh:
                positions = [(int(t), int(z), int(c)) for t, z, c in np.argwhere(stack.present)]
            else:
                positions = sorted(planes)
            shared = self.store.memory.desc(stack.storage)
            per_plane = shape[3] * shape[4] * stack.dtype.itemsize
            cap = len(positions) if shared is not None else max(1, STAGING_BYTES // per_plane)
            if len(positions) > cap:
                self._dirty[key] = set(positions[cap:])
                positions = positions[:cap]
            names = [n or f"C{i + 1}" for i, n in enumerate(stack.channel_names)]
            cal = stack.calibration
            body = {
                "key": key, "shape": list(shape), "positions": [list(p) for p in positions],
                "channel_names": names, "calibration": cal.to_dict() if cal.is_set else None, "fresh": fresh,
                "ranges": [stack.plane_range(*p) for p in positions],  # None: the worker takes it
            }
            if shared is not None:  # the worker reads the planes where they were assembled
                body["storage"] = shared
                body["released"] = self.store.memory.released()
                self.store.memory.pin(shared["shm"])
            else:
                try:
                    seg = self.sup.staging(key, len(positions), stack.yx, stack.dtype, reserve=min(cap, shape[0] * shape[1] * shape[2]))
                except OSError as e:
                    log.warning("display update of %s skipped: %s", key, e)
                    self._dirty[key] = None if fresh else set(positions) | (self._dirty.get(key) or set())
                    continue
                arr = stack.array
                for i, (t, z, c) in enumerate(positions):
                    np.copyto(seg.array[i], arr[t, z, c])
                body["staging"] = seg.desc()
            self._shown[key] = shape
            moved = (stack, stack.moves, positions) if shared else None
            done = functools.partial(self._done, key, shared["shm"] if shared else None, moved)
            self.sup.submit(WorkerJob("update_planes", body, timeout=60.0, done=done, kind="display"))

    def _done(self, key: str, shared: Optional[str], moved: Optional[tuple], reply: dict, get: Any) -> None:
        if shared is not None:
            self.store.memory.unpin(shared)
        if moved is not None:
            stack, moves, positions = moved
            if stack.moves != moves and key in self.store and self.store.get(key) is stack:
                # its planes moved while the worker read them: copy them again
                cur = self._dirty.get(key, set())
                if cur is not None:
                    self._dirty[key] = cur | set(positions)
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
