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

A disk may also be a block device: with `--disk-backend loop` the whole image is attached to a
/dev/loopN (storage.loopdev), so the header is at offset 0 of the device and everything above
works unchanged on it. `open_path` gives the path to open. While an image is attached all I/O
must go through the device (it has its own page cache), so `Disk.open` and `stamp_epoch` given
the image of an attached disk redirect to its device. On a block device, data reads and writes
that are whole 4 KiB pages use a second, O_DIRECT descriptor (no second copy in the device's
page cache); everything else -- the header, unaligned I/O, the replay's pwrites on `fd`, the
`data_array` mapping -- goes through the page cache, which the kernel keeps coherent with
direct I/O (a direct write flushes and invalidates the cached pages of its range).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path

import msgpack
import numpy as np

from storage import loopdev
from vmemu.errors import Fenced, InvalidState, OutOfRange

MAGIC = b"VMDISK01"
VERSION = 1
HEADER = 4096
_HDR = struct.Struct("<8sIIIIQQI")
OFF_EPOCH = 32
MAX_APPLIED = 16
DIRECT_ALIGN = 4096  # O_DIRECT offset/length/buffer alignment we use (>= any logical block)


class Disk:
    def __init__(self, path: Path, fd: int, header: mmap.mmap, epoch: int,
                 direct_fd: int | None = None) -> None:
        self.path = path
        self.fd = fd  # buffered: header, unaligned I/O, replay pwrites
        self.direct_fd = direct_fd  # O_DIRECT on a block device, for page-aligned data I/O
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
    def open(cls, path: Path, epoch: int, *, direct: bool = True) -> "Disk":
        """Open for service at `epoch`, which the hypervisor has already stamped in the header.

        `path` is an image or a block device (a loop device with the whole image attached); an
        image that is attached is opened through its device. `direct` enables O_DIRECT for
        page-aligned data I/O on a block device (ignored for files).
        """
        path, fd = _open_rw(Path(path))
        fds = [fd]
        try:
            block = stat.S_ISBLK(os.fstat(fd).st_mode)
            hdr = mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            disk = cls(path, fd, hdr, epoch)
            if block:
                end = os.lseek(fd, 0, os.SEEK_END)
                if end < HEADER + disk.size:
                    raise InvalidState(f"{path} holds {end} bytes, less than its "
                                       f"{HEADER + disk.size}-byte disk: attached to a "
                                       "truncated image?")
                if direct:
                    disk.direct_fd = _open_direct(path)
                    if disk.direct_fd is not None:
                        fds.append(disk.direct_fd)
            disk.check_epoch()
        except BaseException:
            hdr.close()
            for f in fds:
                os.close(f)
            raise
        return disk

    def close(self) -> None:
        if self._data is not None:
            self._data.flush()
            del self._data
            self._data = None
        self._hdr.close()
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
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

    def _direct(self, offset: int, length: int) -> int | None:
        """The O_DIRECT descriptor if this I/O may use it (whole 4 KiB pages), else None."""
        # HEADER is a multiple of DIRECT_ALIGN, so an aligned data offset is aligned on the device.
        if length > 0 and offset % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0:
            return self.direct_fd
        return None

    def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        dfd = self._direct(offset, length)
        if dfd is not None:
            return _pread_direct(dfd, length, HEADER + offset)
        return os.pread(self.fd, length, HEADER + offset)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.check_range(offset, len(data))
        self.check_epoch()
        dfd = self._direct(offset, len(data))
        if dfd is not None:
            _pwrite_direct(dfd, data, HEADER + offset)
            return
        pwrite_all(self.fd, data, HEADER + offset)

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
        pwrite_all(self.fd, struct.pack("<I", len(raw)) + raw, 40)
        os.fdatasync(self.fd)


def stamp_epoch(path: Path) -> int:
    """Fence every earlier holder of this disk: bump its epoch and return the new one.

    Done by the hypervisor (which owns the storage adapter in the patent) before it hands the
    disk to anyone; a write by a holder of an older epoch fails its check from then on.
    `path` is an image or a block device; an attached image is stamped through its device,
    where the holders' header mappings live.
    """
    _, fd = _open_rw(Path(path))
    try:
        raw = os.pread(fd, 8, OFF_EPOCH)
        epoch = struct.unpack("<Q", raw)[0] + 1
        os.pwrite(fd, struct.pack("<Q", epoch), OFF_EPOCH)
        os.fdatasync(fd)
        return epoch
    finally:
        os.close(fd)


def disk_path(data_dir: Path, node_index: int, disk_index: int) -> Path:
    """The disk's image file (what gets created, and what a loop device is attached to)."""
    return data_dir / f"node{node_index}" / f"disk{disk_index}.img"


def open_path(data_dir: Path, node_index: int, disk_index: int) -> Path:
    """The path to open the disk at: its loop device if the image is attached now, else the image.

    Asks the kernel (storage.loopdev.resolve: the device bound to this very inode), not a
    record, so it is right after crashes and reused device numbers.
    """
    return loopdev.resolve(disk_path(data_dir, node_index, disk_index))


def _open_rw(path: Path) -> tuple[Path, int]:
    """Open a disk read-write, through its loop device if the image is attached.

    A descriptor on a device pins it (a detach is deferred until it closes), so checking the
    device's backing file *after* opening cannot be raced by a detach and a reuse.
    """
    target = loopdev.resolve(path)
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    if target != path:
        try:
            loopdev.verify_fd(fd, path, str(target))
        except BaseException:
            os.close(fd)
            raise
    return target, fd


def _open_direct(path: Path) -> int | None:
    """A second, O_DIRECT descriptor on a block device; None where O_DIRECT is refused."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None


def _aligned(length: int) -> mmap.mmap:
    # Anonymous mappings are page aligned, as O_DIRECT wants its buffers.
    return mmap.mmap(-1, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _pread_direct(fd: int, length: int, pos: int) -> bytes:
    buf = _aligned(length)
    try:
        view = memoryview(buf)
        try:
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:]], pos + done)
                if n == 0:
                    break  # end of device; the range check makes this unreachable
                done += n
        finally:
            view.release()
        return buf[:done]
    finally:
        buf.close()


def pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    """pwrite every byte: a write the file system can only partly place (a full disk) comes
    back short, not as an error, and the next pwrite is what raises ENOSPC."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)


def _pwrite_direct(fd: int, data: bytes | memoryview, pos: int) -> None:
    length = len(data)
    buf = _aligned(length)
    try:
        buf[:] = data
        view = memoryview(buf)
        try:
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:], pos + done)
        finally:
            view.release()
    finally:
        buf.close()
