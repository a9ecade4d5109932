"""Resync: the records of a damaged log that still verify on their own (a numba kernel).

After a corrupt record, what follows cannot be replayed in order, but each record that
still has the record magic, the log's generation and a valid crc32c at an 8-aligned
position is an acknowledged write that is now lost, and is reported as such
(``nvlog_check``). The walk checks the magic first (cheap), computes a checksum only for a
candidate, jumps over a record that verifies (a payload is never searched), and stops at a
checksum budget: a log full of forged candidates (magic, generation, a huge size, a bad
crc at every 8 bytes) costs a few passes over it, not one per candidate.

Caching note, as in ``replay``: numba's cache of ``resync`` is invalidated by changes to
this file only; after editing ``checksum.py`` (whose crc kernel is compiled into it) clear
``storage/__pycache__/*.nbi|*.nbc`` or touch this file.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from storage import nvlog_format as F
from storage.checksum import crc32c_kernel

_HDR = F.RECORD_HEADER
_CRC = F.CRC_SIZE
_MAGIC = F.RECORD_MAGIC
_VERSION = F.RECORD_VERSION
_VERSION_V1 = F.RECORD_VERSION_V1
_LZ4 = F.FLAG_LZ4


@njit(cache=True, nogil=True, inline="always")
def _u16(b, p):  # type: ignore[no-untyped-def]
    return np.int64(b[p]) | (np.int64(b[p + 1]) << 8)


@njit(cache=True, nogil=True, inline="always")
def _u32(b, p):  # type: ignore[no-untyped-def]
    return _u16(b, p) | (_u16(b, p + 2) << 16)


@njit(cache=True, nogil=True, inline="always")
def _u64(b, p):  # type: ignore[no-untyped-def]
    return _u32(b, p) | (_u32(b, p + 4) << 32)


@njit(cache=True, nogil=True)
def resync(log, start, stop, gen32, budget):  # type: ignore[no-untyped-def]
    """Records that verify on their own, starting at 8-aligned positions in [start, stop).

    A candidate has the record magic, generation `gen32` (any if negative), a consistent
    version/flags/stored, fits in the log, and a valid crc32c; its sequence number is not
    checked (that is what the caller reports). After a record the walk jumps over it, so
    a payload is never searched. Returns ``(rows, count, crc_bytes, gave_up)``: one row per
    record in the columns of ``replay.scan`` (IDX_*); `gave_up` when the crc work would pass
    `budget` bytes (the count is then a lower bound).
    """
    size = log.size
    rows = np.empty((16, F.IDX_COLUMNS), dtype=np.int64)
    count = 0
    spent = np.int64(0)
    gave_up = False
    pos = (np.int64(max(start, 0)) + 7) & ~np.int64(7)
    while pos < stop and size - pos >= _HDR + _CRC:
        if _u32(log, pos) != _MAGIC or (gen32 >= 0 and _u32(log, pos + 8) != gen32):
            pos += 8
            continue
        version = _u16(log, pos + 4)
        flags = _u16(log, pos + 6)
        length = _u32(log, pos + 12)
        if version == _VERSION:
            stored = _u32(log, pos + 28)
            if stored != length and not flags & _LZ4:
                pos += 8
                continue
        elif version == _VERSION_V1 and not flags & _LZ4:
            stored = length
        else:
            pos += 8
            continue
        rsize = (_HDR + stored + _CRC + 7) & ~np.int64(7)
        if rsize > size - pos:
            pos += 8
            continue
        body_end = pos + _HDR + stored
        spent += body_end - pos
        if spent > budget:
            gave_up = True
            break
        if crc32c_kernel(log, pos, body_end, 0) != _u32(log, body_end):
            pos += 8
            continue
        if count == rows.shape[0]:
            bigger = np.empty((2 * count, F.IDX_COLUMNS), dtype=np.int64)
            bigger[:count] = rows
            rows = bigger
        row = rows[count]
        row[F.IDX_POS] = pos
        row[F.IDX_SEQ] = _u64(log, pos + 16)
        row[F.IDX_LUN] = _u32(log, pos + 24)
        row[F.IDX_OFFSET] = _u64(log, pos + 32)
        row[F.IDX_LENGTH] = length
        row[F.IDX_CLIENT] = _u64(log, pos + 40)
        row[F.IDX_REQUEST] = _u64(log, pos + 48)
        row[F.IDX_FLAGS] = flags
        row[F.IDX_STORED] = stored
        count += 1
        pos += rsize
    return rows[:count], count, spent, gave_up


def budget(span: int) -> int:
    # Honest logs cost one pass; forged candidates (magic, generation, a huge stored size,
    # a bad crc at every 8 bytes) would cost a pass per candidate without a bound.
    return 4 * max(span, 0) + (1 << 20)


def warm() -> None:
    """Compile (or load) ``resync`` for writable and read-only logs, at domain boot: the
    corrupt path must not pay a compilation inside a takeover."""
    writable = np.zeros(2 * F.record_size(0), dtype=np.uint8)
    readonly = np.frombuffer(bytes(writable), dtype=np.uint8)
    for log in (writable, readonly):
        resync(log, 0, log.size, -1, 1 << 20)
