"""Stacks assembled in shared memory (SharedStackMemory): the same pixels as
in process memory whatever order planes come in, recycled segments that never
show an old stack's pixels, growth in place, pins, planes read straight into
their place, and no segment left behind."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from fiji_bridge.hyperstack import PlaneReader, StackStore
from fiji_bridge.stack_memory import SharedStackMemory, warm_bytes
from fiji_bridge.supervisor import attach_array

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory in /dev/shm")


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def _reader(plane: np.ndarray) -> PlaneReader:
    def read(out: np.ndarray) -> None:
        out[...] = plane

    return PlaneReader(plane.shape, plane.dtype, read)


@pytest.fixture
def mem():
    m = SharedStackMemory(pool_bytes=16 << 20)
    yield m
    m.close()


def test_shared_store_holds_what_a_heap_store_holds_in_any_order(mem):
    """Stacks grown plane by plane in C, Z and T (in order and shuffled, some
    planes missing, some read straight into place), closed and the memory
    reused stack after stack: always numpy-equal to a heap store, missing
    planes zero, earlier views of a stack never showing other pixels than
    it showed or the stack holds now,
    and the worker's mapping (by the descriptor) showing the same pixels."""
    shared, heap = StackStore(memory=mem), StackStore()
    rng = np.random.default_rng(1)
    for round_ in range(6):
        T, Z, C = (int(v) for v in rng.integers(1, 5, 3))
        pos = [(t, z, c) for t in range(T) for z in range(Z) for c in range(C)]
        if round_ % 2:
            random.Random(round_).shuffle(pos)
        views = []
        for i, p in enumerate(pos):
            if i % 5 == 4:
                continue  # missing: must read as zeros, whatever the memory held before
            plane = rng.integers(1, 65535, (24, 40), dtype=np.uint16)
            shared.add_at("k", *p, _reader(plane) if i % 2 else plane)
            heap.add_at("k", *p, plane)
            if i % 7 == 0:
                view = shared.get("k").array
                views.append((view, view.copy()))
        want = heap.get("k").array
        got = shared.get("k").array
        assert got.shape == want.shape and np.array_equal(got, want), f"round {round_}"
        for view, then in views:  # never another stack's pixels: what it showed, or what came since
            t, z, c = view.shape[:3]
            for q in np.ndindex(t, z, c):
                assert np.array_equal(view[q], then[q]) or np.array_equal(view[q], want[q]), f"round {round_}: an earlier view"
        views.clear()
        view = then = None
        desc = mem.desc(shared.get("k").storage)
        arr, mm = attach_array(desc, whole=True)
        try:
            assert np.array_equal(arr[:T, :Z, :C], want)
        finally:
            del arr
            mm.close()
        shared.close("k")
        heap.close("k")


def test_a_closed_stack_s_segment_is_reused_without_its_pixels(mem):
    store = StackStore(memory=mem)
    store.add_at("a", 0, 0, 0, np.full((64, 64), 7, np.uint16))
    store.add_at("a", 0, 1, 0, np.full((64, 64), 7, np.uint16))
    first = mem.desc(store.get("a").storage)["shm"]
    store.close("a")
    assert _exists(first) and first in mem.segments, "pooled, not unlinked"
    store.add_at("b", 0, 1, 0, np.full((64, 64), 3, np.uint16))  # (0, 0, 0) never sent
    assert mem.desc(store.get("b").storage)["shm"] == first, "the pooled segment is taken"
    assert store.get("b").array[0, 0, 0].max() == 0, "a missing plane shows zeros, not the old stack's"
    assert (store.get("b").array[0, 1, 0] == 3).all()
    store.clear()


