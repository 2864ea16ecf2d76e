"""Where weight values live: file-mapped arrays, and walking large ones without keeping them resident.

The loader maps large checkpoint tensors (:func:`map_array`) instead of reading them into memory: the
weight's numpy array is a read-only view of the checkpoint's data file, whose pages the kernel reads
on first touch. Code that streams over a large weight once (the emitter writing its variable, a
randomized SVD) walks it in :func:`row_blocks`, which drops each block's pages from this process
after use (:func:`release`): they stay in the page cache, but no longer count in the process's
resident memory, so the peak follows what is being computed, not the size of the weights.

Mapped arrays are read-only: a pass that tried to change one in place fails loudly instead of
writing through to (or silently diverging from) the input model; passes replace weights with
``Graph.set_weight``.

Example::

    for start, block in row_blocks(weight.value.reshape(-1, n)):   # ~64 MB at a time
        acc += block.T @ block
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np

__all__ = ["BLOCK_BYTES", "map_array", "mapping_of", "release", "row_blocks"]

BLOCK_BYTES = 16 << 20  # bytes per block of row_blocks
_PAGE = mmap.PAGESIZE


def map_array(path: Path, dtype, shape, offset: int) -> np.ndarray:
    """A read-only array of ``dtype`` and ``shape`` over the bytes of ``path`` from ``offset``
    (little-endian data on a little-endian machine only). The caller checks the bounds first: a
    mapping beyond the file's end would fault on access."""
    if sys.byteorder != "little":
        raise ValueError("mapping little-endian data needs a little-endian machine")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mm, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset).reshape(shape)


def mapping_of(array: np.ndarray):
    """The ``mmap`` an array (or a view of one) reads from, or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps a memoryview of the mapping
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def release(array: np.ndarray) -> None:
    """Drop the resident pages of a file-mapped, contiguous ``array`` from this process (the data stays in
    the file and is read again if touched); nothing for any other array."""
    mm = mapping_of(array)
    if mm is None or not array.size or not (array.flags.c_contiguous or array.flags.f_contiguous):
        return
    start = array.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data
    first = start - start % _PAGE
    end = min(start + array.nbytes, len(mm))
    if end > first and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, end - first)
        except (OSError, ValueError):
            pass


def row_blocks(array: np.ndarray, max_bytes: int | None = None):
    """``(start row, block)`` over the leading axis of ``array`` in blocks of about ``max_bytes``
    (default BLOCK_BYTES); a file-mapped block's pages are released once the caller moves on."""
    max_bytes = max_bytes or BLOCK_BYTES
    rows = array.shape[0] if array.ndim else 1
    if not array.ndim:
        yield 0, array
        return
    row_bytes = max(1, array.nbytes // max(rows, 1))
    step = max(1, max_bytes // row_bytes)
    for start in range(0, rows, step):
        block = array[start:start + step]
        yield start, block
        release(block)

