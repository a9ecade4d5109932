"""Unit tests of the RAID layer: devices, checksums, RAID-4/RAID-1, degraded, rebuild, scrub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.disk import Disk
from storage.raid import (
    BLOCK_SIZE,
    BlockDevice,
    BlockUnrecoverable,
    ChecksummedDevice,
    DeviceFailed,
    DiskDevice,
    Layout,
    MemberState,
    MemoryDevice,
    RaidGroup,
    RaidOffline,
    SimulatedCrash,
)
from storage.raid.checksummed import ENTRIES_PER_BLOCK, data_blocks_for
from storage.raid.parity import xor_blocks
from vmemu.errors import InvalidState, OutOfRange, VmemuError


def blk(seed: int) -> bytes:
    return bytes([seed & 0xFF]) * 8 + os.urandom(BLOCK_SIZE - 8)


def mem_group(layout: Layout, n: int = 4,
              nblocks: int = 34) -> tuple[RaidGroup, list[MemoryDevice]]:
    devs = [MemoryDevice(nblocks, f"d{i}") for i in range(n)]
    return RaidGroup(layout, devs), devs


def fill(g: RaidGroup) -> dict[int, bytes]:
    model = {i: blk(i) for i in range(g.nblocks)}
    for i, b in model.items():
        g.write_block(i, b)
    return model


def check(g: RaidGroup, model: dict[int, bytes]) -> None:
    for i, b in model.items():
        assert g.read_block(i) == b, i


# -- devices and checksums ------------------------------------------------------------------

def test_memory_device_fail_and_corrupt() -> None:
    d = MemoryDevice(4)
    assert isinstance(d, BlockDevice)
    b = blk(1)
    d.write_block(2, b)
    assert d.read_block(2) == b
    d.corrupt_block(2, 10)
    assert d.read_block(2) != b
    with pytest.raises(OutOfRange):
        d.read_block(4)
    with pytest.raises(ValueError):
        d.write_block(0, b"short")
    d.fail()
    assert d.failed
    with pytest.raises(DeviceFailed) as e:
        d.read_block(0)
    assert e.value.code == "device_failed"
    with pytest.raises(DeviceFailed):
        d.write_block(0, b)


def test_data_blocks_geometry() -> None:
    assert data_blocks_for(2) == 1
    assert data_blocks_for(513) == 512
    assert data_blocks_for(514) == 512
    assert data_blocks_for(515) == 513
    for n in range(1, 2000, 37):
        d = data_blocks_for(n)
        assert d + -(-d // ENTRIES_PER_BLOCK) <= n
        assert (d + 1) + -(-(d + 1) // ENTRIES_PER_BLOCK) > n


def test_checksummed_device_detects_corruption_and_misdirection() -> None:
    raw = MemoryDevice(10)
    c = ChecksummedDevice(raw)
    assert c.read_checked(3) == (bytes(BLOCK_SIZE), True)  # fresh device verifies as zeros
    b = blk(7)
    c.write_block(3, b)
    assert c.read_checked(3) == (b, True)
    raw.corrupt_block(3, 100)
    assert c.read_checked(3)[1] is False
    # the same bytes at another index do not verify: the crc covers the block address
    raw.write_block(4, b)
    assert c.read_checked(4)[1] is False


def test_xor_blocks() -> None:
    a, b = blk(1), blk(2)
    assert xor_blocks([a, b, b]) == a
    assert xor_blocks([]) == bytes(BLOCK_SIZE)


# -- RAID-4 ---------------------------------------------------------------------------------

def test_raid4_geometry_and_roundtrip() -> None:
    g, _ = mem_group(Layout.RAID4, 4, 34)
    assert g.ndata == 3 and g.parity_index == 3
    assert g.stripes == data_blocks_for(34)
    assert g.nblocks == 3 * g.stripes
    model = fill(g)
    check(g, model)
    assert g.read_block(0) == model[0]
    with pytest.raises(OutOfRange):
        g.read_block(g.nblocks)
    with pytest.raises(ValueError):
        g.write_block(0, b"x")
    rep = g.scrub()
    assert rep.parity_mismatches == 0 and rep.checksum_errors == 0 and not rep.unrecoverable


def test_raid4_parity_is_xor_of_data() -> None:
    g, devs = mem_group(Layout.RAID4, 3, 10)
    model = fill(g)
    for s in range(g.stripes):
        assert devs[2].read_block(s) == xor_blocks([model[2 * s], model[2 * s + 1]])


def test_raid4_degraded_reads_and_writes() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    g.fail_member(1)
    assert g.degraded and not g.offline
    check(g, model)
    for i in range(0, g.nblocks, 2):  # writes to the failed disk's blocks too
        model[i] = blk(i + 100)
        g.write_block(i, model[i])
    check(g, model)


def test_raid4_device_dying_mid_io_is_noticed() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    devs[0].fail()  # the device dies without the group being told
    check(g, model)
    assert g.state[0] is MemberState.FAILED


def test_raid4_second_failure_goes_offline() -> None:
    g, devs = mem_group(Layout.RAID4)
    fill(g)
    g.fail_member(0)
    devs[3].fail()  # parity dies, discovered during I/O
    with pytest.raises(RaidOffline) as e:
        for i in range(g.nblocks):
            g.read_block(i)
    assert e.value.code == "raid_offline"
    assert isinstance(e.value, VmemuError)
    assert g.offline
    for op in (lambda: g.read_block(1), lambda: g.write_block(1, blk(1)), g.scrub):
        with pytest.raises(RaidOffline):
            op()


def test_raid4_corruption_repaired_on_read() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    devs[1].corrupt_block(0, 5)  # logical block 1
    devs[3].corrupt_block(1, 5)  # parity of stripe 1
    check(g, model)
    assert devs[1].read_block(0) == model[1]  # repaired in place
    rep = g.scrub()
    assert rep.checksum_errors == 1 and rep.repaired_parity == 1 and not rep.unrecoverable
    assert g.scrub().checksum_errors == 0


def test_raid4_double_corruption_raises_never_wrong_data() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    devs[0].corrupt_block(2)
    devs[1].corrupt_block(2)
    for lba in (6, 7):
        with pytest.raises(BlockUnrecoverable) as e:
            g.read_block(lba)
        assert e.value.code == "raid_unrecoverable"
    assert g.read_block(8) == model[8]
    with pytest.raises(BlockUnrecoverable):
        g.write_block(8, blk(1))
    assert g.read_block(8) == model[8]  # the refused write changed nothing
    rep = g.scrub()
    assert rep.unrecoverable == [2] and rep.checksum_errors == 2
    # a full-stripe write (no reads needed) makes the stripe whole again
    g.write_stripe(2, [model[6], model[7], model[8]])
    with pytest.raises(ValueError):
        g.write_stripe(2, [model[6]])
    with pytest.raises(OutOfRange):
        g.write_stripe(g.stripes, [model[6], model[7], model[8]])
    check(g, model)
    assert g.scrub().checksum_errors == 0


def test_raid4_corrupt_checksum_table_is_repaired() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    table = ChecksummedDevice(devs[2]).data_blocks
    devs[2].corrupt_block(table, 0)  # entry of stripe 0 on member 2
    check(g, model)
    rep = g.scrub()
    assert rep.checksum_errors == 0


def test_raid4_corruption_while_degraded_raises() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)
    g.fail_member(0)
    devs[1].corrupt_block(3)
    with pytest.raises(BlockUnrecoverable):
        g.read_block(3 * 3 + 1)
    with pytest.raises(BlockUnrecoverable):
        g.read_block(3 * 3)  # reconstructing member 0 needs member 1
    assert g.read_block(3 * 3 + 2) == model[11]


def test_raid4_rebuild_in_slices_with_foreground_io() -> None:
    g, devs = mem_group(Layout.RAID4, 4, 40)
    model = fill(g)
    g.fail_member(2)
    with pytest.raises(InvalidState):
        g.replace(1, MemoryDevice(40))
    with pytest.raises(ValueError):
        g.replace(2, MemoryDevice(3))
    new = MemoryDevice(40, "new")
    g.replace(2, new)
    assert g.state[2] is MemberState.REBUILDING
    total = g.stripes
    done = 0
    step = 0
    while True:
        p = g.rebuild_step(7)
        assert p.total == total and p.done == min(total, done + 7)
        done = p.done
        # foreground writes both behind and ahead of the cursor, and reads everywhere
        for lba in (2, 3 * (total - 1) + 2, 3 * min(done, total - 1) + 2):
            model[lba] = blk(step + lba)
            g.write_block(lba, model[lba])
        step += 1
        check(g, model)
        if p.complete:
            break
    assert g.state[2] is MemberState.OK and not g.degraded
    with pytest.raises(InvalidState):
        g.rebuild_step(1)
    # fully redundant again: another disk may now fail
    g.fail_member(0)
    check(g, model)
    assert new.read_block(0) == model[2]


def test_raid4_failure_during_rebuild_goes_offline() -> None:
    g, devs = mem_group(Layout.RAID4)
    fill(g)
    g.fail_member(0)
    g.replace(0, MemoryDevice(34))
    g.rebuild_step(2)
    g.fail_member(1)
    with pytest.raises(RaidOffline):
        g.read_block(0)
    with pytest.raises(RaidOffline):
        g.rebuild_step(1)


def test_raid4_crash_between_data_and_parity_is_found_by_scrub() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)

    def crash(stage: str, stripe: int) -> None:
        assert stage == "after_data"
        raise SimulatedCrash(stripe)

    g.crash_hook = crash
    new = blk(200)
    with pytest.raises(SimulatedCrash):
        g.write_block(4, new)
    # "restart": a fresh group over the same devices; the data block verifies, parity is stale
    g2 = RaidGroup(Layout.RAID4, devs)
    assert g2.read_block(4) == new
    model[4] = new
    rep = g2.scrub()
    assert rep.parity_mismatches == 1 and rep.repaired_parity == 1
    assert g2.scrub().parity_mismatches == 0
    g2.fail_member(1)  # parity now reconstructs the crashed write's block correctly
    check(g2, model)


def test_raid4_write_heals_stale_parity() -> None:
    g, devs = mem_group(Layout.RAID4)
    model = fill(g)

    def crash(stage: str, stripe: int) -> None:
        raise SimulatedCrash(stripe)

    g.crash_hook = crash
    with pytest.raises(SimulatedCrash):
        g.write_block(0, blk(9))
    g.crash_hook = None
    model[0] = blk(10)
    g.write_block(0, model[0])  # reconstruct-write recomputes parity from verified data
    assert g.scrub().parity_mismatches == 0
    g.fail_member(0)
    check(g, model)


# -- RAID-1 ---------------------------------------------------------------------------------

def test_raid1_roundtrip_degraded_and_offline() -> None:
    g, devs = mem_group(Layout.RAID1, 3, 20)
    assert g.nblocks == g.stripes == data_blocks_for(20)
    model = fill(g)
    for d in devs:
        assert d.read_block(0) == model[0]
    g.fail_member(0)
    check(g, model)
    model[1] = blk(50)
    g.write_block(1, model[1])
    devs[1].fail()
    check(g, model)
    assert not g.offline
    g.fail_member(2)
    assert g.offline
    with pytest.raises(RaidOffline):
        g.read_block(0)


def test_raid1_corruption_repair_and_rebuild() -> None:
    g, devs = mem_group(Layout.RAID1, 2, 20)
    model = fill(g)
    devs[0].corrupt_block(5)
    assert g.read_block(5) == model[5]
    assert devs[0].read_block(5) == model[5]
    devs[1].corrupt_block(6)
    rep = g.scrub()
    assert rep.checksum_errors == 1 and rep.repaired_data == 1
    devs[0].corrupt_block(7)
    devs[1].corrupt_block(7)
    with pytest.raises(BlockUnrecoverable):
        g.read_block(7)
    g.write_block(7, model[7])
    g.fail_member(1)
    g.replace(1, MemoryDevice(20))
    while not g.rebuild_step(4).complete:
        pass
    g.fail_member(0)
    check(g, model)


def test_raid1_torn_mirror_write_found_by_scrub() -> None:
    g, devs = mem_group(Layout.RAID1, 2, 20)
    model = fill(g)

    def crash(stage: str, stripe: int) -> None:
        raise SimulatedCrash(stripe)

    g.crash_hook = crash
    with pytest.raises(SimulatedCrash):
        g.write_block(3, blk(77))
    g2 = RaidGroup(Layout.RAID1, devs)
    rep = g2.scrub()
    assert rep.mirror_mismatches == 1
    model[3] = devs[0].read_block(3)
    assert g2.scrub().mirror_mismatches == 0
    g2.fail_member(0)
    check(g2, model)


# -- real disks -----------------------------------------------------------------------------

def test_raid4_over_real_disk_files(tmp_path: Path) -> None:
    size = 24 * BLOCK_SIZE
    disks: list[Disk] = []
    try:
        for i in range(3):
            p = tmp_path / f"disk{i}.img"
            Disk.create(p, 1, i, size)
            disks.append(Disk.open(p, 0))
        devs = [DiskDevice(d) for d in disks]
        g = RaidGroup(Layout.RAID4, devs)
        assert g.nblocks == 2 * data_blocks_for(24)
        model = fill(g)
        devs[0].corrupt_block(1, 9)
        check(g, model)
        for d in devs:
            d.sync()
        g.fail_member(1)
        check(g, model)
        p = tmp_path / "spare.img"
        Disk.create(p, 1, 9, size)
        spare = Disk.open(p, 0)
        disks.append(spare)
        g.replace(1, DiskDevice(spare))
        assert g.rebuild_step(1000).complete
        g.fail_member(0)
        check(g, model)
    finally:
        for d in disks:
            d.close()


# -- batched writes -------------------------------------------------------------------------

class CountingDevice(MemoryDevice):
    """Counts reads of data blocks (below ``data_limit``), the reads a full-stripe write avoids."""

    def __init__(self, nblocks: int, name: str) -> None:
        super().__init__(nblocks, name)
        self.data_limit = data_blocks_for(nblocks)
        self.data_reads = 0

    def read_block(self, i: int) -> bytes:
        self.data_reads += i < self.data_limit
        return super().read_block(i)

    def read_run(self, first: int, count: int) -> bytes:
        self.data_reads += max(0, min(first + count, self.data_limit) - first)
        return super().read_run(first, count)


def test_write_blocks_full_stripes_do_not_read_data() -> None:
    devs = [CountingDevice(40, f"d{i}") for i in range(4)]
    g = RaidGroup(Layout.RAID4, devs)
    model = {lba: blk(lba) for lba in range(3, 3 + 3 * 10)}  # stripes 1..10, all full
    g.write_blocks(list(model.items()))
    assert sum(d.data_reads for d in devs) == 0
    check(g, model)
    assert g.scrub().parity_mismatches == 0


def test_write_blocks_mixed_partial_duplicates_and_model() -> None:
    g, devs = mem_group(Layout.RAID4, 4, 40)
    model = fill(g)
    batch = [(lba, blk(lba + 100)) for lba in (0, 1, 2, 7, 9, 10, 11, 20, 21, 22, 23, 25)]
    batch.append((7, blk(777)))  # a later duplicate wins
    g.write_blocks(batch)
    model.update(dict(batch))
    check(g, model)
    rep = g.scrub()
    assert rep.parity_mismatches == 0 and rep.checksum_errors == 0
    g.fail_member(2)
    check(g, model)
    with pytest.raises(ValueError):
        g.write_blocks([(0, b"short")])
    with pytest.raises(OutOfRange):
        g.write_blocks([(g.nblocks, blk(1))])


def test_write_blocks_degraded_and_during_rebuild() -> None:
    g, devs = mem_group(Layout.RAID4, 4, 40)
    model = fill(g)
    g.fail_member(1)
    batch = [(lba, blk(lba + 50)) for lba in range(0, 18)]
    g.write_blocks(batch)
    model.update(dict(batch))
    check(g, model)
    g.replace(1, MemoryDevice(40, "r1"))
    g.rebuild_step(3)  # stripes 0..2 live on the new member, 3.. not yet
    batch = [(lba, blk(lba + 60)) for lba in range(0, 30)]
    g.write_blocks(batch)
    model.update(dict(batch))
    check(g, model)
    while not g.rebuild_step(4).complete:
        pass
    assert not g.degraded
    g.fail_member(0)  # every block of member 0 must now come from the others, incl. member 1
    check(g, model)


def test_write_blocks_parity_member_failed() -> None:
    g, devs = mem_group(Layout.RAID4, 3, 30)
    model = fill(g)
    g.fail_member(2)
    batch = [(lba, blk(lba + 9)) for lba in range(4, 16)]
    g.write_blocks(batch)
    model.update(dict(batch))
    check(g, model)


def test_write_blocks_crash_hook_between_data_and_parity() -> None:
    g, devs = mem_group(Layout.RAID4, 4, 40)
    model = fill(g)
    seen: list[int] = []

    def crash(stage: str, stripe: int) -> None:
        assert stage == "after_data"
        seen.append(stripe)
        if len(seen) == 2:
            raise SimulatedCrash(stripe)

    g.crash_hook = crash
    batch = [(lba, blk(lba + 70)) for lba in range(6, 15)]  # stripes 2, 3, 4
    with pytest.raises(SimulatedCrash):
        g.write_blocks(batch)
    assert seen == [2, 3]
    g2 = RaidGroup(Layout.RAID4, devs)  # restart; the documented recovery scrubs first
    rep = g2.scrub()
    assert rep.parity_mismatches == 3 and rep.repaired_parity == 3 and not rep.unrecoverable
    model.update(dict(batch))  # all data was written before the first hook
    check(g2, model)
    g2.fail_member(0)
    check(g2, model)


def test_write_blocks_raid1() -> None:
    g, devs = mem_group(Layout.RAID1, 3, 20)
    model = fill(g)
    g.fail_member(1)
    batch = [(lba, blk(lba + 30)) for lba in (0, 1, 2, 5, 9)]
    g.write_blocks(batch)
    model.update(dict(batch))
    check(g, model)
    g.replace(1, MemoryDevice(20, "r1"))
    while not g.rebuild_step(7).complete:
        pass
    g.fail_member(0)
    g.fail_member(2)
    check(g, model)


def test_rebuild_fast_path_falls_back_on_corruption() -> None:
    # RAID-1, three mirrors: a bad block on the first source sends its chunk down the
    # per-stripe path, which takes the other mirror's copy.
    g, devs = mem_group(Layout.RAID1, 3, 600)  # > one rebuild chunk and one table block
    model = {lba: blk(lba) for lba in range(g.nblocks)}
    g.write_blocks(list(model.items()))
    g.fail_member(2)
    devs[0].corrupt_block(300, 5)
    g.replace(2, MemoryDevice(600, "r2"))
    assert g.rebuild_step(10_000).complete
    g.fail_member(1)
    check(g, model)  # member 0's bad block is repaired from the rebuilt member 2


def test_rebuild_stops_at_a_double_fault_stripe() -> None:
    g, devs = mem_group(Layout.RAID4, 4, 600)
    model = {lba: blk(lba) for lba in range(g.nblocks)}
    g.write_blocks(list(model.items()))
    g.fail_member(3)
    devs[0].corrupt_block(300, 5)  # with member 3 gone, stripe 300 has two bad blocks
    g.replace(3, MemoryDevice(600, "r3"))
    with pytest.raises(BlockUnrecoverable):
        g.rebuild_step(10_000)
    assert g.rebuild_cursor == 300  # everything before it was rebuilt, in bulk
    for lba in range(3 * 300):
        if lba % 3 != 0:
            assert g.read_block(lba) == model[lba]


def test_write_blocks_and_rebuild_over_disk_files(tmp_path: Path) -> None:
    size = 80 * BLOCK_SIZE
    disks: list[Disk] = []
    try:
        for i in range(4):
            p = tmp_path / f"disk{i}.img"
            Disk.create(p, 1, i, size)
            disks.append(Disk.open(p, 0))
        devs = [DiskDevice(d) for d in disks]
        assert devs[0].read_run(0, 3) == bytes(3 * BLOCK_SIZE)
        g = RaidGroup(Layout.RAID4, devs)
        model = {lba: blk(lba) for lba in range(g.nblocks)}
        g.write_blocks(list(model.items()))
        g.sync()
        check(g, model)
        g.fail_member(2)
        p = tmp_path / "spare.img"
        Disk.create(p, 1, 9, size)
        disks.append(Disk.open(p, 0))
        g.replace(2, DiskDevice(disks[-1]))
        assert g.rebuild_step(10_000).complete
        g.fail_member(0)
        check(g, model)
    finally:
        for d in disks:
            d.close()
