"""A tiny block-device protocol (4 KiB blocks) and two implementations.

``MemDevice`` keeps blocks in memory; with ``volatile=True`` writes sit in a write cache until
``sync()`` and ``lose_unsynced()`` drops some or all of them (a power cut). ``FileDevice`` is a
plain file accessed with ``os.pread``/``os.pwrite``; ``sync()`` is ``fsync``.
"""

from __future__ import annotations

import os
import random
from typing import Protocol, runtime_checkable

BLOCK_SIZE = 4096


@runtime_checkable
class BlockDevice(Protocol):
    nblocks: int

    def read_block(self, i: int) -> bytes: ...

    def write_block(self, i: int, data: bytes) -> None: ...

    def sync(self) -> None: ...


def _check(dev_nblocks: int, i: int, data: bytes | None = None) -> None:
    if not 0 <= i < dev_nblocks:
        raise IndexError(f"block {i} out of range 0..{dev_nblocks - 1}")
    if data is not None and len(data) != BLOCK_SIZE:
        raise ValueError(f"block write of {len(data)} bytes, want {BLOCK_SIZE}")


class MemDevice:
    def __init__(self, nblocks: int, volatile: bool = False) -> None:
        self.nblocks = nblocks
        self.volatile = volatile
        self._buf = bytearray(nblocks * BLOCK_SIZE)
        self._cache: dict[int, bytes] = {}
        self.writes = 0
        self.syncs = 0

    def read_block(self, i: int) -> bytes:
        _check(self.nblocks, i)
        if i in self._cache:
            return self._cache[i]
        return bytes(self._buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])

    def write_block(self, i: int, data: bytes) -> None:
        _check(self.nblocks, i, data)
        self.writes += 1
        if self.volatile:
            self._cache[i] = bytes(data)
        else:
            self._buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data

    def sync(self) -> None:
        self.syncs += 1
        for i, data in self._cache.items():
            self._buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data
        self._cache.clear()

    def lose_unsynced(self, rng: random.Random | None = None) -> None:
        """Power cut: each unsynced write survives or not (all lost when no rng given)."""
        for i, data in self._cache.items():
            if rng is not None and rng.random() < 0.5:
                self._buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data
        self._cache.clear()

    def corrupt(self, i: int, offset: int = 0, xor: int = 0xFF) -> None:
        """Flip bits of one byte on the medium (silent corruption, for tests)."""
        self.sync()
        self._buf[i * BLOCK_SIZE + offset] ^= xor


class FileDevice:
    def __init__(self, path: str | os.PathLike[str], nblocks: int | None = None) -> None:
        exists = os.path.exists(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if nblocks is None:
            if not exists:
                raise ValueError("nblocks is required to create a device file")
            nblocks = os.fstat(self._fd).st_size // BLOCK_SIZE
        elif os.fstat(self._fd).st_size < nblocks * BLOCK_SIZE:
            os.ftruncate(self._fd, nblocks * BLOCK_SIZE)
        self.nblocks = nblocks
        self.path = os.fspath(path)

    def read_block(self, i: int) -> bytes:
        _check(self.nblocks, i)
        data = os.pread(self._fd, BLOCK_SIZE, i * BLOCK_SIZE)
        if len(data) < BLOCK_SIZE:
            data += bytes(BLOCK_SIZE - len(data))
        return data

    def write_block(self, i: int, data: bytes) -> None:
        _check(self.nblocks, i, data)
        n = os.pwrite(self._fd, data, i * BLOCK_SIZE)
        if n != BLOCK_SIZE:
            raise OSError(f"short write on block {i}: {n} bytes")

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
