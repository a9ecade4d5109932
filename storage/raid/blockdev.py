"""A RAID group seen as the plain 4 KiB block device WAFL (``storage.wafl``) runs on.

``RaidBlockDevice(group)`` offers ``read_block``/``write_block``/``sync``/``nblocks`` (WAFL's
``BlockDevice`` protocol) plus the two things WAFL's fast path looks for:

* ``write_blocks(items)``: the whole consistency point in one call, which the group turns into
  full-stripe writes (no reads, parity in bulk, one run write per member);
* ``stripe_blocks``: logical blocks per stripe (the data disks of a RAID-4 group, 1 for
  RAID-1), so WAFL's allocator hands a CP whole free stripes.

Errors pass through unchanged (``RaidError`` subclasses), so a failed read reaches WAFL as an
exception, never as wrong data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from storage.raid.group import Layout, RaidGroup


class RaidBlockDevice:
    """Adapter: a :class:`RaidGroup` as a WAFL block device."""

    def __init__(self, group: RaidGroup) -> None:
        self.group = group

    @property
    def nblocks(self) -> int:
        return self.group.nblocks

    @property
    def stripe_blocks(self) -> int:
        return self.group.ndata if self.group.layout is Layout.RAID4 else 1

    def read_block(self, i: int) -> bytes:
        return self.group.read_block(i)

    def write_block(self, i: int, data: bytes) -> None:
        self.group.write_block(i, bytes(data))

    def write_blocks(self, items: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        self.group.write_blocks(items)

    def sync(self) -> None:
        self.group.sync()

    def write_block_array(self, lbas: np.ndarray, rows: np.ndarray) -> None:
        """Block ``rows[i]`` (a (k, 4096) uint8 array) to ``lbas[i]``: ``write_blocks``
        without the per-block buffers, for callers that stage a batch contiguously."""
        self.group.write_block_array(lbas, rows)
