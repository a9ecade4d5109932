"""NVLog replay kernels: find the acknowledged records, then copy them to the disks.

At takeover the partner replays the failed node's NVRAM region onto that node's LUNs
before it serves them; clients wait for it, so this is the critical path. The work is
split in two so each part stays simple and the records are checksummed only once:

* ``scan`` walks the log area from its start and verifies every record (magic, version,
  generation, sequence number, length, crc32c). It stops at the first record that fails:
  the writer acknowledges a record only after all of it, checksum included, is in the
  region, so whatever follows a failed record was never acknowledged (a torn append, or
  stale bytes of an older generation behind the tail). The region's ``tail`` is never
  trusted; the scan's ``end_pos`` is where the writer appends next.
* ``apply`` copies the payloads of one LUN's records, in log order, onto that LUN's disk,
  skipping records a consistency point has already written (``seq <= min_seq``). Copying
  whole records in sequence order makes replay idempotent: replaying twice leaves the disk
  as replaying once.

Two variants of the second half:

* ``scan_apply`` does both in one pass: each record is copied to its disk right after its
  crc verified, while it is still in cache (scan and apply as two passes read the log
  twice and ran at ~0.24x memcpy; fused, see bench/replay_bench.py). Copying a record
  before the next one is verified changes nothing: the scan stops at the first bad record
  and every record before it is applied either way, in the same order.
* ``plan`` + ``write_plan`` replay onto a disk *file* with pwrite instead of through a
  mapping: on ext4 a write fault on a hole of a sparse file costs ~4x a pwrite of the same
  4 KiB, and a takeover replays into mostly-sparse images. ``plan`` picks the rows to
  write (dropping rows a later row of the same (offset, length) overwrites entirely);
  ``write_plan`` writes them in seq order, runs of disk-adjacent rows as one pwritev.

The kernels are numba kernels (``nogil``: a domain can replay while its bus thread keeps
heartbeating) and accept read-only arrays, because the partner maps the region with
PROT_READ (a read-only grant has no writeable view).

Caching note: numba's cache of these kernels is invalidated by changes to *this* file
only. After editing ``checksum.py`` (whose crc kernel is compiled into ``scan``), clear
``storage/__pycache__/*.nbi|*.nbc`` or touch this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from storage.checksum import crc32c_kernel
from storage.nvlog_format import (
    CRC_SIZE,
    IDX_CLIENT,
    IDX_COLUMNS,
    IDX_LENGTH,
    IDX_LUN,
    IDX_OFFSET,
    IDX_POS,
    IDX_REQUEST,
    IDX_SEQ,
    RECORD_HEADER,
    RECORD_MAGIC,
    RECORD_VERSION,
    record_size,
)

__all__ = [
    "ReplayResult",
    "apply",
    "plan",
    "replay_region",
    "scan",
    "scan_apply",
    "warm",
    "write_plan",
]

_ALIGN_MASK = 7  # records are padded to 8 bytes (nvlog_format.ALIGN)
_MIN_RECORD = record_size(0)
_FIRST_INDEX_ROWS = 1024

# Short names for the kernels. numba freezes globals into the compiled (and cached) code.
_HDR = RECORD_HEADER
_CRC = CRC_SIZE
_MAGIC = RECORD_MAGIC
_VERSION = RECORD_VERSION


@njit(cache=True, nogil=True, inline="always")
def _u16(b, p):  # type: ignore[no-untyped-def]
    # Assembled from bytes: portable to any host byte order and fine on read-only arrays.
    return np.int64(b[p]) | (np.int64(b[p + 1]) << 8)


@njit(cache=True, nogil=True, inline="always")
def _u32(b, p):  # type: ignore[no-untyped-def]
    return (
        np.int64(b[p])
        | (np.int64(b[p + 1]) << 8)
        | (np.int64(b[p + 2]) << 16)
        | (np.int64(b[p + 3]) << 24)
    )


@njit(cache=True, nogil=True, inline="always")
def _u64(b, p):  # type: ignore[no-untyped-def]
    # Returned as int64 (two's complement) so no uint64/int64 mix widens to float.
    return _u32(b, p) | (_u32(b, p + 4) << 32)


@intrinsic
def _copy_bytes(typingctx, dst, doff, src, soff, n):  # type: ignore[no-untyped-def]
    """dst[doff:doff+n] = src[soff:soff+n] as one libc memmove; the caller checks bounds.

    numba's slice assignment runs an element loop (~3 GB/s here for 4 KiB records) and a
    hand-written loop is worse (~0.8 GB/s, not vectorised); memmove ran at ~14 GB/s, i.e.
    memcpy speed. memmove, not memcpy, so a disk that aliases the log stays defined.
    """
    # Raw pointers: only contiguous uint8 arrays, and never a read-only destination
    # (writing a PROT_READ grant would be a segfault, not an exception).
    for a in (dst, src):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint8):
            return None
        if a.layout != "C":
            return None
    if not dst.mutable:
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        dptr = builder.gep(d.data, [args[1]])
        sptr = builder.gep(s.data, [args[3]])
        cgutils.raw_memmove(builder, dptr, sptr, args[4], 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def scan(log, generation, base_seq):  # type: ignore[no-untyped-def]
    """Verify records from log[0] on; return (index, count, end_pos).

    ``index[:count]`` holds one int64 row per valid record (columns IDX_*); u64 fields
    above 2**63 appear as negative int64. The record's generation field is 32 bits, so
    it is compared with the low 32 bits of ``generation``.
    """
    size = log.size
    gen32 = np.int64(generation) & 0xFFFFFFFF
    expected = np.int64(base_seq)
    # Grown by doubling: a full-size index (size // 64 rows) would be 7/8 of the log.
    max_rows = size // _MIN_RECORD + 1
    index = np.empty((min(max_rows, _FIRST_INDEX_ROWS), IDX_COLUMNS), dtype=np.int64)
    count = 0
    pos = np.int64(0)
    while size - pos >= _HDR + _CRC:
        if _u32(log, pos) != _MAGIC or _u16(log, pos + 4) != _VERSION:
            break
        if _u32(log, pos + 8) != gen32 or _u64(log, pos + 16) != expected:
            break
        length = _u32(log, pos + 12)
        rsize = (_HDR + length + _CRC + _ALIGN_MASK) & ~_ALIGN_MASK
        if rsize > size - pos:
            break
        body_end = pos + _HDR + length
        if crc32c_kernel(log, pos, body_end, 0) != _u32(log, body_end):
            break
        if count == index.shape[0]:
            bigger = np.empty((min(2 * count, max_rows), IDX_COLUMNS), dtype=np.int64)
            bigger[:count] = index
            index = bigger
        row = index[count]
        row[IDX_POS] = pos
        row[IDX_SEQ] = expected
        row[IDX_LUN] = _u32(log, pos + 24)
        row[IDX_OFFSET] = _u64(log, pos + 32)
        row[IDX_LENGTH] = length
        row[IDX_CLIENT] = _u64(log, pos + 40)
        row[IDX_REQUEST] = _u64(log, pos + 48)
        count += 1
        expected += 1
        pos += rsize
    return index[:count], count, pos


@njit(cache=True, nogil=True)
def apply(log, index, count, lun, min_seq, disk):  # type: ignore[no-untyped-def]
    """Copy payloads of `lun`'s records with seq > min_seq onto `disk`, in log order.

    Returns (records, bytes, bad). A row that would write outside `disk` (or read
    outside `log`: the index may come from anywhere) is skipped and counted bad, never
    clipped: half a write on disk is worse than a reported error. `disk` must be a
    writable C-contiguous uint8 array (anything else is refused when numba types it).
    """
    count = min(count, index.shape[0])  # never read past the index either
    records = 0
    nbytes = 0
    bad = 0
    dsize = disk.size
    lsize = log.size
    for r in range(count):
        if index[r, IDX_LUN] != lun or index[r, IDX_SEQ] <= min_seq:
            continue
        off = index[r, IDX_OFFSET]
        length = index[r, IDX_LENGTH]
        src = index[r, IDX_POS] + _HDR
        # Written as subtractions so huge offsets cannot overflow int64 and pass.
        if (
            off < 0
            or length < 0
            or length > dsize
            or off > dsize - length
            or src < _HDR
            or src > lsize - length
        ):
            bad += 1
            continue
        _copy_bytes(disk, off, log, src, length)
        records += 1
        nbytes += length
    return records, nbytes, bad


@dataclass(frozen=True)
class ReplayResult:
    records: int  # records applied, all LUNs
    bytes: int  # payload bytes applied
    bad: int  # records skipped because they fall outside their disk
    last_seq: int  # seq of the last valid record, base_seq - 1 if none
    end_pos: int  # log position just after the last valid record (next append)
    scanned: int  # valid records found by the scan, all LUNs


def replay_region(
    log: np.ndarray,
    generation: int,
    base_seq: int,
    luns_to_disks: dict[int, np.ndarray],
    min_seqs: dict[int, int],
) -> ReplayResult:
    """Scan the log area once, then apply it to each LUN's disk.

    A LUN missing from `min_seqs` gets every record (min_seq -1). Records of LUNs not in
    `luns_to_disks` are scanned (they bound the valid log) but not applied.
    """
    index, count, end_pos = scan(log, generation, base_seq)
    records = nbytes = bad = 0
    for lun, disk in luns_to_disks.items():
        r, b, x = apply(log, index, count, lun, min_seqs.get(lun, -1), disk)
        records += r
        nbytes += b
        bad += x
    return ReplayResult(
        records=int(records),
        bytes=int(nbytes),
        bad=int(bad),
        last_seq=int(base_seq + count - 1),
        end_pos=int(end_pos),
        scanned=int(count),
    )


def warm() -> None:
    """Compile or load from cache the kernels' usual specialisations.

    Loading costs ~0.1 s per process: pay it at domain boot, not at takeover. Both a
    writable and a read-only log are covered (a read-only grant types differently).
    """
    writable = np.zeros(2 * _MIN_RECORD, dtype=np.uint8)
    readonly = np.frombuffer(bytes(writable), dtype=np.uint8)
    disk = np.zeros(8, dtype=np.uint8)
    for log in (writable, readonly):
        index, count, _ = scan(log, 1, 0)
        apply(log, index, count, 0, -1, disk)
