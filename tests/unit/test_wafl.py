"""Unit tests for the WAFL-like file system core (storage/wafl)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from storage.wafl import (
    BLOCK_SIZE,
    FileDevice,
    MemDevice,
    Wafl,
    WaflChecksumError,
    WaflCrash,
    WaflDead,
    WaflExists,
    WaflNoRoot,
    WaflNoSpace,
    WaflNotFound,
)
from storage.wafl.layout import NDIRECT, PTRS_PER_BLOCK, FsInfo
from vmemu.errors import VmemuError

BS = BLOCK_SIZE
DIND_START = (NDIRECT + PTRS_PER_BLOCK) * BS


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def fs() -> Wafl:
    return Wafl.format(MemDevice(2048))


def test_format_mount_empty():
    dev = MemDevice(1024)
    fs = Wafl.format(dev)
    assert fs.fsck().ok
    fs2 = Wafl.mount(dev)
    assert fs2.list() == {}
    assert fs2.generation == fs.generation == 1
    assert fs2.fsck().ok


def test_mount_blank_device_fails():
    with pytest.raises(WaflNoRoot) as ei:
        Wafl.mount(MemDevice(64))
    assert ei.value.code == "wafl_no_root"
    assert isinstance(ei.value, VmemuError)


def test_write_read_roundtrip_pending_then_committed(fs):
    fs.create("lun0", 0)
    data = pattern(20000, 1)
    fs.write("lun0", 3000, data)
    assert fs.read("lun0", 3000, len(data)) == data
    assert fs.read("lun0", 0, 3000) == bytes(3000)
    assert fs.size("lun0") == 23000
    # not committed yet: a mount from the device does not see it
    assert Wafl.mount(fs.dev).list() == {}
    st = fs.cp()
    assert st.blocks_written > 0 and st.ms >= 0
    fs2 = Wafl.mount(fs.dev)
    assert fs2.read("lun0", 3000, len(data)) == data
    assert fs2.read("lun0", 22990, 100) == data[-10:]  # short read at EOF
    assert fs2.fsck().ok


def test_create_with_size_is_sparse(fs):
    fs.create("lun", 1 << 20)
    fs.cp()
    assert fs.size("lun") == 1 << 20
    assert fs.read("lun", 12345, 100) == bytes(100)
    assert fs.df().used_active < 10


def test_direct_indirect_double_indirect(fs):
    fs.create("big", 0)
    chunks = {0: pattern(BS * 3, 2), NDIRECT * BS - 100: pattern(300, 3),
              (NDIRECT + 5) * BS: pattern(BS, 4), DIND_START - 10: pattern(20, 5),
              DIND_START + PTRS_PER_BLOCK * BS * 2 + 7: pattern(9000, 6)}
    for off, d in chunks.items():
        fs.write("big", off, d)
    fs.cp()
    fs2 = Wafl.mount(fs.dev)
    for off, d in chunks.items():
        assert fs2.read("big", off, len(d)) == d
    assert fs2.fsck().ok
    # overwrite inside the double-indirect range and re-check
    fs2.write("big", DIND_START + 1, b"abc")
    fs2.cp()
    fs3 = Wafl.mount(fs.dev)
    assert fs3.read("big", DIND_START - 10, 20)[10:] == (
        chunks[DIND_START - 10][10:11] + b"abc" + chunks[DIND_START - 10][14:]
    )
    assert fs3.fsck().ok


class RecordingDevice(MemDevice):
    def __init__(self, n):
        super().__init__(n)
        self.log = []

    def write_block(self, i, data):
        self.log.append(i)
        super().write_block(i, data)


def test_cp_never_overwrites_committed_or_snapshot_blocks():
    dev = RecordingDevice(2048)
    fs = Wafl.format(dev)
    fs.create("a", 0)
    fs.write("a", 0, pattern(50 * BS, 7))
    fs.cp()
    fs.snapshot_create("s")
    rng = random.Random(0)
    for gen in range(10):
        for _ in range(5):
            fs.write("a", rng.randrange(0, 60 * BS), pattern(rng.randrange(1, 3 * BS), gen))
        protected = fs.alloc | fs.snap_used
        dev.log.clear()
        g = fs.generation + 1
        fs.cp()
        assert dev.log[-1] == g % 2  # fsinfo last, alternating
        for b in dev.log[:-1]:
            assert not protected[b], f"CP overwrote committed block {b}"
        assert fs.fsck().ok


def test_fsinfo_alternates_and_mount_picks_newest(fs):
    fs.create("f", 0)
    fs.write("f", 0, b"one")
    fs.cp()
    g = fs.generation
    fs.write("f", 0, b"two")
    fs.cp()
    a = FsInfo.unpack(fs.dev.read_block(0))
    b = FsInfo.unpack(fs.dev.read_block(1))
    assert {a.generation, b.generation} == {g, g + 1}
    assert Wafl.mount(fs.dev).read("f", 0, 3) == b"two"
    # corrupt the newest root: mount falls back to the older, still whole, CP
    fs.dev.corrupt((g + 1) % 2, 100)
    old = Wafl.mount(fs.dev)
    assert old.generation == g and old.read("f", 0, 3) == b"one"
    assert old.fsck().ok
    fs.dev.corrupt(g % 2, 100)
    with pytest.raises(WaflNoRoot):
        Wafl.mount(fs.dev)


def _state(fs):
    return {n: fs.read(n, 0, s) for n, s in fs.list().items()}


@pytest.mark.parametrize("volatile", [False, True])
def test_crash_at_every_write_of_a_cp_leaves_previous_cp(volatile):
    dev0 = MemDevice(1024, volatile=volatile)
    fs = Wafl.format(dev0)
    fs.create("a", 0)
    fs.create("b", 0)
    fs.write("a", 0, pattern(30 * BS, 1))
    fs.write("b", DIND_START, pattern(2 * BS, 2))
    fs.cp()
    fs.snapshot_create("snap")
    before = _state(fs)
    gen0 = fs.generation
    image = bytes(dev0._buf)

    def mutate(f):
        f.write("a", 5 * BS + 1, pattern(40 * BS, 3))
        f.write("b", DIND_START + 3 * BS, b"x" * 100)
        f.create("c", 10)
        f.write("c", 0, b"hello")
        f.delete("b")

    probe = Wafl.mount(dev0)
    mutate(probe)
    after = _state(probe)
    total = probe.cp().blocks_written
    assert total > 10
    for k in range(1, total + 1):
        dev = MemDevice(1024, volatile=volatile)
        dev._buf[:] = image
        f = Wafl.mount(dev)
        mutate(f)
        f.crash_after_writes = k
        with pytest.raises(WaflCrash) as ei:
            f.cp()
        with pytest.raises(WaflDead):
            f.read("a", 0, 1)
        if volatile:
            dev.lose_unsynced(random.Random(k))
        g = Wafl.mount(dev)
        rep = g.fsck()
        assert rep.ok, rep.errors
        if g.generation == gen0:
            assert _state(g) == before
        else:
            assert ei.value.fsinfo_written and g.generation == gen0 + 1
            assert _state(g) == after
        assert g.read_snapshot("snap", "b", DIND_START, 2 * BS) == pattern(2 * BS, 2)
    assert ei.value.fsinfo_written  # the last k crashed right after the fsinfo write


def test_checksum_detects_silent_corruption_of_data(fs):
    fs.create("f", 0)
    fs.write("f", 0, pattern(5 * BS, 9))
    fs.cp()
    blk = fs.inodes[fs.dir["f"]].direct[2][0]
    fs.dev.corrupt(blk, 17)
    g = Wafl.mount(fs.dev)
    assert g.read("f", 0, 2 * BS) == pattern(5 * BS, 9)[: 2 * BS]
    with pytest.raises(WaflChecksumError) as ei:
        g.read("f", 2 * BS, 10)
    assert ei.value.code == "wafl_checksum" and ei.value.block == blk
    assert isinstance(ei.value, VmemuError)
    rep = g.fsck()
    assert not rep.ok and any("checksum" in e for e in rep.errors)


def test_checksum_detects_corrupt_indirect_and_metadata(fs):
    fs.create("f", 0)
    fs.write("f", (NDIRECT + 3) * BS, b"data")
    fs.cp()
    ind = fs.inodes[fs.dir["f"]].ind[0]
    fs.dev.corrupt(ind, 4000)
    g = Wafl.mount(fs.dev)
    with pytest.raises(WaflChecksumError):
        g.read("f", (NDIRECT + 3) * BS, 4)
    # corrupt the inode file: mount itself must refuse, not hand back garbage
    fs2 = Wafl.format(MemDevice(512))
    fs2.dev.corrupt(fs2.ifile.direct[0][0], 5)
    with pytest.raises(WaflChecksumError):
        Wafl.mount(fs2.dev)


def test_snapshots_create_list_read_delete(fs):
    fs.create("lun", 0)
    v1 = pattern(10 * BS, 11)
    fs.write("lun", 0, v1)
    fs.snapshot_create("hourly.0")  # takes pending writes with it
    v2 = pattern(10 * BS, 12)
    fs.write("lun", 0, v2)
    fs.create("new", 0)
    fs.write("new", 0, b"n")
    fs.snapshot_create("hourly.1")
    fs.write("lun", 0, b"Z" * 10)
    fs.delete("new")
    fs.cp()
    names = [s["name"] for s in fs.snapshot_list()]
    assert names == ["hourly.0", "hourly.1"]
    assert fs.read_snapshot("hourly.0", "lun", 0, 10 * BS) == v1
    assert fs.read_snapshot("hourly.1", "lun", 0, 10 * BS) == v2
    assert fs.snapshot_files("hourly.0") == {"lun": 10 * BS}
    assert fs.read_snapshot("hourly.1", "new", 0, 1) == b"n"
    with pytest.raises(WaflNotFound):
        fs.read_snapshot("hourly.0", "new", 0, 1)
    with pytest.raises(WaflNotFound):
        fs.read_snapshot("nope", "lun", 0, 1)
    with pytest.raises(WaflExists):
        fs.snapshot_create("hourly.0")
    assert fs.fsck().ok
    g = Wafl.mount(fs.dev)
    assert g.read_snapshot("hourly.0", "lun", 0, 10 * BS) == v1
    assert [s["name"] for s in g.snapshot_list()] == names
    assert g.fsck().snapshot_blocks.keys() == {"hourly.0", "hourly.1"}


def test_blocks_freed_only_when_no_snapshot_uses_them(fs):
    fs.create("lun", 0)
    fs.write("lun", 0, pattern(100 * BS, 1))
    fs.cp()
    base = fs.df()
    fs.snapshot_create("s")
    fs.write("lun", 0, pattern(100 * BS, 2))  # overwrite everything
    fs.cp()
    d = fs.df()
    assert d.used_snapshots_only >= 100  # old blocks held by the snapshot
    assert d.free < base.free - 100
    # write more: the held blocks must not be reused
    held = fs.snap_used & ~fs.alloc
    fs.write("lun", 0, pattern(100 * BS, 3))
    fs.cp()
    assert (fs.snap_used & ~fs.alloc & held).sum() == held.sum()
    assert fs.read_snapshot("s", "lun", 0, 100 * BS) == pattern(100 * BS, 1)
    fs.snapshot_delete("s")
    d2 = fs.df()
    assert d2.used_snapshots_only == 0
    assert d2.free >= base.free - 5
    assert fs.fsck().ok
    assert Wafl.mount(fs.dev).fsck().ok


def test_delete_frees_blocks(fs):
    free0 = fs.df().free
    fs.create("x", 0)
    fs.write("x", 0, pattern(200 * BS, 5))
    fs.cp()
    assert fs.df().free < free0 - 200
    fs.delete("x")
    with pytest.raises(WaflNotFound):
        fs.read("x", 0, 1)
    fs.cp()
    assert fs.df().free >= free0 - 3
    assert fs.fsck().ok
    fs.create("x", 0)  # reuse of the name and inode slot
    fs.write("x", 0, b"again")
    fs.cp()
    assert Wafl.mount(fs.dev).read("x", 0, 5) == b"again"


def test_no_space_leaves_fs_usable():
    fs = Wafl.format(MemDevice(64))
    fs.create("f", 0)
    fs.write("f", 0, pattern(100 * BS, 1))
    with pytest.raises(WaflNoSpace) as ei:
        fs.cp()
    assert ei.value.code == "wafl_no_space"
    fs.delete("f")
    fs.create("g", 0)
    fs.write("g", 0, b"small")
    fs.cp()
    g = Wafl.mount(fs.dev)
    assert g.list() == {"g": 5} and g.fsck().ok


def test_many_files_grow_inode_file(fs):
    for i in range(80):
        fs.create(f"f{i}", 0)
        fs.write(f"f{i}", 0, str(i).encode())
    fs.cp()
    g = Wafl.mount(fs.dev)
    assert len(g.list()) == 80
    assert all(g.read(f"f{i}", 0, 10) == str(i).encode() for i in range(80))
    assert g.fsck().ok and g.fsck().files == 80


def test_file_device_roundtrip(tmp_path):
    path = tmp_path / "disk.img"
    with FileDevice(path, 1024) as dev:
        fs = Wafl.format(dev)
        fs.create("lun", 0)
        fs.write("lun", 100, b"persistent")
        fs.snapshot_create("s")
        fs.write("lun", 100, b"PERSISTENT")
        fs.cp()
    assert path.stat().st_size == 1024 * BS
    with FileDevice(path) as dev:
        g = Wafl.mount(dev)
        assert g.read("lun", 100, 10) == b"PERSISTENT"
        assert g.read_snapshot("s", "lun", 100, 10) == b"persistent"
        assert g.fsck().ok


def test_fsck_detects_leak_and_double_reference(fs):
    fs.create("f", 0)
    fs.write("f", 0, b"x" * BS)
    fs.cp()
    assert fs.fsck().ok
    # a leak: mark an unreachable block allocated in the on-disk map
    fs.alloc[1000] = True
    rep = fs.fsck()
    assert not rep.ok and any("differs" in e for e in rep.errors)


def test_cp_with_nothing_dirty_is_cheap(fs):
    st = fs.cp()
    assert st.blocks_written == 1  # just the fsinfo
    assert Wafl.mount(fs.dev).fsck().ok


def test_df_accounting(fs):
    d = fs.df()
    assert d.used_active + d.used_snapshots_only + d.free == d.total_blocks
    assert np.count_nonzero(fs.alloc) == d.used_active
