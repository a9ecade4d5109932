"""Block devices the RAID group is built from, with fault injection.

A member is anything with ``read_block``/``write_block``/``nblocks``/``fail``/``failed``
(:class:`BlockDevice`). Two implementations: :class:`MemoryDevice` (a bytearray, so the
property tests run thousands of operations per second) and :class:`DiskDevice` (an adapter
over the product's file-backed :class:`storage.disk.Disk`, 4 KiB blocks like the LUN layer).

Both inject the two faults RAID exists for: ``fail()`` makes every later I/O raise
:class:`DeviceFailed` (a dead disk), and ``corrupt_block(i)`` flips bits behind the checksum
layer's back (silent corruption / bit rot), which only a checksum can catch.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from storage.disk import Disk
from storage.raid.errors import DeviceFailed
from vmemu.errors import OutOfRange

BLOCK_SIZE = 4096


@runtime_checkable
class BlockDevice(Protocol):
    """What a RAID member must offer: fixed-size blocks and a failure switch."""

    @property
    def nblocks(self) -> int: ...

    @property
    def failed(self) -> bool: ...

    def read_block(self, i: int) -> bytes: ...

    def write_block(self, i: int, data: bytes) -> None: ...

    def fail(self) -> None: ...


class _FaultyDevice:
    """Shared bookkeeping: the failed flag and argument checks."""

    def __init__(self, nblocks: int, name: str) -> None:
        self._nblocks = nblocks
        self._failed = False
        self.name = name

    @property
    def nblocks(self) -> int:
        return self._nblocks

    @property
    def failed(self) -> bool:
        return self._failed

    def fail(self) -> None:
        """From now on every I/O raises: the disk has died."""
        self._failed = True

    def _check(self, i: int, data: bytes | None = None) -> None:
        if self._failed:
            raise DeviceFailed(f"device {self.name} has failed")
        if not 0 <= i < self._nblocks:
            raise OutOfRange(f"block {i} is past the end of {self.name} ({self._nblocks} blocks)")
        if data is not None and len(data) != BLOCK_SIZE:
            raise ValueError(f"a block is {BLOCK_SIZE} bytes, got {len(data)}")


class MemoryDevice(_FaultyDevice):
    """A device in a bytearray: the fast stand-in for a disk in tests."""

    def __init__(self, nblocks: int, name: str = "mem") -> None:
        super().__init__(nblocks, name)
        self._buf = bytearray(nblocks * BLOCK_SIZE)

    def read_block(self, i: int) -> bytes:
        self._check(i)
        return bytes(self._buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])

    def write_block(self, i: int, data: bytes) -> None:
        self._check(i, data)
        self._buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = data

    def corrupt_block(self, i: int, offset: int = 0, xor: int = 0xFF) -> None:
        """Silently flip bits of one byte (works even on a failed device: it is the medium)."""
        self._buf[i * BLOCK_SIZE + offset] ^= xor


class DiskDevice(_FaultyDevice):
    """Adapter over :class:`storage.disk.Disk`: block i is bytes [i*4096, (i+1)*4096).

    Writes go through ``Disk.write`` so they stay epoch-fenced; a fenced holder gets
    ``Fenced`` (not ``DeviceFailed``): being fenced is not a disk failure.
    """

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk.size // BLOCK_SIZE, f"{disk.path.name}")
        self.disk = disk

    def read_block(self, i: int) -> bytes:
        self._check(i)
        return self.disk.read(i * BLOCK_SIZE, BLOCK_SIZE)

    def write_block(self, i: int, data: bytes) -> None:
        self._check(i, data)
        self.disk.write(i * BLOCK_SIZE, data)

    def corrupt_block(self, i: int, offset: int = 0, xor: int = 0xFF) -> None:
        pos = i * BLOCK_SIZE + offset
        old = self.disk.read(pos, 1)[0]
        self.disk.write(pos, bytes([old ^ xor]))

    def sync(self) -> None:
        self.disk.sync()
