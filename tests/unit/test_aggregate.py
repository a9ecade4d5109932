"""The aggregate on real disk files: RAID over the node's disks, WAFL on it, volumes and LUNs.

Every test formats its own aggregate in tmp_path (sparse disk images, stamped like the
hypervisor stamps them before an assign) and, where durability matters, closes and reopens it
the way a restarted domain or a partner taking over would.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from storage.aggregate import RESERVE, Aggregate
from storage.blockcache import BLOCK
from storage.disk import Disk, disk_path, stamp_epoch
from storage.raid import MemberState, RaidOffline
from vmemu.errors import BadRequest, InvalidState, OutOfRange, UnknownLun, VmemuError

MiB = 1 << 20
NODE = 1


def make_disks(data_dir: Path, count: int, size: int = 8 * MiB, node: int = NODE) -> None:
    for d in range(count):
        Disk.create(disk_path(data_dir, node, d), node, d, size)


def fence(data_dir: Path, count: int, node: int = NODE) -> int:
    """What the hypervisor does before it hands the disks out: a new epoch on each."""
    epochs = {stamp_epoch(disk_path(data_dir, node, d)) for d in range(count)}
    assert len(epochs) == 1
    return epochs.pop()


class Agg:
    """Open/close/reopen an aggregate of node1 in a data dir, closing whatever is left open."""

    def __init__(self, data_dir: Path, ndisks: int, layout: str = "raid4",
                 default_luns: int = 2, lun_bytes: int | None = 2 * MiB) -> None:
        self.data_dir, self.ndisks, self.layout = data_dir, ndisks, layout
        self.default_luns, self.lun_bytes = default_luns, lun_bytes
        self.open_aggs: list[Aggregate] = []

    def open(self) -> Aggregate:
        epoch = fence(self.data_dir, self.ndisks)
        a = Aggregate.open(self.data_dir, NODE, self.ndisks, epoch, self.layout,
                           self.default_luns, self.lun_bytes)
        self.open_aggs.append(a)
        return a

    def reopen(self, a: Aggregate) -> Aggregate:
        a.close()
        return self.open()

    def close(self) -> None:
        for a in self.open_aggs:
            a.close()


@pytest.fixture
def agg(tmp_path: Path):
    made: list[Agg] = []

    def make(ndisks: int = 3, layout: str = "raid4", **kw) -> Agg:
        make_disks(tmp_path, ndisks)
        h = Agg(tmp_path, ndisks, layout, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def pattern(seed: int, n: int = BLOCK) -> bytes:
    return random.Random(seed).randbytes(n)


def commit_blocks(a: Aggregate, lun: int, blocks: dict[int, bytes],
                  snapshot: str | None = None) -> dict:
    """What a CP does with a frozen set: commit, then (main thread) refresh the read view."""
    st = a.commit({lun: {b: bytearray(d) for b, d in blocks.items()}}, snapshot)
    a.refresh_view()
    return st


def aggr_state(data_dir: Path) -> dict:
    return json.loads((data_dir / f"node{NODE}" / "aggr.json").read_text())


# -- format, catalog, data -------------------------------------------------------------------

def test_format_makes_vol0_with_two_luns_and_a_clean_fs(agg, tmp_path: Path) -> None:
    h = agg()
    a = h.open()
    assert sorted(a.volumes) == ["vol0"]
    assert [(l.index, l.path, l.size) for l in sorted(a.luns.values(), key=lambda l: l.index)] == \
        [(0, "vol0/lun0", 2 * MiB), (1, "vol0/lun1", 2 * MiB)]
    assert a.raid_status()["state"] == "normal" and a.raid_status()["layout"] == "raid4"
    assert a.fsck()["ok"]
    st = aggr_state(tmp_path)
    assert st["formatted"] and st["failed"] == [] and st["layout"] == "raid4" and st["disks"] == 3
    # vol0 reserves at most half of what may be reserved, leaving room for more volumes.
    assert a.reserved() <= a.reservable() // 2
    assert a.reservable() == int(a.capacity() * RESERVE)
    # Unwritten LUN blocks read as zeros.
    assert a.read_committed(0, 0, 4) == bytes(4 * BLOCK)


def test_catalog_survives_reopen(agg) -> None:
    h = agg()
    a = h.open()
    v = a.volume_create("vol1", 4 * MiB)
    assert v["name"] == "vol1" and v["size"] == 4 * MiB and v["luns"] == []
    l1 = a.lun_create("vol1", "data", 1 * MiB)
    l2 = a.lun_create("vol1", "logs", 2 * MiB)
    assert (l1.index, l2.index) == (2, 3) and l1.path == "vol1/data"
    before = copy.deepcopy(a._catalog())
    a = h.reopen(a)
    assert a._catalog() == before
    assert a.lun_by_path("vol1/logs").index == 3
    info = a.volume_info("vol1")
    assert [(l["name"], l["index"], l["size"]) for l in info["luns"]] == \
        [("data", 2, 1 * MiB), ("logs", 3, 2 * MiB)]
    # Indexes are never reused: a new LUN after a delete gets a fresh one.
    a.lun_delete(2)
    assert a.lun_create("vol1", "more", 1 * MiB).index == 4
    a = h.reopen(a)
    assert sorted(a.luns) == [0, 1, 3, 4] and a.next_lun == 5
    with pytest.raises(UnknownLun):
        a.read_committed(2, 0, 1)
    assert a.fsck()["ok"]


def test_commit_and_read_committed_round_trip_across_reopen(agg) -> None:
    h = agg()
    a = h.open()
    blocks = {b: pattern(b) for b in (0, 1, 2, 7, 100, 511)}
    st = commit_blocks(a, 0, blocks)
    assert st["blocks"] == len(blocks) and st["written"] >= len(blocks)
    other = {3: pattern(1000)}
    commit_blocks(a, 1, other)
    for b, d in blocks.items():
        assert a.read_committed(0, b, 1) == d
    assert a.read_committed(0, 0, 3) == blocks[0] + blocks[1] + blocks[2]
    assert a.read_committed(0, 3, 1) == bytes(BLOCK)  # a hole
    assert a.read_committed(1, 3, 1) == other[3]
    # Blocks of a deleted (unknown) LUN in a frozen set are skipped, not an error.
    assert a.commit({99: {0: bytearray(BLOCK)}})["blocks"] == 0
    a = h.reopen(a)
    for b, d in blocks.items():
        assert a.read_committed(0, b, 1) == d
    assert a.read_committed(1, 3, 1) == other[3]
    assert a.fsck()["ok"]
    assert a.volume_info("vol0")["used"] >= (len(blocks) + 1) * BLOCK


def test_fsck_clean_after_many_commits(agg) -> None:
    h = agg()
    a = h.open()
    rng = random.Random(7)
    model: dict[tuple[int, int], bytes] = {}
    for i in range(12):
        lun = i % 2
        blocks = {rng.randrange(0, 512): pattern(rng.randrange(1 << 30)) for _ in range(20)}
        commit_blocks(a, lun, blocks)
        model.update({(lun, b): d for b, d in blocks.items()})
        rep = a.fsck()
        assert rep["ok"], rep["errors"]
    a = h.reopen(a)
    assert a.fsck()["ok"]
    for (lun, b), d in model.items():
        assert a.read_committed(lun, b, 1) == d


# -- replay bookkeeping ----------------------------------------------------------------------

def test_applied_is_the_max_over_live_members(agg) -> None:
    h = agg()
    a = h.open()
    assert a.applied() == {}
    a.set_applied({0x11: 10, 0x22: 3})
    assert a.applied() == {0x11: 10, 0x22: 3}
    # One member ahead of the others (a CP that stopped half way through the headers): max.
    a.disks[2].set_applied({0x11: 12, 0x22: 3})
    assert a.applied() == {0x11: 12, 0x22: 3}
    # A failed member no longer counts, even when it is the one ahead.
    a.fail_disk(2)
    assert a.applied() == {0x11: 10, 0x22: 3}
    a.set_applied({0x11: 20})
    assert a.applied() == {0x11: 20}
    assert a.disks[2].applied() == {0x11: 12, 0x22: 3}  # a failed disk is not written
    a = h.reopen(a)
    assert a.applied() == {0x11: 20}


# -- disks: failure, replacement, reconstruction, offline -------------------------------------

def test_fail_disk_is_persisted_and_data_survives_degraded(agg, tmp_path: Path) -> None:
    h = agg()
    a = h.open()
    blocks = {b: pattern(b + 50) for b in range(0, 64, 3)}
    commit_blocks(a, 0, blocks)
    a.fail_disk(1)
    assert aggr_state(tmp_path)["failed"] == [1]
    rs = a.raid_status()
    assert rs["state"] == "degraded"
    assert [d["state"] for d in rs["disks"]] == ["ok", "failed", "ok"]
    with pytest.raises(InvalidState):
        a.fail_disk(1)
    # Degraded writes and reads work.
    more = {b: pattern(b + 5000) for b in range(200, 232)}
    commit_blocks(a, 1, more)
    a = h.reopen(a)
    assert a.group.state[1] is MemberState.FAILED
    assert a.raid_status()["state"] == "degraded"
    for b, d in blocks.items():
        assert a.read_committed(0, b, 1) == d
    for b, d in more.items():
        assert a.read_committed(1, b, 1) == d
    assert a.fsck()["ok"]


def test_replace_and_rebuild_to_completion_keeps_data(agg, tmp_path: Path) -> None:
    h = agg()
    a = h.open()
    blocks = {b: pattern(b + 77) for b in range(0, 300, 2)}
    commit_blocks(a, 0, blocks)
    a.fail_disk(0)
    with pytest.raises(InvalidState):
        a.replace_disk(1, a.disks[1].epoch)  # only a failed disk can be replaced
    a.replace_disk(0, a.disks[1].epoch)
    st = aggr_state(tmp_path)
    assert st["failed"] == [] and st["rebuilding"] == 0
    assert a.rebuilding()
    steps = 0
    while True:
        prog = a.rebuild_step(1000)
        steps += 1
        if prog["complete"]:
            break
        assert steps < 1000
    assert steps > 1  # really in slices
    assert prog["disk"] == "d0" and prog["done"] == prog["total"] == a.group.stripes
    assert prog["rate_mbps"] > 0 and prog["seconds"] >= 0
    assert not a.rebuilding()
    assert a.raid_status()["state"] == "normal"
    assert aggr_state(tmp_path)["rebuilding"] is None
    # Prove the rebuilt disk holds the data: lose another member, read through the new one.
    a.fail_disk(1)
    a = h.reopen(a)
    for b, d in blocks.items():
        assert a.read_committed(0, b, 1) == d
    assert a.fsck()["ok"]
    rep = a.scrub()
    assert rep["unrecoverable"] == [] and rep["checksum_errors"] == 0


def test_a_rebuild_interrupted_by_a_restart_starts_over_and_completes(agg, tmp_path: Path) -> None:
    h = agg()
    a = h.open()
    blocks = {b: pattern(b + 9) for b in range(0, 128)}
    commit_blocks(a, 1, blocks)
    a.fail_disk(2)  # the parity disk
    a.replace_disk(2, a.disks[0].epoch)
    a.rebuild_step(100)
    a = h.reopen(a)
    assert a.rebuilding() and a.group.rebuild_cursor == 0
    a._rebuild_t0 = 0.0  # what replace_disk sets; a reopen restarts the rebuild without it
    while not a.rebuild_step(4096)["complete"]:
        pass
    assert a.raid_status()["state"] == "normal"
    rep = a.scrub()
    assert rep["parity_mismatches"] == 0 and rep["unrecoverable"] == []
    a.fail_disk(0)
    for b, d in blocks.items():
        assert a.read_committed(1, b, 1) == d


def test_rebuild_step_works_right_after_a_reopen_mid_rebuild(agg) -> None:
    h = agg()
    a = h.open()
    a.fail_disk(1)
    a.replace_disk(1, a.disks[0].epoch)
    a.rebuild_step(10)
    a = h.reopen(a)
    assert a.rebuilding()
    while not a.rebuild_step(4096)["complete"]:
        pass
    assert a.raid_status()["state"] == "normal"


def test_second_failure_on_raid4_takes_the_aggregate_offline(agg) -> None:
    h = agg()
    a = h.open()
    blocks = {b: pattern(b + 3) for b in range(0, 40)}
    commit_blocks(a, 0, blocks)
    a = h.reopen(a)  # a cold read cache: every read below has to reach the disks
    a.fail_disk(0)
    a.fail_disk(1)
    assert a.raid_status()["state"] == "offline"
    # Reads fail (they never return garbage), naming the offline group.
    for b in (0, 1, 39):
        with pytest.raises(RaidOffline, match="offline"):
            a.read_committed(0, b, 1)
    with pytest.raises(RaidOffline, match="offline"):
        a.fsck()
    with pytest.raises(RaidOffline, match="offline"):
        a.scrub()
    with pytest.raises(InvalidState, match="offline"):
        a.replace_disk(0, a.disks[2].epoch)
    # Reopening (a restart, a takeover) reports it the same way and leaks no descriptor.
    a.close()
    with pytest.raises(RaidOffline):
        h.open()


def test_raid1_survives_a_failure_and_rebuilds(tmp_path: Path, agg) -> None:
    h = agg(ndisks=2, layout="raid1")
    a = h.open()
    assert a.raid_status()["layout"] == "raid1"
    blocks = {b: pattern(b + 11) for b in range(0, 64)}
    commit_blocks(a, 0, blocks)
    a.fail_disk(0)
    assert a.raid_status()["state"] == "degraded"
    commit_blocks(a, 1, {5: pattern(5555)})
    a = h.reopen(a)
    a.replace_disk(0, a.disks[1].epoch)
    while not a.rebuild_step(2048)["complete"]:
        pass
    a.fail_disk(1)  # only the rebuilt mirror is left
    for b, d in blocks.items():
        assert a.read_committed(0, b, 1) == d
    assert a.read_committed(1, 5, 1) == pattern(5555)
    assert a.fsck()["ok"]


def test_layout_or_disk_count_mismatch_is_refused(agg, tmp_path: Path) -> None:
    h = agg()
    h.open().close()
    epoch = fence(tmp_path, 3)
    with pytest.raises(InvalidState, match="raid4 over 3 disks"):
        Aggregate.open(tmp_path, NODE, 3, epoch, "raid1")
    with pytest.raises(BadRequest, match="raid4 or raid1"):
        Aggregate.open(tmp_path, NODE, 3, epoch, "raid5")


# -- snapshots -----------------------------------------------------------------------------

def test_snapshot_through_commit_then_read_snapshot(agg) -> None:
    h = agg()
    a = h.open()
    A = {b: pattern(b + 100) for b in range(8)}
    B = {b: pattern(b + 200) for b in range(8)}
    commit_blocks(a, 0, A)
    full = a.snapshot_name("vol0", "x")
    assert full == "vol0@x"
    commit_blocks(a, 0, {}, snapshot=full)
    commit_blocks(a, 0, B)
    for b in range(8):
        assert a.read_committed(0, b, 1) == B[b]
        assert a.read_snapshot("vol0", "x", "lun0", b * BLOCK, BLOCK) == A[b]
    assert [s["name"] for s in a.snapshot_list("vol0")] == ["x"]
    assert a.volume_info("vol0")["snapshots"] == ["x"]
    assert a.fsck()["ok"]
    a = h.reopen(a)
    assert a.read_snapshot("vol0", "x", "lun0", 0, 8 * BLOCK) == b"".join(A[b] for b in range(8))
    with pytest.raises(InvalidState, match="holds LUNs"):
        a.volume_delete("vol0")
    with pytest.raises(UnknownLun):
        a.read_snapshot("vol0", "nope", "lun0", 0, BLOCK)
    with pytest.raises(BadRequest):
        a.snapshot_name("vol0", "bad name")
    # A range outside the LUN is refused, never read from somewhere else.
    with pytest.raises(OutOfRange):
        a.read_snapshot("vol0", "x", "lun0", -BLOCK, BLOCK)
    with pytest.raises(BadRequest):
        a.read_snapshot("vol0", "x", "lun0", 0, 64 << 20)
    a.snapshot_delete("vol0", "x")
    assert a.snapshot_list("vol0") == []
    with pytest.raises(UnknownLun):
        a.snapshot_delete("vol0", "x")
    assert a.fsck()["ok"]
    for b in range(8):
        assert a.read_committed(0, b, 1) == B[b]


# -- bad input -----------------------------------------------------------------------------

def test_bad_names_and_sizes_raise_typed_errors_and_change_nothing(agg) -> None:
    h = agg()
    a = h.open()
    a.volume_create("vol1", 2 * MiB)
    a.lun_create("vol1", "l", 1 * MiB)
    before = copy.deepcopy(a._catalog())
    files = dict(a.fs.dir)
    free = a.reservable() - a.reserved()
    cases = [
        (lambda: a.volume_create("vol1", MiB), BadRequest, "already exists"),
        (lambda: a.volume_create("1bad", MiB), BadRequest, "invalid volume name"),
        (lambda: a.volume_create("", MiB), BadRequest, "invalid volume name"),
        (lambda: a.volume_create("a/b", MiB), BadRequest, "invalid volume name"),
        (lambda: a.volume_create("x" * 17, MiB), BadRequest, "invalid volume name"),
        (lambda: a.volume_create("v2", 0), BadRequest, "too small"),
        (lambda: a.volume_create("v2", free + BLOCK), OutOfRange, "does not fit"),
        (lambda: a.lun_create("nov", "l", MiB), UnknownLun, "no volume"),
        (lambda: a.lun_create("vol1", "l", MiB), BadRequest, "already exists"),
        (lambda: a.lun_create("vol1", "9l", MiB), BadRequest, "invalid LUN name"),
        (lambda: a.lun_create("vol1", "m", 2 * MiB), OutOfRange, "does not fit"),
        (lambda: a.lun_create("vol1", "m", 1000), BadRequest, "multiple of 4096"),
        (lambda: a.lun_create("vol1", "m", 0), BadRequest, "multiple of 4096"),
        (lambda: a.lun_create("vol1", "m", -BLOCK), BadRequest, "multiple of 4096"),
        (lambda: a.volume_delete("nov"), UnknownLun, "no volume"),
        (lambda: a.volume_delete("vol1"), InvalidState, "holds LUNs"),
        (lambda: a.lun_delete(42), UnknownLun, "no LUN"),
        (lambda: a.lun_by_path("vol1/zz"), UnknownLun, "no LUN"),
        (lambda: a.snapshot_name("nov", "s"), UnknownLun, "no volume"),
        (lambda: a.snapshot_name("vol1", ""), BadRequest, "invalid snapshot name"),
        (lambda: a.snapshot_name("vol1", "a@b"), BadRequest, "invalid snapshot name"),
        (lambda: a.fail_disk(3), BadRequest, "d0..d2"),
        (lambda: a.fail_disk(-1), BadRequest, "d0..d2"),
        (lambda: a.replace_disk(9, 1), BadRequest, "d0..d2"),
        (lambda: a.replace_disk(0, 1), InvalidState, "only a failed disk"),
    ]
    for fn, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            fn()
        assert a._catalog() == before
    assert dict(a.fs.dir) == files
    assert a.raid_status()["state"] == "normal"
    a = h.reopen(a)
    assert a._catalog() == before
    assert a.fsck()["ok"]


def test_a_failed_create_on_an_offline_aggregate_changes_nothing(agg) -> None:
    """The catalog in memory is rolled back when its commit fails (regression test)."""
    h = agg()
    a = h.open()
    before = copy.deepcopy(a._catalog())
    a.fail_disk(0)
    a.fail_disk(1)
    with pytest.raises(VmemuError, match="offline"):
        a.volume_create("ghost", MiB)
    with pytest.raises(VmemuError):
        a.lun_create("vol0", "ghost", BLOCK)
    assert a._catalog() == before
