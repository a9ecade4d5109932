"""A partner replaying corrupt NVRAM, and opening corrupt disks: the D-module goes on.

Same set-up as test_dmodule (real memfd regions, real disk images): node1 writes, dies; its
region is damaged as a bug in node1 could have done it (through node1's own writable
mapping); node2 replays it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from storage import nvlog_check
from storage import nvlog_format as F
from storage.disk import HEADER, disk_path
from tests.unit.conftest import Fds
from tests.unit.test_dmodule import (R1, R2, R3, Model, Node, assert_reads, data_dir,
                                     fence, random_writes)
from vmemu.errors import CorruptDisk

__all__ = ["data_dir"]  # the fixture, imported for this module's tests


def record_at(node: Node, seq: int) -> int:
    """Region offset of the record with sequence number `seq` in node's region."""
    for s in nvlog_check.read_region(node.buf).logs:
        rows = s.index[: s.count]
        hit = rows[rows[:, F.IDX_SEQ] == seq]
        if hit.shape[0]:
            return s.area.start + int(hit[0, F.IDX_POS])
    raise AssertionError(f"no record {seq}")


def events(node: Node, kind: str) -> list[dict]:
    return [e[1] for e in node.events if e[0] == kind]


def test_a_corrupt_region_header_is_quarantined_and_the_rest_of_the_chain_replays(
        fds: Fds, data_dir: Path) -> None:
    # node1 writes and dies; node2 takes over, writes more, dies; node3 (node1 again) replays
    # the chain [R1, R2] -- with R1's header hit.
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    model = Model()
    random_writes(model, a.d, 1, 10, seed=1)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    b.d.replay_chain(served, [(R1, a.read_only_view(), 1)])
    later = random_writes(model, b.d, 1, 12, seed=2, first_request=500)
    a.buf[0:8] = b"garbage!"  # node1's bug
    c = Node(fds, data_dir, 1, R3)
    served = c.d.open_identity(1, fence(data_dir, 1), "recovery")
    rep = c.d.replay_chain(served, [(R1, a.read_only_view(), 1), (R2, b.read_only_view(), 2)])
    assert rep["regions"] == 2 and rep["quarantined"] == 1 and rep["lost_records"] == 10
    assert rep["records"] == len(later)  # R2 replayed in full
    # node2's replay of R1 had put node1's writes on the disks already (not yet marked):
    # nothing is lost in this run, but the quarantine cannot know, and says "up to".
    assert_reads(c.d, 1, model)
    (ev,) = events(c, "nvram_region_quarantined")
    assert ev["region"] == R1 and ev["owner"] == "node1" and ev["identity"] == 1
    assert "bad magic" in ev["reason"] and ev["data_loss"] and ev["lost_seq"] == [1, 10]
    assert ev["estimate"] and "up to 10" in ev["message"]
    assert "LOST" in ev["message"]
    assert R1 not in served.replayed and served.replayed[R2] > 0  # R1 is not marked as held


def test_a_corrupt_record_mid_log_stops_that_log_and_reports_what_is_lost(
        fds: Fds, data_dir: Path) -> None:
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    writes = []
    for k in range(20):
        data = bytes([k + 1]) * 4096
        seq = a.d.write(1, 0, k * 4096, data, 77, k + 1)
        writes.append((seq, k * 4096, data))
    bad_seq = writes[12][0]
    pos = record_at(a, bad_seq)
    a.buf[pos + F.RECORD_HEADER + 100] ^= 0x01  # one bit of the 13th write's payload
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view(), 1)])
    assert rep["corrupt_records"] == 1 and rep["lost_records"] == 7
    for seq, off, data in writes[:12]:  # everything before the bad record is served
        assert b.d.read(1, 0, off, 4096) == data
    for seq, off, data in writes[12:]:  # the bad one and what follows are not applied
        assert b.d.read(1, 0, off, 4096) == bytes(4096)
    (ev,) = events(b, "nvlog_corrupt_record")
    assert ev["region_offset"] == pos and ev["expected_seq"] == bad_seq
    assert ev["why"] == "checksum mismatch" and ev["verified_after"] == 7
    assert ev["lost_seq"] == [bad_seq + 1, writes[-1][0]] and ev["unverifiable_records"] == 1
    (lun,) = ev["lost_luns"]
    assert lun["lun"] == "node1/lun0" and lun["extents"] == [[13 * 4096, 7 * 4096]]


def test_a_forged_exactly_once_table_record_does_not_stop_the_replay(
        fds: Fds, data_dir: Path) -> None:
    """A table record that verifies but whose payload is not whole (client, request) pairs,
    or is an lz4 block that does not decompress: skipped, counted bad."""
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    a.d.log.append(F.DEDUP_LUN, 0, b"\x01" * 13, flags=F.FLAG_DEDUP)  # not whole pairs
    a.d.log.active.append_stored(F.DEDUP_LUN, 0, b"\xff" * 40, 4000,
                                 flags=F.FLAG_DEDUP | F.FLAG_LZ4)  # does not decompress
    model = Model()
    random_writes(model, a.d, 1, 5, seed=9)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view(), 1)])
    assert rep["bad"] == 1 and rep["records"] == 5
    assert_reads(b.d, 1, model)


@pytest.mark.parametrize("damage,reason", [
    (lambda f: f.write(b"NOTADISK"), "bad magic"),
    (lambda f: (f.seek(12), f.write(struct.pack("<I", 2))), "header says node2"),
    (lambda f: (f.seek(40), f.write(struct.pack("<I", 9) + b"\xc1" * 9)), "applied map"),
    (lambda f: f.truncate(HEADER + 100), "truncated"),
])
def test_a_corrupt_disk_header_refuses_the_identity_with_the_file_named(
        fds: Fds, data_dir: Path, damage, reason: str) -> None:
    b = Node(fds, data_dir, 2, R2)
    b.d.open_identity(2, fence(data_dir, 2), "boot")
    with open(disk_path(data_dir, 1, 1), "r+b") as f:
        damage(f)
    with pytest.raises(CorruptDisk, match=reason) as err:
        b.d.open_identity(1, 0, "takeover")
    assert "disk1.img" in err.value.message
    assert 1 not in b.d.served and 2 in b.d.served  # it still serves what it served
    (ev,) = events(b, "disk_corrupt")
    assert ev["identity"] == 1 and reason.split()[0] in ev["reason"]
    b.d.write(2, 0, 0, b"x" * 512, 5, 1)
    assert b.d.read(2, 0, 0, 512) == b"x" * 512


def test_the_clean_replay_path_reports_nothing(fds: Fds, data_dir: Path) -> None:
    a = Node(fds, data_dir, 1, R1)
    a.d.open_identity(1, fence(data_dir, 1), "boot")
    model = Model()
    random_writes(model, a.d, 1, 30, seed=4)
    b = Node(fds, data_dir, 2, R2)
    served = b.d.open_identity(1, fence(data_dir, 1), "takeover")
    rep = b.d.replay_chain(served, [(R1, a.read_only_view(), 1)])
    assert (rep["quarantined"], rep["corrupt_records"], rep["lost_records"]) == (0, 0, 0)
    assert not [e for e in b.events if e[0] in ("nvram_region_quarantined",
                                                "nvlog_corrupt_record")]
    assert_reads(b.d, 1, model)
