"""--nvram-placement mediator without a cluster: the fd broker's deposit / claim / register
handover on real memfds (client and broker in one process, the client in a thread), the
mediator's region making, and MediatorLink's restart policy against a fake supervisor."""

from __future__ import annotations

import errno
import os
import secrets
import select
import threading
from pathlib import Path
from typing import Any

import pytest

from domains import mediator
from storage import nvlog
from storage import region as shm
from tests.unit.conftest import Fds, memfd_label
from vmemu.config import ClusterConfig
from vmemu.errors import BadRequest, NotGranted, Unavailable, from_wire
from vmemu.hypervisor import fdbroker
from vmemu.hypervisor.fdbroker import MEDIATOR, FdBroker
from vmemu.hypervisor.grants import RO, GrantTable
from vmemu.hypervisor.supervisor import MediatorLink

SIZE = 256 * 1024
ME = os.getpid()


class FakeLink:
    def __init__(self, pid: int | None = ME) -> None:
        self.pid = pid
        self.done: list[int] = []
        self.broker: FdBroker | None = None

    def bind(self, broker: FdBroker) -> None:
        self.broker = broker

    def deposited(self, node: int) -> None:
        self.done.append(node)

    def view(self) -> dict[str, Any]:
        return {"pid": self.pid}


class Rig:
    """A broker in mediator placement; every domain is this process unless told otherwise."""

    def __init__(self, tmp_path: Path, pids: dict[int, int | None] | None = None,
                 link: FakeLink | None = None) -> None:
        self.name = "\0" + memfd_label(tmp_path, "broker") + secrets.token_hex(4)
        self.grants = GrantTable()
        self.pids = pids if pids is not None else {1: ME, 2: ME}
        self.registered: list[tuple[int, int]] = []
        self.events: list[tuple[str, Any, dict]] = []
        self.link = link or FakeLink()
        self.broker = FdBroker(self.name, self.grants, self.pids.get,
                               lambda n, r: self.registered.append((n, r)), placement="mediator",
                               mediator=self.link,  # type: ignore[arg-type]
                               emit=lambda kind, node=None, **f: self.events.append((kind, node, f)))

    def call(self, msg: dict, fd: int | None = None) -> tuple[dict, int | None]:
        """One request from a client thread while this thread runs the broker."""
        out: dict[str, Any] = {}

        def client() -> None:
            out["r"] = fdbroker.request(self.name, msg, fd=fd)

        t = threading.Thread(target=client)
        t.start()
        while t.is_alive():
            r, _, _ = select.select([self.broker.fileno()], [], [], 0.05)
            if r:
                self.broker.on_readable()
        t.join()
        return out["r"]

    def ok(self, msg: dict, fd: int | None = None) -> tuple[dict, int | None]:
        reply, out_fd = self.call(msg, fd)
        if not reply.get("ok"):
            raise from_wire(reply["error"])
        return reply, out_fd

    def deposit(self, node: int, fds: Fds) -> tuple[int, int]:
        fd, rid = mediator.make_region(node, SIZE)
        try:
            self.ok({"op": "deposit", "node": MEDIATOR, "region": rid, "for": node}, fd)
        finally:
            os.close(fd)  # as the mediator does: the broker holds it now
        return rid, 0

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.events]

    def close(self) -> None:
        self.broker.close()


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Rig(tmp_path)
    yield r
    r.close()


def claim_map_seal_register(rig: Rig, node: int, fds: Fds) -> tuple[int, Any]:
    reply, fd = rig.ok({"op": "claim", "node": node, "region": 0})
    assert fd is not None and reply["mode"] == "rw" and reply["size"] == SIZE
    fds.track(fd)
    buf = fds.map(shm.map_read_write(fd, reply["size"]))  # the owner maps first...
    shm.seal(fd, read_only=True)  # ...then seals
    rig.ok({"op": "register", "node": node, "region": reply["region"], "sealed": True}, fd)
    return reply["region"], buf


def test_make_region_is_formatted_in_halves_unsealed_and_left_unmapped() -> None:
    fd, rid = mediator.make_region(3, SIZE)
    try:
        assert not shm.is_write_sealed(fd) and shm.size_of(fd) == SIZE
        assert "/memfd:vmemu-nvram-node3-by-mediator" not in Path("/proc/self/maps").read_text()
        buf = shm.map_read_only(fd)
        hdr = nvlog.RegionHeader.read(buf)
        assert (hdr.node_index, hdr.region_id) == (3, rid) and hdr.halves
        buf.close()
    finally:
        os.close(fd)


def test_region_size_follows_the_config() -> None:
    assert mediator.region_size(ClusterConfig(nodes=2, nvram_mb=8)) == 8 << 20
    assert mediator.region_size(ClusterConfig(nodes=2, ha_mode="none")) == 1 << 20


def test_config_rejects_an_unknown_placement() -> None:
    assert ClusterConfig(nodes=2).nvram_placement == "own"
    with pytest.raises(BadRequest, match="NVRAM placement"):
        ClusterConfig(nodes=2, nvram_placement="partner")


