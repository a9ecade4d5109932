"""Pure-Python reference of ``storage.replay``: same signatures, same results.

Written for clarity, straight from the format in ``nvlog_format``, so tests can check
the numba kernels byte for byte against it and the benchmark can show what the kernels
buy. No numba here: ``crc32c_py`` and ``struct`` only (and ``lz4.block`` for compressed
records, called directly rather than through ``storage.nvlog``'s helpers).
"""

from __future__ import annotations

import lz4.block
import numpy as np

from storage.checksum import crc32c_py
from storage.nvlog_format import (
    CRC_SIZE,
    FLAG_LZ4,
    IDX_COLUMNS,
    IDX_FLAGS,
    IDX_LENGTH,
    IDX_LUN,
    IDX_OFFSET,
    IDX_POS,
    IDX_SEQ,
    IDX_STORED,
    LZ4_MAX_RATIO,
    RECORD_HEADER,
    RECORD_MAGIC,
    RECORD_STRUCT,
    RECORD_VERSION,
    RECORD_VERSION_V1,
    record_size,
)
from storage.replay import ReplayResult

__all__ = ["apply", "plan", "replay_region", "scan"]


def _signed64(v: int) -> int:
    # The numba index is int64: u64 fields above 2**63 read back negative there.
    return v - (1 << 64) if v >= 1 << 63 else v


def scan(log: np.ndarray, generation: int, base_seq: int) -> tuple[np.ndarray, int, int]:
    """Walk the records from position 0; stop at the first one that does not verify."""
    data = memoryview(np.ascontiguousarray(log)).cast("B")
    size = len(data)
    rows: list[list[int]] = []
    pos = 0
    expected = base_seq
    while size - pos >= RECORD_HEADER + CRC_SIZE:
        (magic, version, flags, gen, length, seq, lun, stored, offset, client, request) = (
            RECORD_STRUCT.unpack_from(data, pos)
        )
        if magic != RECORD_MAGIC:
            break
        if version == RECORD_VERSION_V1 and not flags & FLAG_LZ4:
            stored = length  # the v1 pad
        elif version != RECORD_VERSION or (stored != length and not flags & FLAG_LZ4):
            break
        if gen != generation & 0xFFFFFFFF or _signed64(seq) != expected:
            break
        rsize = record_size(stored)
        if rsize > size - pos:
            break
        body_end = pos + RECORD_HEADER + stored
        crc = int.from_bytes(data[body_end : body_end + CRC_SIZE], "little")
        if crc32c_py(data[pos:body_end]) != crc:
            break
        rows.append(
            [pos, expected, lun, _signed64(offset), length, _signed64(client), _signed64(request),
             flags, stored]
        )
        expected += 1
        pos += rsize
    index = np.array(rows, dtype=np.int64).reshape(len(rows), IDX_COLUMNS)
    return index, len(rows), pos


def _payload(log: np.ndarray, row: list[int], disk_size: int) -> bytes | None:
    """The bytes `row` writes, or None for a bad row (outside the disk or the log, or an
    lz4 payload that does not decompress to exactly its length)."""
    off, length = row[IDX_OFFSET], row[IDX_LENGTH]
    src = row[IDX_POS] + RECORD_HEADER
    compressed = row[IDX_FLAGS] & FLAG_LZ4
    stored = row[IDX_STORED] if compressed else length
    in_disk = 0 <= off and 0 <= length and off + length <= disk_size
    in_log = RECORD_HEADER <= src and 0 <= stored and src + stored <= log.size
    if not (in_disk and in_log):
        return None
    raw = bytes(log[src : src + stored])
    if not compressed:
        return raw
    if not 0 <= length <= stored * LZ4_MAX_RATIO + 64:
        return None
    try:
        out = lz4.block.decompress(raw, uncompressed_size=length)
    except lz4.block.LZ4BlockError:
        return None
    return out if len(out) == length else None


def apply(
    log: np.ndarray, index: np.ndarray, count: int, lun: int, min_seq: int, disk: np.ndarray
) -> tuple[int, int, int]:
    """Write `lun`'s payloads with seq > min_seq to `disk` in log order; bad rows count bad."""
    records = nbytes = bad = 0
    for r in range(min(count, len(index))):
        row = [int(v) for v in index[r]]
        if row[IDX_LUN] != lun or row[IDX_SEQ] <= min_seq:
            continue
        data = _payload(log, row, disk.size)
        if data is None:
            bad += 1
            continue
        off, length = row[IDX_OFFSET], row[IDX_LENGTH]
        disk[off : off + length] = np.frombuffer(data, np.uint8)
        records += 1
        nbytes += length
    return records, nbytes, bad


def plan(
    log: np.ndarray, index: np.ndarray, count: int, lun: int, min_seq: int, disk_size: int
) -> tuple[np.ndarray, int]:
    """`lun`'s rows with seq > min_seq worth writing, in seq order; and the bad count.

    Bad (out of the disk or the log, or not decompressing) rows are counted and left
    out, as ``apply`` skips them; so are empty rows, and rows that a later row with the
    same (offset, length) overwrites entirely.
    """
    candidates: list[int] = []
    bad = 0
    for r in range(min(count, len(index))):
        row = [int(v) for v in index[r]]
        if row[IDX_LUN] != lun or row[IDX_SEQ] <= min_seq:
            continue
        if _payload(log, row, disk_size) is None:
            bad += 1
        elif row[IDX_LENGTH]:
            candidates.append(r)
    rows = []
    for k, r in enumerate(candidates):
        key = (int(index[r, IDX_OFFSET]), int(index[r, IDX_LENGTH]))
        later = {(int(index[q, IDX_OFFSET]), int(index[q, IDX_LENGTH])) for q in candidates[k + 1 :]}
        if key not in later:
            rows.append(r)
    return np.array(rows, dtype=np.int64), bad


def replay_region(
    log: np.ndarray,
    generation: int,
    base_seq: int,
    luns_to_disks: dict[int, np.ndarray],
    min_seqs: dict[int, int],
) -> ReplayResult:
    """Scan once, apply per LUN: the reference of ``storage.replay.replay_region``."""
    index, count, end_pos = scan(log, generation, base_seq)
    records = nbytes = bad = 0
    for lun, disk in luns_to_disks.items():
        r, b, x = apply(log, index, count, lun, min_seqs.get(lun, -1), disk)
        records += r
        nbytes += b
        bad += x
    return ReplayResult(records, nbytes, bad, base_seq + count - 1, end_pos, count)
