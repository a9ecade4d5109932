"""The D-module on real memfd NVRAM and real disk images: writes, CPs, and partner replay.

A crash is simulated by abandoning a DModule: its dirty cache (volatile memory) is lost,
its region (NVRAM, held by the test like the hypervisor holds it) and its disks remain.
"""

from __future__ import annotations

import mmap
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from domains.dmodule import DModule
from storage import nvlog_format as F
from storage import region as shm
from storage.disk import Disk, disk_path, stamp_epoch
from storage.lun import BLOCK
from tests.unit.conftest import DISK_SIZE, Fds
from vmemu.errors import BadRequest, Fenced, OutOfRange, UnknownLun

DISKS = 2
R1, R2, R3 = 0x1111, 0x2222, 0x3333


class Model:
    """What every acknowledged write says the LUNs of one identity hold."""

    def __init__(self) -> None:
        self.luns = [bytearray(DISK_SIZE) for _ in range(DISKS)]

    def write(self, lun: int, off: int, data: bytes) -> None:
        self.luns[lun][off:off + len(data)] = data


class Node:
    """One domain incarnation: a DModule on its own region, events recorded."""

    def __init__(self, fds: Fds, data_dir: Path, node: int, region_id: int,
                 size: int = 1 << 20) -> None:
        self.fd, self.buf = fds.region(node, region_id, size, halves=True)
        self.events: list[tuple] = []
        self.d = DModule(node, data_dir, DISKS, self.buf, region_id,
                         emit=lambda *a: self.events.append(a))
        self.region_id = region_id
        self.fds = fds
        fds.closers.append(self.d.close)  # a "crashed" DModule's disks are closed at teardown

    def read_only_view(self) -> mmap.mmap:
        """The partner's mapping: sealed region, O_RDONLY descriptor, PROT_READ."""
        if not shm.is_write_sealed(self.fd):
            shm.seal(self.fd, read_only=True)
        ro = self.fds.track(shm.reopen_read_only(self.fd))
        return self.fds.map(shm.map_read_only(ro))


def fence(data_dir: Path, identity: int) -> int:
    """What the hypervisor does before an Assign: a new epoch on every disk of the identity."""
    epoch = 0
    for d in range(DISKS):
        epoch = stamp_epoch(disk_path(data_dir, identity, d))
    return epoch


def on_disk(data_dir: Path, identity: int, lun: int) -> bytes:
    p = disk_path(data_dir, identity, lun)
    d = Disk.open(p, _epoch_of(p))
    try:
        return d.read(0, d.size)
    finally:
        d.close()


