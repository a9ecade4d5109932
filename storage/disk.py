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
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from storage import fault_io, loopdev
from vmemu.errors import CorruptDisk, Fenced, OutOfRange

MAGIC = b"VMDISK01"
VERSION = 1
HEADER = 4096
_HDR = struct.Struct("<8sIIIIQQI")
OFF_EPOCH = 32
OFF_APPLIED_LEN = 40
OFF_APPLIED = 44
MAX_APPLIED = 16
MAX_SIZE = 1 << 48
EPOCH_LIMIT = 1 << 62  # bumped once per fence: never reached, so a value past it is corrupt
DIRECT_ALIGN = 4096  # O_DIRECT offset/length/buffer alignment we use (>= any logical block)


@dataclass(frozen=True)
class DiskHeader:
    """A header that checked out (``parse_header``)."""

    node_index: int
    disk_index: int
    size: int
    epoch: int
    applied: dict[int, int]


def parse_header(raw: bytes | mmap.mmap, where: str, file_size: int,
                 node: int | None = None, index: int | None = None) -> DiskHeader:
    """Check a disk header read back from `where` (a path, for the message); CorruptDisk if
    it does not parse or is out of range.

    The header comes from a file any process of the user can write: magic and version, the
    owner and disk index (the file's name says which they must be, when given), a size the
    file holds, an epoch the next stamp cannot overflow, and an applied map of at most
    MAX_APPLIED int -> int entries, are all checked before any of it is used.
    """
    if len(raw) < _HDR.size:
        raise _corrupt(where, f"header of {len(raw)} bytes, shorter than {_HDR.size}")
    magic, version, nd, di, _res, size, epoch, alen = _HDR.unpack_from(raw, 0)
    if magic != MAGIC:
        raise _corrupt(where, f"not a vmemu disk (bad magic {magic!r})")
    if version != VERSION:
        raise _corrupt(where, f"not a vmemu disk (unknown version {version})")
    if node is not None and nd != node:
        raise _corrupt(where, f"header says node{nd}, the file is node{node}'s")
    if index is not None and di != index:
        raise _corrupt(where, f"header says disk {di}, the file is disk {index}")
    if size == 0 or size % 512 or size > MAX_SIZE:
        raise _corrupt(where, f"data size {size} out of range (512-byte multiple, up to 2**48)")
    if file_size < HEADER + size:
        raise _corrupt(where, f"{file_size} bytes long, less than its {HEADER}-byte header "
                              f"and {size}-byte data area (truncated?)")
    if epoch >= EPOCH_LIMIT:
        raise _corrupt(where, f"epoch {epoch} is absurd (limit 2**62)")
    return DiskHeader(nd, di, size, epoch, _applied(raw, alen, where))


def _applied(raw: bytes | mmap.mmap, alen: int, where: str) -> dict[int, int]:
    if alen == 0:
        return {}
    if alen > HEADER - OFF_APPLIED or OFF_APPLIED + alen > len(raw):
        raise _corrupt(where, f"applied map of {alen} bytes does not fit the header")
    try:
        m = msgpack.unpackb(bytes(raw[OFF_APPLIED:OFF_APPLIED + alen]), strict_map_key=False,
                            max_array_len=MAX_APPLIED, max_map_len=MAX_APPLIED)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on bad input
        raise _corrupt(where, f"applied map does not parse ({type(exc).__name__})") from None
    if not isinstance(m, dict) or len(m) > MAX_APPLIED:
        raise _corrupt(where, "applied map is not a map of at most "
                              f"{MAX_APPLIED} entries")
    for k, v in m.items():
        if type(k) is not int or type(v) is not int or not 0 < k < 2**63 or not 0 <= v < 2**63:
            raise _corrupt(where, f"applied map entry {k!r}: {v!r} is not region -> seq")
    return dict(m)


def _corrupt(where: str, reason: str) -> CorruptDisk:
    return CorruptDisk(f"disk {where}: {reason}", reason)


