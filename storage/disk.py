"""File-backed disks: a sparse image with a one-page header, then the data area.

Header (4096 bytes, little endian)::

    0   8   magic       b"VMDISK01"
    8   4   version
    12  4   node_index  owning node (1-based)
    16  4   disk_index
    20  4   reserved
    24  8   size        bytes of data area
    32  8   epoch       fencing generation: only the holder of the current epoch may write
    40  4   applied_len length of the msgpack map that follows
    44  .   applied     {region_id: last seq whose effects are durable on this disk}

The epoch is the fence. The hypervisor bumps it before it lets anyone else near the disk, and
every write batch checks it through a shared mapping of the header page, so a stale incarnation
(resumed after SIGSTOP, say) gets `Fenced` instead of scribbling over its successor's data.
`applied` makes replay idempotent across several logs: a record is applied only if its seq is
above what this disk already holds from that region.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import msgpack
import numpy as np

from vmemu.errors import Fenced, OutOfRange

MAGIC = b"VMDISK01"
VERSION = 1
HEADER = 4096
_HDR = struct.Struct("<8sIIIIQQI")
OFF_EPOCH = 32
MAX_APPLIED = 16


class Disk:
    def __init__(self, path: Path, fd: int, header: mmap.mmap, epoch: int) -> None:
        self.path = path
        self.fd = fd
        self._hdr = header
        magic, version, node, disk, _, size, _, _ = _HDR.unpack_from(header, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a vmemu disk")
        self.node_index = node
        self.disk_index = disk
        self.size = size
        self.epoch = epoch
        self._data: np.memmap | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, node_index: int, disk_index: int, size: int) -> None:
        """A new sparse image (fixed size; only written blocks take space)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.truncate(HEADER + size)
            f.write(_HDR.pack(MAGIC, VERSION, node_index, disk_index, 0, size, 0, 0))
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def open(cls, path: Path, epoch: int) -> "Disk":
        """Open for service at `epoch`, which the hypervisor has already stamped in the header."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            hdr = mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        try:
            disk = cls(path, fd, hdr, epoch)
            disk.check_epoch()
        except BaseException:
            hdr.close()
            os.close(fd)
            raise
        return disk

    def close(self) -> None:
        if self._data is not None:
            self._data.flush()
            del self._data
            self._data = None
        self._hdr.close()
        os.close(self.fd)

    # -- fencing ---------------------------------------------------------------------------
    def current_epoch(self) -> int:
        return struct.unpack_from("<Q", self._hdr, OFF_EPOCH)[0]

    def check_epoch(self) -> None:
        now = self.current_epoch()
        if now != self.epoch:
            raise Fenced(f"disk {self.path.name} of node{self.node_index} is at epoch {now}; "
                         f"this incarnation holds epoch {self.epoch} and may not write")

    # -- data ------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} is past the end of a {self.size}-byte disk")

    def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return os.pread(self.fd, length, HEADER + offset)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.check_range(offset, len(data))
        self.check_epoch()
        os.pwrite(self.fd, data, HEADER + offset)

    def data_array(self) -> np.ndarray:
        """A writable shared mapping of the data area: the replay kernels write through it."""
        self.check_epoch()
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=HEADER,
                                   shape=(self.size,))
        return self._data

    def sync(self) -> None:
        os.fdatasync(self.fd)

    # -- replay bookkeeping ----------------------------------------------------------------
    def applied(self) -> dict[int, int]:
        n = struct.unpack_from("<I", self._hdr, 40)[0]
        if n == 0:
            return {}
        raw = msgpack.unpackb(bytes(self._hdr[44:44 + n]), strict_map_key=False)
        return {int(k): int(v) for k, v in raw.items()}

    def set_applied(self, applied: dict[int, int]) -> None:
        """Record (durably) what the data area now holds from each log."""
        self.check_epoch()
        items = list(applied.items())[-MAX_APPLIED:]
        raw = msgpack.packb(dict(items))
        if 44 + len(raw) > HEADER:
            raise ValueError("applied map does not fit in the disk header")
        os.pwrite(self.fd, struct.pack("<I", len(raw)) + raw, 40)
        os.fdatasync(self.fd)


def stamp_epoch(path: Path) -> int:
    """Fence every earlier holder of this disk: bump its epoch and return the new one.

    Done by the hypervisor (which owns the storage adapter in the patent) before it hands the
    disk to anyone; a write by a holder of an older epoch fails its check from then on.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8, OFF_EPOCH)
        epoch = struct.unpack("<Q", raw)[0] + 1
        os.pwrite(fd, struct.pack("<Q", epoch), OFF_EPOCH)
        os.fdatasync(fd)
        return epoch
    finally:
        os.close(fd)


def disk_path(data_dir: Path, node_index: int, disk_index: int) -> Path:
    return data_dir / f"node{node_index}" / f"disk{disk_index}.img"