def _epoch_of(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(32)
        return int.from_bytes(f.read(8), "little")


def block(seed: int, n: int = BLOCK) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def data_dir(tmp_path: Path, make_disks: Callable[..., list[Path]]) -> Path:
    for node in (1, 2):
        make_disks(node, DISKS)
    return tmp_path


@pytest.fixture
def node1(fds: Fds, data_dir: Path) -> Node:
    n = Node(fds, data_dir, 1, R1)
    n.d.open_identity(1, fence(data_dir, 1), "boot")
    return n


def random_writes(model: Model, node: DModule, identity: int, count: int, seed: int,
                  client: int = 77, first_request: int = 1) -> list[tuple[int, int, bytes, int]]:
    """Acknowledged sector-aligned writes of various sizes, overlapping on purpose."""
    rnd = random.Random(seed)
    done = []
    for k in range(count):
        lun = rnd.randrange(DISKS)
        length = 512 * rnd.choice([1, 2, 7, 8, 9, 16])
        off = 512 * rnd.randrange(0, (DISK_SIZE - length) // 512 + 1)
        off = min(off, 8 * BLOCK)  # keep them close together: they overlap
        data = rnd.randbytes(length)
        req = first_request + k
        assert node.write(identity, lun, off, data, client, req) > 0
        model.write(lun, off, data)
        done.append((lun, off, data, req))
    return done


def assert_reads(d: DModule, identity: int, model: Model) -> None:
    for lun in range(DISKS):
        assert d.read(identity, lun, 0, DISK_SIZE) == bytes(model.luns[lun]), f"lun{lun}"


# -- the write path ----------------------------------------------------------------------------
def test_write_then_read_through_an_opened_identity(node1: Node) -> None:
    d = node1.d
    assert d.write(1, 0, 0, block(1), 5, 1) == 1
    assert d.write(1, 1, BLOCK, block(2, 1024), 5, 2) == 2
    assert d.read(1, 0, 0, BLOCK) == block(1)
    assert d.read(1, 1, BLOCK, 1024) == block(2, 1024)
    assert d.read(1, 1, 0, BLOCK) == bytes(BLOCK)
    assert d.log.records == 2 and d.ops == 5


def test_identity_not_served_or_lun_that_does_not_exist_is_unknown_lun(node1: Node) -> None:
    with pytest.raises(UnknownLun, match="does not serve node2"):
        node1.d.write(2, 0, 0, block(1), 5, 1)
    with pytest.raises(UnknownLun, match="no lun2"):
        node1.d.read(1, DISKS, 0, 512)
    with pytest.raises(UnknownLun):
        node1.d.flush(1, -1)
    assert node1.d.log.records == 0


def test_open_identity_with_a_stale_epoch_is_fenced_and_serves_nothing(fds: Fds,
                                                                       data_dir: Path) -> None:
    n = Node(fds, data_dir, 2, R2)
    fence(data_dir, 2)
    with pytest.raises(Fenced):
        n.d.open_identity(2, 0, "boot")
    assert n.d.served == {}


def test_retried_write_is_acknowledged_with_0_and_not_logged_or_applied_again(node1: Node) -> None:
    d = node1.d
    assert d.write(1, 0, 0, b"\x01" * 512, 9, 42) == 1
    assert d.write(1, 0, 0, b"\x02" * 512, 9, 42) == 0  # same client and request: a retry
    assert d.log.records == 1
    assert d.read(1, 0, 0, 512) == b"\x01" * 512
    assert d.write(1, 0, 0, b"\x03" * 512, 10, 42) == 2  # another client's request 42
    assert d.read(1, 0, 0, 512) == b"\x03" * 512


def test_writes_without_a_client_id_are_never_deduplicated(node1: Node) -> None:
    d = node1.d
    assert d.write(1, 0, 0, b"\x01" * 512, 0, 1) == 1
    assert d.write(1, 0, 0, b"\x02" * 512, 0, 1) == 2
    assert d.read(1, 0, 0, 512) == b"\x02" * 512


def test_retry_is_still_recognised_after_a_consistency_point(node1: Node) -> None:
    d = node1.d
    d.write(1, 0, 0, b"\x01" * 512, 9, 1)
    d.consistency_point("test")
    assert d.write(1, 0, 0, b"\x02" * 512, 9, 1) == 0
    assert d.log.records == 1  # only the exactly-once table, carried into the new generation


@pytest.mark.parametrize("offset,data,error", [
    (1, b"x" * 512, BadRequest), (0, b"x" * 100, BadRequest), (0, b"", BadRequest),
    (DISK_SIZE, b"x" * 512, OutOfRange), (-512, b"x" * 512, OutOfRange)])
def test_invalid_write_is_refused_and_changes_nothing(node1: Node, offset: int, data: bytes,
                                                      error: type) -> None:
    d = node1.d
    with pytest.raises(error):
        d.write(1, 0, offset, data, 9, 1)
    assert d.log.records == 0 and d.log.used == 0
    assert d.served[1].cache.dirty_blocks() == 0
    assert d.write(1, 0, 0, b"\x05" * 512, 9, 1) == 1  # the request id was not burnt


# -- consistency points ------------------------------------------------------------------------
def test_consistency_point_writes_data_sets_applied_and_resets_the_log(node1: Node,
                                                                      data_dir: Path) -> None:
    d = node1.d
    model = Model()
    random_writes(model, d, 1, 30, seed=1)
    gen = d.log.generation
    info = d.consistency_point("test")
    assert info["seq"] == 30 and info["region"] == R1 and info["identities"] == [1]
    assert info["blocks"] > 0 and d.cp_count == 1
    assert [e[:2] for e in node1.events] == [("cp_done", info)]
    # The new generation holds one record: the exactly-once table carried across the CP.
    assert d.log.records == 1 and d.log.active_half == 1 and d.log.flushing is None
    served = d.served[1]
    for lun in served.luns:
        disk = served.store.disk_of(lun.index)
        assert served.cache.dirty_blocks() == 0
        assert disk.applied() == {R1: 30}
        assert disk.read(0, DISK_SIZE) == bytes(model.luns[lun.index])
    assert_reads(d, 1, model)
    assert d.write(1, 0, 0, b"\x09" * 512, 1, 1) == 32  # the sequence goes on (31: the table)


def test_a_full_log_triggers_a_consistency_point_and_no_write_is_lost(fds: Fds,
                                                                      data_dir: Path) -> None:
    n = Node(fds, data_dir, 1, R1, size=F.REGION_HEADER + 5 * F.record_size(BLOCK))
    n.d.open_identity(1, fence(data_dir, 1), "boot")
    model = Model()
    for k in range(23):
        n.d.write(1, k % DISKS, (k % 7) * BLOCK, block(k), 3, k + 1)
        model.write(k % DISKS, (k % 7) * BLOCK, block(k))
    # Each half holds 2 blocks; every switch to a half starts a CP (the carried table takes a
    # slot of the new half), so 23 writes need about a CP per write after the first two.
    assert n.d.cp_count >= 10
    assert all(e[1]["reason"] == "log_full" for e in n.events)
    assert_reads(n.d, 1, model)


# -- takeover: the partner replays the chain -----------------------------------------------------
def crash_after_acknowledged_writes(fds: Fds, data_dir: Path) -> tuple[Node, Model, list]:
    """node1 writes, CPs, writes more (acknowledged, only in NVRAM), then dies."""
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    model = Model()
    random_writes(model, a.d, 1, 25, seed=11, first_request=1)
    a.d.consistency_point("timer")
    after_cp = random_writes(model, a.d, 1, 40, seed=12, first_request=100)
    return a, model, after_cp


def test_partner_replay_of_a_read_only_mapping_shows_every_acknowledged_write(
        fds: Fds, data_dir: Path) -> None:
    a, model, after_cp = crash_after_acknowledged_writes(fds, data_dir)
    before = [on_disk(data_dir, 1, lun) for lun in range(DISKS)]
    assert before != [bytes(m) for m in model.luns]  # the last writes are only in NVRAM
    epoch = fence(data_dir, 1)  # the hypervisor fences node1's disks, then assigns
    with pytest.raises(Fenced):
        a.d.consistency_point("too late")  # the dead incarnation can no longer write

    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, epoch, "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view())])
    assert rep["records"] == len(after_cp) and rep["bad"] == 0 and rep["regions"] == 1
    # and the exactly-once tables carried into the halves (one by the CP, one by the failed
    # CP of the fenced incarnation, which switched halves before its commit was refused)
    assert rep["scanned"] == len(after_cp) + 2
    assert served.replayed == {R1: 25 + 1 + len(after_cp) + 1}
    assert_reads(b.d, 1, model)
    # A client retrying a write node1 acknowledged is recognised by node2.
    lun, off, data, req = after_cp[-1]
    assert b.d.write(1, lun, off, b"\xee" * len(data), 77, req) == 0
    assert_reads(b.d, 1, model)

    b.d.consistency_point("after takeover")
    for lun in range(DISKS):
        assert on_disk(data_dir, 1, lun) == bytes(model.luns[lun])
    assert b.d.served[1].store.disk_of(0).applied() == {R1: 25 + 1 + len(after_cp) + 1, R2: 0}


def test_replaying_twice_equals_replaying_once(fds: Fds, data_dir: Path) -> None:
    a, model, _ = crash_after_acknowledged_writes(fds, data_dir)
    epoch = fence(data_dir, 1)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, epoch, "takeover")
    view = a.read_only_view()
    first = b.d.replay_chain(served, [(R1, view)])
    once = [on_disk(data_dir, 1, lun) for lun in range(DISKS)]
    second = b.d.replay_chain(served, [(R1, view)])
    assert [on_disk(data_dir, 1, lun) for lun in range(DISKS)] == once
    assert once == [bytes(m) for m in model.luns]
    assert (second["records"], second["bytes"]) == (first["records"], first["bytes"])


def test_replay_after_the_partners_cp_applies_nothing_again(fds: Fds, data_dir: Path) -> None:
    a, model, _ = crash_after_acknowledged_writes(fds, data_dir)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    b.d.replay_chain(served, [(R1, a.read_only_view())])
    b.d.consistency_point("timer")
    b.d.close()
    c = Node(fds, data_dir, 1, R3)  # node1 again, new incarnation
    served = c.d.open_identity(1, fence(data_dir, 1), "giveback")
    rep = c.d.replay_chain(served, [(R1, a.read_only_view()), (R2, b.read_only_view())])
    assert rep["records"] == 0
    assert_reads(c.d, 1, model)


def test_chain_of_two_dead_regions_is_replayed_oldest_first(fds: Fds, data_dir: Path) -> None:
    a, model, _ = crash_after_acknowledged_writes(fds, data_dir)
    # node2 takes over, replays node1's region, serves more (overlapping) writes, then dies too.
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    b.d.replay_chain(served, [(R1, a.read_only_view())])
    random_writes(model, b.d, 1, 40, seed=13, first_request=1000)
    # node1's next incarnation gets identity 1 with the chain [R1, R2].
    c = Node(fds, data_dir, 1, R3)
    served = c.d.open_identity(1, fence(data_dir, 1), "recovery")
    rep = c.d.replay_chain(served, [(R1, a.read_only_view()), (R2, b.read_only_view())])
    assert rep["regions"] == 2
    assert_reads(c.d, 1, model)
    c.d.consistency_point("timer")
    for lun in range(DISKS):
        assert on_disk(data_dir, 1, lun) == bytes(model.luns[lun])


def test_replay_skips_own_live_region_and_other_identities_records(fds: Fds,
                                                                  data_dir: Path) -> None:
    b = Node(fds, data_dir, 2, R2)
    b.d.open_identity(2, fence(data_dir, 2), "boot")
    own = Model()
    random_writes(own, b.d, 2, 10, seed=5)
    a, model, _ = crash_after_acknowledged_writes(fds, data_dir)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view()), (R2, None)])
    assert rep["regions"] == 1
    assert_reads(b.d, 1, model)
    assert_reads(b.d, 2, own)


