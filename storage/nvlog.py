"""NVLog writer and header access over an NVRAM region (format in nvlog_format).

Single writer (the owning domain); readers (the partner at takeover, the owner's next
incarnation at boot) trust only records whose checksum and sequence verify, so the writer needs
no locks or barriers: the only reader of a live log is a process that starts reading after the
writer was fenced.

With ``compress="lz4"`` the writer stores a write's payload as one lz4 block when that saves
at least 1/8 of it (FLAG_LZ4, `length` logical, `stored` compressed); readers get the logical
bytes back with `record_payload`. Without it nothing on the append path changes.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import lz4.block as _lz4
import numpy as np

from storage import nvlog_format as F
from storage.checksum import crc32c_kernel
from storage.nvlog_header import check_region
from vmemu.errors import LogFull

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

COMPRESSORS = ("lz4",)  # the values NVLogWriter(compress=...) takes, besides None
# Payloads shorter than this are stored raw without trying: a block this small rarely saves
# 1/8, and the compress call would cost more than the bytes it could save.
LZ4_MIN_PAYLOAD = 64


class BadRecord(ValueError):
    """A record that verified (crc) but whose payload cannot be what the writer meant.

    Replay counts it bad and skips it, like a record that falls outside its disk; it does
    not end the log.
    """


def decode_lz4(block: bytes | memoryview | np.ndarray, length: int) -> bytes:
    """The `length` bytes an lz4 block (no size prefix) decompresses to, or BadRecord."""
    stored = len(block)
    # Bound the allocation before asking lz4: `length` comes from the log, up to 4 GiB.
    if length < 0 or length > stored * F.LZ4_MAX_RATIO + 64:
        raise BadRecord(f"lz4 record of {stored} bytes cannot hold {length}")
    try:
        out = _lz4.decompress(block, uncompressed_size=length)
    except _lz4.LZ4BlockError as e:
        raise BadRecord(f"lz4 payload does not decompress: {e}") from None
    # lz4 accepts a block shorter than the room it was given; the record said `length`.
    if len(out) != length:
        raise BadRecord(f"lz4 payload decompresses to {len(out)} bytes, record says {length}")
    return out


def record_payload(log: np.ndarray, row: Sequence[int] | np.ndarray) -> bytes:
    """The logical payload of one index row of `log` (decompressed when FLAG_LZ4).

    For Python consumers of ``replay.scan``'s index (its columns IDX_*): a raw record's
    payload is copied out, a compressed one decompressed to exactly IDX_LENGTH bytes. A row
    whose payload lies outside `log` or does not decompress raises BadRecord: skip it and
    count it bad, as the replay kernels do.
    """
    pos = int(row[F.IDX_POS])
    length = int(row[F.IDX_LENGTH])
    flags = int(row[F.IDX_FLAGS])
    stored = int(row[F.IDX_STORED]) if flags & F.FLAG_LZ4 else length
    src = pos + F.RECORD_HEADER
    if pos < 0 or stored < 0 or src > log.size - stored:
        raise BadRecord(f"record at {pos} reads {stored} bytes outside a {log.size}-byte log")
    if flags & F.FLAG_LZ4:
        return decode_lz4(log[src:src + stored], length)
    return log[src:src + length].tobytes()


@dataclass(frozen=True)
class RegionHeader:
    node_index: int
    region_id: int
    capacity: int
    generation: int
    base_seq: int
    tail: int
    version: int = F.REGION_VERSION

    @classmethod
    def read(cls, buf: mmap.mmap | memoryview | bytes | np.ndarray) -> "RegionHeader":
        """The header of a whole region; CorruptRegion (a ValueError) if it does not check
        out (nvlog_header.check_region: magic, version, node, capacity against the size)."""
        check_region(buf)
        _magic, version, node, rid, cap, gen, base, tail = F.REGION_STRUCT.unpack_from(buf, 0)
        return cls(node, rid, cap, gen, base, tail, version)

    @property
    def halves(self) -> bool:
        return self.version == F.REGION_VERSION_HALVES

    @property
    def half_capacity(self) -> int:
        return (self.capacity // 2) // 8 * 8


def format_region(buf: mmap.mmap, node_index: int, region_id: int,
                  halves: bool = False) -> RegionHeader:
    capacity = len(buf) - F.REGION_HEADER
    if capacity <= F.record_size(0) * (2 if halves else 1):
        raise ValueError("region too small for a log")
    version = F.REGION_VERSION_HALVES if halves else F.REGION_VERSION
    F.REGION_STRUCT.pack_into(buf, 0, F.REGION_MAGIC, version, node_index, region_id,
                              capacity, 1, 1, 0)
    if halves:  # half 1 starts unused: generation 0 never matches a record
        for off in F.HALF_FIELDS[1]:
            _U64.pack_into(buf, off, 0)
    return RegionHeader.read(buf)


def log_view(buf: mmap.mmap) -> np.ndarray:
    """The log area as a uint8 array (read-only when the mapping is)."""
    return np.frombuffer(buf, dtype=np.uint8, offset=F.REGION_HEADER)


def region_logs(buf: mmap.mmap | bytearray, owner: int | None = None,
                region_id: int | None = None) -> list[tuple[np.ndarray, int, int]]:
    """Every log of a region as (view, generation, base_seq), oldest records first.

    One log for a version-1 region; two for a region used in halves, ordered by base_seq so
    that replaying them in this order applies records in sequence order. The header is
    checked first (CorruptRegion); a half whose own fields are absurd is left out (the
    D-module replays through ``nvlog_check.read_region``, which also reports it).
    """
    hdr = check_region(buf, owner, region_id)
    whole = log_view(buf)  # type: ignore[arg-type]
    return [(whole[a.start - F.REGION_HEADER:a.start - F.REGION_HEADER + a.size], a.generation,
             a.base_seq) for a in hdr.logs if a.problem is None]


class NVLogWriter:
    def __init__(self, buf: mmap.mmap, track_spans: bool = False,
                 compress: str | None = None, half: int | None = None) -> None:
        if compress is not None and compress not in COMPRESSORS:
            raise ValueError(f"unknown NVLog compression {compress!r} (have: {', '.join(COMPRESSORS)})")
        self.buf = buf
        self.track_spans = track_spans
        self.compress = compress
        hdr = RegionHeader.read(buf)
        self.header = hdr
        if half is None:
            self.capacity = hdr.capacity
            self.log_off = F.REGION_HEADER
            self.off_gen, self.off_base, self.off_tail = F.OFF_GENERATION, F.OFF_BASE_SEQ, F.OFF_TAIL
        else:
            if not hdr.halves:
                raise ValueError("this region is not formatted in halves")
            self.capacity = hdr.half_capacity
            self.log_off = F.REGION_HEADER + half * self.capacity
            self.off_gen, self.off_base, self.off_tail = F.HALF_FIELDS[half]
        self.generation = _U64.unpack_from(buf, self.off_gen)[0]
        self.next_seq = _U64.unpack_from(buf, self.off_base)[0]
        self.tail = 0
        self._arr = np.frombuffer(buf, dtype=np.uint8)
        self.records = 0
        # Byte ranges of the region written since the last drain: what a mirror must copy.
        self.spans: list[tuple[int, int]] = []
        # Payload bytes offered to / stored by the lz4 path, and records it compressed (for a
        # status ratio). Counted there only: the uncompressed path does no extra work.
        self.lz4_in = 0
        self.lz4_out = 0
        self.lz4_records = 0
        if compress == "lz4":
            # An instance attribute, chosen once: `append` itself stays the raw path untouched.
            self.append = self._append_lz4  # type: ignore[method-assign]

    @property
    def used(self) -> int:
        return self.tail

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def fits(self, length: int) -> bool:
        # A payload of `length` bytes stored raw: the worst case for a compressing writer too.
        return self.tail + F.record_size(length) <= self.capacity

    def append(self, lun: int, offset: int, payload: bytes | memoryview, client: int = 0,
               request: int = 0, flags: int = F.FLAG_WRITE) -> int:
        """Log one write; when this returns the record is complete and may be acknowledged."""
        length = len(payload)
        size = F.record_size(length)
        if self.tail + size > self.capacity:
            raise LogFull(f"NVLog full: {self.tail}/{self.capacity} bytes used")
        seq = self.next_seq
        pos = self.log_off + self.tail
        F.RECORD_STRUCT.pack_into(self.buf, pos, F.RECORD_MAGIC, F.RECORD_VERSION, flags,
                                  self.generation, length, seq, lun, length, offset, client,
                                  request)
        body = pos + F.RECORD_HEADER
        self.buf[body:body + length] = payload
        end = body + length
        crc = crc32c_kernel(self._arr, pos, end, 0)
        _U32.pack_into(self.buf, end, crc)
        # Zero the padding so a later generation's stale bytes never look like part of us.
        if size - (end + F.CRC_SIZE - pos):
            self.buf[end + F.CRC_SIZE:pos + size] = bytes(size - (end + F.CRC_SIZE - pos))
        self.tail += size
        self.next_seq = seq + 1
        self.records += 1
        _U64.pack_into(self.buf, self.off_tail, self.tail)
        if self.track_spans:
            self.spans.append((pos, pos + size))
        return seq

    def _append_lz4(self, lun: int, offset: int, payload: bytes | memoryview, client: int = 0,
                    request: int = 0, flags: int = F.FLAG_WRITE) -> int:
        """``append`` with compression: a write's payload goes in as lz4 if that saves 1/8.

        Only plain writes: other records (the exactly-once table) are read raw by their
        consumers. Below 1/8 the decompression at replay is not worth the space.
        """
        length = len(payload)
        if flags != F.FLAG_WRITE or length < LZ4_MIN_PAYLOAD:
            return self.append_stored(lun, offset, payload, length, client, request, flags)
        packed = _lz4.compress(payload, store_size=False)
        self.lz4_in += length
        if len(packed) > length - (length >> 3):
            self.lz4_out += length
            return self.append_stored(lun, offset, payload, length, client, request, flags)
        self.lz4_out += len(packed)
        self.lz4_records += 1
        return self.append_stored(lun, offset, packed, length, client, request,
                                  flags | F.FLAG_LZ4)

    def append_stored(self, lun: int, offset: int, stored: bytes | memoryview, length: int,
                      client: int = 0, request: int = 0, flags: int = F.FLAG_WRITE) -> int:
        """Log one record whose payload is already in its stored form (`stored` bytes).

        `length` is the logical payload size (the disk range): ``len(stored)`` unless
        FLAG_LZ4 is set, when `stored` must be an lz4 block that decompresses to `length`
        bytes. ``append`` is this with ``stored = payload``, written out for speed.
        """
        n = len(stored)
        size = F.record_size(n)
        if self.tail + size > self.capacity:
            raise LogFull(f"NVLog full: {self.tail}/{self.capacity} bytes used")
        seq = self.next_seq
        pos = self.log_off + self.tail
        F.RECORD_STRUCT.pack_into(self.buf, pos, F.RECORD_MAGIC, F.RECORD_VERSION, flags,
                                  self.generation, length, seq, lun, n, offset, client,
                                  request)
        body = pos + F.RECORD_HEADER
        self.buf[body:body + n] = stored
        end = body + n
        _U32.pack_into(self.buf, end, crc32c_kernel(self._arr, pos, end, 0))
        if size - (end + F.CRC_SIZE - pos):
            self.buf[end + F.CRC_SIZE:pos + size] = bytes(size - (end + F.CRC_SIZE - pos))
        self.tail += size
        self.next_seq = seq + 1
        self.records += 1
        _U64.pack_into(self.buf, self.off_tail, self.tail)
        if self.track_spans:
            self.spans.append((pos, pos + size))
        return seq

    def reset(self, next_seq: int | None = None) -> None:
        """Start a new generation: every record so far is on disk (a CP made it so).

        base_seq is written before the generation, so a crash between the two leaves a log
        whose old records no longer verify (their seq no longer follows base_seq): they were
        on disk already, so nothing acknowledged is lost. A half taking over from the other
        half starts at the other's `next_seq`, so sequence numbers run on across halves.
        """
        if next_seq is not None:
            self.next_seq = next_seq
        _U64.pack_into(self.buf, self.off_base, self.next_seq)
        self.generation += 1
        _U64.pack_into(self.buf, self.off_gen, self.generation)
        self.tail = 0
        self.records = 0
        _U64.pack_into(self.buf, self.off_tail, 0)
        if self.track_spans:
            self.spans.append((0, F.HALF_HEADER_END))

    def drain_spans(self) -> list[tuple[int, int]]:
        spans, self.spans = self.spans, []
        return spans


class TwoHalfLog:
    """The NVLog used in two halves: a CP flushes one while writes go to the other.

    `switch()` (a CP starts) resets the free half as the continuation of the active one and
    makes it active; `release()` (that CP committed) frees the other half again. A write that
    does not fit the active half while the other is still being flushed must wait for that
    CP: a stall, which the D-module counts.
    """

    def __init__(self, buf: mmap.mmap, track_spans: bool = False,
                 compress: str | None = None) -> None:
        self.halves = [NVLogWriter(buf, track_spans, compress, half=h) for h in (0, 1)]
        self.active_half = 0
        self.flushing: int | None = None

    @property
    def active(self) -> NVLogWriter:
        return self.halves[self.active_half]

    # what the D-module reads of a single log, for the active half
    @property
    def capacity(self) -> int:
        return self.active.capacity

    @property
    def used(self) -> int:
        return self.active.used

    @property
    def records(self) -> int:
        return self.active.records

    @property
    def generation(self) -> int:
        return self.active.generation

    @property
    def last_seq(self) -> int:
        return self.active.last_seq

    def fits(self, length: int) -> bool:
        return self.active.fits(length)

    def append(self, *args: object, **kw: object) -> int:
        return self.active.append(*args, **kw)  # type: ignore[arg-type]

    def can_switch(self) -> bool:
        return self.flushing is None

    def switch(self) -> int:
        """A CP begins: the active half's records are what it flushes. Returns that half."""
        if self.flushing is not None:
            raise RuntimeError("both NVLog halves are in use: the previous CP has not finished")
        old = self.active_half
        new = 1 - old
        self.halves[new].reset(next_seq=self.halves[old].next_seq)
        self.active_half = new
        self.flushing = old
        return old

    def release(self) -> None:
        """The CP of the flushing half committed: its records are on disk."""
        self.flushing = None

    def drain_spans(self) -> list[tuple[int, int]]:
        return self.halves[0].drain_spans() + self.halves[1].drain_spans()

    @property
    def spans(self) -> list[tuple[int, int]]:
        return self.halves[0].spans + self.halves[1].spans

    @property
    def lz4_in(self) -> int:
        return sum(h.lz4_in for h in self.halves)

    @property
    def lz4_out(self) -> int:
        return sum(h.lz4_out for h in self.halves)
