"""A write-anywhere file system (WAFL-like) over a 4 KiB block device.

See ``layout.py`` for the on-disk format and ``__init__.py`` for the design summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from storage.raid.crc_batch import block_crcs

from .device import BlockDevice
from .errors import (
    WaflChecksumError,
    WaflCrash,
    WaflDead,
    WaflExists,
    WaflInvalid,
    WaflNoRoot,
    WaflNoSpace,
    WaflNotFound,
)
from .layout import (
    BS,
    FIRST_USER_INO,
    HOLE,
    INO_BMAP,
    INO_ROOTDIR,
    INODE_SIZE,
    INODES_PER_BLOCK,
    MAX_FILE_SIZE,
    MAX_SNAPSHOTS,
    NDIRECT,
    PTRS_PER_BLOCK,
    SNAP_NAME_MAX,
    T_BMAP,
    T_DIR,
    T_FILE,
    T_FREE,
    T_IFILE,
    ZERO_BLOCK,
    FsInfo,
    Inode,
    SnapEntry,
    block_crc,
    pack_dir,
    pack_ptrs,
    path_nodes,
    unpack_dir,
    unpack_ptrs,
)

RESERVED = (0, 1)
IFILE = "ifile"  # key of the inode file in per-CP maps


@dataclass
class CpStats:
    generation: int
    blocks_written: int
    blocks_freed: int
    ms: float


@dataclass
class FsckReport:
    ok: bool
    generation: int
    errors: list[str] = field(default_factory=list)
    active_blocks: int = 0
    snapshot_blocks: dict[str, int] = field(default_factory=dict)
    blocks_checked: int = 0
    files: int = 0


@dataclass
class DfReport:
    total_blocks: int
    used_active: int
    used_snapshots_only: int
    free: int
    dirty_blocks: int
    block_size: int = BS


class _Reader:
    """Read-only access to committed trees on the device, verifying every checksum."""

    def __init__(self, dev: BlockDevice, cache_limit: int = 4096) -> None:
        self.dev = dev
        self._ind: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._limit = cache_limit

    def block(self, ptr: tuple[int, int], what: str = "block") -> bytes:
        blk, crc = ptr
        if blk == 0:
            return ZERO_BLOCK
        if not 0 < blk < self.dev.nblocks:
            raise WaflChecksumError(blk, crc, 0, what + " (pointer out of range)")
        data = self.dev.read_block(blk)
        got = block_crc(data)
        if got != crc:
            raise WaflChecksumError(blk, crc, got, what)
        return data

    def ptrs(self, ptr: tuple[int, int]) -> list[tuple[int, int]]:
        if ptr[0] == 0:
            return [HOLE] * PTRS_PER_BLOCK
        hit = self._ind.get(ptr)
        if hit is None:
            hit = unpack_ptrs(self.block(ptr, "indirect block"))
            if len(self._ind) >= self._limit:
                self._ind.clear()
            self._ind[ptr] = hit
        return hit

    def ptr_array(self, ptr: tuple[int, int]) -> np.ndarray:
        """The pointers of an indirect block as a (512, 2) int64 array (zeros for a hole)."""
        if ptr[0] == 0:
            return np.zeros((PTRS_PER_BLOCK, 2), dtype=np.int64)
        return np.array(self.ptrs(ptr), dtype=np.int64).reshape(PTRS_PER_BLOCK, 2)

    def leaf_blocks(self, ino: Inode, fbns: np.ndarray) -> np.ndarray:
        """Block numbers currently holding file blocks ``fbns`` (0 for holes), vectorised."""
        out = np.zeros(fbns.size, dtype=np.int64)
        direct = fbns < NDIRECT
        for i in np.flatnonzero(direct).tolist():
            out[i] = ino.direct[int(fbns[i])][0]
        base = NDIRECT + PTRS_PER_BLOCK
        single = (fbns >= NDIRECT) & (fbns < base)
        if single.any() and ino.ind[0]:
            out[single] = self.ptr_array(ino.ind)[fbns[single] - NDIRECT, 0]
        double = np.flatnonzero(fbns >= base)
        if double.size and ino.dind[0]:
            f = fbns[double] - base
            top = self.ptr_array(ino.dind)
            for k in np.unique(f // PTRS_PER_BLOCK).tolist():
                child = (int(top[k, 0]), int(top[k, 1]))
                if child[0]:
                    sel = f // PTRS_PER_BLOCK == k
                    out[double[sel]] = self.ptr_array(child)[f[sel] % PTRS_PER_BLOCK, 0]
        return out

    def node_ptr(self, ino: Inode, node: tuple) -> tuple[int, int]:
        kind = node[0]
        if kind == "i1":
            return ino.ind
        if kind == "i2":
            if len(node) == 1:
                return ino.dind
            return self.ptrs(ino.dind)[node[1]]
        fbn = node[1]
        if fbn < NDIRECT:
            return ino.direct[fbn]
        f = fbn - NDIRECT
        if f < PTRS_PER_BLOCK:
            return self.ptrs(ino.ind)[f]
        f -= PTRS_PER_BLOCK
        return self.ptrs(self.ptrs(ino.dind)[f // PTRS_PER_BLOCK])[f % PTRS_PER_BLOCK]

    def file_block(self, ino: Inode, fbn: int) -> bytes:
        return self.block(self.node_ptr(ino, ("d", fbn)), "data block")

    def _hole_run_end(self, ino: Inode, fbn: int) -> int:
        """If file block `fbn` lies under a hole indirect pointer, the first fbn past that hole."""
        if fbn < NDIRECT:
            return fbn
        f = fbn - NDIRECT
        if f < PTRS_PER_BLOCK:
            return NDIRECT + PTRS_PER_BLOCK if ino.ind[0] == 0 else fbn
        f -= PTRS_PER_BLOCK
        base = NDIRECT + PTRS_PER_BLOCK
        if ino.dind[0] == 0:
            return base + PTRS_PER_BLOCK * PTRS_PER_BLOCK
        k = f // PTRS_PER_BLOCK
        if self.ptrs(ino.dind)[k][0] == 0:
            return base + (k + 1) * PTRS_PER_BLOCK
        return fbn

    def read_range(self, ino: Inode, offset: int, length: int, dirty=None) -> bytes:
        end = min(ino.size, offset + length)
        if offset >= end:
            return b""
        out = bytearray(end - offset)  # holes read as zeros
        fbn, last = offset // BS, (end - 1) // BS
        while fbn <= last:
            b = dirty.get(fbn) if dirty else None
            if b is None:
                skip = self._hole_run_end(ino, fbn)
                if skip > fbn:  # no block under a hole indirect, except pending ones
                    if dirty:
                        for f in sorted(x for x in dirty if fbn <= x < min(skip, last + 1)):
                            self._copy(out, offset, end, f, dirty[f])
                    fbn = skip
                    continue
                p = self.node_ptr(ino, ("d", fbn))
                if p[0] == 0:
                    fbn += 1
                    continue
                b = self.block(p, "data block")
            self._copy(out, offset, end, fbn, b)
            fbn += 1
        return bytes(out)

    @staticmethod
    def _copy(out: bytearray, offset: int, end: int, fbn: int, b) -> None:
        lo = max(offset, fbn * BS)
        hi = min(end, (fbn + 1) * BS)
        out[lo - offset : hi - offset] = b[lo - fbn * BS : hi - fbn * BS]

    def tree_blocks(self, ino: Inode, verify_data: bool = False):
        """Yield (block, kind) for every block of a file's tree (indirect blocks verified)."""
        for p in ino.direct:
            if p[0]:
                if verify_data:
                    self.block(p, "data block")
                yield p[0], "data"
        if ino.ind[0]:
            yield ino.ind[0], "indirect"
            for p in self.ptrs(ino.ind):
                if p[0]:
                    if verify_data:
                        self.block(p, "data block")
                    yield p[0], "data"
        if ino.dind[0]:
            yield ino.dind[0], "indirect"
            for c in self.ptrs(ino.dind):
                if c[0]:
                    yield c[0], "indirect"
                    for p in self.ptrs(c):
                        if p[0]:
                            if verify_data:
                                self.block(p, "data block")
                            yield p[0], "data"

    def inode_table(self, ifile: Inode) -> dict[int, Inode]:
        table = {}
        nblk = (ifile.size + BS - 1) // BS
        for fbn in range(nblk):
            b = self.file_block(ifile, fbn)
            for k in range(INODES_PER_BLOCK):
                ino = fbn * INODES_PER_BLOCK + k
                table[ino] = Inode.unpack(b[k * INODE_SIZE : (k + 1) * INODE_SIZE])
        return table

    def bitmap(self, bmap: Inode, nblocks: int) -> np.ndarray:
        raw = self.read_range(bmap, 0, bmap.size)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:nblocks]
        out = np.zeros(nblocks, dtype=bool)
        out[: bits.size] = bits.astype(bool)
        return out