def test_growth_along_t_moves_nothing_and_along_z_moves_in_place(mem):
    store = StackStore(memory=mem)
    p = [np.full((32, 32), i + 1, np.uint8) for i in range(8)]
    store.add_at("k", 0, 0, 0, p[0])
    store.add_at("k", 1, 0, 0, p[1])  # T 1 -> 2: a new, doubled segment
    store.add_at("k", 2, 0, 0, p[2])  # T 2 -> 4
    st = store.get("k")
    name, before = mem.desc(st.storage)["shm"], st.array
    store.add_at("k", 3, 0, 0, p[3])  # fits: no new segment, nothing moved
    assert mem.desc(st.storage)["shm"] == name and st.moves == 0
    assert np.array_equal(before, st.array[:3]), "a view taken before a T growth stays valid"
    del before
    store.close("k")
    # Z growth inside a roomy (warm) segment: planes move in place, counted
    roomy = SharedStackMemory()
    roomy.warm(1 << 20)
    mem, store = roomy, StackStore(memory=roomy)
    store.add_at("z", 0, 0, 0, p[4])
    st = store.get("z")
    name = mem.desc(st.storage)["shm"]
    store.add_at("z", 0, 1, 0, p[5])
    store.add_at("z", 1, 2, 0, p[6])
    assert mem.desc(st.storage)["shm"] == name and st.moves >= 1
    want = np.zeros((2, 3, 1, 32, 32), np.uint8)
    want[0, 0, 0], want[0, 1, 0], want[1, 2, 0] = p[4], p[5], p[6]
    assert np.array_equal(st.array, want)
    store.clear()
    roomy.close()


def test_a_pinned_segment_outlives_its_stack_and_is_not_reused_until_unpinned(mem):
    store = StackStore(memory=mem)
    store.add_at("k", 0, 0, 0, np.ones((8, 8), np.uint8))
    name = mem.desc(store.get("k").storage)["shm"]
    mem.pin(name)
    store.close("k")
    store.add_at("j", 0, 0, 0, np.ones((8, 8), np.uint8))
    assert mem.desc(store.get("j").storage)["shm"] != name, "a job in flight still reads it"
    assert _exists(name)
    mem.unpin(name)
    assert _exists(name) and name in mem.segments, "pooled once the job is done"
    store.clear()


def test_the_pool_is_bounded_and_tells_the_worker_what_went():
    mem = SharedStackMemory(pool_bytes=1 << 20)
    store = StackStore(memory=mem)
    names = []
    for i in range(4):  # four 512 KiB stacks alive at once, then closed
        store.add_at(f"s{i}", 0, 0, 0, np.ones((512, 512), np.uint16))
        names.append(mem.desc(store.get(f"s{i}").storage)["shm"])
    store.clear()
    assert mem.pooled_bytes <= 1 << 20
    gone = mem.released()
    assert len(gone) == 2 and not any(_exists(n) for n in gone) and set(gone) <= set(names)
    assert mem.released() == [], "each name is told once"
    mem.close()
    assert not any(_exists(n) for n in names)


def test_a_failed_read_loses_only_its_plane_and_a_failed_first_plane_leaves_no_stack(mem):
    store = StackStore(memory=mem)
    store.add_at("f", 0, 0, 0, np.full((8, 8), 5, np.uint16))
    store.add_at("f", 0, 1, 0, np.full((8, 8), 6, np.uint16))

    def torn(out: np.ndarray) -> None:
        out[:2] = 9
        raise OSError("the producer truncated its segment")

    with pytest.raises(OSError):
        store.add_at("f", 0, 0, 0, PlaneReader((8, 8), np.uint16, torn))
    st = store.get("f")
    assert st.planes == 1 and st.array[0, 0, 0].max() == 0 and (st.array[0, 1, 0] == 6).all()
    used = store.nbytes
    with pytest.raises(OSError):
        store.add_at("g", 0, 0, 0, PlaneReader((8, 8), np.uint16, torn))
    assert "g" not in store and store.nbytes == used
    store.clear()


def test_warm_memory_is_taken_by_the_first_stack_and_close_unlinks_all():
    mem = SharedStackMemory()
    mem.warm(4 << 20)
    (warm,) = mem.segments
    store = StackStore(memory=mem)
    for k in "abc":
        store.add_at(k, 0, 0, 0, np.ones((64, 64), np.uint16))
    assert mem.desc(store.get("a").storage)["shm"] == warm
    names = list(mem.segments)
    mem.pin(names[1])
    store.close("b")
    mem.close()
    assert len(names) == 3 and not any(_exists(n) for n in names)


def test_warm_size_from_the_environment():
    assert warm_bytes({"FIJI_BRIDGE_WARM": "0"}) == 0
    assert warm_bytes({"FIJI_BRIDGE_WARM": "64m"}) == 64 << 20
    assert warm_bytes({"FIJI_BRIDGE_WARM": "1g"}) == min(1 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    with pytest.raises(ValueError, match="FIJI_BRIDGE_WARM"):
        warm_bytes({"FIJI_BRIDGE_WARM": "lots"})