def test_release_identity_makes_the_disks_hold_everything_and_lets_go(node1: Node,
                                                                     data_dir: Path) -> None:
    model = Model()
    random_writes(model, node1.d, 1, 20, seed=3)
    info = node1.d.release_identity(1)
    assert info["reason"] == "giveback" and 1 not in node1.d.served
    for lun in range(DISKS):
        assert on_disk(data_dir, 1, lun) == bytes(model.luns[lun])
    with pytest.raises(UnknownLun):
        node1.d.read(1, 0, 0, 512)


def test_exactly_once_table_survives_a_cp_and_a_takeover(fds, make_disks, tmp_path) -> None:
    """A write acknowledged, then flushed by a CP, then retried at the partner: applied once."""
    from domains.dmodule import DModule
    from storage import region as shm

    owner_fd, owner_buf = fds.region(1, 0x101, 1 << 20, halves=True)
    make_disks(1, 2)
    owner = DModule(1, tmp_path, 2, owner_buf, 0x101, lambda *a: None)
    owner.open_identity(1, epoch=0, reason="boot")
    owner.write(1, 0, 0, b"a" * 4096, client=77, request=5)
    owner.consistency_point("test")
    owner.write(1, 0, 4096, b"b" * 4096, client=78, request=1)
    ro = fds.map(shm.map_read_only(fds.track(shm.reopen_read_only(owner_fd))))
    _, partner_buf = fds.region(2, 0x202, 1 << 20, halves=True)
    partner = DModule(2, tmp_path, 2, partner_buf, 0x202, lambda *a: None)
    owner.close()  # the owner is gone; its disks and its log remain
    served = partner.open_identity(1, epoch=0, reason="takeover")
    partner.replay_chain(served, [(0x101, ro)])
    assert partner.dedup.applied(77, 5)  # carried across the CP in the dedup record
    assert partner.dedup.applied(78, 1)  # from the write record itself
    assert partner.write(1, 0, 0, b"z" * 4096, client=77, request=5) == 0
    assert partner.read(1, 0, 0, 4096) == b"a" * 4096
    assert partner.read(1, 0, 4096, 4096) == b"b" * 4096
    partner.close()