def _bitmap_bytes(nblocks: int) -> int:
    return (nblocks + 7) // 8


class _Stage:
    """Contiguous staging rows for one CP's block writes.

    The CP copies every block it writes here once, so checksums run over many rows in one
    numba call and a RAID device gets the whole batch as one array. The buffer is kept
    between CPs (re-faulting tens of MiB of fresh pages per CP costs milliseconds).
    """

    def __init__(self) -> None:
        self.buf = np.empty((0, BS), dtype=np.uint8)
        self._flat = memoryview(self.buf.reshape(-1))
        self.n = 0

    def reset(self, capacity: int) -> None:
        self.n = 0
        if self.buf.shape[0] < capacity:
            self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        new = np.empty((capacity, BS), dtype=np.uint8)
        new[: self.n] = self.buf[: self.n]
        self.buf = new
        self._flat = memoryview(new.reshape(-1))

    def add(self, data) -> int:
        if self.n >= self.buf.shape[0]:
            self._resize(max(16, 2 * self.buf.shape[0]))
        i = self.n
        self._flat[i * BS : (i + 1) * BS] = data
        self.n += 1
        return i

    def rows(self, first: int, count: int) -> np.ndarray:
        return self.buf[first : first + count]

    def row_view(self, i: int) -> memoryview:
        return self._flat[i * BS : (i + 1) * BS]

    def row_bytes(self, i: int) -> bytes:
        return self.buf[i].tobytes()


