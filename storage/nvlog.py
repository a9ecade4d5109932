"""NVLog writer and header access over an NVRAM region (format in nvlog_format).

Single writer (the owning domain); readers (the partner at takeover, the owner's next
incarnation at boot) trust only records whose checksum and sequence verify, so the writer needs
no locks or barriers: the only reader of a live log is a process that starts reading after the
writer was fenced.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

from storage import nvlog_format as F
from storage.checksum import crc32c_kernel
from vmemu.errors import LogFull

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


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
    def __init__(self, buf: mmap.mmap, track_spans: bool = False) -> None:
        self.buf = buf
        self.track_spans = track_spans
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

    @property
    def used(self) -> int:
        return self.tail

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def fits(self, length: int) -> bool:
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
                                  self.generation, length, seq, lun, 0, offset, client, request)
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
