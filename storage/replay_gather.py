"""Gather the payloads of planned replay rows into one buffer of whole 4 KiB blocks.

A takeover onto file-system LUNs puts the planned rows (``replay.plan``) into the block
cache. One Python ``cache.write`` per row (plus a ``tobytes`` per payload) made that ~98% of
a takeover's time; here one numba pass copies every *block-aligned* raw row's payload, cut
into 4 KiB blocks, into one buffer, and the cache takes them all in one dict update
(``BlockCache.put_blocks``). Rows that are not whole aligned blocks (partial or unaligned
writes) and compressed rows are marked for the caller's per-row path, which reads the old
contents of the block they touch.

Caching note: numba caches these kernels per file; the streaming copy helpers come from
``storage.replay`` (clear ``storage/__pycache__/*.nbi|*.nbc`` after editing that file).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from storage.nvlog_format import (FLAG_LZ4, IDX_COLUMNS, IDX_FLAGS, IDX_LENGTH, IDX_OFFSET,
                                  IDX_POS, RECORD_HEADER)
from storage.replay import _copy_payload, _store_fence

BLOCK = 4096
_MASK = BLOCK - 1


@njit(cache=True, nogil=True)
def _gather_kernel(log, index, rows):  # type: ignore[no-untyped-def]
    n = rows.size
    first = np.empty(n, dtype=np.int64)  # per row: its first block's slot, -1: per-row path
    pieces = 0
    lsize = log.size
    for k in range(n):
        r = rows[k]
        off = index[r, IDX_OFFSET]
        length = index[r, IDX_LENGTH]
        src = index[r, IDX_POS] + RECORD_HEADER
        # A plan only holds rows that fit the log and the LUN; checked again because a
        # bad row here would read outside the log (numba does not bounds-check).
        simple = (index[r, IDX_FLAGS] & FLAG_LZ4) == 0 and (off & _MASK) == 0 \
            and (length & _MASK) == 0 and length > 0 and off >= 0 \
            and src >= RECORD_HEADER and src <= lsize - length
        if simple:
            first[k] = pieces
            pieces += length // BLOCK
        else:
            first[k] = -1
    blocks = np.empty(pieces, dtype=np.int64)
    data = np.empty(pieces * BLOCK, dtype=np.uint8)
    for k in range(n):
        p = first[k]
        if p < 0:
            continue
        r = rows[k]
        length = index[r, IDX_LENGTH]
        b0 = index[r, IDX_OFFSET] // BLOCK
        for j in range(length // BLOCK):
            blocks[p + j] = b0 + j
        _copy_payload(data, p * BLOCK, log, index[r, IDX_POS] + RECORD_HEADER, length)
    _store_fence()
    return first, blocks, data


def gather_blocks(log: np.ndarray, index: np.ndarray,
                  rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The payloads of `rows` (index rows, in the order to apply them) as 4 KiB blocks.

    Returns ``(first, blocks, data)``: ``first[k]`` is the slot of row k's first block, or
    -1 when row k must take the per-row path (not whole aligned blocks, or compressed);
    slot i is block number ``blocks[i]`` with contents ``data[i*4096:(i+1)*4096]``. Slots
    are in row order, so where a block appears twice the later slot is the later write.
    """
    return _gather_kernel(log, index, np.ascontiguousarray(rows, dtype=np.int64))


def warm() -> None:
    """Compile or load the kernel for a writable and a read-only log (see replay.warm)."""
    writable = np.zeros(2 * BLOCK, dtype=np.uint8)
    readonly = np.frombuffer(bytes(writable), dtype=np.uint8)
    index = np.zeros((1, IDX_COLUMNS), dtype=np.int64)
    for log in (writable, readonly):
        gather_blocks(log, index, np.zeros(0, dtype=np.int64))
