"""Corrupt NVRAM and a corrupt disk header on a live cluster: loud, survived, never a loop.

How the test corrupts node1's NVRAM: it stops node1 (SIGSTOP: no CP can run) and writes
into node1's *own* writable mapping of its region through /proc/<pid>/mem, as a bug in
node1 itself would; then it has Domain 0 kill node1. This needs no vmemu interface: the fd
broker hands a test nothing writable, and a probe op that writes regions would be an attack
surface in every build. It needs ptrace rights over node1 (root, or the same user with
yama's ptrace_scope 0); without them the test is skipped, saying so.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from storage import nvlog_check
from storage import nvlog_format as F
from tests.e2e.conftest import wait_until


def own_region(pid: int, node: int) -> tuple[int, int]:
    """(address, size) of node's own read-write mapping of its NVRAM region."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if parts[1] == "rw-s" and f"/memfd:vmemu-nvram-node{node} " in line:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                return lo, hi - lo
    raise AssertionError(f"no writable NVRAM mapping in node{node} (pid {pid})")


def mem_fd(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDWR)
    except PermissionError as exc:
        pytest.skip(f"no ptrace rights over the guest to corrupt its NVRAM: {exc}")


def block(i: int) -> bytes:
    return (f"write {i:04d} ".encode() * 400)[:4096]


def write_blocks(c, first: int, n: int) -> None:
    with c.client("node1") as b:
        for i in range(first, first + n):
            b.write(0, i * 4096, block(i))


def kinds_after(c, t0: float, kind: str) -> list[dict]:
    return [e for e in c.events() if e["kind"] == kind and e["mono"] >= t0]


