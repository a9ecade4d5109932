"""Block devices the RAID group is built from, with fault injection.

A member is anything with ``read_block``/``write_block``/``nblocks``/``fail``/``failed``
(:class:`BlockDevice`). Two implementations: :class:`MemoryDevice` (a bytearray, so the
property tests run thousands of operations per second) and :class:`DiskDevice` (an adapter
over the product's file-backed :class:`storage.disk.Disk`, 4 KiB blocks like the LUN layer).

Both also offer ``read_run``/``write_run``: several consecutive blocks in one call (one
``pread``/``pwrite`` on a disk), which the group's batched write path and the rebuild use so
that large transfers do not pay a system call and a Python round trip per 4 KiB block.
Members without them still work: the checksum layer falls back to per-block I/O.

Both inject the two faults RAID exists for: ``fail()`` makes every later I/O raise
:class:`DeviceFailed` (a dead disk), and ``corrupt_block(i)`` flips bits behind the checksum
layer's back (silent corruption / bit rot), which only a checksum can catch.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence

import numpy as np

from storage import fault_io
from storage.disk import HEADER, Disk
from storage.raid.errors import DeviceFailed
from vmemu.errors import OutOfRange

BLOCK_SIZE = 4096
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# One buffer of whole blocks, or a sequence of 4 KiB block buffers written back to back.
RunData = Union[bytes, bytearray, memoryview, np.ndarray, Sequence[Union[bytes, bytearray, memoryview]]]


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

    def _check_run(self, first: int, count: int) -> None:
        if self._failed:
            raise DeviceFailed(f"device {self.name} has failed")
        if count < 0 or first < 0 or first + count > self._nblocks:
            raise OutOfRange(f"blocks [{first}, {first + count}) are past the end of "
                             f"{self.name} ({self._nblocks} blocks)")


def run_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    """A flat byte view of a run of blocks (a 2-D uint8 array or any contiguous buffer)."""
    mv = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if mv.nbytes % BLOCK_SIZE:
        raise ValueError(f"a run is whole {BLOCK_SIZE}-byte blocks, got {mv.nbytes} bytes")
    return mv


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

    def read_run(self, first: int, count: int) -> bytes:
        """Blocks ``first .. first+count-1`` as one buffer."""
        self._check_run(first, count)
        return bytes(self._buf[first * BLOCK_SIZE:(first + count) * BLOCK_SIZE])

    def write_run(self, first: int, data: RunData) -> None:
        """Write consecutive blocks starting at ``first``: one buffer of whole blocks, or a
        sequence of block buffers (gathered, like ``pwritev``)."""
        if isinstance(data, (list, tuple)):
            data = b"".join(data)
        mv = run_bytes(data)
        self._check_run(first, mv.nbytes // BLOCK_SIZE)
        self._buf[first * BLOCK_SIZE:first * BLOCK_SIZE + mv.nbytes] = mv

    def corrupt_block(self, i: int, offset: int = 0, xor: int = 0xFF) -> None:
        """Silently flip bits of one byte (works even on a failed device: it is the medium)."""
        self._buf[i * BLOCK_SIZE + offset] ^= xor


class DiskDevice(_FaultyDevice):
    """Adapter over :class:`storage.disk.Disk`: block i is bytes [i*4096, (i+1)*4096).

    Writes go through ``Disk.write`` so they stay epoch-fenced; a fenced holder gets
    ``Fenced`` (not ``DeviceFailed``): being fenced is not a disk failure.

    An I/O error (EIO, also a torn write: storage.fault_io) is the disk failing: it becomes
    ``DeviceFailed`` and the device stays failed, so the group serves from the other members
    and never trusts this one again until it is replaced and rebuilt. A write that failed
    half-way leaves the member's block stale with a checksum entry that may still vouch for
    the old contents: only failing the member keeps such a block from being read back. Other
    errors (ENOSPC on a full file system) pass through: the CP fails and is retried.
    """

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk.size // BLOCK_SIZE, f"{disk.path.name}")
        self.disk = disk

    @contextlib.contextmanager
    def _eio_fails(self) -> Iterator[None]:
        """An EIO inside fails the device for good (see the class docstring)."""
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._failed = True
            raise DeviceFailed(f"device {self.name} has failed: {exc.strerror or exc}") from exc

    def read_block(self, i: int) -> bytes:
        self._check(i)
        with self._eio_fails():
            return self.disk.read(i * BLOCK_SIZE, BLOCK_SIZE)

    def write_block(self, i: int, data: bytes) -> None:
        self._check(i, data)
        with self._eio_fails():
            self.disk.write(i * BLOCK_SIZE, data)

    def read_run(self, first: int, count: int) -> bytes:
        """Blocks ``first .. first+count-1`` with one ``pread``."""
        self._check_run(first, count)
        with self._eio_fails():
            return self.disk.read(first * BLOCK_SIZE, count * BLOCK_SIZE)

    def write_run(self, first: int, data: RunData) -> None:
        """Consecutive blocks with one (epoch-fenced) ``pwrite``, or ``pwritev`` calls of up to
        IOV_MAX buffers when given a sequence of block buffers (no copy to gather them)."""
        with self._eio_fails():
            self._write_run(first, data)

    def _write_run(self, first: int, data: RunData) -> None:
        if isinstance(data, (list, tuple)) and getattr(self.disk, "direct_fd", None) is not None:
            # A disk on a block device writes aligned data with O_DIRECT through Disk.write;
            # keep every write on that path rather than mixing in buffered pwritev.
            data = b"".join(data)
        if not isinstance(data, (list, tuple)):
            mv = run_bytes(data)
            self._check_run(first, mv.nbytes // BLOCK_SIZE)
            self.disk.write(first * BLOCK_SIZE, mv)
            return
        if any(len(b) != BLOCK_SIZE for b in data):
            raise ValueError(f"a run's buffers are {BLOCK_SIZE}-byte blocks")
        self._check_run(first, len(data))
        self.disk.check_range(first * BLOCK_SIZE, len(data) * BLOCK_SIZE)
        self.disk.check_epoch()  # what Disk.write checks: a fenced holder may not write
        pos = HEADER + first * BLOCK_SIZE
        for k in range(0, len(data), _IOV_MAX):
            chunk = data[k:k + _IOV_MAX]
            want = len(chunk) * BLOCK_SIZE
            n = fault_io.pwritev(self.disk.fd, chunk, pos)
            if n != want:  # regular files do not short-write, but never assume it
                flat = b"".join(chunk)
                while n < want:
                    n += fault_io.pwrite(self.disk.fd, flat[n:], pos + n)
            pos += want

    def corrupt_block(self, i: int, offset: int = 0, xor: int = 0xFF) -> None:
        pos = i * BLOCK_SIZE + offset
        old = self.disk.read(pos, 1)[0]
        self.disk.write(pos, bytes([old ^ xor]))

    def sync(self) -> None:
        if self._failed:
            raise DeviceFailed(f"device {self.name} has failed")
        with self._eio_fails():
            self.disk.sync()
