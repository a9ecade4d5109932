"""A checksum table at the end of each member, so silent corruption is caught on read.

Layout of a member with ``B`` raw blocks::

    [0, D)        data blocks, full 4096 bytes each (the RAID stripe units)
    [D, B)        checksum table: 512 entries of 8 bytes per table block
                  entry = <I crc32c> <I tag>, tag = TAG_WRITTEN once the block is written

``D`` is the largest count with ``D + ceil(D / 512) <= B`` (0.2% overhead). Keeping data blocks
a full 4 KiB (rather than 4088 bytes + checksum in-block) keeps logical blocks aligned with the
LUN layer's 4 KiB blocks, which the write-anywhere file system above will want.

The crc covers the block's index then its data (``crc32c(data, crc32c(index))``), so a block
written to the wrong place (a misdirected write) fails its check too. A never-written entry
(all zero) stands for the zero block, so a fresh device verifies without initialisation.

Not atomic: a write stores the data block, then its table entry. A crash between the two leaves
a checksum mismatch, which the group resolves from redundancy like any other corruption (the
old stripe contents win, consistently). A corrupted *table* entry looks like a bad data block
whose reconstruction equals what is on disk; the group then just rewrites the entry.
"""

from __future__ import annotations

import struct

from storage.checksum import crc32c
from storage.raid.device import BLOCK_SIZE, BlockDevice
from vmemu.errors import OutOfRange

ENTRY = struct.Struct("<II")
ENTRIES_PER_BLOCK = BLOCK_SIZE // ENTRY.size
TAG_WRITTEN = 0x52414944  # "RAID"
_ZERO = bytes(BLOCK_SIZE)


def data_blocks_for(nblocks: int) -> int:
    """How many data blocks fit in ``nblocks`` raw blocks alongside their checksum table."""
    d = nblocks * ENTRIES_PER_BLOCK // (ENTRIES_PER_BLOCK + 1)
    while d > 0 and d + -(-d // ENTRIES_PER_BLOCK) > nblocks:
        d -= 1
    return d


def block_crc(i: int, data: bytes) -> int:
    return crc32c(data, crc32c(struct.pack("<Q", i)))


class ChecksummedDevice:
    """A member device seen through its checksum table."""

    def __init__(self, raw: BlockDevice) -> None:
        self.raw = raw
        self.data_blocks = data_blocks_for(raw.nblocks)

    @property
    def failed(self) -> bool:
        return self.raw.failed

    def _entry_pos(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.data_blocks:
            raise OutOfRange(f"data block {i} is past {self.data_blocks}")
        return self.data_blocks + i // ENTRIES_PER_BLOCK, (i % ENTRIES_PER_BLOCK) * ENTRY.size

    def expected_crc(self, i: int) -> int | None:
        """The stored crc of block i; None if the entry itself is garbage."""
        tb, off = self._entry_pos(i)
        crc, tag = ENTRY.unpack_from(self.raw.read_block(tb), off)
        if tag == TAG_WRITTEN:
            return crc
        if tag == 0 and crc == 0:
            return block_crc(i, _ZERO)
        return None

    def matches(self, i: int, data: bytes) -> bool:
        """Does ``data`` agree with block i's stored checksum?"""
        return self.expected_crc(i) == block_crc(i, data)

    def read_checked(self, i: int) -> tuple[bytes, bool]:
        """Block i and whether it verified (raises DeviceFailed if the device is dead)."""
        data = self.raw.read_block(i)
        return data, self.matches(i, data)

    def write_block(self, i: int, data: bytes) -> None:
        """Write data, then its checksum entry (read-modify-write of one table block)."""
        tb, off = self._entry_pos(i)
        self.raw.write_block(i, data)
        table = bytearray(self.raw.read_block(tb))
        ENTRY.pack_into(table, off, block_crc(i, data), TAG_WRITTEN)
        self.raw.write_block(tb, bytes(table))
