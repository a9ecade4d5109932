"""Disk faults end to end: I/O errors under writes, bit flips in a LUN's data block, and chaos
runs with the disk fault kinds (docs/chaos.md, "Disk faults").

The faults are real: rules of the guest's fault layer at the OS boundary (storage/fault_io.py,
installed through Domain 0 like `vmemu chaos` does) and bits flipped straight into the disk
image files of a running cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.disk import HEADER
from tests.e2e.conftest import events_when
from tests.e2e.test_chaos import SLACK, chaos

pytestmark = pytest.mark.e2e

BLOCK = 4096
STORAGE = dict(disk_mb=32, nvram_mb=16, disks=3)  # RAID-4: two data disks and parity


def manage(c, what: str, **args):
    return c.control.call("manage", dict(args, what=what), timeout=60)


def blk(tag: int, i: int) -> bytes:
    head = f"tag{tag:04x}-block{i:06d}|".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def kinds(evs: list[dict]) -> list[str]:
    return [e["kind"] for e in evs]


def test_an_eio_disk_under_writes_loses_no_acknowledged_write(make_cluster):
    """A data disk of node1 fails every I/O while writes and a CP go on: RAID fails it and
    serves from the others; every acknowledged write reads back, on node1 and, after node1
    is killed, on its partner (which must not trust the failed disk's stale blocks either)."""
    c = make_cluster(nodes=2, **STORAGE)
    with c.client("node1") as b:
        for i in range(64):
            b.write(0, i * BLOCK, blk(1, i))
    manage(c, "cp", node="node1")
    res = manage(c, "disk_fault", node="node1", disk=0, kind="eio", duration_s=30)
    assert [r["kind"] for r in res["rules"]] == ["eio"]
    with c.client("node1") as b:
        for i in range(0, 64, 2):
            b.write(0, i * BLOCK, blk(2, i))
    manage(c, "cp", node="node1")  # written degraded: d0 failed on the first error
    evs = events_when(c, lambda evs: "disk_failed" in kinds(evs))
    failed = [e for e in evs if e["kind"] == "disk_failed"]
    assert failed and failed[0]["cause"] == "io_error" and failed[0]["disk"] == "d0"
    want = {i: blk(2 if i % 2 == 0 else 1, i) for i in range(64)}
    with c.client("node1") as b:
        for i, d in want.items():
            assert b.read(0, i * BLOCK, BLOCK) == d, f"block {i}"
    assert manage(c, "disk_fault", node="node1", disk=-1, kind="clear")["rules"] == []
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30,
               "node2 to take node1 over")
    with c.client("node1") as b:  # served by node2 now, from node1's disks
        for i, d in want.items():
            assert b.read(0, i * BLOCK, BLOCK) == d, f"block {i} after the takeover"
    raid = manage(c, "disk_fault", node="node1", disk=-1, kind="clear")["raid"]
    assert [d["state"] for d in raid["disks"]] == ["failed", "ok", "ok"]


def test_a_bit_flip_in_a_lun_data_block_is_never_read_back(make_cluster):
    """One bit flipped in the very disk block that holds a LUN block: the read returns what
    was written (the block's checksum fails, RAID rebuilds it from parity and rewrites it),
    never the flipped bytes; the repair is reported, and a scrub finds nothing left."""
    c = make_cluster(nodes=2, **STORAGE)
    data = blk(0xB17F, 5)
    with c.client("node1") as b:
        b.write(0, 5 * BLOCK, data)
    manage(c, "cp", node="node1")
    found = []
    for d in range(3):
        raw = (c.dir / "node1" / f"disk{d}.img").read_bytes()
        at = raw.find(data, HEADER)
        if at >= 0:
            found.append((d, at))
    assert len(found) == 1, found  # one copy: on a data disk (parity holds an XOR)
    d, at = found[0]
    with open(c.dir / "node1" / f"disk{d}.img", "r+b") as f:
        f.seek(at + 1234)
        byte = f.read(1)[0]
        f.seek(at + 1234)
        f.write(bytes([byte ^ 0x10]))
    with c.client("node1") as b:
        assert b.read(0, 5 * BLOCK, BLOCK) == data

    def repaired(evs: list[dict]) -> bool:
        return any(e["kind"] == "read_errors" and e.get("repaired", 0) > 0 for e in evs)

    assert repaired(events_when(c, repaired))
    assert (c.dir / "node1" / f"disk{d}.img").read_bytes()[at:at + BLOCK] == data  # rewritten
    manage(c, "scrub", node="node1")
    evs = events_when(c, lambda evs: "scrub_done" in kinds(evs), timeout=60)
    scrub = [e for e in evs if e["kind"] == "scrub_done"]
    assert scrub and scrub[-1]["unrecoverable"] == [] and scrub[-1]["checksum_errors"] == 0


