"""A LUN: a block volume on one disk, with the D-module's in-memory cache of dirty blocks.

Acknowledged writes live in two places until a consistency point: the NVLog (durable, in
NVRAM) and this cache (volatile, in the domain's memory, what reads are served from). A CP
writes the cache to the disk; a crash loses the cache, and replay of the NVLog rebuilds the
disk instead. Dirty data is kept per 4 KiB block; a partial-block write merges into the block.
"""

from __future__ import annotations

from storage.disk import Disk
from vmemu.errors import BadRequest, OutOfRange

BLOCK = 4096
SECTOR = 512
MAX_IO = 1 << 20


def check_io(name: str, size: int, offset: int, length: int) -> None:
    """One rule for every LUN request: sector-aligned, at most MAX_IO, inside the LUN."""
    if offset % SECTOR or length % SECTOR:
        raise BadRequest(f"offset {offset} and length {length} must be multiples of {SECTOR}")
    if length <= 0 or length > MAX_IO:
        raise BadRequest(f"length {length} must be between {SECTOR} and {MAX_IO} bytes")
    if offset < 0 or offset + length > size:
        raise OutOfRange(f"range {offset}+{length} is past the end of {name} ({size} bytes)")


class Lun:
    def __init__(self, identity: int, index: int, disk: Disk) -> None:
        self.identity = identity
        self.index = index
        self.disk = disk
        self.size = disk.size
        self.dirty: dict[int, bytearray] = {}

    def check(self, offset: int, length: int) -> None:
        check_io(f"node{self.identity}/lun{self.index}", self.size, offset, length)

    def _block(self, b: int) -> bytearray:
        buf = self.dirty.get(b)
        if buf is None:
            buf = bytearray(self.disk.read(b * BLOCK, BLOCK))
            self.dirty[b] = buf
        return buf

    def write_cached(self, offset: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            b, off = divmod(offset + pos, BLOCK)
            n = min(BLOCK - off, len(mv) - pos)
            if n == BLOCK:
                self.dirty[b] = bytearray(mv[pos:pos + n])
            else:
                self._block(b)[off:off + n] = mv[pos:pos + n]
            pos += n

    def write_through(self, offset: int, data: bytes | memoryview) -> None:
        """No NVRAM (--ha-mode none): the write is on the disk, synced, before it is acknowledged."""
        self.disk.write(offset, data)
        self.disk.sync()

    def read(self, offset: int, length: int) -> bytes:
        self.check(offset, length)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if not any(b in self.dirty for b in range(first, last + 1)):
            return self.disk.read(offset, length)
        out = bytearray(self.disk.read(first * BLOCK, (last - first + 1) * BLOCK))
        for b in range(first, last + 1):
            buf = self.dirty.get(b)
            if buf is not None:
                out[(b - first) * BLOCK:(b - first + 1) * BLOCK] = buf
        start = offset - first * BLOCK
        return bytes(out[start:start + length])

    def flush_dirty(self) -> int:
        """Write every dirty block to the disk in runs of adjacent blocks; returns blocks."""
        blocks = sorted(self.dirty)
        i = 0
        while i < len(blocks):
            j = i
            while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j - i < 255:
                j += 1
            run = b"".join(self.dirty[b] for b in blocks[i:j + 1])
            self.disk.write(blocks[i] * BLOCK, run)
            i = j + 1
        n = len(blocks)
        self.dirty.clear()
        return n
