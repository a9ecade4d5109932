"""--nvram-placement mediator on real processes: a third domain allocates every NVRAM region,
Domain 0 hands it to its owner read-write and to the partner read-only, and everything else
(takeover replay, restart with a fresh region, giveback) works as with own placement."""

from __future__ import annotations

import os
import signal

import pytest

from clients.verify import verify
from tests.e2e.conftest import BOOT_S, alive, events_when, served_by, wait_until
from tests.e2e.test_failover import load_in_thread, wait_ops


def mediator_of(c) -> dict:  # type: ignore[no-untyped-def]
    return c.status().raw["nvram"]["mediator"]


def allocated(c) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in c.events() if e["kind"] == "region_allocated"]


def shm_entries(cluster_id: str) -> set[str]:
    """What vmemu could have left in /dev/shm (other tests' entries are not ours to judge)."""
    return {e for e in os.listdir("/dev/shm") if "vmemu" in e or cluster_id in e}


def test_mediator_allocates_every_region_and_the_partner_cannot_write(make_cluster):
    c = make_cluster(nodes=2, nvram_placement="mediator")
    s = c.status()
    assert s.raw["config"]["nvram_placement"] == "mediator"
    med = s.raw["nvram"]["mediator"]
    assert med["alive"] and alive(med["pid"])
    with open(f"/proc/{med['pid']}/cmdline", "rb") as f:
        assert b"domains.mediator" in f.read()
    # Each guest's region was made by the mediator, for that guest, and is the one it uses.
    evs = allocated(c)
    assert {e["owner"] for e in evs} == {"node1", "node2"}
    assert all(e["node"] == "mediator" and e["mediator_pid"] == med["pid"] for e in evs)
    for name in ("node1", "node2"):
        assert s.node(name)["region"] in {e["region"] for e in evs if e["owner"] == name}
    rows = {r["region"]: r for r in s.raw["nvram"]["regions"]}
    assert {rows[s.node(n)["region"]]["owner"] for n in ("node1", "node2")} == {"node1", "node2"}
    assert all(r["allocator"] == "mediator" and r["sealed"] for r in rows.values())
    assert all(g["mode"] == "ro" for g in s.raw["grants"])
    # The partner's descriptor is read-only and the region sealed: the kernel refuses each write.
    res = c.control.call("probe", {"node": "node2", "what": "write_partner"})
    assert res["grant_mode"] == "ro"
    assert res["mmap_read_write"] in ("EACCES", "EPERM")
    assert res["pwrite"] == "EBADF"
    assert res["reopen_read_write_and_pwrite"] == "EPERM"
    with c.client("node1") as b:
        b.write(0, 0, b"m" * 4096)
        assert b.read(0, 0, 4096) == b"m" * 4096
    pids = [n["pid"] for n in s.nodes] + [med["pid"], c.proc.pid]
    c.stop()
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every process, mediator included")
    assert not shm_entries(c.cfg.cluster_id)  # memfds only: nothing was ever named in /dev/shm


def test_the_mediator_dies_with_the_hypervisor(make_cluster):
    c = make_cluster(nodes=2, nvram_placement="mediator")
    s = c.status()
    pids = [n["pid"] for n in s.nodes] + [s.raw["nvram"]["mediator"]["pid"]]
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(10)
    c.ctl.close()  # nobody to ask for a clean stop any more
    c.ctl = None
    wait_until(lambda: not any(alive(p) for p in pids), 10, "guests and mediator to die with Domain 0")
    assert not shm_entries(c.cfg.cluster_id)


