"""XOR parity over 4 KiB blocks: numpy for a few blocks, a numba kernel for batches of stripes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numba import njit

from storage.raid.device import BLOCK_SIZE

ZERO_BLOCK = bytes(BLOCK_SIZE)


def xor_blocks(blocks: Iterable[bytes]) -> bytes:
    """XOR of equally sized blocks; the XOR of nothing is the zero block."""
    acc = np.zeros(BLOCK_SIZE // 8, dtype=np.uint64)
    for b in blocks:
        acc ^= np.frombuffer(b, dtype=np.uint64)
    return acc.tobytes()


@njit(cache=True, nogil=True)
def _gather_xor(words, idx, out):  # type: ignore[no-untyped-def]
    nm, ns = idx.shape
    w = words.shape[1]
    for s in range(ns):
        r0 = idx[0, s]
        for k in range(w):
            out[s, k] = words[r0, k]
        for m in range(1, nm):
            r = idx[m, s]
            for k in range(w):
                out[s, k] ^= words[r, k]


def gather_xor(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Parity of many stripes in one pass: ``out[s] = XOR_m rows[idx[m, s]]``.

    ``rows`` is a (k, 4096) uint8 array of blocks in any order and ``idx`` a (members,
    stripes) array of row numbers, so the data never has to be reordered into stripes first.
    """
    words = np.ascontiguousarray(rows, dtype=np.uint8).reshape(rows.shape[0], BLOCK_SIZE)
    words = words.view(np.uint64)
    ix = np.ascontiguousarray(idx, dtype=np.int64)
    if ix.size and (ix.min() < 0 or ix.max() >= words.shape[0]):
        raise IndexError("row index out of range")
    out = np.empty((ix.shape[1], words.shape[1]), dtype=np.uint64)
    if ix.shape[0] and ix.shape[1]:
        _gather_xor(words, ix, out)
    return out.view(np.uint8)