def test_a_bad_disk_fault_request_is_refused_and_changes_nothing(make_cluster):
    c = make_cluster(nodes=2, **STORAGE)
    from vmemu.errors import VmemuError

    for args in ({"disk": 3, "kind": "eio", "duration_s": 1},
                 {"disk": 0, "kind": "melt", "duration_s": 1},
                 {"disk": 0, "kind": "eio", "duration_s": 1e9},
                 {"disk": 0, "kind": "slow", "duration_s": 1, "delay_ms": -4},
                 {"disk": 0, "kind": "eio", "duration_s": 1, "probability": "all"}):
        with pytest.raises(VmemuError) as e:
            manage(c, "disk_fault", node="node1", **args)
        assert e.value.code == "bad_request" and "disk_fault" in e.value.message
    assert manage(c, "disk_fault", node="node1", disk=-1, kind="clear")["rules"] == []
    with c.client("node1") as b:  # and the node still serves
        b.write(0, 0, blk(3, 0))
        assert b.read(0, 0, BLOCK) == blk(3, 0)


def _run(tmp_path: Path, seed: int, duration: str, faults: str) -> dict:
    p = chaos(tmp_path, "--seed", str(seed), "--duration", duration, "--availability-slack",
              SLACK, "--faults", faults, "--json", "--out", "runs")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.mark.parametrize("seed, kind", [(1, "disk_eio"), (10, "disk_bitflip")])
def test_a_chaos_run_with_disk_faults_is_linearizable_and_heals(tmp_path, seed, kind):
    """Seed 1 draws I/O errors on every call to a disk of node2, seed 10 four bit flips in a
    disk of node2: each run is valid, the healing replaced the failed disk (and rebuilt it) or
    scrubbed the flipped bits away, and the fault is on the availability clock."""
    res = _run(tmp_path, seed, "8s", "disk_eio,disk_slow,disk_torn,disk_bitflip")
    assert res["valid"] is True and res["faults"] == {kind: 1}, res
    assert res["ops"]["ok"] > 100 and res["availability_ok"] is True
    f = json.loads((tmp_path / "runs" / f"seed-{seed}" / "faults.jsonl").read_text()
                   .splitlines()[0])
    assert {o["what"] for o in res["outages"]} == {"disk"}
    if kind == "disk_eio":
        assert f["disks"]["replaced"] == [f"node2/d{f['disk']}"]
    else:
        scrub = f["disks"]["scrubs"]["node2"]
        # every flipped block was caught: by a client's read (repaired then) or by the scrub
        assert scrub["unrecoverable"] == [] and scrub["checksum_errors"] <= len(f["flips"])


def test_a_kill_during_a_rebuild_is_linearizable_and_the_rebuild_completes(tmp_path):
    """kill -9 of the guest at `reconstruction_started`: its partner serves the identity and
    rebuilds again (the rebuild is in aggr.json), the healing waits for every rebuild and a
    clean scrub, and no acknowledged write is lost."""
    res = _run(tmp_path, 5, "8s", "kill_in_rebuild")
    assert res["valid"] is True and res["faults"] == {"kill_in_rebuild": 1}, res
    run = tmp_path / "runs" / "seed-5"
    f = json.loads((run / "faults.jsonl").read_text().splitlines()[0])
    assert f["trigger"] == "reconstruction_started" and f["killed"] == ["node1"]
    assert f["disks"]["scrubs"]["node1"]["unrecoverable"] == []
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["kind"] == "reconstruction_done" and e["identity"] == 1]
    assert done and done[-1]["mono"] > f["mono"]  # finished after the kill, by someone
