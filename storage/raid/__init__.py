"""RAID layer for the future write-anywhere D-module: checksummed block devices grouped into
RAID-4 or RAID-1 with degraded reads, rebuild onto a replacement and scrub.

Pure and self-contained: nothing in the product uses it yet. See ``group.py`` for the design
(layouts, checksum placement, the write hole) and ``device.py`` for the fault injection.
"""

from __future__ import annotations

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
    "RaidGroup",
    "RaidOffline",
    "RebuildProgress",
    "ScrubReport",
    "SimulatedCrash",
]
