"""Assembly of CZT hyperstacks from streamed planes.

A producer sends 2-D planes, each with its :class:`~fiji_bridge.components.PlaneComponents`
(plate, well, site, channel, z, t). An :class:`AxisMapping` says which
components place a plane on ImageJ's C, Z and T axes and which ones pick the
stack (the *window*); a :class:`StackStore` keeps one :class:`Hyperstack` per
window key and puts each plane where it belongs, in any order.

Indices along an axis:

* an axis made of exactly **one integer component** (the default:
  channel -> C, z -> Z, t -> T) uses that component's value as the index;
* an axis that **combines several components**, or uses a non-integer one
  (OpenHCS maps well + site + timepoint to T), numbers each distinct value
  tuple by order of first appearance, per stack. The numbering is stable
  (a tuple keeps its index) and reported in :attr:`StackInfo.axis_labels`,
  so ``T=3`` can be read back as ``["B02", 1, 0]``;
* an axis made of no component is always index 0.

Dimensions grow as new indices arrive. Storage grows by amortised doubling
along T, Z and C, so planes arriving one index at a time cost O(1) copying
each on average. Missing planes read as zeros and are listed in
:attr:`StackInfo.missing`. A plane whose dtype or YX shape disagrees with its
stack is refused with :class:`PlaneRejected` and the stack is left as it was.
A memory cap bounds what all stacks of a store may hold, so an absurd index
is refused with an explanation instead of a ``MemoryError``. Where the
pixels live is the store's ``memory`` (:class:`HeapMemory`, or shared memory
the engine worker maps: :mod:`fiji_bridge.stack_memory`); a plane may also
come as a :class:`PlaneReader`, read straight into its place. The stack
vocabulary (errors, :class:`AxisMapping`, :class:`StackInfo`) lives in
:mod:`fiji_bridge.stack_types` and is re-exported here.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .components import Calibration, ComponentError, PlaneComponents
from .stack_types import (  # the stack vocabulary, re-exported: fiji_bridge.hyperstack names them all
    ALLOWED_DTYPES,
    AxisMapping,
    PlaneRejected,
    StackError,
    StackInfo,
    StackNotFound,
    _direct,
)

__all__ = [
    "ALLOWED_DTYPES",
    "AxisMapping",
    "HeapMemory",
    "PlaneReader",
    "Hyperstack",
    "PlaneRejected",
    "StackError",
    "StackInfo",
    "StackNotFound",
    "StackStore",
    "default_max_bytes",
]

def default_max_bytes() -> int:
    """The default memory cap of a store: ``FIJI_BRIDGE_MAX_STACK_BYTES`` when
    set, else half of the physical memory (8 GiB when that is unknown)."""
    env = os.environ.get("FIJI_BRIDGE_MAX_STACK_BYTES")
    if env:
        try:
            return max(1, int(float(env)))
        except ValueError:
            raise StackError(
                f"FIJI_BRIDGE_MAX_STACK_BYTES={env!r} is not a number of bytes"
            ) from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------
# checks


def _check_dtype(dtype: Any, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise PlaneRejected(f"{what}: unknown dtype {dtype!r}") from None
    native = dt.newbyteorder("=")
    if native.name not in ALLOWED_DTYPES or dt.fields:
        raise PlaneRejected(
            f"{what}: dtype {dt.name} is not supported; use one of {', '.join(ALLOWED_DTYPES)} "
            f"(e.g. convert with .astype('float32'))"
        )
    return native


class PlaneReader:
    """A plane not yet read: its (Y, X) shape, dtype, and ``read(out)`` that
    fills ``out`` (a plane of a stack's storage) with it. A stack reads it
    straight into its place (e.g. from a producer's shared memory), so no
    copy is made in between; when ``read`` raises, the plane at that place
    is gone and the error propagates. ``close`` releases the source."""

    def __init__(
        self,
        shape: Sequence[int],
        dtype: Any,
        read: Callable[[np.ndarray], Optional[tuple[float, float]]],
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self.close = close

    def read_into(self, out: np.ndarray) -> Optional[tuple[float, float]]:
        """Fill ``out``; the plane's (min, max) when the read took it on the way, else None."""
        return self._read(out)


def _as_plane(plane: Any, what: str) -> Any:
    """A 2-D (Y, X) array of an allowed dtype; (1, Y, X) is squeezed. A
    :class:`PlaneReader` is checked by its shape and dtype."""
    if isinstance(plane, PlaneReader):
        if plane.ndim != 2 or 0 in plane.shape:
            raise PlaneRejected(f"{what}: a plane must be 2-D (Y, X), got shape {plane.shape}")
        _check_dtype(plane.dtype, what)
        return plane
    if not isinstance(plane, np.ndarray):
        try:
            plane = np.asarray(plane)
        except Exception as exc:  # noqa: BLE001 - anything not array-like
            raise PlaneRejected(f"{what}: not an array ({exc})") from None
    if plane.ndim == 3 and plane.shape[0] == 1:
        plane = plane[0]
    if plane.ndim != 2:
        raise PlaneRejected(
            f"{what}: a plane must be 2-D (Y, X), got shape {plane.shape}; "
            "send each plane of a stack separately or use add_stack"
        )
    if 0 in plane.shape:
        raise PlaneRejected(f"{what}: empty plane of shape {plane.shape}")
    _check_dtype(plane.dtype, what)
    return plane


def _check_index(name: str, v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PlaneRejected(f"{what}: index {name}={v!r} must be an integer")
    v = int(v)
    if not 0 <= v <= PlaneComponents.MAX_INDEX:
        raise PlaneRejected(
            f"{what}: index {name}={v} is out of range 0..{PlaneComponents.MAX_INDEX}"
        )
    return v


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > 512 or not key.isprintable():
        raise StackError(f"a stack key must be a non-empty printable string, got {key!r}")
    return key


class _Budget:
    """Bytes held by the stacks of one store, against a cap (not thread-safe
    by itself: the store's lock serialises it)."""

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, old: int, new: int, explain: str) -> None:
        if self.limit is not None and self.used - old + new > self.limit:
            raise PlaneRejected(
                f"{explain} would need {_gib(new)} for this stack, and all stacks together "
                f"{_gib(self.used - old + new)}, over the memory cap of {_gib(self.limit)}. "
                "Check the indices (a typo?), close stacks you no longer need, or raise the "
                "cap (StackStore(max_bytes=...) / FIJI_BRIDGE_MAX_STACK_BYTES)"
            )
        self.used += new - old

    def free(self, n: int) -> None:
        self.used = max(0, self.used - n)


class HeapMemory:
    """Stack storage in this process's memory (numpy). The interface a
    store's ``memory`` offers: storage (zeroed or not: the stack zeroes the
    planes it reads before they were written), growth in place, release,
    and the shared-memory descriptor of a storage array (None: it has none)."""

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, bool]:
        """Storage of ``shape``/``dtype`` and whether it reads as zeros."""
        return np.zeros(shape, dtype=dtype), True

    def grow(self, array: np.ndarray, cap: tuple[int, int, int], new_cap: tuple[int, int, int]) -> Optional[np.ndarray]:
        """``array`` (T, Z, C, Y, X storage of capacity ``cap``) laid out anew
        as ``new_cap`` in its own memory, every plane moved to its new place,
        or None: then the store allocates anew and copies."""
        return None

    def free(self, array: np.ndarray) -> None:
        """Nothing to do: numpy frees the memory with the last reference."""

    def desc(self, array: np.ndarray) -> Optional[dict]:
        return None

    def released(self) -> list[str]:
        """Shared segments given up since the last call (none here)."""
        return []

    pooled_bytes = 0  #: bytes of freed storage kept for reuse

    def close(self) -> None:
        pass


_HEAP = HeapMemory()


# --------------------------------------------------------------------------
# one hyperstack


class Hyperstack:
    """One CZT hyperstack being assembled.

    Storage grows with amortised doubling along T, Z and C (no O(n^2) copying
    when planes arrive one index at a time); :attr:`array` is a TZCYX view of
    the filled extent (zeros where missing). The view belongs to the current
    storage: after a later growth it no longer follows new planes, so take a
    fresh one (or a copy) after adding. ``max_bytes`` caps its storage
    (default :func:`default_max_bytes`). Not thread-safe by itself; a
    :class:`StackStore` serialises access (use :meth:`StackStore.snapshot`).
    """

    def __init__(
        self,
        key: str,
        dtype: Union[str, np.dtype],
        yx: tuple[int, int],
        *,
        channel_names: Optional[Sequence[Optional[str]]] = None,
        calibration: Optional[Calibration] = None,
        max_bytes: Optional[int] = None,
        _budget: Optional[_Budget] = None,
        _memory: Optional[HeapMemory] = None,
    ) -> None:
        self.key = _check_key(key)
        self._memory = _memory or _HEAP
        self.dtype = _check_dtype(dtype, f"stack {key!r}")
        if len(yx) != 2 or any(isinstance(n, bool) or int(n) != n or n <= 0 for n in yx):
            raise StackError(f"stack {key!r}: yx must be two positive integers, got {yx!r}")
        self.yx = (int(yx[0]), int(yx[1]))
        if _budget is None:
            _budget = _Budget(max_bytes if max_bytes is not None else default_max_bytes())
        self._budget = _budget
        self._data = np.zeros((0, 0, 0) + self.yx, dtype=self.dtype)
        self._present = np.zeros((0, 0, 0), dtype=bool)
        # (T, Z, C) capacity: True where the storage holds no plane and was
        # never zeroed (recycled memory); zeroed when read. None: none such
        self._undefined: Optional[np.ndarray] = None
        self._ranges: dict[tuple[int, int, int], tuple[float, float]] = {}  # (min, max) of planes read with it
        self._dims = [0, 0, 0]  # filled extent T, Z, C
        self._count = 0
        self._nbytes = 0  # bytes reserved in the budget
        self._channel_names: list[Optional[str]] = list(channel_names or [])
        self._calibration = calibration or Calibration()
        self.version = 0
        #: times the planes moved within their storage (a Z or C growth in
        #: place): a reader of the storage that raced a move reads again
        self.moves = 0
        # combined axes: value tuple -> index, by first appearance
        self._labels: dict[str, dict[tuple, int]] = {}
        self._label_components: dict[str, tuple[str, ...]] = {}

    # -- reading --------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self._dims[0], self._dims[1], self._dims[2]) + self.yx  # type: ignore[return-value]

    @property
    def array(self) -> np.ndarray:
        """(T, Z, C, Y, X) view of the filled extent; zeros where missing."""
        t, z, c = self._dims
        if self._undefined is not None:
            self._zero_undefined()
        return self._data[:t, :z, :c]

    def _zero_undefined(self) -> None:
        """Zero the planes of the filled extent that recycled storage left
        undefined (nothing arrived there): missing planes read as zeros."""
        assert self._undefined is not None
        t, z, c = self._dims
        for tt, zz, cc in np.argwhere(self._undefined[:t, :z, :c]):
            self._data[tt, zz, cc] = 0
            self._undefined[tt, zz, cc] = False
        if not self._undefined.any():
            self._undefined = None

    @property
    def storage(self) -> np.ndarray:
        """The whole (T, Z, C, Y, X) storage, capacity included: a plane at
        (t, z, c) of :attr:`array` is ``storage[t, z, c]`` too."""
        return self._data

    @property
    def present(self) -> np.ndarray:
        """(T, Z, C) booleans: which planes have arrived."""
        t, z, c = self._dims
        return self._present[:t, :z, :c]

    def plane_range(self, t: int, z: int, c: int) -> Optional[tuple[float, float]]:
        """(min, max) of the plane at (t, z, c) when it was taken while the
        plane was read in (see :meth:`PlaneReader.read_into`), else None."""
        return self._ranges.get((t, z, c))

    @property
    def channel_names(self) -> list[Optional[str]]:
        names = self._channel_names[: self._dims[2]]
        return names + [None] * (self._dims[2] - len(names))

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    @property
    def planes(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes of storage held (capacity, not just the filled extent)."""
        return self._nbytes

    def info(self) -> StackInfo:
        missing = [tuple(int(i) for i in m) for m in np.argwhere(~self.present)]
        return StackInfo(
            key=self.key,
            shape=self.shape,
            dtype=self.dtype.name,
            planes=self._count,
            missing=missing,  # type: ignore[arg-type]
            channel_names=self.channel_names,
            calibration=self._calibration,
            version=self.version,
            axis_labels={
                ax: [list(v) for v in labels] for ax, labels in self._labels.items() if labels
            },
            axis_components={
                ax: list(self._label_components[ax]) for ax, labels in self._labels.items() if labels
            },
        )

    def __repr__(self) -> str:
        return f"Hyperstack({self.key!r}, TZCYX={self.shape}, {self.dtype.name}, planes={self._count})"

    # -- writing --------------------------------------------------------------

    def add(
        self,
        t: int,
        z: int,
        c: int,
        plane: np.ndarray,
        *,
        channel_name: Optional[str] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        """Put ``plane`` at (t, z, c), replacing what was there.

        Raises :class:`PlaneRejected` (the stack unchanged) for a bad index,
        a plane that is not 2-D, a dtype or YX shape other than the stack's,
        or a growth beyond the memory cap.
        """
        where = f"plane for stack {self.key!r} at (t={t}, z={z}, c={c})"
        t, z, c = (_check_index(n, v, where) for n, v in (("t", t), ("z", z), ("c", c)))
        plane = self._check_plane(plane, where)
        self._ensure_capacity(t + 1, z + 1, c + 1, where)
        self._put(t, z, c, plane, channel_name, calibration)

    def add_plane(
        self,
        plane: np.ndarray,
        components: PlaneComponents,
        *,
        mapping: Optional[AxisMapping] = None,
        calibration: Optional[Calibration] = None,
    ) -> tuple[int, int, int]:
        """Place a plane by its components; returns its (t, z, c)."""
        mapping = mapping or AxisMapping()
        pending: dict[str, tuple] = {}
        idx = {}
        for axis, names in mapping.axis_components().items():
            idx[axis], new_label = self._resolve(axis, names, components)
            if new_label is not None:
                pending[axis] = new_label
        self.add(
            idx["t"], idx["z"], idx["c"], plane,
            channel_name=components.channel_name, calibration=calibration,
        )
        for axis, label in pending.items():  # commit labels only once the plane is in
            self._labels.setdefault(axis, {})[label] = idx[axis]
            self._label_components[axis] = mapping.axis_components()[axis]
        return idx["t"], idx["z"], idx["c"]

    # -- internals ------------------------------------------------------------

    def _resolve(
        self, axis: str, names: tuple[str, ...], comps: PlaneComponents
    ) -> tuple[int, Optional[tuple]]:
        """Index along ``axis``, and the label tuple if it is a new one."""
        if not names:
            return 0, None
        if _direct(names):
            return int(getattr(comps, names[0])), None
        label = tuple(getattr(comps, n) for n in names)
        table = self._labels.get(axis, {})
        if self._label_components.get(axis, names) != names:
            raise PlaneRejected(
                f"stack {self.key!r}: its {axis.upper()} axis is labelled by "
                f"{list(self._label_components[axis])}, this plane's mapping uses {list(names)}; "
                "send it to another stack or keep one mapping per stack"
            )
        if label in table:
            return table[label], None
        return len(table), label

    def _check_plane(self, plane: Any, where: str) -> np.ndarray:
        plane = _as_plane(plane, where)
        if plane.dtype.newbyteorder("=") != self.dtype:
            raise PlaneRejected(
                f"{where} has dtype {plane.dtype.name} but the stack is {self.dtype.name}: "
                f"convert it (plane.astype('{self.dtype.name}')) or send it to another stack"
            )
        if plane.shape != self.yx:
            raise PlaneRejected(
                f"{where} has YX shape {plane.shape} but the stack is {self.yx}: "
                "crop/resize it or send it to another stack"
            )
        return plane

    def _plane_bytes(self) -> int:
        return self.yx[0] * self.yx[1] * self.dtype.itemsize + 1  # + presence flag

    def _ensure_capacity(self, nt: int, nz: int, nc: int, where: str) -> None:
        cap = self._present.shape
        need = (nt, nz, nc)
        if all(n <= k for n, k in zip(need, cap)):
            return
        exact = tuple(max(n, k) for n, k in zip(need, cap))
        doubled = tuple(
            k if n <= k else (max(n, 2 * k) if k else n) for n, k in zip(need, cap)
        )
        per_plane = self._plane_bytes()
        chosen = None
        for cand in dict.fromkeys((doubled, exact)):  # prefer doubling, fall back to exact
            try:
                self._budget.reserve(
                    self._nbytes, math.prod(cand) * per_plane,
                    f"{where}: growing to T,Z,C = {cand}",
                )
            except PlaneRejected:
                if cand == exact:
                    raise
                continue
            chosen = cand
            break
        assert chosen is not None
        new_bytes = math.prod(chosen) * per_plane
        t, z, c = cap
        present = np.zeros(chosen, dtype=bool)
        present[:t, :z, :c] = self._present
        data = self._memory.grow(self._data, cap, chosen) if t else None  # the planes stay in their memory
        zeroed = False  # whether the positions beyond the old capacity read as zeros
        if data is not None and chosen[1:] != cap[1:]:
            self.moves += 1  # planes moved within their memory
        if data is None:
            try:
                data, zeroed = self._memory.allocate(chosen + self.yx, self.dtype)
            except (MemoryError, ValueError):  # ValueError: larger than the address space
                self._budget.free(new_bytes - self._nbytes)  # undo the reservation
                raise PlaneRejected(
                    f"{where}: not enough memory to grow the stack to T,Z,C = {chosen} "
                    f"({_gib(new_bytes)}); check the indices or close stacks"
                ) from None
            data[:t, :z, :c] = self._data
            self._memory.free(self._data)
        undefined = np.full(chosen, not zeroed, dtype=bool)
        undefined[:t, :z, :c] = self._undefined if self._undefined is not None else False
        self._data, self._present, self._nbytes = data, present, new_bytes
        self._undefined = undefined if undefined.any() else None

    def release(self) -> None:
        """Give the storage back to the store's memory (the stack is gone)."""
        self._memory.free(self._data)

    def _put(self, t, z, c, plane, channel_name, calibration) -> None:
        rng = None
        if isinstance(plane, PlaneReader):
            try:
                rng = plane.read_into(self._data[t, z, c])  # straight into its place: no copy in between
            except BaseException:
                # the read stopped part-way: the plane there (if any) is gone
                if self._present[t, z, c]:
                    self._present[t, z, c] = False
                    self._count -= 1
                self._data[t, z, c] = 0
                raise
        else:
            self._data[t, z, c] = plane
        if self._undefined is not None:
            self._undefined[t, z, c] = False
        if rng is not None:
            self._ranges[(t, z, c)] = rng
        else:
            self._ranges.pop((t, z, c), None)
        if not self._present[t, z, c]:
            self._present[t, z, c] = True
            self._count += 1
        for i, v in enumerate((t, z, c)):
            self._dims[i] = max(self._dims[i], v + 1)
        if channel_name is not None:
            if len(self._channel_names) <= c:
                self._channel_names.extend([None] * (c + 1 - len(self._channel_names)))
            self._channel_names[c] = str(channel_name)
        if calibration is not None:
            self._calibration = calibration
        self.version += 1

    @classmethod
    def _from_array(
        cls,
        key: str,
        array: np.ndarray,
        *,
        channel_names=None,
        calibration=None,
        budget: _Budget,
        copy: bool = True,
        memory: Optional[HeapMemory] = None,
    ) -> "Hyperstack":
        what = f"stack {key!r}"
        arr = np.asarray(array)
        if arr.ndim != 5 or 0 in arr.shape:
            raise PlaneRejected(
                f"{what}: add_stack needs a non-empty 5-D array ordered (T, Z, C, Y, X), "
                f"got shape {arr.shape}"
            )
        dt = _check_dtype(arr.dtype, what)
        for n, v in zip("tzc", arr.shape[:3]):
            _check_index(n, v - 1, what)
        stack = cls(key, dt, arr.shape[3:], channel_names=channel_names,
                    calibration=calibration, _budget=budget, _memory=memory)
        nbytes = math.prod(arr.shape[:3]) * stack._plane_bytes()
        budget.reserve(0, nbytes, f"{what} of shape {arr.shape} {dt.name}")
        try:
            if copy:
                data, _ = stack._memory.allocate(arr.shape, dt)
                np.copyto(data, arr, casting="unsafe")
            else:
                data = np.ascontiguousarray(arr, dtype=dt)
        except MemoryError:
            budget.free(nbytes)
            raise PlaneRejected(f"{what}: not enough memory for {_gib(nbytes)}") from None
        stack._data = data
        stack._present = np.ones(arr.shape[:3], dtype=bool)
        stack._dims = list(arr.shape[:3])
        stack._count = math.prod(arr.shape[:3])
        stack._nbytes = nbytes
        stack.version = 1
        return stack


# --------------------------------------------------------------------------
# the store


class StackStore:
    """Thread-safe collection of Hyperstacks keyed by window key.

    ``max_bytes`` caps the memory all stacks may hold together (default:
    :func:`default_max_bytes`, half the RAM); a plane that would need more is
    refused with :class:`PlaneRejected`, and nothing already stored changes.
    ``memory`` allocates the stacks' storage (default :class:`HeapMemory`).
    """

    def __init__(self, max_bytes: Optional[int] = None, memory: Optional[HeapMemory] = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or int(max_bytes) <= 0):
            raise StackError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self._budget = _Budget(int(max_bytes) if max_bytes is not None else default_max_bytes())
        self._stacks: dict[str, Hyperstack] = {}
        self._lock = threading.RLock()
        self.memory = memory or _HEAP

    @property
    def max_bytes(self) -> int:
        return self._budget.limit  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes held by all stacks."""
        with self._lock:
            return self._budget.used

    def add_plane(
        self,
        plane: np.ndarray,
        components: Union[PlaneComponents, Mapping[str, Any]],
        *,
        key: Optional[str] = None,
        mapping: Optional[AxisMapping] = None,
        calibration: Optional[Calibration] = None,
    ) -> tuple[str, int, int, int]:
        """Place a plane by its components; returns ``(key, t, z, c)``.

        The key is ``key`` when given, else the mapping's window key
        (default plate+well+site). The first plane of a key creates its stack
        with the plane's dtype and YX shape.
        """
        comps = _as_components(components)
        mapping = mapping or AxisMapping()
        key = _check_key(key) if key is not None else mapping.window_key(comps)
        with self._lock:
            stack = self._stacks.get(key)
            if stack is None:
                first = _as_plane(plane, f"first plane of stack {key!r}")
                stack = Hyperstack(key, first.dtype, first.shape, _budget=self._budget, _memory=self.memory)
            try:
                t, z, c = stack.add_plane(plane, comps, mapping=mapping, calibration=calibration)
            except BaseException:
                if key not in self._stacks:  # a new stack whose first plane failed
                    self._budget.free(stack.nbytes)
                    stack.release()
                raise
            self._stacks[key] = stack
        return key, t, z, c

    def add_at(
        self,
        key: str,
        t: int,
        z: int,
        c: int,
        plane: np.ndarray,
        *,
        channel_name: Optional[str] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        """Put a plane at explicit (t, z, c) of stack ``key`` (created if new).
        Do not mix with combined-axis mappings on the same stack."""
        key = _check_key(key)
        with self._lock:
            stack = self._stacks.get(key)
            if stack is None:
                first = _as_plane(plane, f"first plane of stack {key!r}")
                stack = Hyperstack(key, first.dtype, first.shape, _budget=self._budget, _memory=self.memory)
            try:
                stack.add(t, z, c, plane, channel_name=channel_name, calibration=calibration)
            except BaseException:
                if key not in self._stacks:
                    self._budget.free(stack.nbytes)
                    stack.release()
                raise
            self._stacks[key] = stack

    def add_stack(
        self,
        key: str,
        array5d_tzcyx: np.ndarray,
        *,
        channel_names: Optional[Sequence[Optional[str]]] = None,
        calibration: Optional[Calibration] = None,
        copy: bool = True,
    ) -> None:
        """Store a whole (T, Z, C, Y, X) stack at once, replacing any stack of
        that key. ``copy=False`` adopts a C-contiguous array of an allowed
        dtype without copying (the caller must not modify it afterwards)."""
        key = _check_key(key)
        if channel_names is not None:
            channel_names = [None if n is None else str(n) for n in channel_names]
        with self._lock:
            old = self._stacks.get(key)
            old_bytes = old.nbytes if old is not None else 0
            self._budget.free(old_bytes)  # the new one replaces it
            try:
                stack = Hyperstack._from_array(
                    key, array5d_tzcyx, channel_names=channel_names,
                    calibration=calibration, budget=self._budget, copy=copy, memory=self.memory,
                )
            except BaseException:
                self._budget.used += old_bytes  # the old stack stays
                raise
            if old is not None:
                stack.version = old.version + 1
                old.release()
            self._stacks[key] = stack

    def get(self, key: str) -> Hyperstack:
        """The live stack (see :meth:`snapshot` for a consistent copy)."""
        with self._lock:
            try:
                return self._stacks[key]
            except KeyError:
                raise StackNotFound(self._not_found(key)) from None

    def info(self, key: str) -> StackInfo:
        with self._lock:
            return self.get(key).info()

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._stacks)

    def infos(self) -> list[StackInfo]:
        with self._lock:
            return [s.info() for s in self._stacks.values()]

    def snapshot(self, key: str) -> tuple[np.ndarray, StackInfo]:
        """A C-contiguous copy of the (T, Z, C, Y, X) array and its info, taken
        under the lock (consistent even while planes keep arriving)."""
        with self._lock:
            stack = self.get(key)
            return np.array(stack.array, copy=True, order="C"), stack.info()

    def close(self, key: str) -> None:
        """Forget a stack and free its memory; StackNotFound if unknown."""
        with self._lock:
            stack = self._stacks.pop(key, None)
            if stack is None:
                raise StackNotFound(self._not_found(key))
            self._budget.free(stack.nbytes)
            stack.release()

    def clear(self) -> None:
        with self._lock:
            for stack in self._stacks.values():
                stack.release()
            self._stacks.clear()
            self._budget.used = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._stacks

    def __len__(self) -> int:
        with self._lock:
            return len(self._stacks)

    def __repr__(self) -> str:
        return f"StackStore({len(self)} stacks, {_gib(self.nbytes)} of {_gib(self.max_bytes)})"

    def _not_found(self, key: Any) -> str:
        known = list(self._stacks)
        shown = ", ".join(repr(k) for k in known[:10]) + (" ..." if len(known) > 10 else "")
        return f"no stack {key!r}; known stacks: {shown or 'none'}"


def _as_components(components: Union[PlaneComponents, Mapping[str, Any]]) -> PlaneComponents:
    if isinstance(components, PlaneComponents):
        return components
    if isinstance(components, Mapping):
        try:
            return PlaneComponents.from_dict(dict(components))
        except (ComponentError, TypeError) as exc:
            raise PlaneRejected(f"bad plane components {dict(components)!r}: {exc}") from None
    raise PlaneRejected(
        f"components must be PlaneComponents or a dict, got {type(components).__name__}"
    )

