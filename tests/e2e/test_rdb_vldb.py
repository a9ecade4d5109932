"""The management database and the VLDB on a live cluster: any endpoint serves any volume,
management keeps working with a node down, and a returning node's replica catches up."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import os

from tests.e2e.conftest import BOOT_S, wait_until

MiB = 1 << 20
BLOCK = 4096


def vmemu(c, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMEMU_DATA_DIR=str(c.dir))
    return subprocess.run([sys.executable, "-m", "vmemu.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def replica_volumes(c, node: str) -> dict[str, str]:
    """What a node's own replica (SQLite, on its disk) says: volume -> owner."""
    db = sqlite3.connect(f"file:{c.dir / node / 'rdb.sqlite'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT name, owner_node FROM volumes").fetchall())
    finally:
        db.close()


def caught_up(rdb: dict, node: str) -> bool:
    """The driver counts `node` for commit, at the committed seq."""
    st = rdb["nodes"][node]
    return bool(st["caught_up"]) and st["last_seq"] == rdb["committed_seq"]


def test_any_endpoint_serves_any_volume_through_the_vldb(make_cluster):
    c = make_cluster(nodes=2, disk_mb=64)
    assert vmemu(c, "volume", "create", "vol1", "--node", "node1", "--size", "16M").returncode == 0
    assert vmemu(c, "lun", "create", "vol1/data", "--size", "4M").returncode == 0
    data = bytes(range(256)) * 16
    # Written through node2's endpoint: the N-module there finds vol1 on node1 and forwards.
    with c.client("node2") as b:
        b.write_path("vol1/data", 8 * BLOCK, data)
        assert b.read_path("vol1/data", 8 * BLOCK, BLOCK) == data
    # Read back through node1's own endpoint, by path and by index: it really is there.
    def luns(s):
        return (s.node("node1").get("storage") or {}).get("luns") or []

    c.wait_for(lambda s: any(l[1] == "vol1/data" for l in luns(s)), 10, "the LUN in status")
    with c.client("node1") as a:
        lun = next(l for l in luns(c.status()) if l[1] == "vol1/data")
        assert a.read(lun[0], 8 * BLOCK, BLOCK) == data
        assert a.read_path("vol1/data", 8 * BLOCK, BLOCK) == data
    # Every replica agrees on the VLDB.
    assert replica_volumes(c, "node1") == replica_volumes(c, "node2") == {"vol1": "node1"}
    # A path on an unknown volume is a clear error, and the domains stay up.
    with c.client("node2", give_up_after=10) as b:
        try:
            b.read_path("nosuch/x", 0, BLOCK)
            raise AssertionError("a read of an unknown volume succeeded")
        except Exception as exc:  # noqa: BLE001 - the typed error text is what matters
            assert "nosuch" in str(exc)
        assert b.read_path("vol1/data", 8 * BLOCK, BLOCK) == data

    # After node1 dies, node2 serves its identity: the same path still works from node2.
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover")
    with c.client("node2") as b:
        assert b.read_path("vol1/data", 8 * BLOCK, BLOCK) == data


def test_management_works_with_a_node_down_and_the_replica_catches_up(make_cluster):
    c = make_cluster(nodes=2, disk_mb=64)
    assert vmemu(c, "volume", "create", "a1", "--node", "node1", "--size", "8M").returncode == 0
    c.crash("node2")
    c.wait_for(lambda s: s.node("node2")["identity_served_by"] == "node1", 20, "takeover")
    # node2 is down: volumes can still be made, on node1 and on node2's identity (served by
    # its partner), and the RDB commits them on the live replica.
    p = vmemu(c, "volume", "create", "b2", "--node", "node2", "--size", "8M")
    assert p.returncode == 0, p.stderr
    assert vmemu(c, "lun", "create", "b2/l0", "--size", "1M").returncode == 0
    assert replica_volumes(c, "node1") == {"a1": "node1", "b2": "node2"}
    assert replica_volumes(c, "node2") == {"a1": "node1"}  # down: behind
    c.restart("node2")
    c.wait_for(lambda s: s.node("node2")["state"] in ("up", "serving"), BOOT_S, "node2 to boot")
    wait_until(lambda: replica_volumes(c, "node2") == {"a1": "node1", "b2": "node2"}, 30,
               "node2's replica to catch up")
    # The replica's file holds the entries before the driver hears the apply's reply and marks
    # it caught up (and commits at the next idle turn): poll the driver's view for that.
    c.wait_for(lambda s: caught_up(s.raw["rdb"], "node2"), 30,
               "the RDB driver to count node2's replica as caught up")
    # The volume made while node2 was down is node2's and served on its aggregate.
    c.giveback("node2")
    c.wait_for(lambda s: s.node("node2")["identity_served_by"] == "node2", 30, "giveback")
    p = vmemu(c, "volume", "list", "--json")
    assert p.returncode == 0
    assert '"b2"' in p.stdout
    # A clash is refused by the RDB and changes nothing anywhere.
    p = vmemu(c, "volume", "create", "b2", "--node", "node1", "--size", "8M")
    assert p.returncode != 0 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert replica_volumes(c, "node1") == replica_volumes(c, "node2") == {"a1": "node1", "b2": "node2"}
