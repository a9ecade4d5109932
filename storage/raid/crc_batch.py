"""crc32c of many 4 KiB blocks in one numba call.

The checksum table and the file system above both need one crc per block. Calling
``storage.checksum.crc32c`` per block costs a dispatcher round trip (microseconds) per 4 KiB,
which dominated batched writes; these kernels loop over the rows of a 2-D array inside numba,
reusing ``crc32c_kernel`` (the SSE4.2 kernel where the CPU has it), so the values are exactly
those of the per-block functions.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from storage.checksum import crc32c_kernel


@njit(cache=True, nogil=True)
def _crcs(flat, nrows, rowlen, out):  # type: ignore[no-untyped-def]
    for r in range(nrows):
        out[r] = crc32c_kernel(flat, r * rowlen, (r + 1) * rowlen, 0)


@njit(cache=True, nogil=True)
def _indexed_crcs(flat, nrows, rowlen, index, out):  # type: ignore[no-untyped-def]
    seed = np.empty(8, dtype=np.uint8)
    for r in range(nrows):
        v = np.int64(index[r])
        for k in range(8):
            seed[k] = np.uint8((v >> (8 * k)) & 0xFF)
        c = crc32c_kernel(seed, 0, 8, 0)
        out[r] = crc32c_kernel(flat, r * rowlen, (r + 1) * rowlen, c)


def _flat(rows: np.ndarray | bytes | bytearray | memoryview, rowlen: int) -> tuple[np.ndarray, int]:
    if isinstance(rows, np.ndarray):
        flat = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
    else:
        flat = np.frombuffer(rows, dtype=np.uint8)
    if flat.size % rowlen:
        raise ValueError(f"{flat.size} bytes is not a whole number of {rowlen}-byte rows")
    return flat, flat.size // rowlen


def block_crcs(rows: np.ndarray | bytes | bytearray | memoryview, rowlen: int = 4096) -> np.ndarray:
    """``crc32c(row)`` of every ``rowlen``-byte row, as uint32 (the WAFL pointer checksum)."""
    flat, n = _flat(rows, rowlen)
    out = np.empty(n, dtype=np.uint32)
    if n:
        _crcs(flat, n, rowlen, out)
    return out


def indexed_block_crcs(rows: np.ndarray | bytes | bytearray | memoryview,
                       index: np.ndarray, rowlen: int = 4096) -> np.ndarray:
    """``crc32c(row, crc32c(pack("<Q", index[r])))`` per row: the RAID checksum-table value."""
    flat, n = _flat(rows, rowlen)
    idx = np.ascontiguousarray(index, dtype=np.int64)
    if idx.size != n:
        raise ValueError(f"{n} rows but {idx.size} indexes")
    out = np.empty(n, dtype=np.uint32)
    if n:
        _indexed_crcs(flat, n, rowlen, idx, out)
    return out


@njit(cache=True, nogil=True)
def _gather_indexed_crcs(flat, rowlen, sel, index, out):  # type: ignore[no-untyped-def]
    seed = np.empty(8, dtype=np.uint8)
    for r in range(sel.size):
        v = np.int64(index[r])
        for k in range(8):
            seed[k] = np.uint8((v >> (8 * k)) & 0xFF)
        c = crc32c_kernel(seed, 0, 8, 0)
        s = np.int64(sel[r]) * rowlen
        out[r] = crc32c_kernel(flat, s, s + rowlen, c)


def gather_indexed_crcs(rows: np.ndarray, sel: np.ndarray, index: np.ndarray,
                        rowlen: int = 4096) -> np.ndarray:
    """``indexed_block_crcs`` of ``rows[sel]`` without materialising the gather."""
    flat, n = _flat(rows, rowlen)
    s = np.ascontiguousarray(sel, dtype=np.int64)
    idx = np.ascontiguousarray(index, dtype=np.int64)
    if s.size != idx.size:
        raise ValueError(f"{s.size} rows selected but {idx.size} indexes")
    if s.size and (s.min() < 0 or s.max() >= n):
        raise IndexError("row selection out of range")
    out = np.empty(s.size, dtype=np.uint32)
    if s.size:
        _gather_indexed_crcs(flat, rowlen, s, idx, out)
    return out
