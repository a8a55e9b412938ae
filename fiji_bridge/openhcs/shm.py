"""Reading sender-owned shared memory -- and leaving it to its owner.

Ownership, as the released senders implement it (polystore 0.2.17 through
0.2.19 and 0.6.x, ``StreamingBackend.save_batch``): the sender creates one
block per image (named ``fiji_<12 hex>``), names it in the batch, and after
the viewer's reply -- success, error or timeout -- closes **and unlinks**
it itself. The viewer copies and closes; it must not unlink (the sender's
own unlink would then fail), nor leave the block on its resource tracker
(which would unlink it when the viewer exits). A killed sender's blocks are
unlinked by the sender's resource tracker. (zmqruntime 0.2.x still ships a
viewer helper that unlinks after copying; openhcs 0.8.6's own Fiji viewer
does not use it, and no sender needs it.)

So :func:`copy_block` only reads: through :func:`fiji_bridge.transport.read_shm`,
which opens the block read-only and never maps it into the resource
tracker, never unlinks, and refuses what is not a block of this user's
(not :class:`multiprocessing.shared_memory.SharedMemory`, whose attach on
Python 3.11/3.12 unlinks a block it fails to map).

:class:`ReleasedBlocks` is an opt-in last line for a sender that leaves its
blocks to the viewer (none of the released ones): it unlinks blocks a batch
named that still exist a grace period after the reply -- and only those
that look like that sender's own: a name with its prefix and a regular file
owned by this user. Off by default.
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from typing import Iterable, Optional

import numpy as np

from ..transport import TransportError, read_shm
from .wire import WireError

__all__ = ["SENDER_PREFIX", "ReleasedBlocks", "copy_block", "unlink_senders_block"]

#: polystore's ``FijiStreamingBackend.SHM_PREFIX``
SENDER_PREFIX = "fiji_"
_SHM_DIR = "/dev/shm"


def _regular(name: str) -> Optional[os.stat_result]:
    """``lstat`` of ``/dev/shm/<name>`` if it is a regular file (None if it is
    not, or where there is no ``/dev/shm``)."""
    try:
        st = os.stat(os.path.join(_SHM_DIR, name), follow_symlinks=False)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def copy_block(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Copy ``shape``/``dtype`` pixels out of block ``name`` (native byte order); never unlinks it."""
    if os.path.isdir(_SHM_DIR) and os.path.lexists(os.path.join(_SHM_DIR, name)) and _regular(name) is None:
        # a FIFO would block a read-only open; a link could point anywhere
        raise WireError(f"{name!r} is not a shared-memory block (not a regular file in {_SHM_DIR})")
    try:
        data = read_shm(name, shape, dtype)
    except TransportError as exc:
        raise WireError(str(exc)) from None
    return data if data.dtype.isnative else data.astype(data.dtype.newbyteorder("="))


def unlink_senders_block(name: str, prefix: str = SENDER_PREFIX) -> bool:
    """Unlink block ``name`` if it is still there and looks like the
    sender's: ``prefix`` + name, a regular file owned by this user (never a
    link, a FIFO or another account's file). True if it was unlinked."""
    if not name.startswith(prefix) or "/" in name or name in (".", ".."):
        return False
    try:
        import _posixshmem  # type: ignore[import-not-found]
    except ImportError:  # Windows: named mappings vanish with their last handle
        return False
    st = _regular(name)
    if st is None or st.st_uid != os.geteuid():
        return False
    try:
        _posixshmem.shm_unlink("/" + name)
    except OSError:
        return False
    return True


class ReleasedBlocks:
    """Blocks named by answered batches, swept once their grace period is
    over (``grace_s`` None: never -- the default, the senders unlink)."""

    def __init__(self, grace_s: Optional[float] = None, prefix: str = SENDER_PREFIX) -> None:
        self.grace_s = grace_s
        self.prefix = prefix
        self._due: deque[tuple[float, tuple[str, ...]]] = deque()
        self.unlinked = 0

    def note(self, names: Iterable[str], now: Optional[float] = None) -> None:
        names = tuple(n for n in names if n.startswith(self.prefix))
        if names and self.grace_s is not None:
            self._due.append(((time.monotonic() if now is None else now) + self.grace_s, names))

    def sweep(self, now: Optional[float] = None, *, everything: bool = False) -> int:
        """Unlink leftovers whose grace is over (all noted ones if ``everything``)."""
        now = time.monotonic() if now is None else now
        n = 0
        while self._due and (everything or self._due[0][0] <= now):
            _, names = self._due.popleft()
            n += sum(unlink_senders_block(name, self.prefix) for name in names)
        self.unlinked += n
        return n

    def __len__(self) -> int:
        return sum(len(names) for _, names in self._due)