@pytest.mark.parametrize("ha_mode", ["shm", "mirror"])
def test_kill9_under_load_then_restart_and_giveback(make_cluster, tmp_path, ha_mode):
    c = make_cluster(nodes=2, nvram_placement="mediator", ha_mode=ha_mode)
    c.wait_for(lambda s: all(n["takeover_possible"] for n in s.nodes), 20, "partners ready")
    first = c.status().node("node1")["region"]
    journal = tmp_path / "w.jsonl"
    load = load_in_thread(c.endpoint("node1"), journal, 4.0)
    wait_ops(c, "node1", 2000, timeout=60)
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover by node2")
    summary = load.finish(60)
    assert summary["errors"] == 0 and summary["reconnects"] >= 1
    res = verify(c.endpoint("node1"), journal)
    assert res["passed"], res["problems"]
    assert res["ok"] > 1000
    # shm: node2 replayed node1's mediator-allocated region through its read-only mapping;
    # mirror: from its own copy of that region, received write by write.
    replay = next(e for e in c.events() if e["kind"] == "replay_done" and e["identity"] == "node1"
                  and e["node"] == "node2" and e["regions"] > 0)
    assert replay["scanned"] > 0
    assert replay["from_mirror_copy"] == (1 if ha_mode == "mirror" else 0)
    if ha_mode == "shm":
        def mapped_ro(evs: list[dict]) -> bool:  # node2's own report, sent when it mapped
            return any(e["kind"] == "mapped" and e["node"] == "node2" and e["region"] == first
                       and e["mode"] == "ro" for e in evs)

        assert mapped_ro(events_when(c, mapped_ro))

    # The restarted node1 gets a NEW region from the mediator; then giveback.
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", BOOT_S, "node1 to boot")
    second = c.status().node("node1")["region"]
    assert second and second != first
    assert any(e["region"] == second and e["owner"] == "node1" for e in allocated(c))
    c.giveback("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 20, "giveback")
    res = verify(c.endpoint("node1"), journal)
    assert res["passed"], res["problems"]
    kinds = [e["kind"] for e in c.events()]
    assert "giveback_started" in kinds and "released" in kinds


def test_mediator_death_keeps_regions_and_a_new_mediator_serves_restarts(make_cluster):
    c = make_cluster(nodes=2, nvram_placement="mediator")
    c.wait_for(lambda s: all(n["takeover_possible"] for n in s.nodes), 20, "partners ready")
    with c.client("node1") as b:
        for i in range(32):
            b.write(0, i * 4096, bytes([i + 1]) * 4096)
    old = mediator_of(c)["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: any(e["kind"] == "mediator_exited" for e in c.events()), 10, "mediator_exited")
    exited = next(e for e in c.events() if e["kind"] == "mediator_exited")
    assert exited["pid"] == old and exited["regions_held_by_hypervisor"] >= 2
    c.wait_for(lambda s: s.raw["nvram"]["mediator"]["alive"]
               and s.raw["nvram"]["mediator"]["pid"] != old, 10, "a new mediator")
    new = mediator_of(c)
    assert new["restarts"] == 1 and alive(new["pid"]) and not alive(old)
    # The regions did not die with it: the cluster serves, and a takeover replays node1's.
    assert c.status().raw["regions_held"] == 2 and c.status().all_serving()
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover by node2")
    with c.client("node1") as b:
        for i in range(32):
            assert b.read(0, i * 4096, 4096) == bytes([i + 1]) * 4096
        b.write(0, 32 * 4096, b"\xaa" * 4096)
    # node1's next incarnation gets its region from the new mediator.
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", BOOT_S, "node1 to boot")
    region = c.status().node("node1")["region"]
    ev = next(e for e in allocated(c) if e["region"] == region)
    assert ev["owner"] == "node1" and ev["mediator_pid"] == new["pid"]
    c.giveback("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 20, "giveback")
    assert served_by(c, "node1") == "node1"
    with c.client("node1") as b:
        for i in range(32):
            assert b.read(0, i * 4096, 4096) == bytes([i + 1]) * 4096
        assert b.read(0, 32 * 4096, 4096) == b"\xaa" * 4096
    pids = [n["pid"] for n in c.status().nodes] + [new["pid"], c.proc.pid]
    c.stop()
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every process, mediator included")