def test_corrupt_nvram_and_disk_header_are_reported_and_survived(make_cluster):
    # No CP by timer while node1's writes sit in its log; a hang is not declared for 5 s, so
    # stopping node1 to corrupt it does not race the heartbeat.
    c = make_cluster(nodes=2, cp_interval_s=600.0, heartbeat_misses=100)
    c.wait_for(lambda s: all(n["takeover_possible"] for n in s.nodes), 30, "partners ready")
    node2_pid = c.status().node("node2")["pid"]

    # -- a corrupt record in the middle of node1's log -------------------------------------------
    write_blocks(c, 0, 40)  # acknowledged: in node1's NVLog only
    pid1 = c.status().node("node1")["pid"]
    os.kill(pid1, signal.SIGSTOP)
    addr, size = own_region(pid1, 1)
    fd = mem_fd(pid1)
    try:
        region = os.pread(fd, size, addr)
        read = nvlog_check.read_region(region, 1)
        assert read.problems == []
        (log,) = [s for s in read.logs if s.count]
        rows = log.index[: log.count]
        mine = rows[rows[:, F.IDX_LUN] == F.lun_gid(1, 0)]
        assert mine.shape[0] == 40
        victim = mine[20]  # the 21st write
        offset = log.area.start + int(victim[F.IDX_POS])
        os.pwrite(fd, bytes([region[offset + F.RECORD_HEADER + 7] ^ 0x10]),
                  addr + offset + F.RECORD_HEADER + 7)
    finally:
        os.close(fd)
    t0 = time.monotonic()
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 60, "takeover")
    (ev,) = kinds_after(c, t0, "nvlog_corrupt_record")
    assert ev["node"] == "node2" and ev["identity"] == 1 and ev["owner"] == "node1"
    assert ev["region_offset"] == offset and ev["why"] == "checksum mismatch"
    assert ev["expected_seq"] == int(victim[F.IDX_SEQ])
    assert ev["verified_after"] == 19 and ev["data_loss"] and ev["lost_records"] == 19
    assert ev["lost_seq"] == [int(mine[21, F.IDX_SEQ]), int(mine[39, F.IDX_SEQ])]
    (lun,) = ev["lost_luns"]
    assert lun["lun"] == "node1/lun0" and lun["extents"] == [[21 * 4096, 19 * 4096]]
    assert "LOST" in ev["message"]
    done = [e for e in kinds_after(c, t0, "replay_done") if e["identity"] == "node1"]
    assert done[-1]["corrupt_records"] == 1 and done[-1]["lost_records"] == 19
    st = c.status()
    assert st.node("node2")["pid"] == node2_pid and st.node("node2")["state"] == "serving"
    (row,) = st.raw["nvram"]["corrupt_records"]
    assert row["owner"] == "node1" and row["position"] == int(victim[F.IDX_POS])
    assert st.raw["nvram"]["corruption"]["lost_records"] == 19
    wait_until(lambda: c.status().raw["nvram"]["corrupt_records"][0].get("copy") is not None,
               20, "the region's copy in quarantine/")
    copy = c.status().raw["nvram"]["corrupt_records"][0]["copy"]
    with open(copy, "rb") as f:
        f.seek(offset)
        assert f.read(F.RECORD_HEADER) == region[offset:offset + F.RECORD_HEADER]
    with c.client("node1") as b:  # served by node2: everything before the bad record
        for i in range(20):
            assert b.read(0, i * 4096, 4096) == block(i), i
        for i in range(20, 40):  # the bad one and what follows: lost, and said so
            assert b.read(0, i * 4096, 4096) != block(i), i

    # -- a corrupt region header: the assign goes on, it does not loop ----------------------------
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", 120, "node1 back")
    c.giveback("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1"
               and s.node("node2")["takeover_possible"] and s.node("node1")["takeover_possible"],
               60, "giveback")
    # The giveback's replay is made durable by a CP; wait for it, so that the writes below
    # are in node1's NVLog only.
    c.wait_for(lambda s: (s.node("node1")["cp_count"] or 0) >= 1, 30, "node1's first CP")
    write_blocks(c, 100, 10)
    pid1 = c.status().node("node1")["pid"]
    os.kill(pid1, signal.SIGSTOP)
    addr, _ = own_region(pid1, 1)
    fd = mem_fd(pid1)
    try:
        os.pwrite(fd, b"NOTNVRAM", addr)  # the magic
    finally:
        os.close(fd)
    t1 = time.monotonic()
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 60, "takeover")
    (q,) = kinds_after(c, t1, "nvram_region_quarantined")
    assert q["node"] == "node2" and q["owner"] == "node1" and "bad magic" in q["reason"]
    assert q["half"] is None and q["data_loss"] and q["lost_records"] >= 10
    assert kinds_after(c, t1, "assign_failed") == []
    st = c.status()
    assert st.node("node2")["pid"] == node2_pid
    (qrow,) = st.raw["nvram"]["quarantined"]
    assert qrow["owner"] == "node1" and qrow["reported_by"] == "node2" and qrow["when"]
    with c.client("node1") as b:  # node1's last writes were in that region: lost, and said so
        assert all(b.read(0, i * 4096, 4096) != block(i) for i in range(100, 110))

    # -- a corrupt disk header: refused with the file named, retried later and later ------------
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", 120, "node1 back")
    disk = c.dir / "node1" / "disk0.img"
    with open(disk, "r+b") as f:
        good = f.read(8)
        f.seek(0)
        f.write(b"GARBAGE!")
    t2 = time.monotonic()
    c.giveback("node1")  # node2 lets go; the hypervisor's stamp refuses the disk
    c.wait_for(lambda s: (s.node("node1")["assign_backoff"] or {}).get("failures", 0) >= 4, 30,
               "failed assigns")
    bo = c.status().node("node1")["assign_backoff"]
    assert "disk0.img" in bo["error"] and "bad magic" in bo["error"]
    failed = kinds_after(c, t2, "assign_failed")
    gaps = [b["mono"] - a["mono"] for a, b in zip(failed, failed[1:])]
    assert [f["retry_in_s"] for f in failed[:4]] == [1.0, 1.0, 1.0, 2.0]
    assert all(g >= 0.9 for g in gaps)  # not a loop
    assert any(e["kind"] == "disk_corrupt" and e["mono"] >= t2 for e in c.events())
    assert c.status().node("node2")["pid"] == node2_pid  # nobody died of it
    with open(disk, "r+b") as f:
        f.write(good)  # a human repairs it: the next retry serves the identity
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 60, "served again")
    assert c.status().node("node1")["assign_backoff"] is None
    with c.client("node1") as b:
        assert b.read(0, 0, 4096) == block(0)
