"""Disk faults at the OS boundary (storage/fault_io.py) under the aggregate on real disk files:
an I/O error or a torn write fails the member, the group serves from the others, nothing
acknowledged is lost, and a restart (or a partner's takeover) never trusts the member again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from storage import fault_io
from storage.fault_io import Rule
from storage.raid import MemberState
from tests.unit.test_aggregate import agg, aggr_state, commit_blocks, pattern  # noqa: F401

ALL = frozenset(fault_io.OPS)


@pytest.fixture(autouse=True)
def empty_table():
    fault_io.TABLE.clear()
    yield
    fault_io.TABLE.clear()


def fault(kind: str, disk: int, ops: frozenset[str] = ALL, p: float = 1.0) -> None:
    fault_io.TABLE.add(Rule(1, disk, kind, p, time.monotonic() + 60, 0.0, ops), time.monotonic())


@pytest.mark.parametrize("kind, ops", [("eio", ALL), ("eio", frozenset({"sync"})),
                                       ("torn", frozenset({"write"}))])
def test_a_failing_disk_under_a_commit_degrades_and_survives_a_restart(
        agg, tmp_path: Path, kind: str, ops: frozenset[str]) -> None:  # noqa: F811
    h = agg()
    a = h.open()
    old = {b: pattern(b) for b in range(0, 96)}
    commit_blocks(a, 0, old)
    fault(kind, 0, ops)
    new = {b: pattern(b + 1000) for b in range(0, 96, 2)}
    commit_blocks(a, 0, new)  # the commit goes through, degraded
    assert a.group.state[0] is MemberState.FAILED
    assert aggr_state(tmp_path)["failed"] == [0]  # recorded before the root that needs it
    assert [f["disk"] for f in a.take_failures()] == ["d0"]
    want = {**old, **new}
    for b, d in want.items():
        assert a.read_committed(0, b, 1) == d
    fault_io.TABLE.clear()
    # A restart, or the partner taking over: the member missed the commit's writes, and its
    # stale blocks still match their own checksums; it must stay out until it is rebuilt.
    a = h.reopen(a)
    assert a.group.state[0] is MemberState.FAILED
    for b, d in want.items():
        assert a.read_committed(0, b, 1) == d
    assert a.fsck()["ok"]
    a.replace_disk(0, a.disks[1].epoch)
    while a.rebuilding():
        a.rebuild_step(4096)
    assert a.raid_status()["state"] == "normal"
    a = h.reopen(a)
    for b, d in want.items():
        assert a.read_committed(0, b, 1) == d
    assert a.scrub()["unrecoverable"] == []


def test_a_read_error_is_served_from_parity(agg) -> None:  # noqa: F811
    h = agg()
    a = h.open()
    blocks = {b: pattern(b + 7) for b in range(64)}
    commit_blocks(a, 1, blocks)
    fault("eio", 0, frozenset({"read"}))  # a data disk (d2 is parity)
    for b, d in blocks.items():
        assert a.read_committed(1, b, 1) == d
    assert a.raid_status()["state"] == "degraded"


def test_a_header_write_error_fails_the_member_not_the_commit(agg, tmp_path: Path) -> None:  # noqa: F811
    h = agg()
    a = h.open()
    commit_blocks(a, 0, {0: pattern(1)})
    fault("eio", 1, frozenset({"sync"}))  # the data syncs fail first, then its header's
    a.set_applied({5: 9})
    assert a.group.state[1] is MemberState.FAILED
    assert a.applied() == {5: 9}
    assert aggr_state(tmp_path)["failed"] == [1]


def test_two_failing_disks_take_raid4_offline_and_the_commit_fails(agg) -> None:  # noqa: F811
    from storage.raid import RaidOffline

    h = agg()
    a = h.open()
    blocks = {b: pattern(b) for b in range(16)}
    commit_blocks(a, 0, blocks)
    fault("eio", 0)
    fault("eio", 1)
    with pytest.raises(RaidOffline):
        commit_blocks(a, 0, {b: pattern(b + 9) for b in range(16)})
    assert a.unusable() is not None
