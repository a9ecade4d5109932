"""The D-module's cache of acknowledged writes not yet on disk, in two generations.

Acknowledged writes live in the NVLog (durable) and here (what reads are served from) until a
consistency point has put them on disk. A CP *freezes* the active generation: from then on new
writes go to a fresh active generation (and to the other NVLog half) while the frozen one is
written out in the background; reads look in active, then frozen, then at the committed disk
state. When the CP has committed, the frozen generation is dropped.

Pure data structure: what "the committed disk state" is comes in as a function, so this works
for the flat LUN path and for LUNs that are files of a write-anywhere file system.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

BLOCK = 4096

# block number -> 4 KiB: a bytearray, or a writable memoryview of 4 KiB into one buffer that
# a bulk insert (put_blocks, a takeover's replay) filled; both are updated in place alike.
Block = bytearray | memoryview
Blocks = dict[int, Block]
ReadCommitted = Callable[[int, int, int], bytes]  # (lun, first block, count) -> bytes


class BlockCache:
    def __init__(self, read_committed: ReadCommitted) -> None:
        self.read_committed = read_committed
        self.active: dict[int, Blocks] = {}
        self.frozen: dict[int, Blocks] = {}

    # -- generations -------------------------------------------------------------------------
    def freeze(self) -> dict[int, Blocks]:
        """Start a CP: the current writes become the frozen set, returned to be written out."""
        if self.frozen:
            raise RuntimeError("a CP is already flushing; finish it before freezing again")
        self.frozen, self.active = self.active, {}
        return self.frozen

    def thaw(self) -> None:
        """The CP committed: the frozen blocks are on disk now."""
        self.frozen = {}

    def unfreeze(self) -> None:
        """The CP failed: its blocks become dirty again (newer writes of a block win)."""
        for lun, blocks in self.frozen.items():
            act = self.active.setdefault(lun, {})
            for b, buf in blocks.items():
                act.setdefault(b, buf)
        self.frozen = {}

    def dirty_blocks(self) -> int:
        return sum(len(b) for b in self.active.values())

    def frozen_blocks(self) -> int:
        return sum(len(b) for b in self.frozen.values())

    # -- I/O ---------------------------------------------------------------------------------
    def _cached(self, lun: int, b: int) -> Block | None:
        buf = self.active.get(lun, {}).get(b)
        if buf is None:
            buf = self.frozen.get(lun, {}).get(b)
        return buf

    def write(self, lun: int, offset: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        blocks = self.active.setdefault(lun, {})
        pos = 0
        while pos < len(mv):
            b, off = divmod(offset + pos, BLOCK)
            n = min(BLOCK - off, len(mv) - pos)
            if n == BLOCK:
                blocks[b] = bytearray(mv[pos:pos + n])
            else:
                buf = blocks.get(b)
                if buf is None:
                    old = self.frozen.get(lun, {}).get(b)
                    buf = bytearray(old) if old is not None else \
                        bytearray(self.read_committed(lun, b, 1))
                    blocks[b] = buf
                buf[off:off + n] = mv[pos:pos + n]
            pos += n

    def put_blocks(self, lun: int, blocks: list[int], data: memoryview) -> None:
        """Whole blocks at once: as ``write(lun, b * BLOCK, data[i*BLOCK:(i+1)*BLOCK])`` for
        each ``b = blocks[i]`` in order (a later one of the same block wins), without a copy
        per block: the cache keeps 4 KiB views of `data`, which must be writable, not shared
        with anyone else, and hold ``len(blocks)`` blocks. A whole-block write never reads
        the old block, so neither does this."""
        if data.nbytes != len(blocks) * BLOCK or data.readonly:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) * BLOCK} writable bytes, "
                             f"not {data.nbytes}")
        mv = data.cast("B")
        end = len(blocks) * BLOCK
        views = map(mv.__getitem__, map(slice, range(0, end, BLOCK), range(BLOCK, end + BLOCK, BLOCK)))
        # memoryviews are tracked by the cyclic GC: thousands of them set off collections
        # that walk the whole heap (2-3x this call's time). They form no cycles.
        was = gc.isenabled()
        gc.disable()
        try:
            self.active.setdefault(lun, {}).update(zip(blocks, views))
        finally:
            if was:
                gc.enable()

    def read(self, lun: int, offset: int, length: int) -> bytes:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        start = offset - first * BLOCK
        act, frz = self.active.get(lun), self.frozen.get(lun)
        if not act and not frz:
            data = self.read_committed(lun, first, last - first + 1)
            return data if start == 0 and length % BLOCK == 0 else data[start:start + length]
        out = bytearray((last - first + 1) * BLOCK)
        b = first
        while b <= last:  # cached blocks from the cache; each run of the rest in one read
            buf = self._cached(lun, b)
            if buf is not None:
                out[(b - first) * BLOCK:(b - first + 1) * BLOCK] = buf
                b += 1
                continue
            e = b
            while e + 1 <= last and self._cached(lun, e + 1) is None:
                e += 1
            out[(b - first) * BLOCK:(e - first + 1) * BLOCK] = self.read_committed(lun, b, e - b + 1)
            b = e + 1
        return bytes(out[start:start + length])
