"""On-disk format of the WAFL-like file system (all integers little-endian).

Block 0 and block 1: the two fsinfo (root) blocks; CP generation g is written to block g % 2.
Every other block belongs to a file and is reached through a block pointer.

Block pointer (8 bytes): ``u32 block, u32 crc32c(block contents)``; block 0 means a hole
(reads as zeros). The checksum lives in the parent (ZFS style), so a block that is silently
corrupted, or a stale block left by a lost write, never matches.

Inode (128 bytes, 32 per block): ``u16 type, u16 flags, u32 generation, u64 size,
12 direct pointers, 1 single-indirect pointer, 1 double-indirect pointer``. An indirect block
holds 512 pointers. Max file size (12 + 512 + 512*512) * 4 KiB, about 1 GiB.

Fixed inode numbers in the inode file: 1 = root directory, 2 = block map. The inode file's own
inode lives in the fsinfo.

Block map file: one bit per device block (bit i of byte i//8, LSB first), set = used by the
active file system (blocks 0 and 1 always set).

Directory file: ``u32 count`` then per entry ``u32 ino, u16 name length, name (utf-8)``.

fsinfo block: magic, version, block size, nblocks, generation, the inode file's inode, snapshot
table (up to MAX_SNAPSHOTS entries: ``u32 id, u32 0, u64 generation, f64 ctime, 40-byte name,
the inode file's inode as of that snapshot``), and crc32c over the first 4092 bytes in the
last 4 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from storage.checksum import crc32c

from .device import BLOCK_SIZE
from .errors import WaflInvalid

BS = BLOCK_SIZE
NDIRECT = 12
PTRS_PER_BLOCK = BS // 8
INODE_SIZE = 128
INODES_PER_BLOCK = BS // INODE_SIZE
MAX_FILE_BLOCKS = NDIRECT + PTRS_PER_BLOCK + PTRS_PER_BLOCK * PTRS_PER_BLOCK
MAX_FILE_SIZE = MAX_FILE_BLOCKS * BS

T_FREE, T_FILE, T_DIR, T_BMAP, T_IFILE = 0, 1, 2, 3, 4
INO_ROOTDIR = 1
INO_BMAP = 2
FIRST_USER_INO = 3

HOLE = (0, 0)
ZERO_BLOCK = bytes(BS)

MAGIC = b"VMWAFL01"
VERSION = 1
MAX_SNAPSHOTS = 16
SNAP_NAME_MAX = 40

_PTR = struct.Struct("<II")
_INODE_HDR = struct.Struct("<HHIQ")
_PTRS_ALL = struct.Struct("<" + "II" * PTRS_PER_BLOCK)
_FSINFO_HDR = struct.Struct("<8sIIQQI")  # magic, version, bs, nblocks, generation, nsnap
_SNAP_HDR = struct.Struct("<IIQd40s")
SNAP_ENTRY_SIZE = _SNAP_HDR.size + INODE_SIZE


def block_crc(data: bytes) -> int:
    return crc32c(data)


@dataclass
class Inode:
    type: int = T_FREE
    flags: int = 0
    gen: int = 0
    size: int = 0
    direct: list[tuple[int, int]] = field(default_factory=lambda: [HOLE] * NDIRECT)
    ind: tuple[int, int] = HOLE
    dind: tuple[int, int] = HOLE

    def pack(self) -> bytes:
        out = bytearray(_INODE_HDR.pack(self.type, self.flags, self.gen, self.size))
        for p in (*self.direct, self.ind, self.dind):
            out += _PTR.pack(*p)
        out += bytes(INODE_SIZE - len(out))
        return bytes(out)

    @classmethod
    def unpack(cls, b: bytes) -> Inode:
        t, fl, gen, size = _INODE_HDR.unpack_from(b, 0)
        ptrs = [_PTR.unpack_from(b, 16 + 8 * i) for i in range(NDIRECT + 2)]
        return cls(t, fl, gen, size, ptrs[:NDIRECT], ptrs[NDIRECT], ptrs[NDIRECT + 1])

    def copy(self) -> Inode:
        return Inode(self.type, self.flags, self.gen, self.size, list(self.direct), self.ind, self.dind)


def pack_ptrs(ptrs: list[tuple[int, int]]) -> bytes:
    flat = [x for p in ptrs for x in p]
    return _PTRS_ALL.pack(*flat)


def unpack_ptrs(b: bytes) -> list[tuple[int, int]]:
    flat = _PTRS_ALL.unpack(b)
    return list(zip(flat[0::2], flat[1::2]))


@dataclass
class SnapEntry:
    id: int
    name: str
    gen: int
    ctime: float
    ifile: Inode


@dataclass
class FsInfo:
    nblocks: int
    generation: int
    ifile: Inode
    snapshots: list[SnapEntry]

    def pack(self) -> bytes:
        if len(self.snapshots) > MAX_SNAPSHOTS:
            raise WaflInvalid("too many snapshots")
        out = bytearray(
            _FSINFO_HDR.pack(MAGIC, VERSION, BS, self.nblocks, self.generation, len(self.snapshots))
        )
        out += self.ifile.pack()
        for s in self.snapshots:
            out += _SNAP_HDR.pack(s.id, 0, s.gen, s.ctime, s.name.encode().ljust(SNAP_NAME_MAX, b"\0"))
            out += s.ifile.pack()
        out += bytes(BS - 4 - len(out))
        out += struct.pack("<I", block_crc(bytes(out)))
        return bytes(out)

    @classmethod
    def unpack(cls, b: bytes) -> FsInfo | None:
        """The fsinfo in `b`, or None if it is not a valid one (bad magic or checksum)."""
        if len(b) != BS or b[:8] != MAGIC:
            return None
        (crc,) = struct.unpack_from("<I", b, BS - 4)
        if block_crc(b[: BS - 4]) != crc:
            return None
        magic, ver, bs, nblocks, gen, nsnap = _FSINFO_HDR.unpack_from(b, 0)
        if ver != VERSION or bs != BS or nsnap > MAX_SNAPSHOTS:
            return None
        off = _FSINFO_HDR.size
        ifile = Inode.unpack(b[off : off + INODE_SIZE])
        off += INODE_SIZE
        snaps = []
        for _ in range(nsnap):
            sid, _z, sgen, ctime, name = _SNAP_HDR.unpack_from(b, off)
            off += _SNAP_HDR.size
            ino = Inode.unpack(b[off : off + INODE_SIZE])
            off += INODE_SIZE
            snaps.append(SnapEntry(sid, name.rstrip(b"\0").decode(), sgen, ctime, ino))
        return cls(nblocks, gen, ifile, snaps)


def pack_dir(entries: dict[str, int]) -> bytes:
    out = bytearray(struct.pack("<I", len(entries)))
    for name, ino in sorted(entries.items()):
        nb = name.encode()
        out += struct.pack("<IH", ino, len(nb)) + nb
    return bytes(out)


def unpack_dir(b: bytes) -> dict[str, int]:
    if len(b) < 4:
        return {}
    (n,) = struct.unpack_from("<I", b, 0)
    off = 4
    out = {}
    for _ in range(n):
        ino, ln = struct.unpack_from("<IH", b, off)
        off += 6
        out[b[off : off + ln].decode()] = ino
        off += ln
    return out


def path_nodes(fbn: int) -> list[tuple]:
    """Tree nodes (data block first, then its indirect ancestors) holding file block `fbn`."""
    if fbn < NDIRECT:
        return [("d", fbn)]
    f = fbn - NDIRECT
    if f < PTRS_PER_BLOCK:
        return [("d", fbn), ("i1",)]
    f -= PTRS_PER_BLOCK
    if f >= PTRS_PER_BLOCK * PTRS_PER_BLOCK:
        raise WaflInvalid(f"file block {fbn} beyond the maximum file size")
    return [("d", fbn), ("i2", f // PTRS_PER_BLOCK), ("i2",)]
