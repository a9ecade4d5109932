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

* ``scan_apply`` does both in one pass: a record verified is copied to its disk (with
  streaming stores) while the next one's crc runs, the payload still in cache (scan and
  apply as two passes read the log twice and ran at ~0.24x memcpy; fused ~0.35-0.47x, see
  bench/replay_bench.py). Copying a record before the next one is verified changes
  nothing: the scan stops at the first bad record and every record before it is applied
  either way, in the same order.
* ``plan`` + ``write_plan`` replay onto a disk *file* with pwrite instead of through a
  mapping: on ext4 a write fault on a hole of a sparse file costs ~4x a pwrite of the same
  4 KiB, and a takeover replays into mostly-sparse images. ``plan`` picks the rows to
  write (dropping rows a later row of the same (offset, length) overwrites entirely);
  ``write_plan`` writes them in seq order, runs of disk-adjacent rows as one pwritev.

Compressed records (FLAG_LZ4, see nvlog_format): ``scan`` walks and verifies them on
their stored bytes like any other and indexes them (IDX_FLAGS, IDX_STORED); the numba
kernels never decompress. ``apply`` and ``replay_region`` hand a LUN that has compressed
rows to ``apply_py``, which applies *all* of that LUN's rows in log order in Python (lz4
decompresses in C): redoing the raw rows too is what keeps "later record wins" without
interleaving kernel and Python writes. ``plan`` checks that the compressed rows decompress
(one that does not is bad, and must not supersede an earlier row) and keeps them in its
seq-ordered rows; ``write_plan`` decompresses them into its pwritev runs. A log without
compressed rows takes exactly the kernels' path, plus one flag test per row.

The kernels are numba kernels (``nogil``: a domain can replay while its bus thread keeps
heartbeating) and accept read-only arrays, because the partner maps the region with
PROT_READ (a read-only grant has no writeable view).