def test_handover_owner_writes_partner_cannot(rig: Rig, fds: Fds) -> None:
    rid, _ = rig.deposit(1, fds)
    assert rig.link.done == [1]
    assert rig.kinds() == ["region_allocated"]
    assert rig.events[0][1] == "mediator" and rig.events[0][2]["owner"] == "node1"
    got, buf = claim_map_seal_register(rig, 1, fds)
    assert got == rid and rig.registered == [(1, rid)]
    buf[4096:4100] = b"abcd"  # the owner's mapping, made before the seal, still writes
    assert not rig.broker.pending and rid in rig.broker.held
    [row] = rig.grants.region_rows()
    assert row["allocator"] == "mediator" and row["owner"] == "node1" and row["sealed"]

    rig.grants.grant(rid, 2, RO)
    reply, fd = rig.ok({"op": "map", "node": 2, "region": rid})
    fds.track(fd)  # type: ignore[arg-type]
    assert reply["mode"] == "ro"
    assert bytes(fds.map(shm.map_read_only(fd))[4096:4100]) == b"abcd"  # type: ignore[arg-type]
    assert shm.refused(shm.try_map_writable(fd))  # type: ignore[arg-type]
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"x", 0)  # type: ignore[arg-type]
    assert e.value.errno == errno.EBADF
    fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd2, b"x", 0)
        assert e.value.errno == errno.EPERM  # the seal the owner set
    finally:
        os.close(fd2)
    assert rig.broker.view()["regions"][0]["allocator"] == "mediator"


def test_claim_before_deposit_is_unavailable(rig: Rig) -> None:
    reply, fd = rig.call({"op": "claim", "node": 1, "region": 0})
    assert fd is None and from_wire(reply["error"]).code == Unavailable.code


def test_only_the_mediator_deposits(tmp_path: Path) -> None:
    r = Rig(tmp_path, link=FakeLink(pid=1))  # the mediator is someone else
    try:
        fd, rid = mediator.make_region(1, SIZE)
        try:
            reply, _ = r.call({"op": "deposit", "node": MEDIATOR, "region": rid, "for": 1}, fd)
        finally:
            os.close(fd)
        assert from_wire(reply["error"]).code == NotGranted.code
        assert not r.broker.pending
    finally:
        r.close()


def test_a_deposit_must_not_be_sealed_yet(rig: Rig, fds: Fds) -> None:
    fd, _ = fds.region(1, 77, SIZE, halves=True)
    shm.seal(fd, read_only=True)
    reply, _ = rig.call({"op": "deposit", "node": MEDIATOR, "region": 77, "for": 1}, fd)
    assert from_wire(reply["error"]).code == BadRequest.code and not rig.broker.pending


def test_a_guest_cannot_register_a_region_of_its_own(rig: Rig, fds: Fds) -> None:
    fd, _ = fds.region(1, 99, SIZE, halves=True)
    shm.seal(fd, read_only=True)
    reply, _ = rig.call({"op": "register", "node": 1, "region": 99, "sealed": True}, fd)
    assert from_wire(reply["error"]).code == NotGranted.code and not rig.registered


def test_registering_another_descriptor_under_the_claimed_id_is_refused(rig: Rig, fds: Fds) -> None:
    rid, _ = rig.deposit(1, fds)
    reply, fd = rig.ok({"op": "claim", "node": 1, "region": 0})
    fds.track(fd)  # type: ignore[arg-type]
    other, _ = fds.region(1, 5, SIZE, halves=True)
    shm.seal(other, read_only=True)
    reply, _ = rig.call({"op": "register", "node": 1, "region": rid, "sealed": True}, other)
    assert from_wire(reply["error"]).code == NotGranted.code and not rig.registered
    assert rid in rig.broker.pending  # still there for the real descriptor


def test_a_claimed_region_goes_to_one_incarnation_only(tmp_path: Path, fds: Fds) -> None:
    pids: dict[int, int | None] = {1: ME, 2: ME}
    r = Rig(tmp_path, pids=pids)
    try:
        first, _ = r.deposit(1, fds)
        _, fd = r.ok({"op": "claim", "node": 1, "region": 0})
        fds.track(fd)  # type: ignore[arg-type]
        reply, fd2 = r.ok({"op": "claim", "node": 1, "region": 0})  # same incarnation: same one
        fds.track(fd2)  # type: ignore[arg-type]
        assert reply["region"] == first
        # That incarnation died before registering; node1 restarts and gets a fresh region.
        pids[1] = 1
        second, _ = r.deposit(1, fds)
        assert first not in r.broker.pending and "region_discarded" in r.kinds()
        pids[1] = ME
        reply, fd3 = r.ok({"op": "claim", "node": 1, "region": 0})
        fds.track(fd3)  # type: ignore[arg-type]
        assert reply["region"] == second
    finally:
        r.close()


def test_a_newer_deposit_supersedes_an_unclaimed_one(rig: Rig, fds: Fds) -> None:
    old, _ = rig.deposit(2, fds)
    new, _ = rig.deposit(2, fds)
    assert list(rig.broker.pending) == [new]
    got, _ = claim_map_seal_register(rig, 2, fds)
    assert got == new and old not in rig.broker.held


