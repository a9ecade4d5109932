"""The storage OS end to end: volumes, LUNs, snapshots, RAID failures and rebuilds, takeover.

Real clusters (processes, sockets, disk files), small disks so that every aggregate is quick to
format, rebuild and scrub. Management goes through the CLI as a user types it (a subprocess
with VMEMU_DATA_DIR) or through ``Control.call("manage", ...)`` where the CLI has no command.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest

from clients.load import LoadSpec
from clients.verify import verify
from tests.e2e.conftest import LoadRun, events_when, wait_until
from tests.e2e.test_cli import assert_one_line_error, vmemu
from vmemu.config import nbd_address
from vmemu.errors import VmemuError

MiB = 1 << 20
BLOCK = 4096
STORAGE = dict(disk_mb=64, nvram_mb=16, disks=3)  # RAID-4: two data disks and parity
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd belongs to the system interpreter


def cli_json(c, *args):
    p = vmemu(c.dir, *args, "--json", check=True)
    return json.loads(p.stdout)


def manage(c, what: str, **args):
    return c.control.call("manage", dict(args, what=what), timeout=60)


def storage(s, node: str) -> dict:
    """A node's storage figures in a status, {} while its heartbeat has not brought them yet."""
    return s.node(node)["storage"] or {}


def raid_state(s, node: str = "node1") -> str | None:
    return (storage(s, node).get("raid") or {}).get("state")


def raid_of(s, node: str = "node1") -> dict:
    return storage(s, node).get("raid") or {}


def kinds(evs: list[dict]) -> list[str]:
    return [e["kind"] for e in evs]


def raid(c, node: str = "node1") -> dict:
    """The RAID state in status (its figures ride on heartbeats: the first may still lack it)."""
    st = c.wait_for(lambda s: s.node(node)["storage"] is not None, 10, f"{node}'s storage in status")
    return st.node(node)["storage"]["raid"]


def volume_row(rows, owner: str, name: str) -> dict:
    matches = [r for r in rows if r["owner"] == owner and r["name"] == name]
    assert len(matches) == 1, rows
    return matches[0]


