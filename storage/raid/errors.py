"""Errors of the RAID layer.

They subclass ``VmemuError`` so that, once the D-module sits on RAID, a failure crosses the bus
with a stable code like every other vmemu error. The rule they serve: the group raises rather
than return data it cannot prove correct.
"""

from __future__ import annotations

from vmemu.errors import VmemuError


class RaidError(VmemuError):
    """Base of the RAID layer's errors."""

    code = "raid_error"


class RaidOffline(RaidError):
    """More members are gone than the layout can survive; every I/O fails until repaired."""

    code = "raid_offline"


class BlockUnrecoverable(RaidError):
    """One stripe has more bad blocks than redundancy (e.g. two checksum errors in RAID-4)."""

    code = "raid_unrecoverable"


class DeviceFailed(RaidError):
    """An I/O reached a failed member device (the fault-injected "disk is dead")."""

    code = "device_failed"


class ChecksumMismatch(RaidError):
    """A block's contents do not match its stored crc32c: silent corruption, caught."""

    code = "checksum_mismatch"


class SimulatedCrash(Exception):
    """Raised by a test's crash hook to model the process dying mid-stripe-write.

    Deliberately not a ``VmemuError``: it stands for a power cut, not a reported failure.
    """