def test_regions_outlive_the_mediator(rig: Rig, fds: Fds) -> None:
    """The mediator closes its descriptor after the deposit: the broker's keeps the region."""
    rid, _ = rig.deposit(1, fds)
    rig.link.pid = None  # the mediator is gone
    got, buf = claim_map_seal_register(rig, 1, fds)
    assert got == rid and nvlog.RegionHeader.read(buf).region_id == rid


def test_the_broker_watches_extra_descriptors(rig: Rig) -> None:
    r, w = os.pipe()
    seen: list[int] = []
    try:
        rig.broker.watch(r, lambda: seen.append(os.read(r, 1)[0]))
        os.write(w, b"\x07")
        assert select.select([rig.broker.fileno()], [], [], 1.0)[0]
        rig.broker.on_readable()
        assert seen == [7]
        rig.broker.unwatch(r)
        os.write(w, b"\x08")
        assert not select.select([rig.broker.fileno()], [], [], 0.05)[0]
    finally:
        os.close(r)
        os.close(w)


def test_own_placement_refuses_claims(tmp_path: Path) -> None:
    name = "\0" + memfd_label(tmp_path, "own") + secrets.token_hex(4)
    b = FdBroker(name, GrantTable(), {1: ME}.get, lambda n, r: None)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "r", fdbroker.request(name, {"op": "claim", "node": 1, "region": 0})))
    t.start()
    while t.is_alive():
        if select.select([b.fileno()], [], [], 0.05)[0]:
            b.on_readable()
    t.join()
    b.close()
    assert out["r"][1] is None and out["r"][0]["error"]["code"] == "bad_request"


# -- MediatorLink ------------------------------------------------------------------------------
class FakeChild:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = 1000 + pid


class FakeSup:
    def __init__(self) -> None:
        self.mediator: FakeChild | None = None
        self.spawned = 0
        self.told: list[dict] = []

    def spawn_mediator(self) -> FakeChild:
        self.spawned += 1
        self.mediator = FakeChild(self.spawned)
        return self.mediator

    def tell_mediator(self, msg: dict) -> bool:
        if self.mediator is None:
            return False
        self.told.append(dict(msg, to=self.mediator.pid))
        return True

    def kill_mediator(self) -> int | None:
        self.mediator = None
        return -9


class FakeBroker:
    def __init__(self) -> None:
        self.held: dict = {1: None}
        self.pending: dict = {}
        self.watched: dict[int, Any] = {}

    def watch(self, fd: int, cb: Any) -> None:
        self.watched[fd] = cb

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)


def make_link(stopping: bool = False, max_starts: int = 5):  # type: ignore[no-untyped-def]
    sup, broker, events = FakeSup(), FakeBroker(), []
    link = MediatorLink(sup, lambda kind, node=None, **f: events.append((kind, f)),  # type: ignore[arg-type]
                        lambda: stopping, max_starts=max_starts)
    link.bind(broker)  # type: ignore[arg-type]
    return link, sup, broker, events


def test_link_asks_for_a_region_per_spawn_and_forgets_it_once_deposited() -> None:
    link, sup, broker, events = make_link()
    link.start()
    link.allocate_for(1)
    link.allocate_for(2)
    assert [m["node"] for m in sup.told] == [1, 2] and link.pid == 1
    link.deposited(1)
    assert link.wanted == {2}
    assert events[0][0] == "mediator_started" and 1001 in broker.watched


def test_a_dead_mediator_is_restarted_and_asked_again_for_what_it_had_not_made() -> None:
    link, sup, broker, events = make_link()
    link.start()
    link.allocate_for(1)
    link.allocate_for(2)
    link.deposited(1)
    broker.watched[1001]()  # its pidfd: it exited
    kinds = [k for k, _ in events]
    assert kinds == ["mediator_started", "mediator_exited", "mediator_started"]
    exited = events[1][1]
    assert exited["exit_code"] == -9 and exited["wanted"] == ["node2"]
    assert exited["regions_held_by_hypervisor"] == 1
    assert sup.told[-1] == {"op": "allocate", "node": 2, "to": 2}
    assert link.view()["restarts"] == 1 and 1001 not in broker.watched


def test_a_mediator_that_keeps_dying_is_left_down_until_the_next_spawn() -> None:
    link, sup, broker, events = make_link(max_starts=3)
    link.start()
    link.allocate_for(1)
    for _ in range(3):
        broker.watched[1000 + sup.spawned]()
    assert sup.mediator is None and events[-1][0] == "mediator_gave_up"
    link.allocate_for(2)  # a new guest: try again
    assert sup.mediator is not None and {m["node"] for m in sup.told if m["to"] == sup.spawned} == {1, 2}


def test_no_restart_while_the_cluster_stops() -> None:
    link, sup, broker, events = make_link(stopping=True)
    link.start()
    broker.watched[1001]()
    assert sup.mediator is None and [k for k, _ in events][-1] == "mediator_exited"