def blk(tag: int, i: int) -> bytes:
    return (bytes([tag & 0xFF, i & 0xFF, (i >> 8) & 0xFF]) * (BLOCK // 3 + 1))[:BLOCK]


def load_in_thread(endpoint: str, journal: Path, seconds: float, lun: int = 0) -> LoadRun:
    return LoadRun(endpoint, LoadSpec(duration=seconds, iodepth=16, size=8 * MiB, lun=lun), journal)


def wait_ops(c, node: str, at_least: int, timeout: float = 30) -> None:
    wait_until(lambda: (c.status().node(node)["ops"] or 0) >= at_least, timeout,
               f"{at_least} ops on {node}")


def libnbd_available() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0


NBD_SCRIPT = r"""
import json, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
seen = bytes(h.pread(4096, 0))
h.pwrite(b"N" * 4096, 4096)
h.flush()
print(json.dumps({"size": size, "first": seen.hex()}))
h.shutdown()
"""


# -- volumes, LUNs, snapshots, bad input -------------------------------------------------------

def test_volume_lun_and_snapshot_lifecycle_with_bad_input_refused(make_cluster):
    c = make_cluster(nodes=2, **STORAGE)
    d = c.dir
    p = vmemu(d, "volume", "create", "vol1", "--node", "node1", "--size", "16M", check=True)
    assert "vol1" in p.stdout and "node1" in p.stdout
    p = vmemu(d, "lun", "create", "vol1/data", "--size", "8M", check=True)
    assert "index 2" in p.stdout, p.stdout

    vols = cli_json(c, "volume", "list")
    v1 = volume_row(vols, "node1", "vol1")
    assert v1["served_by"] == "node1" and v1["size"] == 16 * MiB and v1["snapshots"] == []
    assert v1["luns"] == [{"name": "data", "index": 2, "size": 8 * MiB}]
    assert {r["name"] for r in vols if r["owner"] == "node2"} == {"vol0"}  # nothing leaked
    # `lun list` reads status, whose LUNs ride on heartbeats: wait for the new one there.
    c.wait_for(lambda s: any(l[1] == "vol1/data" for l in storage(s, "node1").get("luns") or []),
               10, "the new LUN in status")
    rows = cli_json(c, "lun", "list")
    row = next(r for r in rows if r["identity"] == "node1" and r["path"] == "vol1/data")
    assert row["lun"] == "lun2" and row["size"] == 8 * MiB and row["served_by"] == "node1"
    assert row["uri"].endswith("/lun2")

    # The new LUN by its index, through the block protocol.
    with c.client("node1") as b:
        assert {"lun": 2, "size": 8 * MiB} in b.info()["luns"]
        for i in range(8):
            b.write(2, i * 64 * 1024, blk(0xA0, i))
        b.write(2, 8 * MiB - BLOCK, blk(0xA1, 0))  # its last block
        with pytest.raises(VmemuError, match="past the end"):
            b.write(2, 8 * MiB, blk(0xA2, 0))
        for i in range(8):
            assert b.read(2, i * 64 * 1024, BLOCK) == blk(0xA0, i)
        assert b.read(2, 8 * MiB - BLOCK, BLOCK) == blk(0xA1, 0)
        assert b.read(0, 0, BLOCK) == bytes(BLOCK)  # lun0 of vol0 is another file

    # ... and by its path, through NBD.
    if libnbd_available():
        host, port = nbd_address(c.control.config, 1)
        p = subprocess.run([SYSTEM_PYTHON, "-c", NBD_SCRIPT, f"nbd://{host}:{port}/vol1/data"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["size"] == 8 * MiB and bytes.fromhex(out["first"]) == blk(0xA0, 0)
        with c.client("node1") as b:
            assert b.read(2, BLOCK, BLOCK) == b"N" * BLOCK
    else:
        warnings.warn("python3-libnbd is not installed: the NBD-by-path part was not run")

    # Bad input: one line on stderr, exit code != 0, and nothing changes.
    vmemu(d, "cp", "node1", check=True)  # nothing dirty: 'used' stays put from here on
    before = (cli_json(c, "volume", "list"), cli_json(c, "lun", "list"))
    raid_before = [raid(c, n) for n in ("node1", "node2")]
    bad = [
        (["volume", "create", "vol1", "--node", "node1", "--size", "4M"], "already exists"),
        (["volume", "create", "1bad", "--node", "node1", "--size", "4M"], "invalid volume name"),
        (["volume", "create", "huge", "--node", "node1", "--size", "10G"], "does not fit"),
        (["volume", "create", "vol0", "--node", "node1", "--size", "1M"], "root volume"),
        (["volume", "create", "v2", "--node", "node1", "--size", "banana"], "not a size"),
        (["volume", "create", "v2", "--node", "node1", "--size", "0"], "must be positive"),
        (["volume", "create", "v2", "--node", "node9", "--size", "4M"], "unknown node"),
        (["lun", "create", "nov/x", "--size", "4M"], "no volume 'nov'"),
        (["lun", "create", "vol1/big", "--size", "32M"], "bytes free"),
        (["lun", "create", "vol1/data", "--size", "4M"], "already exists"),
        (["lun", "create", "vol1", "--size", "4M"], "VOLUME/LUN"),
        (["lun", "create", "vol1/x", "--size", "lots"], "not a size"),
        (["disk", "fail", "node1", "d9"], "d0..d2"),
        (["disk", "replace", "node1", "d9"], "d0..d2"),
        (["disk", "fail", "node1", "disk1"], "not a disk name"),
        (["disk", "replace", "node1", "d1"], "only a failed disk"),
        (["snapshot", "delete", "vol1", "nope"], "no snapshot"),
        (["snapshot", "create", "vol1", "bad name"], "invalid snapshot name"),
        (["fsck", "node5"], "unknown node"),
    ]
    for args, needle in bad:
        assert_one_line_error(vmemu(d, *args), needle)
    assert (cli_json(c, "volume", "list"), cli_json(c, "lun", "list")) == before
    assert [raid(c, n) for n in ("node1", "node2")] == raid_before

    # Snapshot: A, snapshot, B. Current reads show B, the snapshot shows A.
    # (vol0 exists on both nodes; a name-routed command reaches the first: node1.)
    A = [blk(0x41, i) for i in range(16)]
    B = [blk(0x42, i) for i in range(16)]
    with c.client("node1") as b:
        for i in range(16):
            b.write(0, i * BLOCK, A[i])
    p = vmemu(d, "snapshot", "create", "vol0", "s1", "--node", "node1", check=True)
    assert "vol0@s1" in p.stdout
    assert_one_line_error(vmemu(d, "snapshot", "create", "vol0", "s1", "--node", "node1"), "already has a snapshot")
    with c.client("node1") as b:
        for i in range(16):
            b.write(0, i * BLOCK, B[i])
        assert b.read(0, 0, 16 * BLOCK) == b"".join(B)
    snap = manage(c, "snapshot_read", node="node1", volume="vol0", name="s1", lun="lun0", offset=0,
                  length=16 * BLOCK)
    assert bytes(snap) == b"".join(A)
    assert [s["name"] for s in cli_json(c, "snapshot", "list", "vol0", "--node", "node1")] == ["s1"]
    assert cli_json(c, "fsck", "node1")["ok"]
    vmemu(d, "cp", "node1", check=True)  # B on disk now; the snapshot still holds A
    snap = manage(c, "snapshot_read", node="node1", volume="vol0", name="s1", lun="lun0", offset=4 * BLOCK,
                  length=BLOCK)
    assert bytes(snap) == A[4]
    assert cli_json(c, "fsck", "node1")["ok"]
    assert volume_row(cli_json(c, "volume", "list"), "node1", "vol0")["snapshots"] == ["s1"]
    assert volume_row(cli_json(c, "volume", "list"), "node2", "vol0")["snapshots"] == []
    vmemu(d, "snapshot", "delete", "vol0", "s1", "--node", "node1", check=True)
    assert cli_json(c, "snapshot", "list", "vol0", "--node", "node1") == []
    with pytest.raises(VmemuError, match="no snapshot"):
        manage(c, "snapshot_read", node="node1", volume="vol0", name="s1", lun="lun0", offset=0, length=BLOCK)
    res = cli_json(c, "fsck", "node1")
    assert res["ok"] and res["errors"] == [] and res["snapshots"] == {}
    with c.client("node1") as b:
        assert b.read(0, 0, 16 * BLOCK) == b"".join(B)
    assert "clean" in vmemu(d, "fsck", "node2", check=True).stdout


# -- RAID: degraded, reconstruction, offline ---------------------------------------------------

def test_disk_failure_and_reconstruction_under_load(make_cluster, tmp_path):
    c = make_cluster(nodes=2, **STORAGE)
    ep = c.endpoint("node1")
    j1, j2 = tmp_path / "degraded.jsonl", tmp_path / "rebuild.jsonl"

    # Phase 1: a disk fails under load.
    load = load_in_thread(ep, j1, 2.5, lun=0)
    wait_ops(c, "node1", 500)
    p = vmemu(c.dir, "disk", "fail", "node1", "d1", check=True)
    assert "degraded" in p.stdout
    st = c.wait_for(lambda s: raid_state(s) == "degraded", 10, "status to show node1 degraded")
    r = storage(st, "node1")["raid"]
    assert [x["state"] for x in r["disks"]] == ["ok", "failed", "ok"]
    s1 = load.finish()
    assert s1["errors"] == 0 and s1["write"]["ops"] > 500
    vmemu(c.dir, "cp", "node1", check=True)  # everything through the degraded group to disk
    res = verify(ep, j1)
    assert res["passed"], res["problems"]
    assert res["ok"] > 500
    assert_one_line_error(vmemu(c.dir, "disk", "fail", "node1", "d1"), "already failed")

    # Phase 2: the replacement is reconstructed in the background while the load goes on.
    load = load_in_thread(ep, j2, 2.5, lun=1)
    wait_ops(c, "node1", s1["write"]["ops"] + 300)
    vmemu(c.dir, "disk", "replace", "node1", "d1", check=True)
    s2 = load.finish()  # it ran into the reconstruction; it need not run to its end
    assert s2["errors"] == 0 and s2["write"]["ops"] > 300
    st = c.wait_for(lambda s: raid_state(s) == "normal", 60,
                    "reconstruction of node1 d1")
    rb = st.node("node1")["storage"]["raid"]["rebuild"]
    assert rb["disk"] == "d1" and rb["done"] == rb["total"] > 0
    for j in (j1, j2):
        res = verify(ep, j)
        assert res["passed"], (j.name, res["problems"])

    # RAID events travel apart from the heartbeats that brought the state "normal".
    evs = events_when(c, lambda evs: "reconstruction_done" in kinds(evs))
    done = [e for e in evs if e["kind"] == "reconstruction_done"]
    assert len(done) == 1 and done[0]["disk"] == "d1" and done[0]["node"] == "node1"
    assert done[0]["rate_mbps"] > 0 and done[0]["total"] == rb["total"]
    order = kinds(evs)
    assert order.index("disk_failed") < order.index("reconstruction_started") < \
        order.index("reconstruction_done")

    vmemu(c.dir, "cp", "node1", check=True)
    res = cli_json(c, "fsck", "node1")
    assert res["ok"], res["errors"]
    p = vmemu(c.dir, "scrub", "node1", check=True, timeout=300)
    assert "unrecoverable []" in p.stdout and "checksum_errors 0" in p.stdout, p.stdout
    assert "parity_mismatches 0" in p.stdout, p.stdout
    # `scrub` returned on the domain's scrub_status; its event comes on its own.
    scrub = [e for e in events_when(c, lambda evs: "scrub_done" in kinds(evs))
             if e["kind"] == "scrub_done"]
    assert scrub and scrub[-1]["checksum_errors"] == 0
    # With d1 rebuilt, losing d0 now must still leave every acknowledged write readable.
    manage(c, "disk_fail", node="node1", disk=0)
    for j in (j1, j2):
        res = verify(ep, j)
        assert res["passed"], (j.name, res["problems"])


def test_a_second_disk_failure_takes_raid4_offline_and_nothing_returns_wrong_data(make_cluster):
    c = make_cluster(nodes=2, **STORAGE)
    data = {i: blk(0x5A, i) for i in range(0, 256, 8)}
    with c.client("node1") as b:
        for i, v in data.items():
            b.write(0, i * BLOCK, v)
    vmemu(c.dir, "cp", "node1", check=True)  # on disk, the cache empty: reads reach RAID
    manage(c, "disk_fail", node="node1", disk=0)
    res = manage(c, "disk_fail", node="node1", disk=1)
    assert res["state"] == "offline"
    st = c.wait_for(lambda s: raid_state(s) == "offline", 10,
                    "status to report node1 offline")
    assert [x["state"] for x in st.node("node1")["storage"]["raid"]["disks"]] == \
        ["failed", "failed", "ok"]
    evs = events_when(c, lambda evs: kinds(evs).count("disk_failed") >= 2)
    assert [e["raid"] for e in evs if e["kind"] == "disk_failed"] == ["degraded", "offline"]

    # Reads fail rather than return garbage, and say why.
    failed = 0
    with c.client("node1") as b:
        for i, v in data.items():
            try:
                got = b.read(0, i * BLOCK, BLOCK)
            except VmemuError as exc:
                assert "offline" in exc.message, exc.message
                failed += 1
            else:
                assert got == v, f"block {i}: wrong data from an offline group"
    assert failed == len(data)

    # Management names the offline group, in one line.
    assert_one_line_error(vmemu(c.dir, "fsck", "node1"), "raid4 group is offline")
    assert_one_line_error(vmemu(c.dir, "scrub", "node1"), "raid4 group is offline")
    assert_one_line_error(vmemu(c.dir, "disk", "replace", "node1", "d0"), "offline")
    # A snapshot would be a CP that leaves this aggregate out: refused, not a false success.
    assert_one_line_error(vmemu(c.dir, "snapshot", "create", "vol0", "late", "--node", "node1"),
                          "offline")
    assert raid(c)["state"] == "offline"
    # The partner's own aggregate is untouched.
    assert raid(c, "node2")["state"] == "normal"
    assert cli_json(c, "fsck", "node2")["ok"]


def test_a_write_to_an_offline_aggregate_is_refused_and_the_domain_survives(make_cluster):
    c = make_cluster(nodes=2, **dict(STORAGE, cp_interval_s=1.0))
    manage(c, "disk_fail", node="node1", disk=0)
    manage(c, "disk_fail", node="node1", disk=1)
    with c.client("node1", give_up_after=10.0) as b:
        with pytest.raises(VmemuError, match="offline"):
            b.write(0, 0, blk(1, 1))
    # Nothing was acknowledged, so the timer CPs have nothing to fail on: the domain lives
    # on through two more CP intervals.
    until = c.status().raw["uptime_s"] + 2.5
    c.wait_for(lambda s: s.raw["uptime_s"] >= until or s.node("node1")["state"] != "serving",
               15, "two more CP intervals")
    assert c.status().node("node1")["state"] == "serving"


def test_raid1_boots_and_survives_a_disk_failure(make_cluster):
    c = make_cluster(nodes=2, disk_mb=64, nvram_mb=16, disks=2, raid="raid1")
    r = raid(c)
    assert r["layout"] == "raid1" and r["state"] == "normal" and len(r["disks"]) == 2
    with c.client("node1") as b:
        for i in range(32):
            b.write(1, i * BLOCK, blk(0x11, i))
    vmemu(c.dir, "cp", "node1", check=True)
    assert "raid1 group is degraded" in vmemu(c.dir, "disk", "fail", "node1", "d0", check=True).stdout
    with c.client("node1") as b:
        for i in range(32):
            assert b.read(1, i * BLOCK, BLOCK) == blk(0x11, i)
        for i in range(32, 48):
            b.write(1, i * BLOCK, blk(0x11, i))
    vmemu(c.dir, "cp", "node1", check=True)
    assert cli_json(c, "fsck", "node1")["ok"]
    vmemu(c.dir, "disk", "replace", "node1", "d0", check=True)
    c.wait_for(lambda s: raid_state(s) == "normal", 30,
               "the raid1 mirror to be rebuilt")
    manage(c, "disk_fail", node="node1", disk=1)  # only the rebuilt copy is left
    with c.client("node1") as b:
        for i in range(48):
            assert b.read(1, i * BLOCK, BLOCK) == blk(0x11, i)
    assert cli_json(c, "fsck", "node1")["ok"]


# -- takeover onto the RAID-backed file system --------------------------------------------------

def test_takeover_replays_onto_the_aggregate_and_double_failure_is_unavailable(make_cluster,
                                                                                 tmp_path):
    c = make_cluster(nodes=2, **STORAGE)
    vmemu(c.dir, "volume", "create", "vol7", "--node", "node1", "--size", "8M", check=True)
    c.wait_for(lambda s: "vol7" in storage(s, "node1").get("volumes", []), 10, "vol7 in status")
    vmemu(c.dir, "lun", "create", "vol7/l", "--size", "4M", check=True)
    with c.client("node1") as b:
        for i in range(16):
            b.write(2, i * BLOCK, blk(0x77, i))
    journal = tmp_path / "w.jsonl"
    load = load_in_thread(c.endpoint("node1"), journal, 3.0)
    wait_ops(c, "node1", 1500)
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover by node2")
    summary = load.finish()
    assert summary["errors"] == 0 and summary["reconnects"] >= 1
    res = verify(c.endpoint("node1"), journal)
    assert res["passed"], res["problems"]
    assert res["ok"] > 1000
    with c.client("node1") as b:
        assert b.info()["served_by"] == "node2"
        for i in range(16):
            assert b.read(2, i * BLOCK, BLOCK) == blk(0x77, i)

    # node1's aggregate, now on node2: replayed writes committed by a CP, fsck clean.
    c.wait_for(lambda s: storage(s, "node1").get("dirty_blocks") == 0, 20,
               "a CP of the replayed writes")
    p = vmemu(c.dir, "fsck", "node1", check=True)
    assert "clean" in p.stdout
    vols = cli_json(c, "volume", "list")
    for name in ("vol0", "vol7"):
        assert volume_row(vols, "node1", name)["served_by"] == "node2"
    assert volume_row(vols, "node2", "vol0")["served_by"] == "node2"
    assert raid(c)["state"] == "normal"
    res = verify(c.endpoint("node1"), journal)  # again, now from the file system on disk
    assert res["passed"], res["problems"]

    # Both nodes down: management of node1's identity is unavailable, in one line.
    c.crash("node2")
    c.wait_for(lambda s: all(n["identity_served_by"] is None for n in s.nodes), 20,
               "both identities unavailable")
    assert_one_line_error(vmemu(c.dir, "fsck", "node1"), "no partner serves its identity")
    assert_one_line_error(vmemu(c.dir, "volume", "create", "v9", "--node", "node1",
                                "--size", "4M"), "is down")
    assert_one_line_error(vmemu(c.dir, "disk", "fail", "node2", "d0"), "is down")
    assert_one_line_error(vmemu(c.dir, "lun", "create", "vol7/m", "--size", "1M"), "vol7")
    assert cli_json(c, "volume", "list") == []


def test_a_volume_is_routable_as_soon_as_it_is_created(make_cluster):
    # A slow heartbeat makes the window wide enough that the outcome does not depend on timing.
    c = make_cluster(nodes=2, disk_mb=64, nvram_mb=16, disks=2, heartbeat_ms=500,
                     heartbeat_misses=20)
    for i in range(3):
        manage(c, "volume_create", node="node2", name=f"r{i}", size=MiB)
        res = manage(c, "lun_create", volume=f"r{i}", name="l", size=BLOCK)
        assert res["path"] == f"r{i}/l"


def test_silent_corruption_is_repaired_from_raid_and_reported(make_cluster):
    """Bit rot under a live file system: reads still return what was written (the block's
    checksum catches it, RAID rebuilds it), the repair is reported, and scrub finds the rest."""
    c = make_cluster(nodes=2, **STORAGE)
    with c.client("node1") as b:
        for i in range(64):
            b.write(0, i * BLOCK, blk(0x5C, i))
    vmemu(c.dir, "cp", "node1", check=True)
    # Flip a byte in every 4 KiB block of d0's data area past the fsinfo blocks, behind the
    # D-module's back (the image is a plain file; the page cache keeps both views coherent).
    img = c.dir / "node1" / "disk0.img"
    size = img.stat().st_size
    with open(img, "r+b") as f:
        for off in range(4096 + 4 * BLOCK, min(size, 4096 + 512 * BLOCK), BLOCK):
            f.seek(off + 100)
            byte = f.read(1)
            f.seek(off + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    with c.client("node1") as b:
        for i in range(64):
            assert b.read(0, i * BLOCK, BLOCK) == blk(0x5C, i), f"block {i}"
    c.wait_for(lambda s: (raid_of(s).get("read_errors") or {}).get("repaired", 0) > 0, 10,
               "the repairs in status")

    def repaired(evs: list[dict]) -> bool:
        return any(e["kind"] == "read_errors" and e.get("repaired", 0) > 0 for e in evs)

    assert repaired(events_when(c, repaired))
    rep = cli_json(c, "fsck", "node1")  # everything the file system reaches verifies again
    assert rep["ok"], rep["errors"]
    p = vmemu(c.dir, "scrub", "node1", check=True)
    assert "unrecoverable []" in p.stdout
