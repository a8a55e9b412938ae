"""Reading sender-owned shared memory, and making sure none is left behind.

Ownership, as the released senders implement it (polystore 0.2.17 through
0.6.3, whatever their docstrings say): the sender creates one block per
image, names it in the batch, and after the viewer's reply -- success or
error -- closes **and unlinks** it. The viewer copies, closes, and must not
unlink (the sender's own unlink would then fail) nor leave the block on its
resource tracker (which would unlink it when the viewer exits).

A killed sender's blocks are unlinked by the sender's resource tracker. As a
last line for senders that expect the viewer to unlink (OpenHCS's in-tree
backend before PolyStore), :class:`ReleasedBlocks` unlinks any block a
batch named that still exists a grace period after the reply.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from multiprocessing import resource_tracker, shared_memory
from typing import Iterable, Optional

import numpy as np

from .wire import WireError

__all__ = ["ReleasedBlocks", "copy_block"]

_POSIX = getattr(shared_memory, "_USE_POSIX", False)


def _attach(name: str, track: bool) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=track)
    shm = shared_memory.SharedMemory(name=name)
    if not track and _POSIX:
        # 3.11/3.12 register every attach; a non-owner must not be tracked
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def copy_block(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Copy ``shape``/``dtype`` pixels out of block ``name``; never unlinks it."""
    try:
        shm = _attach(name, track=False)
    except FileNotFoundError:
        raise WireError(
            f"shared memory block {name!r} does not exist (released by its sender, or never created)"
        ) from None
    except (OSError, ValueError) as exc:
        raise WireError(f"cannot open shared memory block {name!r}: {exc}") from None
    try:
        count = int(np.prod(shape))
        need = count * dtype.itemsize
        if shm.size < need:
            raise WireError(
                f"shared memory block {name!r} holds {shm.size} bytes, but shape {list(shape)} "
                f"of {dtype} needs {need}"
            )
        view = np.frombuffer(shm.buf, dtype=dtype, count=count)
        try:
            data = view.reshape(shape).astype(dtype.newbyteorder("="), copy=True)
        finally:
            del view  # release the exported buffer before close()
        return data
    finally:
        shm.close()


def unlink_if_present(name: str) -> bool:
    """Unlink block ``name`` if it still exists; True if it did."""
    try:
        shm = _attach(name, track=True)  # attach+unlink keep the tracker balanced
    except (FileNotFoundError, OSError, ValueError):
        return False
    try:
        shm.close()
        shm.unlink()
        return True
    except FileNotFoundError:
        return False


class ReleasedBlocks:
    """Blocks named by answered batches, swept once their grace period is over."""

    def __init__(self, grace_s: Optional[float] = 10.0) -> None:
        self.grace_s = grace_s
        self._due: deque[tuple[float, tuple[str, ...]]] = deque()
        self.unlinked = 0

    def note(self, names: Iterable[str], now: Optional[float] = None) -> None:
        names = tuple(names)
        if names and self.grace_s is not None:
            self._due.append(((time.monotonic() if now is None else now) + self.grace_s, names))

    def sweep(self, now: Optional[float] = None, *, everything: bool = False) -> int:
        """Unlink leftovers whose grace is over (all noted ones if ``everything``)."""
        now = time.monotonic() if now is None else now
        n = 0
        while self._due and (everything or self._due[0][0] <= now):
            _, names = self._due.popleft()
            n += sum(unlink_if_present(name) for name in names)
        self.unlinked += n
        return n

    def __len__(self) -> int:
        return sum(len(names) for _, names in self._due)