class Wafl:
    """The file system. Writes stay in memory until ``cp()`` commits them."""

    # ------------------------------------------------------------------ format / mount
    @classmethod
    def format(cls, dev: BlockDevice) -> Wafl:
        if dev.nblocks < 16:
            raise WaflInvalid("device too small")
        dev.write_block(0, ZERO_BLOCK)
        dev.write_block(1, ZERO_BLOCK)
        dev.sync()
        fs = cls.__new__(cls)
        fs._init_common(dev)
        fs.generation = 0
        fs.ifile = Inode(type=T_IFILE)
        fs.snapshots = []
        fs.inodes = {i: Inode() for i in range(INODES_PER_BLOCK)}
        fs.inodes[INO_ROOTDIR] = Inode(type=T_DIR, gen=1)
        fs.inodes[INO_BMAP] = Inode(type=T_BMAP, gen=1, size=_bitmap_bytes(dev.nblocks))
        fs.dir = {}
        fs.alloc = np.zeros(dev.nblocks, dtype=bool)
        fs.alloc[list(RESERVED)] = True
        # the committed map on the device is all holes (zeros): the first CP writes it out
        fs._alloc_packed = np.zeros(fs._bmap_padded, dtype=np.uint8)
        fs.snap_used = np.zeros(dev.nblocks, dtype=bool)
        fs._snap_maps = {}
        fs.dirty_inodes = {0, INO_ROOTDIR, INO_BMAP}
        fs._dir_dirty = True
        fs.cp()
        return fs

    @classmethod
    def mount(cls, dev: BlockDevice) -> Wafl:
        fs = cls.__new__(cls)
        fs._init_common(dev)
        info = fs._pick_root()
        fs.generation = info.generation
        fs.ifile = info.ifile
        fs.snapshots = info.snapshots
        fs.inodes = fs._rd.inode_table(info.ifile)
        bmap = fs.inodes.get(INO_BMAP)
        root = fs.inodes.get(INO_ROOTDIR)
        if bmap is None or bmap.type != T_BMAP or root is None or root.type != T_DIR:
            raise WaflInvalid("inode file lacks the block map or root directory")
        fs.alloc = fs._rd.bitmap(bmap, dev.nblocks)
        fs._alloc_packed = fs._pack(fs.alloc)
        fs.dir = unpack_dir(fs._rd.read_range(root, 0, root.size))
        fs._snap_maps = {s.id: fs._snapshot_bitmap(s) for s in fs.snapshots}
        fs._recompute_snap_used()
        fs.dirty_inodes = set()
        fs._dir_dirty = False
        return fs

    def _init_common(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.nblocks = dev.nblocks
        self._rd = _Reader(dev)
        self.dirty: dict[int, dict[int, bytearray]] = {}
        self.pending_free: list[Inode] = []
        self._pending_snap_create: str | None = None
        self._pending_snap_delete: str | None = None
        self.crash_after_writes: int | None = None
        self._dead = False
        self.death: BaseException | None = None  # what stopped it (see cp)
        self._stage = _Stage()
        nbytes = _bitmap_bytes(dev.nblocks)
        self._bmap_padded = ((nbytes + BS - 1) // BS) * BS

    def _pick_root(self) -> FsInfo:
        best = None
        for slot in RESERVED:
            info = FsInfo.unpack(self.dev.read_block(slot))
            if info is None or info.nblocks != self.dev.nblocks:
                continue
            if best is None or info.generation > best.generation:
                best = info
        if best is None:
            raise WaflNoRoot("no valid fsinfo in block 0 or 1: not a file system, or both copies corrupt")
        return best

    def _pack(self, bits: np.ndarray) -> np.ndarray:
        out = np.zeros(self._bmap_padded, dtype=np.uint8)
        p = np.packbits(bits.astype(np.uint8), bitorder="little")
        out[: p.size] = p
        return out

    def _snapshot_bitmap(self, s: SnapEntry) -> np.ndarray:
        first = self._rd.file_block(s.ifile, INO_BMAP // INODES_PER_BLOCK)
        k = INO_BMAP % INODES_PER_BLOCK
        bmap = Inode.unpack(first[k * INODE_SIZE : (k + 1) * INODE_SIZE])
        return self._rd.bitmap(bmap, self.nblocks)

    def _recompute_snap_used(self) -> None:
        u = np.zeros(self.nblocks, dtype=bool)
        for m in self._snap_maps.values():
            u |= m
        self.snap_used = u

    def _alive(self) -> None:
        if self._dead:
            raise WaflDead("file system crashed; remount it from the device")

    # ------------------------------------------------------------------ files
    def _lookup(self, name: str) -> int:
        ino = self.dir.get(name)
        if ino is None:
            raise WaflNotFound(f"no file named {name!r}")
        return ino

    def create(self, name: str, size: int = 0) -> int:
        self._alive()
        if not name or len(name.encode()) > 255 or "\0" in name:
            raise WaflInvalid(f"bad file name {name!r}")
        if name in self.dir:
            raise WaflExists(f"file {name!r} exists")
        if not 0 <= size <= MAX_FILE_SIZE:
            raise WaflInvalid(f"size {size} out of range (max {MAX_FILE_SIZE})")
        ino = next(
            (i for i in sorted(self.inodes) if i >= FIRST_USER_INO and self.inodes[i].type == T_FREE),
            None,
        )
        if ino is None:
            base = max(self.inodes) + 1
            for k in range(INODES_PER_BLOCK):
                self.inodes[base + k] = Inode()
            ino = base
        old = self.inodes[ino]
        self.inodes[ino] = Inode(type=T_FILE, gen=old.gen + 1, size=size)
        self.dirty_inodes.add(ino)
        self.dir[name] = ino
        self._dir_dirty = True
        return ino

    def delete(self, name: str) -> None:
        self._alive()
        ino = self._lookup(name)
        old = self.inodes[ino]
        if any(p[0] for p in (*old.direct, old.ind, old.dind)):
            self.pending_free.append(old)
        self.inodes[ino] = Inode(type=T_FREE, gen=old.gen)
        self.dirty.pop(ino, None)
        self.dirty_inodes.add(ino)
        del self.dir[name]
        self._dir_dirty = True

    def list(self) -> dict[str, int]:
        """name -> size of every file in the active file system."""
        return {n: self.inodes[i].size for n, i in sorted(self.dir.items())}

    def size(self, name: str) -> int:
        return self.inodes[self._lookup(name)].size

    def write(self, name: str, offset: int, data: bytes) -> None:
        self._alive()
        ino = self._lookup(name)
        inode = self.inodes[ino]
        end = offset + len(data)
        if offset < 0 or end > MAX_FILE_SIZE:
            raise WaflInvalid(f"write [{offset}, {end}) beyond the maximum file size")
        if not data:
            return
        d = self.dirty.setdefault(ino, {})
        pos = 0
        for fbn in range(offset // BS, (end - 1) // BS + 1):
            blk = d.get(fbn)
            lo = max(offset, fbn * BS) - fbn * BS
            hi = min(end, (fbn + 1) * BS) - fbn * BS
            if blk is None:
                if lo == 0 and hi == BS:
                    blk = bytearray(BS)
                elif fbn * BS >= inode.size:
                    blk = bytearray(BS)
                else:
                    blk = bytearray(self._rd.file_block(inode, fbn))
                d[fbn] = blk
            blk[lo:hi] = data[pos : pos + hi - lo]
            pos += hi - lo
        if end > inode.size:
            inode.size = end
            self.dirty_inodes.add(ino)

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (short at end of file), pending writes included."""
        self._alive()
        ino = self._lookup(name)
        return self._rd.read_range(self.inodes[ino], offset, length, self.dirty.get(ino))

    # ------------------------------------------------------------------ snapshots
    def snapshot_create(self, name: str) -> CpStats:
        """Take a snapshot: runs a CP and records its root under `name`, atomically."""
        self._alive()
        if not name or len(name.encode()) > SNAP_NAME_MAX:
            raise WaflInvalid(f"bad snapshot name {name!r}")
        if any(s.name == name for s in self.snapshots):
            raise WaflExists(f"snapshot {name!r} exists")
        if len(self.snapshots) >= MAX_SNAPSHOTS:
            raise WaflNoSpace(f"at most {MAX_SNAPSHOTS} snapshots")
        self._pending_snap_create = name
        try:
            return self.cp()
        finally:
            self._pending_snap_create = None

    def snapshot_delete(self, name: str) -> CpStats:
        """Delete a snapshot: runs a CP whose fsinfo no longer lists it; its blocks free after."""
        self._alive()
        self._snap(name)
        self._pending_snap_delete = name
        try:
            return self.cp()
        finally:
            self._pending_snap_delete = None

    def snapshot_list(self) -> list[dict]:
        return [
            {"name": s.name, "id": s.id, "generation": s.gen, "ctime": s.ctime,
             "unique_blocks": int((self._snap_maps[s.id] & ~self.alloc).sum())}
            for s in self.snapshots
        ]

    def _snap(self, name: str) -> SnapEntry:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise WaflNotFound(f"no snapshot named {name!r}")

    def _snap_view(self, snap: str) -> tuple[dict[int, Inode], dict[str, int]]:
        s = self._snap(snap)
        table = self._rd.inode_table(s.ifile)
        root = table[INO_ROOTDIR]
        return table, unpack_dir(self._rd.read_range(root, 0, root.size))

    def snapshot_files(self, snap: str) -> dict[str, int]:
        table, d = self._snap_view(snap)
        return {n: table[i].size for n, i in sorted(d.items())}

    def read_snapshot(self, snap: str, name: str, offset: int, length: int) -> bytes:
        self._alive()
        table, d = self._snap_view(snap)
        if name not in d:
            raise WaflNotFound(f"no file named {name!r} in snapshot {snap!r}")
        return self._rd.read_range(table[d[name]], offset, length)

    # ------------------------------------------------------------------ consistency point
    def cp(self) -> CpStats:
        """Commit every pending change: write-anywhere, then the fsinfo, then sync."""
        self._alive()
        t0 = time.perf_counter()
        if self._dir_dirty:
            root = self.inodes[INO_ROOTDIR]
            content = pack_dir(self.dir)
            size = max(root.size, len(content))
            content = content + bytes(size - len(content))
            d = self.dirty.setdefault(INO_ROOTDIR, {})
            for fbn in range((size + BS - 1) // BS):
                d[fbn] = bytearray(content[fbn * BS : (fbn + 1) * BS].ljust(BS, b"\0"))
            root.size = size
            self.dirty_inodes.add(INO_ROOTDIR)
            self._dir_dirty = False
        plan = self._plan()  # may raise WaflNoSpace; nothing is changed then
        try:
            return self._commit(plan, t0)
        except BaseException as exc:
            # Memory may now be ahead of the disk (a partial commit): nothing more from this
            # instance. The disks still hold the last committed root, which a mount reads.
            self._dead = True
            self.death = exc
            raise

    @property
    def dirty_blocks(self) -> int:
        """User data blocks written since the last CP (what the next CP must at least write)."""
        return sum(len(d) for d in self.dirty.values())

    @property
    def stripe_blocks(self) -> int:
        """Logical blocks per device stripe (``dev.stripe_blocks``; 1 when it has none)."""
        return max(1, int(getattr(self.dev, "stripe_blocks", 1) or 1))

    def _free_list(self) -> np.ndarray:
        """Blocks a CP may write, whole free stripes first (in order), then the rest.

        On RAID-4 this makes a CP's writes land on stripes holding no live block, which the
        device writes as full stripes (no reads; the write hole cannot reach live data).
        """
        free = ~(self.alloc | self.snap_used)
        sb = self.stripe_blocks
        if sb == 1:
            return np.flatnonzero(free)
        # Never use the rest of the fsinfo blocks' stripe: every CP ends with a
        # read-modify-write of that stripe, so a block there would be exposed to the write
        # hole each time. Costs at most stripe_blocks - 2 blocks.
        free[:sb] = False
        ns = self.nblocks // sb
        whole = np.zeros(self.nblocks, dtype=bool)
        whole[: ns * sb] = np.repeat(free[: ns * sb].reshape(ns, sb).all(axis=1), sb)
        return np.concatenate([np.flatnonzero(whole), np.flatnonzero(free & ~whole)])

    def _plan(self) -> dict:
        rd = self._rd
        free_list = self._free_list()
        cursor = [0]
        new_alloc = self.alloc.copy()
        relocs: dict[object, dict[tuple, int]] = {}
        freed = [0]

        def inode_of(key):
            return self.ifile if key == IFILE else self.inodes[key]

        def relocate_path(key, fbn) -> bool:
            r = relocs.setdefault(key, {})
            inode = inode_of(key)
            changed = False
            for node in path_nodes(fbn):
                if node in r:
                    continue
                old = rd.node_ptr(inode, node)[0]
                if old:
                    new_alloc[old] = False
                    freed[0] += 1
                if cursor[0] >= free_list.size:
                    raise WaflNoSpace("no free blocks for the consistency point")
                b = int(free_list[cursor[0]])
                cursor[0] += 1
                new_alloc[b] = True
                r[node] = b
                changed = True
            return changed

        def relocate_file(key, fbn_list) -> None:
            """relocate_path for many file blocks at once (the bulk of a CP), in numpy."""
            r = relocs.setdefault(key, {})
            inode = inode_of(key)
            fbns = np.array(sorted(f for f in fbn_list if ("d", f) not in r), dtype=np.int64)
            if not fbns.size:
                return
            if fbns[-1] >= NDIRECT + PTRS_PER_BLOCK + PTRS_PER_BLOCK * PTRS_PER_BLOCK:
                path_nodes(int(fbns[-1]))  # raises the usual error
            base = NDIRECT + PTRS_PER_BLOCK
            inds: list[tuple] = []
            if ((fbns >= NDIRECT) & (fbns < base)).any():
                inds.append(("i1",))
            dbl = fbns[fbns >= base] - base
            if dbl.size:
                inds += [("i2", int(k)) for k in np.unique(dbl // PTRS_PER_BLOCK)] + [("i2",)]
            inds = [n for n in inds if n not in r]
            olds = rd.leaf_blocks(inode, fbns)
            olds = np.concatenate([olds[olds != 0],
                                   np.array([b for b in (rd.node_ptr(inode, n)[0] for n in inds) if b],
                                            dtype=np.int64)])
            new_alloc[olds] = False
            freed[0] += int(olds.size)
            need = fbns.size + len(inds)
            if cursor[0] + need > free_list.size:
                raise WaflNoSpace("no free blocks for the consistency point")
            got = free_list[cursor[0] : cursor[0] + need]
            cursor[0] += need
            new_alloc[got] = True
            got_l = got.tolist()
            r.update(zip([("d", f) for f in fbns.tolist()], got_l[: fbns.size]))
            r.update(zip(inds, got_l[fbns.size :]))

        dirty_inos = set(self.dirty_inodes)
        for ino, blocks in self.dirty.items():
            relocate_file(ino, blocks.keys())
            dirty_inos.add(ino)
        for old in self.pending_free:
            for b, _kind in rd.tree_blocks(old):
                new_alloc[b] = False
                freed[0] += 1
        nmap_blocks = self._bmap_padded // BS
        while True:
            changed = False
            packed = self._pack(new_alloc)
            diff = (packed != self._alloc_packed).reshape(nmap_blocks, BS).any(axis=1)
            for fbn in np.flatnonzero(diff):
                if relocate_path(INO_BMAP, int(fbn)):
                    changed = True
                    dirty_inos.add(INO_BMAP)
            for fbn in sorted({i // INODES_PER_BLOCK for i in dirty_inos}):
                if relocate_path(IFILE, fbn):
                    changed = True
            if not changed:
                break
        return {"relocs": relocs, "new_alloc": new_alloc, "packed": packed, "freed": freed[0]}

    def _build_file(self, inode: Inode, r: dict[tuple, int], data_of, writes: list) -> None:
        """Compute new contents bottom-up for relocated nodes; update `inode`'s pointers.

        Contents go to the CP's staging array (``writes`` gets ``(block, stage row)``); the
        data blocks' checksums are computed in one numba call over their rows.
        """
        rd = self._rd
        stage = self._stage
        fl = sorted(n[1] for n in r if n[0] == "d")
        F = np.array(fl, dtype=np.int64)
        B = np.array([r[("d", f)] for f in fl], dtype=np.int64)
        row0 = stage.n
        for f in fl:
            stage.add(data_of(f))
        C = block_crcs(stage.rows(row0, len(fl))).astype(np.int64) if fl else np.zeros(0, np.int64)
        writes.extend(zip(B.tolist(), range(row0, row0 + len(fl))))
        for i in np.flatnonzero(F < NDIRECT).tolist():
            inode.direct[int(F[i])] = (int(B[i]), int(C[i]))

        def emit(node, base_ptr, idx, blks, crcs) -> tuple[int, int]:
            arr = rd.ptr_array(base_ptr)
            arr[idx, 0] = blks
            arr[idx, 1] = crcs
            c = arr.astype("<u4").tobytes()
            writes.append((r[node], stage.add(c)))
            return (r[node], block_crc(c))

        base = NDIRECT + PTRS_PER_BLOCK
        if ("i1",) in r:
            m = (F >= NDIRECT) & (F < base)
            inode.ind = emit(("i1",), inode.ind, F[m] - NDIRECT, B[m], C[m])
        if ("i2",) in r:
            top = rd.ptr_array(inode.dind)
            m = F >= base
            D, Bd, Cd = F[m] - base, B[m], C[m]
            kids = sorted(n[1] for n in r if n[0] == "i2" and len(n) == 2)
            kb, kc = [], []
            for k in kids:
                sel = D // PTRS_PER_BLOCK == k
                p = emit(("i2", k), (int(top[k, 0]), int(top[k, 1])),
                         D[sel] % PTRS_PER_BLOCK, Bd[sel], Cd[sel])
                kb.append(p[0])
                kc.append(p[1])
            inode.dind = emit(("i2",), inode.dind, np.array(kids, dtype=np.int64),
                              np.array(kb, dtype=np.int64), np.array(kc, dtype=np.int64))

    def _commit(self, plan: dict, t0: float) -> CpStats:
        relocs = plan["relocs"]
        new_alloc = plan["new_alloc"]
        packed = plan["packed"]
        self._stage.reset(sum(len(r) for r in relocs.values()))
        writes: list[tuple[int, int]] = []  # (block, stage row)
        for key in sorted(k for k in relocs if k not in (INO_BMAP, IFILE)):
            d = self.dirty.get(key, {})
            self._build_file(self.inodes[key], relocs[key], d.__getitem__, writes)
        if INO_BMAP in relocs:
            self._build_file(
                self.inodes[INO_BMAP], relocs[INO_BMAP],
                lambda fbn: packed[fbn * BS : (fbn + 1) * BS].tobytes(), writes,
            )
        n_inode_blocks = (max(self.inodes) + INODES_PER_BLOCK) // INODES_PER_BLOCK
        self.ifile.size = n_inode_blocks * BS

        def inode_block(fbn):
            out = bytearray()
            for k in range(INODES_PER_BLOCK):
                out += self.inodes.get(fbn * INODES_PER_BLOCK + k, Inode()).pack()
            return out

        if IFILE in relocs:
            self._build_file(self.ifile, relocs[IFILE], inode_block, writes)
        snapshots = list(self.snapshots)
        gen = self.generation + 1
        if self._pending_snap_create is not None:
            sid = max((s.id for s in snapshots), default=0) + 1
            snapshots.append(SnapEntry(sid, self._pending_snap_create, gen, time.time(), self.ifile.copy()))
        if self._pending_snap_delete is not None:
            snapshots = [s for s in snapshots if s.name != self._pending_snap_delete]
        info = FsInfo(self.nblocks, gen, self.ifile.copy(), snapshots)
        fsinfo_block = info.pack()
        # --- the only device writes: new blocks (never reachable from a committed root) ...
        stage = self._stage
        blks = np.fromiter((b for b, _ in writes), dtype=np.int64, count=len(writes))
        live = self.alloc[blks] | self.snap_used[blks]
        assert not live.any(), f"CP would overwrite blocks {blks[live][:10].tolist()}"
        write_array = getattr(self.dev, "write_block_array", None)
        write_blocks = getattr(self.dev, "write_blocks", None)
        n = 0
        if self.crash_after_writes is None and (write_array or write_blocks) is not None and writes:
            # One batch: a RAID device turns it into full-stripe writes. With crash injection
            # armed the per-block loop below runs instead, so the crash point stays exact.
            pad = self._stripe_padding(blks)
            for b in pad.tolist():
                writes.append((b, stage.add(ZERO_BLOCK)))
            all_blks = np.concatenate([blks, pad])
            if write_array is not None:
                # rows were staged in `writes` order, one per write: no gather needed
                write_array(all_blks, stage.rows(0, len(writes)))
            else:
                write_blocks([(b, stage.row_view(i)) for b, i in writes])
            n = int(blks.size)
        else:
            for blk, row in writes:
                self.dev.write_block(blk, stage.row_bytes(row))
                n += 1
                self._maybe_crash(n, False)
        self.dev.sync()  # barrier: the tree is durable before the root that points at it
        self.dev.write_block(gen % 2, fsinfo_block)
        n += 1
        self._maybe_crash(n, True)
        self.dev.sync()
        # --- committed
        self.generation = gen
        self.alloc = new_alloc
        self._alloc_packed = packed
        self.dirty.clear()
        self.dirty_inodes.clear()
        self.pending_free.clear()
        if self._pending_snap_create is not None:
            self._snap_maps[snapshots[-1].id] = new_alloc.copy()
        if self._pending_snap_delete is not None:
            live = {s.id for s in snapshots}
            self._snap_maps = {k: v for k, v in self._snap_maps.items() if k in live}
        self.snapshots = snapshots
        self._recompute_snap_used()
        return CpStats(gen, n, plan["freed"], (time.perf_counter() - t0) * 1000.0)

    def _stripe_padding(self, blks: np.ndarray) -> np.ndarray:
        """Free blocks completing every stripe the CP writes partly, if the rest is free.

        They are written as zero blocks and stay free (unallocated, unreferenced); writing
        them turns the CP's partly filled stripes into full-stripe writes, which need no reads
        and touch no live block. Stripes holding live blocks are left alone (they take the
        device's read-modify-write path).
        """
        sb = self.stripe_blocks
        if sb == 1 or not blks.size:
            return np.zeros(0, dtype=np.int64)
        ns = self.nblocks // sb
        stripes = np.unique(blks // sb)
        stripes = stripes[stripes < ns]
        members = (stripes[:, None] * sb + np.arange(sb)[None, :]).reshape(-1)
        written = np.zeros(self.nblocks, dtype=bool)
        written[blks] = True
        busy = (self.alloc | self.snap_used)[members].reshape(-1, sb).any(axis=1)
        pad = ~written[members].reshape(-1, sb) & ~busy[:, None]
        return members[pad.reshape(-1)].astype(np.int64)

    def _maybe_crash(self, n: int, fsinfo_written: bool) -> None:
        if self.crash_after_writes is not None and n >= self.crash_after_writes:
            self.crash_after_writes = None
            self._dead = True
            raise WaflCrash(n, fsinfo_written)

    # ------------------------------------------------------------------ checks
    def df(self) -> DfReport:
        used = int(self.alloc.sum())
        snap_only = int((self.snap_used & ~self.alloc).sum())
        return DfReport(
            total_blocks=self.nblocks,
            used_active=used,
            used_snapshots_only=snap_only,
            free=self.nblocks - used - snap_only,
            dirty_blocks=self.dirty_blocks,
        )

    def fsck(self) -> FsckReport:
        """Check the committed state on the device (pending writes are not looked at).

        For the active file system and each snapshot: every block reachable from its root is
        read and its checksum verified, no block is reachable twice, and the reachable set
        (plus blocks 0 and 1) equals that root's block map file exactly. Also checks the
        in-memory map matches the device and the directory points at live inodes.
        """
        rd = _Reader(self.dev)  # fresh: no cached indirect blocks
        rep = FsckReport(ok=True, generation=self.generation)
        try:
            info = self._pick_root()
        except WaflNoRoot as e:
            rep.ok = False
            rep.errors.append(str(e))
            return rep
        roots = [("active", info.ifile)] + [(f"snapshot {s.name}", s.ifile) for s in info.snapshots]
        for label, ifile in roots:
            try:
                seen = np.zeros(self.nblocks, dtype=bool)
                count = 0

                def mark(b, what):
                    nonlocal count
                    if not 0 < b < self.nblocks or b in RESERVED:
                        rep.errors.append(f"{label}: {what} points at bad block {b}")
                    elif seen[b]:
                        rep.errors.append(f"{label}: block {b} reachable twice ({what})")
                    seen[b] = True
                    count += 1

                for b, kind in rd.tree_blocks(ifile, verify_data=True):
                    mark(b, "inode file " + kind)
                table = rd.inode_table(ifile)
                for ino, inode in table.items():
                    if inode.type == T_FREE:
                        if any(p[0] for p in (*inode.direct, inode.ind, inode.dind)):
                            rep.errors.append(f"{label}: free inode {ino} has block pointers")
                        continue
                    for b, kind in rd.tree_blocks(inode, verify_data=True):
                        mark(b, f"inode {ino} {kind}")
                seen[list(RESERVED)] = True
                bmap = rd.bitmap(table[INO_BMAP], self.nblocks)
                missing = np.flatnonzero(seen & ~bmap)
                leaked = np.flatnonzero(bmap & ~seen)
                if missing.size:
                    rep.errors.append(f"{label}: reachable but not allocated: {missing[:10].tolist()}")
                if leaked.size:
                    rep.errors.append(f"{label}: allocated but unreachable (leak): {leaked[:10].tolist()}")
                rep.blocks_checked += count
                if label == "active":
                    rep.active_blocks = count
                    root = table[INO_ROOTDIR]
                    d = unpack_dir(rd.read_range(root, 0, root.size))
                    rep.files = len(d)
                    for name, ino in d.items():
                        if table.get(ino, Inode()).type != T_FILE:
                            rep.errors.append(f"directory entry {name!r} -> inode {ino}, not a file")
                    if info.generation == self.generation and not np.array_equal(bmap, self.alloc):
                        rep.errors.append("in-memory block map differs from the device")
                else:
                    rep.snapshot_blocks[label[len("snapshot "):]] = count
            except WaflChecksumError as e:
                rep.errors.append(f"{label}: {e.message}")
        rep.ok = not rep.errors
        return rep
