"""Warm shared memory the bridge lends to producers for their plane rings.

A producer sending over shared memory copies each plane into a slot of its
:class:`~fiji_bridge.transport.ShmRing`. A slot it creates itself is fresh
memory: on its first lap every page is touched for the first time, which
costs 10-30x a page written again (the kernel zeroes it; a virtual machine's
host may first have to back it): 6-25 ms for an 8 MB plane instead of
0.5 ms, so a new producer's first eight 2048x2048 planes took 0.05-0.2 s
longer than the rest. The bridge, which touches its memory at start-up while
the JVM starts anyway, therefore keeps a few segments warm
(``fjbs_<bridge pid>_rl<n>``) and **lends** them:

* ``lease_ring`` (control request): the producer names its process (pid and
  start time, read from ``/proc``: a pid alone may be reused, and one from
  another pid namespace names someone else) and the slots it wants; it gets
  up to that many warm segments of at least the slot size, or none. It maps
  them read/write and uses them as slots; segments it did not get it creates
  itself, as before.
* ``release_ring`` gives them back, once every plane written into them has
  been acknowledged (so no plane is read after another producer wrote the
  slot). A producer that closes with planes in flight keeps its lease.
* A lease whose producer is gone (its pid no longer runs with that start
  time) is taken back at the next lease request and in the bridge's
  housekeeping, so a killed producer leaks nothing for long.

The bridge owns the segments: the producer never unlinks them, the bridge
unlinks them when it closes, and the next bridge (or worker) reaps those of
a killed one by their prefix. Nothing else changes on the wire: a leased
slot's name travels in the plane header and the bridge reads it with the
same checks as any producer's segment.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .supervisor import SERVER_PREFIX, SharedArray

__all__ = ["RingLeases", "LEASE_SLOTS", "LEASE_SLOT_BYTES", "process_start"]

log = logging.getLogger(__name__)

#: warm segments the bridge lends (one producer ring of the default 8 credits)
LEASE_SLOTS = 8
#: size of each: a plane of up to 16 MiB (2048x2048 and 2560x2160 uint16, 2048x2048 float32)
LEASE_SLOT_BYTES = 16 << 20

_NAMES = itertools.count()


def process_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks since boot, field 22 of
    ``/proc/<pid>/stat``), or None where it is gone or cannot be read: with
    the pid it names one process for good."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Lease:
    pid: int
    start: int
    names: list[str] = field(default_factory=list)


class RingLeases:
    """The bridge's warm ring segments and who holds them. Thread-safe
    (:meth:`warm` runs on the warm-up thread, the rest on the bridge loop)."""

    def __init__(self, slots: int = LEASE_SLOTS, slot_bytes: int = LEASE_SLOT_BYTES) -> None:
        self.slots = int(slots)
        self.slot_bytes = int(slot_bytes)
        self._free: list[SharedArray] = []
        self._leased: dict[str, tuple[str, SharedArray]] = {}  # segment name -> (lease id, segment)
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._closed = False

    def warm(self) -> float:
        """Create the segments, every page touched (``MAP_POPULATE`` and
        reserved: a full ``/dev/shm`` leaves fewer, never a SIGBUS later).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        made = []
        for _ in range(self.slots):
            try:
                made.append(SharedArray(f"{SERVER_PREFIX}_{os.getpid()}_rl{next(_NAMES)}", (self.slot_bytes,), "uint8", reserve=True))
            except OSError as e:
                log.warning("ring segments to lend: %d of %d (%s)", len(made), self.slots, e)
                break
        for seg in made:
            seg.array = None  # type: ignore[assignment]  # producers write it, the bridge never views it
        with self._lock:
            if self._closed:
                for seg in made:
                    seg.unlink()
                return 0.0
            self._free.extend(made)
        return time.perf_counter() - t0

    def lease(self, pid: int, start: int, slots: int, slot_bytes: int) -> tuple[Optional[str], list[str]]:
        """Lend up to ``slots`` free segments of at least ``slot_bytes`` to the
        process ``pid`` started at ``start``: ``(lease id, names)``, or
        ``(None, [])`` when none fits or that process is not the one running
        under that pid here (another host's or pid namespace's)."""
        self.reap()
        if process_start(pid) != start or slot_bytes > self.slot_bytes or slots < 1:
            return None, []
        with self._lock:
            if not self._free:
                return None, []
            lease_id = secrets.token_hex(8)
            lent, self._free = self._free[:slots], self._free[slots:]
            for seg in lent:
                self._leased[seg.name] = (lease_id, seg)
            self._leases[lease_id] = _Lease(pid, start, [s.name for s in lent])
        return lease_id, [s.name for s in lent]

    def release(self, lease_id: str) -> int:
        """Take lease ``lease_id`` back (its producer has every plane
        acknowledged); the number of segments returned (0: unknown lease)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return 0
            for name in lease.names:
                _, seg = self._leased.pop(name)
                self._free.append(seg)
            return len(lease.names)

    def reap(self) -> int:
        """Take back the leases of producers that are gone; how many."""
        with self._lock:
            gone = [k for k, v in self._leases.items() if process_start(v.pid) != v.start]
        return sum(self.release(k) > 0 for k in gone)

    def status(self) -> dict:
        with self._lock:
            return {"segments": len(self._free) + len(self._leased), "leased": len(self._leased),
                    "slot_bytes": self.slot_bytes, "leases": len(self._leases)}

    def close(self) -> None:
        """Unlink every segment, lent or not (the bridge is going: its
        producers' next planes fail to reach it anyway)."""
        with self._lock:
            self._closed = True
            segs = self._free + [seg for _, seg in self._leased.values()]
            self._free, self._leased, self._leases = [], {}, {}
        for seg in segs:
            seg.unlink()