class Disk:
    def __init__(self, path: Path, fd: int, header: mmap.mmap, epoch: int,
                 direct_fd: int | None = None, *, file_size: int | None = None,
                 node: int | None = None, index: int | None = None) -> None:
        self.path = path
        self.fd = fd  # buffered: header, unaligned I/O, replay pwrites
        self.direct_fd = direct_fd  # O_DIRECT on a block device, for page-aligned data I/O
        self._hdr = header
        if file_size is None:
            file_size = os.lseek(fd, 0, os.SEEK_END)
        hdr = parse_header(header, str(path), file_size, node, index)
        self.node_index = hdr.node_index
        self.disk_index = hdr.disk_index
        self.size = hdr.size
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
    def open(cls, path: Path, epoch: int, *, direct: bool = True, node: int | None = None,
             index: int | None = None) -> "Disk":
        """Open for service at `epoch`, which the hypervisor has already stamped in the header.

        `path` is an image or a block device (a loop device with the whole image attached); an
        image that is attached is opened through its device. `direct` enables O_DIRECT for
        page-aligned data I/O on a block device (ignored for files). `node` and `index`, when
        given, must be what the header says (the file's name says whose disk it is). A header
        that does not check out raises CorruptDisk naming the file and the reason.
        """
        path, fd = _open_rw(Path(path))
        fds = [fd]
        try:
            block = stat.S_ISBLK(os.fstat(fd).st_mode)
            end = os.lseek(fd, 0, os.SEEK_END)
            if end < HEADER:  # mapping a page past the end of a file would SIGBUS on access
                raise _corrupt(str(path), f"{end} bytes long, shorter than its {HEADER}-byte header")
            hdr = mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            disk = cls(path, fd, hdr, epoch, file_size=end, node=node, index=index)
            if block and direct:
                disk.direct_fd = _open_direct(path)
                if disk.direct_fd is not None:
                    fds.append(disk.direct_fd)
            disk.check_epoch()
            for f in fds:  # the key a fault rule names this disk by (storage.fault_io)
                fault_io.register(f, disk.node_index, disk.disk_index)
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
            fault_io.unregister(self.direct_fd)
            os.close(self.direct_fd)
            self.direct_fd = None
        fault_io.unregister(self.fd)
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
        return fault_io.pread(self.fd, length, HEADER + offset)

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
        fault_io.fdatasync(self.fd)

    # -- replay bookkeeping ----------------------------------------------------------------
    def applied(self) -> dict[int, int]:
        """{region: last seq on this disk}, read back from the header; CorruptDisk if the map
        does not check out."""
        n = struct.unpack_from("<I", self._hdr, OFF_APPLIED_LEN)[0]
        return _applied(self._hdr, n, str(self.path))

    def set_applied(self, applied: dict[int, int]) -> None:
        """Record (durably) what the data area now holds from each log."""
        self.check_epoch()
        items = list(applied.items())[-MAX_APPLIED:]
        raw = msgpack.packb(dict(items))
        if OFF_APPLIED + len(raw) > HEADER:
            raise ValueError("applied map does not fit in the disk header")
        pwrite_all(self.fd, struct.pack("<I", len(raw)) + raw, OFF_APPLIED_LEN)
        fault_io.fdatasync(self.fd)


def stamp_epoch(path: Path, node: int | None = None, index: int | None = None) -> int:
    """Fence every earlier holder of this disk: bump its epoch and return the new one.

    Done by the hypervisor (which owns the storage adapter in the patent) before it hands the
    disk to anyone; a write by a holder of an older epoch fails its check from then on.
    `path` is an image or a block device; an attached image is stamped through its device,
    where the holders' header mappings live. The header is checked first (``parse_header``,
    with the expected `node` and `index` when given): nothing is written into a file that is
    not this disk, and CorruptDisk says why.
    """
    target, fd = _open_rw(Path(path))
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        hdr = parse_header(os.pread(fd, HEADER, 0), str(target), end, node, index)
        epoch = hdr.epoch + 1
        if epoch >= EPOCH_LIMIT:  # the next open would refuse it: refuse it here
            raise _corrupt(str(target), f"epoch {hdr.epoch} is absurd (limit 2**62)")
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
                n = fault_io.preadv(fd, [view[done:]], pos + done)
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
        done += fault_io.pwrite(fd, view[done:], pos + done)


def _pwrite_direct(fd: int, data: bytes | memoryview, pos: int) -> None:
    length = len(data)
    buf = _aligned(length)
    try:
        buf[:] = data
        view = memoryview(buf)
        try:
            done = 0
            while done < length:
                done += fault_io.pwrite(fd, view[done:], pos + done)
        finally:
            view.release()
    finally:
        buf.close()