Caching note: numba's cache of these kernels is invalidated by changes to *this* file
only. After editing ``checksum.py`` (whose crc kernel and SSE4.2 helpers are compiled into
``scan`` and ``scan_apply``), clear
``storage/__pycache__/*.nbi|*.nbc`` or touch this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from storage import fault_io
from storage.checksum import (
    _BLK,
    _SHIFT,
    HAVE_SSE42,
    _crc_u8,
    _crc_u64,
    _load_u64,
    _shift,
    crc32c_kernel,
    crc32c_kernel_table,
)
from storage.nvlog_format import (
    CRC_SIZE,
    IDX_CLIENT,
    FLAG_LZ4,
    IDX_COLUMNS,
    IDX_FLAGS,
    IDX_LENGTH,
    IDX_LUN,
    IDX_OFFSET,
    IDX_POS,
    IDX_REQUEST,
    IDX_SEQ,
    IDX_STORED,
    RECORD_HEADER,
    RECORD_MAGIC,
    RECORD_VERSION,
    RECORD_VERSION_V1,
    record_size,
)
from storage.nvlog import BadRecord, record_payload

__all__ = [
    "ReplayResult",
    "apply",
    "apply_py",
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
_VERSION_V1 = RECORD_VERSION_V1
_LZ4 = FLAG_LZ4


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


@intrinsic
def _address(typingctx, a):  # type: ignore[no-untyped-def]
    """The address of a 1-D array's first element, as an integer (for alignment)."""
    if not (isinstance(a, types.Array) and a.ndim == 1):
        return None
    sig = types.intp(a)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return sig, codegen


@intrinsic
def _stream64(typingctx, dst, doff, src, soff):  # type: ignore[no-untyped-def]
    """Copy 64 bytes with a non-temporal store: dst + doff must be 64-byte aligned.

    The store writes whole cache lines without reading them first (a plain store to a
    line not in cache reads it from memory, then writes it back later), and does not push
    the log out of the cache. Same argument rules as _copy_bytes.
    """
    for a in (dst, src):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint8):
            return None
        if a.layout != "C":
            return None
    if not dst.mutable:
        return None
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        vec = ir.VectorType(ir.IntType(64), 8)
        sptr = builder.bitcast(builder.gep(s.data, [args[3]]), vec.as_pointer())
        dptr = builder.bitcast(builder.gep(d.data, [args[1]]), vec.as_pointer())
        store = builder.store(builder.load(sptr, align=1), dptr, align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):  # type: ignore[no-untyped-def]
    """Order the non-temporal stores before anything after (an mfence on x86)."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


_STREAM_MIN = 256  # payloads from this size are copied with non-temporal stores


@njit(cache=True, nogil=True, inline="always")
def _header_sizes(log, pos, size, gen32, expected):  # type: ignore[no-untyped-def]
    """(length, stored, flags) of the record at `pos`; stored is -1 where the log ends.

    `length` is the logical payload size (the disk range), `stored` the payload bytes in
    the log (they differ only with FLAG_LZ4). The log ends at a bad magic or version,
    another generation, a sequence gap, a stored size that contradicts the flags, or a
    record that would not fit in what is left of the log. (The checksum is the caller's:
    it may fuse it with a copy.)
    """
    end = (np.int64(0), np.int64(-1), np.int64(0))
    if _u32(log, pos) != _MAGIC:
        return end
    if _u32(log, pos + 8) != gen32 or _u64(log, pos + 16) != expected:
        return end
    version = _u16(log, pos + 4)
    flags = _u16(log, pos + 6)
    length = np.int64(_u32(log, pos + 12))
    if version == _VERSION:
        stored = np.int64(_u32(log, pos + 28))
        if stored != length and not flags & _LZ4:
            return end
    elif version == _VERSION_V1 and not flags & _LZ4:
        stored = length  # v1: the field was pad; payloads were never compressed
    else:
        return end
    if (_HDR + stored + _CRC + _ALIGN_MASK) & ~_ALIGN_MASK > size - pos:
        return end
    return (length, stored, flags)


@njit(cache=True, nogil=True, inline="always")
def _disk_fits(off: int, length: int, dsize: int) -> bool:
    """[off, off + length) lies in a `dsize`-byte disk (subtractions: no int64 overflow)."""
    return not (off < 0 or length < 0 or length > dsize or off > dsize - length)


@njit(cache=True, nogil=True, inline="always")
def _log_fits(src: int, n: int, lsize: int) -> bool:
    """A payload of `n` bytes at `src` lies in the log, after a record header."""
    return not (n < 0 or n > lsize or src < _HDR or src > lsize - n)


@njit(cache=True, nogil=True, inline="always")
def _row_fits(off: int, length: int, src: int, dsize: int, lsize: int) -> bool:
    """A record's payload lies inside the log and its target inside the disk.

    Written as subtractions so huge offsets cannot overflow int64 and pass.
    """
    return not (off < 0 or length < 0 or length > dsize or off > dsize - length
                or src < _HDR or src > lsize - length)


@njit(cache=True, nogil=True)
def _copy_payload(dst, doff, src, soff, n):  # type: ignore[no-untyped-def]
    """dst[doff:doff+n] = src[soff:soff+n], streaming (non-temporal) where it pays.

    The caller checks bounds, and issues _store_fence before it returns to Python.
    """
    d = _address(dst) + doff
    s = _address(src) + soff
    if n < _STREAM_MIN or (d < s + n and s < d + n):  # small, or overlapping: memmove
        _copy_bytes(dst, doff, src, soff, n)
        return
    head = (-d) & 63
    if head:
        _copy_bytes(dst, doff, src, soff, head)
    i = head
    while n - i >= 64:
        _stream64(dst, doff + i, src, soff + i)
        i += 64
    if n > i:
        _copy_bytes(dst, doff + i, src, soff + i, n - i)


@njit(cache=True, nogil=True)
def _copy_then_crc_sse42(log, start, end, disk, doff, soff, n):  # type: ignore[no-untyped-def]
    """Copy log[soff:soff+n] to disk[doff:], and return crc32c(log[start:end]).

    For scan_apply: the copy is the previous (verified) record's payload; its streaming
    stores drain while the crc of the next record runs. The crc is checksum's SSE4.2
    kernel written out here, with the copy inside its first block iteration. Measured
    on 4 KiB records (bench/replay_bench.py log, fused loop): copy in the loop 7.8-9.1
    GB/s; copy before the loop 6.3-6.8; copy then a call of crc32c_kernel ~5.5-6.1.
    The crc alone runs at the same speed either way (~19 GB/s); why the placement
    matters this much was not pinned down.
    """
    c = np.int64(0xFFFFFFFF)
    i = np.int64(start)
    copied = n <= 0
    while end - i >= 3 * _BLK:
        if not copied:
            _copy_payload(disk, doff, log, soff, n)
            copied = True
        c1 = np.int64(0)
        c2 = np.int64(0)
        j = i
        stop = i + _BLK
        while j < stop:
            c = _crc_u64(c, _load_u64(log, j))
            c1 = _crc_u64(c1, _load_u64(log, j + _BLK))
            c2 = _crc_u64(c2, _load_u64(log, j + 2 * _BLK))
            j += 8
        c = _shift(c, _SHIFT) ^ c1
        c = _shift(c, _SHIFT) ^ c2
        i += 3 * _BLK
    while i + 8 <= end:
        c = _crc_u64(c, _load_u64(log, i))
        i += 8
    while i < end:
        c = _crc_u8(c, log[i])
        i += 1
    if not copied:  # a record too short for a block
        _copy_payload(disk, doff, log, soff, n)
    return np.uint32(c ^ 0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _copy_then_crc_table(log, start, end, disk, doff, soff, n):  # type: ignore[no-untyped-def]
    if n > 0:
        _copy_payload(disk, doff, log, soff, n)
    return crc32c_kernel_table(log, start, end, 0)


# Chosen with the crc kernel (see checksum.crc32c_kernel): only one is ever compiled.
_copy_then_crc = _copy_then_crc_sse42 if HAVE_SSE42 else _copy_then_crc_table


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
        length, stored, flags = _header_sizes(log, pos, size, gen32, expected)
        if stored < 0:
            break
        rsize = (_HDR + stored + _CRC + _ALIGN_MASK) & ~_ALIGN_MASK
        body_end = pos + _HDR + stored
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
        row[IDX_FLAGS] = flags
        row[IDX_STORED] = stored
        count += 1
        expected += 1
        pos += rsize
    return index[:count], count, pos


@njit(cache=True, nogil=True)
def _apply_kernel(log, index, count, lun, min_seq, disk):  # type: ignore[no-untyped-def]
    """``apply`` for raw rows: (records, bytes, bad, lz4), compressed rows left out.

    `lz4` counts the compressed rows it left out; when it is not 0 the caller redoes the
    LUN with ``apply_py`` (which needs every row, in order, to keep later-wins).
    """
    count = min(count, index.shape[0])  # never read past the index either
    records = 0
    nbytes = 0
    bad = 0
    lz4 = 0
    dsize = disk.size
    lsize = log.size
    for r in range(count):
        if index[r, IDX_LUN] != lun or index[r, IDX_SEQ] <= min_seq:
            continue
        if index[r, IDX_FLAGS] & _LZ4:
            lz4 += 1
            continue
        off = index[r, IDX_OFFSET]
        length = index[r, IDX_LENGTH]
        src = index[r, IDX_POS] + _HDR
        if not _row_fits(off, length, src, dsize, lsize):
            bad += 1
            continue
        _copy_bytes(disk, off, log, src, length)
        records += 1
        nbytes += length
    return records, nbytes, bad, lz4


def _fits(off: int, length: int, dsize: int) -> bool:
    return 0 <= off and 0 <= length <= dsize and off <= dsize - length


def apply_py(
    log: np.ndarray, index: np.ndarray, count: int, lun: int, min_seq: int, disk: np.ndarray
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``apply`` in Python for a LUN with compressed rows: every row, in log order.

    Returns ``((records, bytes, bad), (lz4_records, lz4_bytes, lz4_bad))``: the totals, and
    the share of the compressed rows (``replay_region`` adds only that share to what the
    fused kernel counted for the raw ones). Bad rows (outside the disk or the log, or a
    compressed payload that does not decompress to its length) are skipped and counted.
    """
    rs = index[: min(count, index.shape[0])]
    rows = rs[(rs[:, IDX_LUN] == lun) & (rs[:, IDX_SEQ] > min_seq)].tolist()  # ints, not numpy
    dsize = disk.size
    lsize = log.size
    # Plain byte copies through memoryviews where the arrays allow (most of the per-row cost
    # here is Python overhead; numpy slicing per row doubled it); numpy otherwise.
    fast = disk.dtype == np.uint8 and disk.flags.c_contiguous and log.flags.c_contiguous
    dmv = memoryview(disk) if fast else None
    lmv = memoryview(log) if fast else None
    tot = [0, 0, 0]
    lz = [0, 0, 0]
    for row in rows:
        off = row[IDX_OFFSET]
        length = row[IDX_LENGTH]
        compressed = bool(row[IDX_FLAGS] & _LZ4)
        data: bytes | memoryview | np.ndarray | None = None
        if _fits(off, length, dsize):
            if compressed:
                try:
                    data = record_payload(log, row)
                except BadRecord:
                    data = None
            else:
                src = row[IDX_POS] + _HDR
                if _HDR <= src <= lsize - length:
                    data = lmv[src : src + length] if lmv is not None else log[src : src + length]
        share = (tot, lz) if compressed else (tot,)
        if data is None:
            for t in share:
                t[2] += 1
            continue
        if dmv is not None:
            dmv[off : off + length] = data
        else:
            disk[off : off + length] = np.frombuffer(data, np.uint8)
        for t in share:
            t[0] += 1
            t[1] += length
    return (tot[0], tot[1], tot[2]), (lz[0], lz[1], lz[2])


def apply(
    log: np.ndarray, index: np.ndarray, count: int, lun: int, min_seq: int, disk: np.ndarray
) -> tuple[int, int, int]:
    """Copy payloads of `lun`'s records with seq > min_seq onto `disk`, in log order.

    Returns (records, bytes, bad). A row that would write outside `disk` (or read
    outside `log`: the index may come from anywhere) is skipped and counted bad, never
    clipped: half a write on disk is worse than a reported error. `disk` must be a
    writable C-contiguous uint8 array (anything else is refused when numba types it).
    A compressed row that does not decompress to its length is bad too. If the LUN has
    compressed rows the whole LUN is redone by ``apply_py``, in order (see module doc).
    """
    records, nbytes, bad, lz4 = _apply_kernel(log, index, count, lun, min_seq, disk)
    if lz4:
        (records, nbytes, bad), _ = apply_py(log, index, count, lun, min_seq, disk)
    return records, nbytes, bad


@njit(cache=True, nogil=True)
def scan_apply(log, generation, base_seq, luns, min_seqs, disks):  # type: ignore[no-untyped-def]
    """``scan`` and ``apply`` fused: copy each record to its disk as soon as it verifies.

    `disks` is a non-empty tuple of writable C-contiguous uint8 arrays (a tuple: free to
    build, where a numba typed List costs ~0.5 s of compilation in every process); the
    record of LUN ``luns[j]`` goes to ``disks[j]`` if its seq is above ``min_seqs[j]``.
    Records of other LUNs are verified and indexed only, and so are compressed records
    (FLAG_LZ4) of any LUN: they are not applied nor counted here; ``replay_region``
    finishes their LUNs with ``apply_py``. Returns
    ``(index, count, end_pos, records, bytes, bad)``: the first three as ``scan``, the
    rest as the sum of ``apply`` over the LUNs (out-of-bounds records counted bad, never
    clipped). A LUN listed twice uses its first entry.

    A verified record's payload is copied (with streaming stores) just before the next
    record's crc: the stores drain while the crc runs. Every copy is done before return,
    including the last record's and when the next record fails.
    """
    size = log.size
    gen32 = np.int64(generation) & 0xFFFFFFFF
    expected = np.int64(base_seq)
    nd = min(luns.size, min_seqs.size, len(disks))
    max_rows = size // _MIN_RECORD + 1
    index = np.empty((min(max_rows, _FIRST_INDEX_ROWS), IDX_COLUMNS), dtype=np.int64)
    count = 0
    records = 0
    nbytes = 0
    bad = 0
    pos = np.int64(0)
    # The copy owed for the last verified record: disks[pend][pend_off:] <- log[pend_src:].
    pend = -1
    pend_off = np.int64(0)
    pend_src = np.int64(0)
    pend_len = np.int64(0)
    while size - pos >= _HDR + _CRC:
        length, stored, flags = _header_sizes(log, pos, size, gen32, expected)
        if stored < 0:
            break
        rsize = (_HDR + stored + _CRC + _ALIGN_MASK) & ~_ALIGN_MASK
        body_end = pos + _HDR + stored
        if pend >= 0:
            crc = _copy_then_crc(log, pos, body_end, disks[pend], pend_off, pend_src, pend_len)
            pend = -1
        else:
            crc = crc32c_kernel(log, pos, body_end, 0)
        if crc != _u32(log, body_end):
            break
        if count == index.shape[0]:
            bigger = np.empty((min(2 * count, max_rows), IDX_COLUMNS), dtype=np.int64)
            bigger[:count] = index
            index = bigger
        lun = _u32(log, pos + 24)
        off = _u64(log, pos + 32)
        row = index[count]
        row[IDX_POS] = pos
        row[IDX_SEQ] = expected
        row[IDX_LUN] = lun
        row[IDX_OFFSET] = off
        row[IDX_LENGTH] = length
        row[IDX_CLIENT] = _u64(log, pos + 40)
        row[IDX_REQUEST] = _u64(log, pos + 48)
        row[IDX_FLAGS] = flags
        row[IDX_STORED] = stored
        for j in range(nd):
            if luns[j] != lun:
                continue
            if expected > min_seqs[j] and not flags & _LZ4:
                dsize = disks[j].size
                # The payload is inside the log (rsize fit); only the disk side can be off.
                if off < 0 or length > dsize or off > dsize - length:
                    bad += 1
                else:
                    pend = j
                    pend_off = off
                    pend_src = pos + _HDR
                    pend_len = length
                    records += 1
                    nbytes += length
            break
        count += 1
        expected += 1
        pos += rsize
    if pend >= 0:
        _copy_payload(disks[pend], pend_off, log, pend_src, pend_len)
    _store_fence()
    return index[:count], count, pos, records, nbytes, bad


# Multiplier of the plan's hash (2**64 / golden ratio, as a signed int64 so the kernel
# never mixes uint64 with int64).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


@njit(cache=True, nogil=True)
def _plan_kernel(log, index, count, lun, min_seq, disk_size, skip):  # type: ignore[no-untyped-def]
    """``plan``, plus: rows r with ``skip[r]`` (r < skip.size) are bad; and the number of
    compressed rows in range, which the caller must check decompress."""
    count = min(count, index.shape[0])
    lsize = log.size
    cand = np.empty(count, dtype=np.int64)
    nc = 0
    bad = 0
    lz4 = 0
    for r in range(count):
        if index[r, IDX_LUN] != lun or index[r, IDX_SEQ] <= min_seq:
            continue
        off = index[r, IDX_OFFSET]
        length = index[r, IDX_LENGTH]
        src = index[r, IDX_POS] + _HDR
        compressed = index[r, IDX_FLAGS] & _LZ4
        if compressed:
            # The disk takes `length` bytes, the log holds `stored`: check each its own.
            fits = _disk_fits(off, length, disk_size) and \
                _log_fits(src, index[r, IDX_STORED], lsize)
        else:
            fits = _row_fits(off, length, src, disk_size, lsize)
        if not fits or (r < skip.size and skip[r]):
            bad += 1
            continue
        if compressed:
            lz4 += 1  # even if empty: it must still decompress (to nothing)
        if length > 0:
            cand[nc] = r
            nc += 1
    # Open addressing on (offset, length), walking from the newest row: a row whose key
    # is already there is overwritten later. Empty slots have length -1.
    cap = 16
    while cap < 2 * nc:
        cap *= 2
    mask = cap - 1
    slot_off = np.empty(cap, dtype=np.int64)
    slot_len = np.full(cap, -1, dtype=np.int64)
    keep = np.zeros(nc, dtype=np.bool_)
    kept = 0
    for k in range(nc - 1, -1, -1):
        r = cand[k]
        off = index[r, IDX_OFFSET]
        length = index[r, IDX_LENGTH]
        h = (off ^ (length << 40)) * _GOLDEN
        h = (h ^ (h >> 29)) & mask
        while True:
            if slot_len[h] == -1:
                slot_off[h] = off
                slot_len[h] = length
                keep[k] = True
                kept += 1
                break
            if slot_len[h] == length and slot_off[h] == off:
                break
            h = (h + 1) & mask
    rows = np.empty(kept, dtype=np.int64)
    n = 0
    for k in range(nc):
        if keep[k]:
            rows[n] = cand[k]
            n += 1
    return rows, bad, lz4


_NO_SKIP = np.zeros(0, dtype=np.bool_)  # writable, as every skip array: one specialisation


def plan(
    log: np.ndarray, index: np.ndarray, count: int, lun: int, min_seq: int, disk_size: int
) -> tuple[np.ndarray, int]:
    """The rows of `lun` with seq > min_seq that a replay must write, in seq order.

    Returns ``(rows, bad)``. Rows that would write outside ``[0, disk_size)`` or read
    outside `log` are left out and counted in `bad` (as ``apply`` skips them). Left out
    too, not counted: rows with an empty payload (they write nothing) and rows fully
    superseded by a later row with the same (offset, length), whose write covers every
    byte of theirs. Writing ``rows`` in order leaves the disk as ``apply`` does.

    Compressed rows are planned like raw ones once each is known to decompress: one that
    does not is bad, and is checked *before* superseding (a bad row must not hide an
    earlier good one of the same range), at the cost of decompressing it here and again in
    ``write_plan``.
    """
    rows, bad, lz4 = _plan_kernel(log, index, count, lun, min_seq, disk_size, _NO_SKIP)
    if not lz4:
        return rows, bad
    rs = index[: min(count, index.shape[0])]
    cand = np.flatnonzero((rs[:, IDX_LUN] == lun) & (rs[:, IDX_SEQ] > min_seq)
                          & (rs[:, IDX_FLAGS] & _LZ4 != 0))
    skip = np.zeros(rs.shape[0], dtype=np.bool_)
    for r in cand.tolist():
        try:
            record_payload(log, rs[r])
        except BadRecord:
            skip[r] = True
    if skip.any():
        rows, bad, _ = _plan_kernel(log, index, count, lun, min_seq, disk_size, skip)
    return rows, int(bad)


_MAX_IOV = 64  # rows per pwritev
_MAX_RUN = 1 << 20  # bytes per pwritev


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """pwritev until every byte is written (a regular file may still write short)."""
    while bufs:
        done = fault_io.pwritev(fd, bufs, offset) if len(bufs) > 1 \
            else fault_io.pwrite(fd, bufs[0], offset)
        offset += done
        while bufs and done >= len(bufs[0]):
            done -= len(bufs[0])
            bufs.pop(0)
        if bufs and done:
            bufs[0] = bufs[0][done:]
        elif bufs and not done:
            raise OSError(f"pwrite wrote nothing at {offset}")


def write_plan(
    log: np.ndarray, index: np.ndarray, rows: np.ndarray, fd: int, base: int, disk_size: int
) -> tuple[int, int]:
    """Write the planned rows' payloads to `fd` at ``base + offset``, in order.

    Runs of rows that follow each other on disk (offset_i + length_i == offset_i+1) go
    out as one pwritev (at most _MAX_IOV rows, _MAX_RUN bytes). Each run is range
    checked against `disk_size` first; a plan never fails it. Returns (bytes, calls).
    No fsync and no epoch check: the caller checks the epoch before, syncs later (CP).
    """
    if rows.size == 0:
        return 0, 0
    mv = memoryview(log)  # 1-D uint8 (the log view): slices are byte ranges, no copies
    srcs = (index[rows, IDX_POS] + _HDR).tolist()
    offs = index[rows, IDX_OFFSET].tolist()
    lens = index[rows, IDX_LENGTH].tolist()
    # Compressed rows, decompressed up front (position in `rows` -> logical payload); a
    # planned row always decompresses, one from elsewhere may not: refused like a bad range.
    decoded: dict[int, memoryview] = {}
    for k in np.flatnonzero(index[rows, IDX_FLAGS] & _LZ4).tolist():
        try:
            decoded[k] = memoryview(record_payload(log, index[rows[k]]))
        except BadRecord as e:
            raise ValueError(f"replay row {int(rows[k])}: {e}") from None
    n = len(offs)
    nbytes = calls = 0
    i = 0
    while i < n:
        start = offs[i]
        end = start + lens[i]
        bufs = [decoded[i] if decoded and i in decoded else mv[srcs[i] : srcs[i] + lens[i]]]
        i += 1
        while i < n and offs[i] == end and len(bufs) < _MAX_IOV and end - start + lens[i] <= _MAX_RUN:
            bufs.append(decoded[i] if decoded and i in decoded else mv[srcs[i] : srcs[i] + lens[i]])
            end += lens[i]
            i += 1
        if start < 0 or end > disk_size:
            raise ValueError(f"replay write {start}..{end} outside a {disk_size}-byte disk")
        _pwritev_all(fd, bufs, base + start)
        nbytes += end - start
        calls += 1
    return nbytes, calls


@dataclass(frozen=True)
class ReplayResult:
    records: int  # records applied, all LUNs
    bytes: int  # payload bytes applied
    bad: int  # records skipped because they fall outside their disk
    last_seq: int  # seq of the last valid record, base_seq - 1 if none
    end_pos: int  # log position just after the last valid record (next append)
    scanned: int  # valid records found by the scan, all LUNs


def _fusable(disks: list[np.ndarray]) -> bool:
    # scan_apply takes one tuple of identically typed arrays: writable, 1-D, C, uint8.
    return all(
        isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 1
        and d.flags.c_contiguous and d.flags.writeable
        for d in disks
    )


def replay_region(
    log: np.ndarray,
    generation: int,
    base_seq: int,
    luns_to_disks: dict[int, np.ndarray],
    min_seqs: dict[int, int],
) -> ReplayResult:
    """Scan the log area and apply it to each LUN's disk: one fused pass.

    A LUN missing from `min_seqs` gets every record (min_seq -1). Records of LUNs not in
    `luns_to_disks` are scanned (they bound the valid log) but not applied. Disks that
    cannot share one tuple type go through ``scan`` + ``apply`` (which refuses read-only
    or strided disks when numba types them). A LUN with compressed records in the log is
    finished by ``apply_py`` after the fused pass (see the module doc).
    """
    disks = list(luns_to_disks.values())
    if disks and _fusable(disks):
        luns = np.fromiter(luns_to_disks, dtype=np.int64, count=len(disks))
        mins = np.array([min_seqs.get(l, -1) for l in luns_to_disks], dtype=np.int64)
        index, count, end_pos, records, nbytes, bad = scan_apply(
            log, generation, base_seq, luns, mins, tuple(disks))
        lz4 = index[:count][index[:count, IDX_FLAGS] & _LZ4 != 0]
        if lz4.size:
            for lun, disk in luns_to_disks.items():
                m = min_seqs.get(lun, -1)
                if np.any((lz4[:, IDX_LUN] == lun) & (lz4[:, IDX_SEQ] > m)):
                    # The kernel applied and counted this LUN's raw rows: redo all of them
                    # in order, add only what the compressed rows add.
                    _, (r, b, x) = apply_py(log, index, count, lun, m, disk)
                    records += r
                    nbytes += b
                    bad += x
    else:
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
    """Compile or load from cache the kernels a domain uses, in their usual types.

    Loading costs ~0.1 s per process: pay it at domain boot, not at takeover. Both a
    writable and a read-only log are covered (a read-only grant types differently).
    ``scan_apply`` is left out: domains replay with ``plan`` + ``write_plan`` (disk
    files), and each of its specialisations would add to every boot.
    """
    writable = np.zeros(2 * _MIN_RECORD, dtype=np.uint8)
    readonly = np.frombuffer(bytes(writable), dtype=np.uint8)
    disk = np.zeros(8, dtype=np.uint8)
    for log in (writable, readonly):
        index, count, _ = scan(log, 1, 0)
        apply(log, index, count, 0, -1, disk)
        plan(log, index, count, 0, -1, disk.size)  # the kernel in its one (_NO_SKIP) type
