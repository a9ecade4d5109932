"""The fd broker on its own: never waits on a client, checks what it is handed, issues tokens.

Real sockets and memfds; the broker runs in this thread, clients in threads or as raw sockets.
"""

from __future__ import annotations

import os
import resource
import secrets
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from storage import region as shm
from tests.unit.conftest import Fds, memfd_label
from vmemu.hypervisor import fdbroker
from vmemu.hypervisor.fdbroker import FdBroker
from vmemu.hypervisor.grants import RO, GrantTable

SIZE = 64 * 1024
ME = os.getpid()


class Rig:
    def __init__(self, tmp_path: Path, **kw: Any) -> None:
        self.name = "\0" + memfd_label(tmp_path, "fdb") + secrets.token_hex(4)
        self.grants = GrantTable()
        self.registered: list[tuple[int, int]] = []
        self.events: list[str] = []
        self.broker = FdBroker(self.name, self.grants, {1: ME, 2: ME}.get,
                               lambda n, r: self.registered.append((n, r)),
                               emit=lambda kind, *a, **f: self.events.append(kind), **kw)

    def pump(self, until: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < end, "the broker did not get there in time"
            if select.select([self.broker.fileno()], [], [], 0.02)[0]:
                self.broker.on_readable()
            self.broker.tick(time.monotonic())

    def call(self, msg: dict, fd: int | None = None) -> tuple[dict, int | None]:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "r", fdbroker.request(self.name, msg, fd=fd)))
        t.start()
        self.pump(lambda: not t.is_alive())
        t.join()
        return out["r"]


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Rig(tmp_path, region_size=SIZE, require_sealed=True)
    yield r
    r.broker.close()


def sealed_region(fds: Fds, size: int = SIZE, seal: bool = True) -> int:
    fd = fds.memfd(size)
    fds.map(shm.map_read_write(fd))
    if seal:
        shm.seal(fd, read_only=True)
    return fd


def test_an_idle_connection_never_blocks_the_broker_and_is_closed_at_its_deadline(rig: Rig) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    idle.connect(rig.name)
    rig.pump(lambda: len(rig.broker.conns) == 1)
    t = time.monotonic()
    rig.broker.on_readable()  # nothing to read: returns at once instead of waiting for it
    assert time.monotonic() - t < 0.05
    rig.pump(lambda: not rig.broker.conns, timeout=fdbroker.CONN_DEADLINE_S + 2)
    assert rig.broker.refused["timeout"] == 1
    idle.settimeout(2)
    assert idle.recv(16) == b""  # closed by the broker
    idle.close()


def test_connections_beyond_the_cap_are_closed_at_once(rig: Rig) -> None:
    socks = []
    try:
        for _ in range(fdbroker.MAX_CONNS + 5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(rig.name)
            socks.append(s)
        rig.pump(lambda: rig.broker.refused["too_many"] == 5)
        assert len(rig.broker.conns) == fdbroker.MAX_CONNS
        # A client that meets a full broker retries until the idle ones have been closed.
        reply, _ = rig.call({"op": "map", "node": 1, "region": 5})
        assert rig.broker.refused["timeout"] == fdbroker.MAX_CONNS
        assert reply["error"]["code"] == "not_granted"
    finally:
        for s in socks:
            s.close()


def test_register_checks_seal_size_and_once_per_incarnation_and_issues_a_token(rig: Rig, fds: Fds) -> None:
    unsealed = sealed_region(fds, seal=False)
    reply, _ = rig.call({"op": "register", "node": 1, "region": 7, "sealed": False}, unsealed)
    assert reply["error"]["code"] == "not_granted" and "seal" in reply["error"]["message"]
    reply, _ = rig.call({"op": "register", "node": 1, "region": 7, "sealed": True}, unsealed)
    assert reply["error"]["code"] == "bad_request"  # claims a seal it does not have
    big = sealed_region(fds, size=2 * SIZE)
    reply, _ = rig.call({"op": "register", "node": 1, "region": 7, "sealed": True}, big)
    assert reply["error"]["code"] == "bad_request" and "bytes" in reply["error"]["message"]
    assert rig.registered == [] and rig.broker.held == {}

    good = sealed_region(fds)
    reply, _ = rig.call({"op": "register", "node": 1, "region": 7, "sealed": True}, good)
    assert reply["ok"] and rig.registered == [(1, 7)]
    token = reply["token"]
    assert rig.broker.token_ok(1, token) and not rig.broker.token_ok(1, "0" * 32)
    assert not rig.broker.token_ok(2, token) and not rig.broker.token_ok(1, None)

    again = sealed_region(fds)
    reply, _ = rig.call({"op": "register", "node": 1, "region": 8, "sealed": True}, again)
    assert reply["error"]["code"] == "not_granted"  # one region per incarnation
    assert list(rig.broker.held) == [7]
    rig.broker.forget(1)
    assert not rig.broker.token_ok(1, token)


def test_read_only_map_of_an_unsealed_region_is_refused_by_the_broker(tmp_path: Path, fds: Fds) -> None:
    r = Rig(tmp_path)  # no require_sealed: the grant table and the map check stand alone
    try:
        fd = sealed_region(fds, seal=False)
        assert r.call({"op": "register", "node": 1, "region": 9, "sealed": False}, fd)[0]["ok"]
        r.grants.grants[(9, 2)] = RO  # as if a grant slipped past the table's own check
        reply, out = r.call({"op": "map", "node": 2, "region": 9})
        assert out is None and reply["error"]["code"] == "not_granted"
        assert "not write-sealed" in reply["error"]["message"]
    finally:
        r.broker.close()


def test_too_many_descriptors_or_bytes_are_refused_and_closed(rig: Rig, fds: Fds) -> None:
    many = [sealed_region(fds) for _ in range(fdbroker.MAX_FDS + 2)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(rig.name)
        socket.send_fds(s, [msgpack.packb({"op": "map", "node": 1, "region": 1})], many)
        rig.pump(lambda: rig.broker.refused["bad"] == 1)
        s.settimeout(2)
        assert msgpack.unpackb(s.recv(4096))["error"]["code"] == "bad_request"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(rig.name)
        s.send(b"\x00" * (fdbroker.MAX_MSG * 2))
        rig.pump(lambda: rig.broker.refused["bad"] == 2)
    # The broker holds none of what it was sent: no descriptor of ours leaked into it.
    assert rig.broker.held == {} and not rig.broker.conns


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(rig: Rig) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(rig.name)
    hog: list[int] = []
    try:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
        hog.append(os.dup(0))  # the last descriptor left: accept() gets EMFILE
        rig.broker.on_readable()
        assert rig.broker.accept_paused_until > 0 and "broker_accept_paused" in rig.events
        # The listener is out of the poll set: the pending connection does not wake us again.
        assert not select.select([rig.broker.fileno()], [], [], 0.05)[0]
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    rig.pump(lambda: len(rig.broker.conns) == 1, timeout=2)  # resumed after the pause
    client.close()
