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

    @classmethod
    def read(cls, buf: mmap.mmap | memoryview | bytes | np.ndarray) -> "RegionHeader":
        raw = bytes(memoryview(buf)[: F.REGION_STRUCT.size])
        magic, version, node, rid, cap, gen, base, tail = F.REGION_STRUCT.unpack(raw)
        if magic != F.REGION_MAGIC or version != F.REGION_VERSION:
            raise ValueError("not an NVRAM region (bad magic or version)")
        return cls(node, rid, cap, gen, base, tail)


def format_region(buf: mmap.mmap, node_index: int, region_id: int) -> RegionHeader:
    capacity = len(buf) - F.REGION_HEADER
    if capacity <= F.record_size(0):
        raise ValueError("region too small for a log")
    F.REGION_STRUCT.pack_into(buf, 0, F.REGION_MAGIC, F.REGION_VERSION, node_index, region_id,
                              capacity, 1, 1, 0)
    return RegionHeader.read(buf)


def log_view(buf: mmap.mmap) -> np.ndarray:
    """The log area as a uint8 array (read-only when the mapping is)."""
    return np.frombuffer(buf, dtype=np.uint8, offset=F.REGION_HEADER)


class NVLogWriter:
    def __init__(self, buf: mmap.mmap, track_spans: bool = False,
                 compress: str | None = None) -> None:
        if compress is not None and compress not in COMPRESSORS:
            raise ValueError(f"unknown NVLog compression {compress!r} (have: {', '.join(COMPRESSORS)})")
        self.buf = buf
        self.track_spans = track_spans
        self.compress = compress
        hdr = RegionHeader.read(buf)
        self.header = hdr
        self.capacity = hdr.capacity
        self.generation = hdr.generation
        self.next_seq = hdr.base_seq
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
        pos = F.REGION_HEADER + self.tail
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
        _U64.pack_into(self.buf, F.OFF_TAIL, self.tail)
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
        pos = F.REGION_HEADER + self.tail
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
        _U64.pack_into(self.buf, F.OFF_TAIL, self.tail)
        if self.track_spans:
            self.spans.append((pos, pos + size))
        return seq

    def reset(self) -> None:
        """Start a new generation: every record so far is on disk (a CP made it so).

        base_seq is written before the generation, so a crash between the two leaves a log
        whose old records no longer verify (their seq no longer follows base_seq): they were
        on disk already, so nothing acknowledged is lost.
        """
        _U64.pack_into(self.buf, F.OFF_BASE_SEQ, self.next_seq)
        self.generation += 1
        _U64.pack_into(self.buf, F.OFF_GENERATION, self.generation)
        self.tail = 0
        self.records = 0
        _U64.pack_into(self.buf, F.OFF_TAIL, 0)
        if self.track_spans:
            self.spans.append((0, F.REGION_STRUCT.size))

    def drain_spans(self) -> list[tuple[int, int]]:
        spans, self.spans = self.spans, []
        return spans
