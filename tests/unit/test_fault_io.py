"""The disk fault layer (storage/fault_io.py): its rule table, the checks of a disk_fault
request, and the faults themselves on real disk files (a Disk opened like a guest opens it)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from storage import fault_io
from storage.disk import HEADER, Disk, disk_path, stamp_epoch
from storage.fault_io import Rule, RuleError, RuleTable, parse_rule


@pytest.fixture(autouse=True)
def empty_table():
    """The process-wide table starts and ends empty: no rule leaks into another test."""
    fault_io.TABLE.clear()
    yield
    fault_io.TABLE.clear()


@pytest.fixture
def disk(tmp_path: Path):
    path = disk_path(tmp_path, 3, 1)
    Disk.create(path, 3, 1, 1 << 20)
    d = Disk.open(path, stamp_epoch(path))
    yield d
    d.close()


def rule(kind: str = "eio", until: float = 100.0, **kw) -> Rule:
    return parse_rule(dict({"kind": kind, "disk": 1, "duration_s": until}, **kw), 3, 4, 0.0)


# -- the request: every field checked ---------------------------------------------------------

@pytest.mark.parametrize("args, what", [
    ({"kind": "boom", "disk": 0, "duration_s": 1}, "kind"),
    ({"kind": None, "disk": 0, "duration_s": 1}, "kind"),
    ({"kind": "eio", "disk": 4, "duration_s": 1}, "disk"),
    ({"kind": "eio", "disk": -1, "duration_s": 1}, "disk"),
    ({"kind": "eio", "disk": "0", "duration_s": 1}, "disk"),
    ({"kind": "eio", "disk": True, "duration_s": 1}, "disk"),
    ({"kind": "eio", "disk": 0}, "duration_s is required"),
    ({"kind": "eio", "disk": 0, "duration_s": 0}, "duration_s"),
    ({"kind": "eio", "disk": 0, "duration_s": 601}, "duration_s"),
    ({"kind": "eio", "disk": 0, "duration_s": float("nan")}, "duration_s"),
    ({"kind": "eio", "disk": 0, "duration_s": "5"}, "duration_s"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "probability": 0}, "probability"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "probability": 1.5}, "probability"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "probability": False}, "probability"),
    ({"kind": "slow", "disk": 0, "duration_s": 1, "delay_ms": 0}, "delay_ms"),
    ({"kind": "slow", "disk": 0, "duration_s": 1, "delay_ms": 2001}, "delay_ms"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "ops": []}, "ops"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "ops": ["erase"]}, "ops"),
    ({"kind": "eio", "disk": 0, "duration_s": 1, "ops": "read"}, "ops"),
    ({"kind": "torn", "disk": 0, "duration_s": 1, "ops": ["read"]}, "torn"),
])
def test_a_bad_request_is_refused_naming_the_field(args: dict, what: str) -> None:
    with pytest.raises(RuleError, match=what):
        parse_rule(args, 1, 4, 0.0)


def test_a_good_request_gives_the_rule_with_its_defaults() -> None:
    r = parse_rule({"kind": "slow", "disk": 3, "duration_s": 2.5}, 2, 4, 10.0)
    assert r == Rule(2, 3, "slow", 1.0, 12.5, 0.02, frozenset(fault_io.OPS))
    torn = parse_rule({"kind": "torn", "disk": 0, "duration_s": 1, "probability": 0.5}, 2, 4, 0.0)
    assert torn is not None and torn.ops == {"write"} and torn.probability == 0.5
    assert parse_rule({"kind": "clear", "disk": -1}, 2, 4, 0.0) is None
    with pytest.raises(RuleError, match="no disks"):
        parse_rule({"kind": "eio", "disk": 0, "duration_s": 1}, 2, 0, 0.0)


# -- the table --------------------------------------------------------------------------------

def test_rules_expire_on_their_own_and_only_hit_their_disk_and_ops() -> None:
    t = RuleTable(seed=1)
    t.add(rule("eio", until=5.0, ops=["write"]), now=0.0)
    assert [r.kind for r in t.fire((3, 1), "write", now=1.0)] == ["eio"]
    assert t.fire((3, 1), "read", now=1.0) == []  # not its op
    assert t.fire((3, 2), "write", now=1.0) == []  # another disk
    assert t.fire((4, 1), "write", now=1.0) == []  # another identity's disk 1
    assert t.fire((3, 1), "write", now=5.0) == []  # expired
    assert t.rules == [] and t.injected["eio"] == 1


def test_a_rule_replaces_its_kind_on_a_disk_and_the_table_is_bounded() -> None:
    t = RuleTable()
    t.add(rule("eio", until=5.0), 0.0)
    t.add(rule("eio", until=9.0), 0.0)
    t.add(rule("slow", until=9.0), 0.0)
    assert sorted((r.kind, r.until) for r in t.rules) == [("eio", 9.0), ("slow", 9.0)]
    # slow is applied before an eio that fires on the same call
    assert [r.kind for r in t.fire((3, 1), "read", 1.0)] == ["slow", "eio"]
    t.clear()
    for d in range(fault_io.MAX_RULES):
        t.add(Rule(1, d, "eio", 1.0, 100.0), 0.0)
    with pytest.raises(RuleError, match="rules are installed"):
        t.add(Rule(2, 0, "eio", 1.0, 100.0), 0.0)
    # expired rules make room
    assert len(t.active(200.0)) == 0
    t.add(Rule(2, 0, "eio", 1.0, 300.0), 200.0)
    assert len(t.rules) == 1


def test_clear_takes_an_identity_and_a_disk_or_all() -> None:
    t = RuleTable()
    for ident, d in ((1, 0), (1, 1), (2, 0)):
        t.add(Rule(ident, d, "eio", 1.0, 100.0), 0.0)
    assert t.clear(1, 1) == 1
    assert t.clear(1, -1) == 1
    assert [(r.identity, r.disk) for r in t.rules] == [(2, 0)]
    assert t.clear() == 1 and t.rules == []


def test_probability_is_honoured_roughly() -> None:
    t = RuleTable(seed=7)
    t.add(Rule(1, 0, "eio", 0.25, 100.0), 0.0)
    hits = sum(bool(t.fire((1, 0), "read", 1.0)) for _ in range(4000))
    assert 800 < hits < 1200


# -- the faults on a real disk file -----------------------------------------------------------

def test_no_rule_means_plain_io(disk: Disk) -> None:
    disk.write(0, b"a" * 4096)
    assert disk.read(0, 4096) == b"a" * 4096
    disk.sync()


def test_eio_fails_reads_writes_and_syncs_of_that_disk_only(disk: Disk, tmp_path: Path) -> None:
    disk.write(0, b"a" * 4096)
    fault_io.TABLE.add(Rule(3, 1, "eio", 1.0, time.monotonic() + 60), time.monotonic())
    for call in (lambda: disk.read(0, 4096), lambda: disk.write(0, b"b" * 4096), disk.sync,
                 lambda: disk.set_applied({1: 5})):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO and "injected" in str(e.value)
    other = disk_path(tmp_path, 3, 2)  # another disk of the same node: untouched
    Disk.create(other, 3, 2, 1 << 20)
    d2 = Disk.open(other, stamp_epoch(other))
    try:
        d2.write(0, b"c" * 4096)
        assert d2.read(0, 4096) == b"c" * 4096
    finally:
        d2.close()
    fault_io.TABLE.clear(3, 1)
    assert disk.read(0, 4096) == b"a" * 4096  # nothing was written while it failed


def test_a_torn_write_stores_whole_sectors_of_a_prefix_then_fails(disk: Disk) -> None:
    disk.write(0, b"o" * 8192)
    fault_io.TABLE.add(Rule(3, 1, "torn", 1.0, time.monotonic() + 60, 0.0,
                            frozenset({"write"})), time.monotonic())
    with pytest.raises(OSError) as e:
        disk.write(0, b"n" * 8192)
    assert e.value.errno == errno.EIO
    fault_io.TABLE.clear()
    got = disk.read(0, 8192)
    assert got == b"n" * 4096 + b"o" * 4096  # the first half, whole sectors
    # A write smaller than two sectors tears to nothing: a sector is never half written.
    fault_io.TABLE.add(Rule(3, 1, "torn", 1.0, time.monotonic() + 60, 0.0,
                            frozenset({"write"})), time.monotonic())
    with pytest.raises(OSError):
        disk.write(100, b"x" * 700)
    fault_io.TABLE.clear()
    assert disk.read(0, 1024) == b"n" * 1024


def test_slow_delays_each_call(disk: Disk) -> None:
    fault_io.TABLE.add(Rule(3, 1, "slow", 1.0, time.monotonic() + 60, 0.05), time.monotonic())
    t = time.monotonic()
    for _ in range(3):
        disk.read(0, 4096)
    assert time.monotonic() - t >= 0.15
    assert fault_io.TABLE.injected["slow"] == 3


def test_a_closed_disk_is_no_longer_a_target(tmp_path: Path) -> None:
    path = disk_path(tmp_path, 3, 1)
    Disk.create(path, 3, 1, 1 << 20)
    d = Disk.open(path, stamp_epoch(path))
    fd = d.fd
    d.close()
    assert fd not in fault_io._keys
    fault_io.TABLE.add(Rule(3, 1, "eio", 1.0, time.monotonic() + 60), time.monotonic())
    other = os.open(path, os.O_RDONLY)  # may reuse the number: must not be faulted
    try:
        assert len(fault_io.pread(other, 16, HEADER)) == 16
    finally:
        os.close(other)
