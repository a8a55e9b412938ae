"""Pixels of the plate store's images as chunk files, one (y, x) plane a chunk.

zarr-python 3 reads and writes each chunk through its asyncio event loop
thread; for the plate store's images (every plane one Blosc chunk, which is
how :class:`~fiji_bridge.backends.zarr_plate.ZarrPlateStore` writes them)
that machinery costs more than the compression itself: 0.15 GB/s against
0.5-0.9 GB/s written here for 1024x1024 uint16 on 2 cores, and a
3 MB field read 10 ms against 2 ms. So the planes go between numpy and the
chunk files here, with numcodecs' Blosc (which releases the GIL, so planes
run in parallel threads):

* :func:`write_planes` writes the chunk files that zarr would write for the
  array (v2: a Blosc frame; v3: the ``bytes`` (little endian) + ``blosc``
  codecs' output), named by the array's own chunk key encoding; chunks that
  are all zero are not written (zarr's default: they read as the fill value);
* :func:`read_planes` reads them back, or returns None when the array is
  not laid out that way (another codec, filters, chunks that are not whole
  planes, big endian...): the caller then reads it with zarr.

zarr stays the authority on names and metadata: the chunk keys come from
the array's parsed metadata, and the array metadata itself is written by
zarr (:class:`ArrayTemplates` copies what zarr wrote for the first array of
a kind to the next ones).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["ArrayTemplates", "blosc_of", "plane_codec", "read_planes", "write_planes", "writer_pool"]

_POOL: Optional[Any] = None
_POOL_LOCK = threading.Lock()


def writer_pool() -> Any:
    """Threads compressing and decompressing planes, shared by the stores of a process."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="zarr-planes")
        return _POOL


def blosc_of(compressor: Any) -> Any:
    """The numcodecs Blosc of a v2 compressor or a v3 ``BloscCodec`` (the
    same frame either way)."""
    from numcodecs import Blosc

    if isinstance(compressor, Blosc):
        return compressor
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}

    def text(v: Any) -> str:
        return str(v.value if hasattr(v, "value") else v)

    return Blosc(cname=text(compressor.cname), clevel=int(compressor.clevel), shuffle=shuffle[text(compressor.shuffle)])


def plane_codec(arr: Any) -> Optional[Any]:
    """The numcodecs codec that decodes each chunk of the zarr array ``arr``
    into a plane, or None unless the array is laid out as this module writes:
    C order, no filters, one Blosc chunk a whole (y, x) plane, little endian
    (or one byte)."""
    from numcodecs import Blosc

    m = arr.metadata
    if arr.ndim < 2:
        return None
    chunks = tuple(getattr(arr, "chunks", ()))
    if chunks[:-2] != (1,) * (arr.ndim - 2) or chunks[-2:] != tuple(arr.shape[-2:]):
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.itemsize > 1 and dtype.byteorder == ">":
        return None
    if getattr(m, "zarr_format", None) == 2:
        if m.filters or m.order != "C" or not isinstance(m.compressor, Blosc):
            return None
        return m.compressor
    codecs = tuple(getattr(m, "codecs", ()))
    if len(codecs) != 2 or type(codecs[0]).__name__ != "BytesCodec" or type(codecs[1]).__name__ != "BloscCodec":
        return None
    endian = getattr(codecs[0], "endian", None)
    if dtype.itemsize > 1 and str(getattr(endian, "value", endian)) != "little":
        return None
    return blosc_of(codecs[1])


def _plane_indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*shape[:-2])]


def write_planes(root: Path, data: np.ndarray, codec: Any, chunk_key: Callable[[tuple[int, ...]], str]) -> None:
    """Every (y, x) plane of ``data`` compressed with ``codec`` into
    ``root/<chunk_key(index + (0, 0))>``, planes in parallel threads; planes
    that are all zero are not written."""
    le = data.astype(data.dtype.newbyteorder("<"), copy=False) if data.dtype.itemsize > 1 else data

    def one(idx: tuple[int, ...]) -> None:
        plane = le[idx]
        if not plane.any():
            return
        path = root / chunk_key(idx + (0, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(codec.encode(np.ascontiguousarray(plane)))

    list(writer_pool().map(one, _plane_indices(data.shape)))


def read_planes(arr: Any, out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The whole zarr array ``arr`` (opened from a local folder), read chunk
    file by chunk file, or None when :func:`plane_codec` does not know its
    layout. A missing chunk reads as the fill value. ``out``: where to put
    it (the array's shape and dtype; each (y, x) plane contiguous, as in a
    transposed view of a field in another axis order), else a new array."""
    codec = plane_codec(arr)
    if codec is None:
        return None
    root = Path(str(arr.store.root)) / arr.path
    dtype = np.dtype(arr.dtype).newbyteorder("=")
    if out is None:
        out = np.empty(arr.shape, dtype=dtype)
    elif out.shape != tuple(arr.shape) or out.dtype != dtype or not out[(0,) * (out.ndim - 2)].flags.c_contiguous:
        raise ValueError(f"read_planes: out is {out.shape} {out.dtype}, the array {tuple(arr.shape)} {dtype} "
                         f"(with contiguous planes)")
    fill = arr.metadata.fill_value
    encode = arr.metadata.encode_chunk_key

    def one(idx: tuple[int, ...]) -> None:
        try:
            raw = (root / encode(idx + (0, 0))).read_bytes()
        except FileNotFoundError:
            out[idx] = 0 if fill is None else fill
            return
        codec.decode(raw, out=out[idx])

    indices = _plane_indices(arr.shape)
    if len(indices) <= 2:
        for idx in indices:
            one(idx)
    else:
        list(writer_pool().map(one, indices))
    return out


class ArrayTemplates:
    """Array metadata files as zarr wrote them, by kind of array, to give
    the next array of the same kind without a call into zarr: an array's
    metadata (``.zarray``/``.zattrs`` or ``zarr.json``) names no path, so
    two arrays of one shape, dtype, chunking and codecs have the same files."""

    FILES = (".zarray", ".zattrs", "zarr.json")

    def __init__(self) -> None:
        self._kinds: dict[Any, tuple[dict[str, bytes], Any]] = {}
        self._lock = threading.Lock()

    def make(self, key: Any, d: Path, create: Callable[[], Any]) -> Any:
        """Give the folder ``d`` the metadata of an array of kind ``key``
        and return zarr's parsed metadata of that kind (its
        ``encode_chunk_key`` names the chunk files): copied when an array of
        the kind was made before, else made by ``create()`` (zarr's own
        call, which must make the array at ``d`` and return it) and kept."""
        with self._lock:
            hit = self._kinds.get(key)
        if hit is not None:
            files, meta = hit
            d.mkdir(parents=True, exist_ok=True)
            for name, raw in files.items():
                (d / name).write_bytes(raw)
            return meta
        arr = create()
        files = {name: (d / name).read_bytes() for name in self.FILES if (d / name).is_file()}
        with self._lock:
            self._kinds[key] = (files, arr.metadata)
        return arr.metadata