def test_replay_writes_a_rewritten_block_once_and_adjacent_blocks_in_one_call(
        fds: Fds, data_dir: Path) -> None:
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    model = Model()
    for k in range(10):  # the same block, ten times
        data = block(100 + k)
        assert a.d.write(1, 0, 4 * BLOCK, data, 77, k + 1) > 0
        model.write(0, 4 * BLOCK, data)
    for k in range(8):  # a sequential run, as a file copy writes it
        data = block(200 + k)
        assert a.d.write(1, 1, k * BLOCK, data, 77, 100 + k) > 0
        model.write(1, k * BLOCK, data)
    half = block(300, BLOCK // 2)  # same offset, shorter: does not supersede the block
    assert a.d.write(1, 0, 4 * BLOCK, half, 77, 200) > 0
    model.write(0, 4 * BLOCK, half)

    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view())])
    assert (rep["records"], rep["bytes"], rep["bad"]) == (19, 18 * BLOCK + BLOCK // 2, 0)
    assert rep["written"] == 1 + 8 + 1  # the last full write of the block, the run, the half
    assert rep["written_bytes"] == 9 * BLOCK + BLOCK // 2
    assert rep["writes"] == 3  # the run went out as one pwritev
    assert_reads(b.d, 1, model)
    b.d.consistency_point("after takeover")
    for lun in range(DISKS):
        assert on_disk(data_dir, 1, lun) == bytes(model.luns[lun])


def test_replay_by_a_fenced_holder_writes_nothing(fds: Fds, data_dir: Path) -> None:
    a, model, _ = crash_after_acknowledged_writes(fds, data_dir)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    before = [on_disk(data_dir, 1, lun) for lun in range(DISKS)]
    fence(data_dir, 1)  # someone else is handed the disks first
    with pytest.raises(Fenced):
        b.d.replay_chain(served, [(R1, a.read_only_view())])
    assert [on_disk(data_dir, 1, lun) for lun in range(DISKS)] == before
