"""Stacks assembled in shared memory (SharedStackMemory): the same pixels as
in process memory, segments grown in place along T, kept while pinned, and
none left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fiji_bridge.hyperstack import StackStore
from fiji_bridge.stack_memory import SharedStackMemory
from fiji_bridge.supervisor import attach_array

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory in /dev/shm")


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def test_shared_store_holds_what_a_heap_store_holds_and_grows_t_in_place():
    mem = SharedStackMemory()
    shared, heap = StackStore(memory=mem), StackStore()
    rng = np.random.default_rng(1)
    planes = {(t, z, c): rng.integers(0, 65535, (20, 30), dtype=np.uint16) for t in range(5) for z in range(3) for c in range(2)}
    try:
        names = []
        for (t, z, c), p in planes.items():  # C and Z fill first, then T grows
            for store in (shared, heap):
                store.add_at("k", t, z, c, p)
            names.append(mem.desc(shared.get("k").storage)["shm"])
            assert np.array_equal(shared.get("k").array, heap.get("k").array)
        # once Z and C are full, T grows in place: one segment from then on
        assert len(set(names[names.index(names[-1]):])) == 1
        assert mem.segments == [names[-1]]  # the outgrown segments were unlinked
        # the worker's view: the segment as the descriptor names it
        desc = mem.desc(shared.get("k").storage)
        arr, mm = attach_array(desc)
        try:
            assert np.array_equal(arr[: 5, :3, :2], heap.get("k").array)
        finally:
            del arr
            mm.close()
    finally:
        shared.clear()
        mem.close()
    assert not any(_exists(n) for n in names)


def test_a_pinned_segment_outlives_its_stack_until_unpinned():
    mem = SharedStackMemory()
    store = StackStore(memory=mem)
    store.add_at("k", 0, 0, 0, np.ones((8, 8), np.uint8))
    name = mem.desc(store.get("k").storage)["shm"]
    mem.pin(name)
    store.close("k")
    assert _exists(name), "a job in flight still names it"
    mem.unpin(name)
    assert not _exists(name)
    mem.close()


def test_close_unlinks_every_segment():
    mem = SharedStackMemory()
    store = StackStore(memory=mem)
    for k in "abc":
        store.add_at(k, 0, 0, 0, np.ones((8, 8), np.uint16))
    names = list(mem.segments)
    mem.pin(names[0])
    store.close("a")
    mem.close()
    assert len(names) == 3 and not any(_exists(n) for n in names)
