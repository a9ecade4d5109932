"""A WAFL-like write-anywhere file system for the D-module (pure: no processes).

Design (see ``layout.py`` for the byte-level format):

* Everything is a file: the inode file (its inode in the fsinfo), the block map file (inode 2,
  one bit per block), the root directory (inode 1, a flat name -> inode map), user files (LUNs).
* Two fsinfo root blocks (0 and 1), each with a crc32c and a CP generation; CP g goes to block
  g % 2; mount takes the newest valid one.
* Consistency point: every modified block -- data, indirect, directory, block map, inode file --
  is written to a block free in the last committed CP *and* in every snapshot, never over a
  block a committed root can reach; then a sync barrier, then the fsinfo, then sync. A crash at
  any point leaves the previous CP whole. The block map's own relocation is solved by a
  fixed-point loop (relocating map blocks changes the map) before anything is written.
* Checksums live in the parent pointer (block, crc32c), ZFS style; every read is verified and a
  mismatch raises ``WaflChecksumError`` (code ``wafl_checksum``), never returns data.
* Snapshots: entries in the fsinfo's snapshot table (name, id, generation, the inode file's inode
  as of that CP). A snapshot's block map is the block map file *as of the snapshot* (read through
  the snapshot's own inode file), so no extra bookkeeping: a block is free only when it is clear
  in the active map and in every snapshot's map. Snapshot create/delete are CPs.
* Batched CPs: when the device offers ``write_block_array`` or ``write_blocks`` (a RAID group
  through ``storage.raid.blockdev.RaidBlockDevice``), a CP stages every block once and hands
  the device one batch; with ``crash_after_writes`` armed it writes block by block instead, so
  the crash point stays exact. ``dirty_blocks`` says how much the next CP has to write.
* Stripe-aligned allocation: with ``dev.stripe_blocks`` > 1 (RAID-4: the data disks), a CP
  takes whole free stripes first and pads its last partly used one with zero blocks that stay
  free, so its writes are full-stripe writes over stripes holding no live block; the rest of
  the fsinfo blocks' stripe is never allocated. That closes the RAID-4 write hole for CP
  writes: a crash between data and parity leaves stale parity only where nothing committed
  points, so even a disk lost before the post-crash scrub costs no committed data. Only when
  no whole free stripe is left does a CP fall back to free blocks in partly live stripes
  (read-modify-write, exposed to the hole until a scrub).
* Fault injection: ``fs.crash_after_writes = k`` raises ``WaflCrash`` after the k-th block write
  of the next CP; the in-memory fs is then dead, remount from the device.
"""

from .device import BLOCK_SIZE, BlockDevice, FileDevice, MemDevice
from .errors import (
    WaflChecksumError,
    WaflCrash,
    WaflDead,
    WaflError,
    WaflExists,
    WaflInvalid,
    WaflNoRoot,
    WaflNoSpace,
    WaflNotFound,
)
from .fs import CpStats, DfReport, FsckReport, Wafl

__all__ = [
    "BLOCK_SIZE",
    "BlockDevice",
    "CpStats",
    "DfReport",
    "FileDevice",
    "FsckReport",
    "MemDevice",
    "Wafl",
    "WaflChecksumError",
    "WaflCrash",
    "WaflDead",
    "WaflError",
    "WaflExists",
    "WaflInvalid",
    "WaflNoRoot",
    "WaflNoSpace",
    "WaflNotFound",
]
