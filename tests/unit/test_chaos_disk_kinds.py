"""The disk fault kinds of a chaos run: their schedule parameters, their availability budgets
(shown passing and failing), and the bit flips the nemesis writes into an image."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from storage.disk import HEADER, Disk, disk_path, stamp_epoch
from storage.raid.checksummed import data_blocks_for
from vmemu.chaos import availability as av
from vmemu.chaos.nemesis_disk import flip_bits
from vmemu.chaos.schedule import DEFAULT_KINDS, DISK_KINDS, KINDS, generate
from tests.unit.test_chaos_availability import judge, kill, steady


def test_disk_kinds_are_known_drawn_only_when_asked_and_carry_their_parameters() -> None:
    assert set(DISK_KINDS) <= set(KINDS) and not set(DISK_KINDS) & set(DEFAULT_KINDS)
    assert all(f.kind not in DISK_KINDS for f in generate(7, 200, 2).faults)
    sched = generate(7, 400, 2, DISK_KINDS, gap_s=5)
    seen = {f.kind for f in sched.faults}
    assert seen == set(DISK_KINDS)
    for f in sched.faults:
        assert 0 <= f.params["disk_draw"] < 1 << 16
        if f.kind in ("disk_eio", "disk_slow", "disk_torn"):
            assert 2.0 <= f.params["hold_s"] <= 4.0
        if f.kind == "disk_slow":
            assert 5.0 <= f.params["delay_ms"] <= 40.0
        if f.kind == "disk_bitflip":
            assert 1 <= f.params["flips"] <= 8
    assert generate(7, 400, 2, DISK_KINDS, gap_s=5) == sched  # the same seed, the same faults


def disk_fault(index: int, at: float, ended: float, kind: str = "disk_eio",
               target: str = "node1") -> dict:
    return {"index": index, "kind": kind, "target": target, "started": at - 0.01, "mono": at,
            "disk": 0, "held_s": 3.0, "ended": ended}


@pytest.mark.parametrize("kind, what, budget", [("disk_eio", "disk", 1.0),
                                                ("disk_torn", "disk", 1.0),
                                                ("disk_bitflip", "disk", 1.0),
                                                ("disk_slow", "disk_slow", 2.0)])
def test_a_disk_fault_is_judged_against_its_budget(kind: str, what: str, budget: float) -> None:
    ok = steady("node1", 0, 30, [(10.0, 10.5)]) + steady("node2", 0, 30)
    a = judge(ok, [disk_fault(0, 10.0, 15.0, kind)])
    assert a["ok"], a["violations"]
    mine = [o for o in a["outages"] if o["identity"] == "node1"]
    assert [(o["what"], o["budget_s"]) for o in mine] == [(what, budget)]
    # a stall past the budget while the disk fault lasts fails the run, naming the fault
    bad = steady("node1", 0, 30, [(11.0, 11.0 + budget + 0.5)]) + steady("node2", 0, 30)
    a = judge(bad, [disk_fault(0, 10.0, 15.0, kind)])
    assert not a["ok"]
    v = a["violations"][0]
    assert v["fault"] == {"index": 0, "kind": kind, "target": "node1"} and v["what"] == what
    assert "disk" in av.describe(v)


def test_a_kill_in_a_rebuild_is_judged_like_a_kill() -> None:
    ops = steady("node1", 0, 30, [(10.0, 11.6)]) + steady("node2", 0, 30)
    a = judge(ops, [kill(0, 10.0, 15.0, kind="kill_in_rebuild")])
    assert [v["what"] for v in a["violations"]] == ["kill"]


def test_bit_flips_land_in_allocated_data_blocks_only(tmp_path: Path) -> None:
    path = disk_path(tmp_path, 1, 0)
    size = 4 << 20
    Disk.create(path, 1, 0, size)
    d = Disk.open(path, stamp_epoch(path))
    try:
        for b in (3, 7, 200):
            d.write(b * 4096, bytes([b]) * 4096)
        table = data_blocks_for(size // 4096)
        d.write(table * 4096, b"\x55" * 4096)  # the checksum table area: never a target
        d.sync()
    finally:
        d.close()
    before = path.read_bytes()
    flips = flip_bits(path, random.Random(3), 8)
    after = path.read_bytes()
    assert sorted(f["block"] for f in flips) == [3, 7, 200]  # only the written ones
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    assert len(diff) == 3
    for i, f in zip(sorted(diff), sorted(flips, key=lambda f: f["block"])):
        assert i == HEADER + f["block"] * 4096 + f["bit"] // 8
        assert bin(before[i] ^ after[i]).count("1") == 1
