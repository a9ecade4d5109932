"""RAID layer for the future write-anywhere D-module: checksummed block devices grouped into
RAID-4 or RAID-1 with degraded reads, rebuild onto a replacement and scrub.

Pure and self-contained. ``blockdev.RaidBlockDevice`` presents a group as the 4 KiB block
device WAFL runs on (with the batched ``write_blocks`` / ``write_block_array`` and
``stripe_blocks`` its consistency points use). See ``group.py`` for the design (layouts,
checksum placement, the write hole, batched full-stripe writes) and ``device.py`` for the
fault injection.
"""

from __future__ import annotations

from storage.raid.blockdev import RaidBlockDevice
from storage.raid.checksummed import ChecksummedDevice
from storage.raid.device import BLOCK_SIZE, BlockDevice, DiskDevice, MemoryDevice
from storage.raid.errors import (
    BlockUnrecoverable,
    ChecksumMismatch,
    DeviceFailed,
    RaidError,
    RaidOffline,
    SimulatedCrash,
)
from storage.raid.group import Layout, MemberState, RaidGroup, RebuildProgress, ScrubReport

__all__ = [
    "BLOCK_SIZE",
    "BlockDevice",
    "BlockUnrecoverable",
    "ChecksumMismatch",
    "ChecksummedDevice",
    "DeviceFailed",
    "DiskDevice",
    "Layout",
    "MemberState",
    "MemoryDevice",
    "RaidError",
    "RaidBlockDevice",
    "RaidGroup",
    "RaidOffline",
    "RebuildProgress",
    "ScrubReport",
    "SimulatedCrash",
]
