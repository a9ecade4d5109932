"""The NBD transport's bounds (domains/nbd_server.py, domains/nbd_conn.py) on real loopback
sockets: connection cap, handshake eviction, handshake / stall / idle timeouts, clients that
do not read, the per-turn decode budget, the shared memory pool with per-connection reserves,
and EMFILE on accept. Timeouts are shortened through `Limits`; every wait polls for a state
with a deadline."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from typing import Callable

import pytest

from domains import nbd_proto as P
from domains import nbd_server as S
from domains.mem_dmodule import MemDModule
from domains.nbd_limits import Limits
from tests.unit.test_nbd_proto import opt, req
from tests.unit.test_nbd_server import Client, Loop, pump

MiB = 1 << 20


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.005)


def closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    """Read (and drop) what the server sends until it closes; False if it did not in time."""
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not s.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


@pytest.fixture
def make_server():
    made: list[tuple[S.NbdServer, Loop]] = []

    def make(**kw) -> tuple[S.NbdServer, tuple[str, int], Loop, MemDModule]:
        d = MemDModule(1, {1: (16 * MiB, 2 * MiB)})
        srv = S.NbdServer(d, 1, lambda ident: ("127.0.0.1", 0), limits=replace(Limits(), **kw))
        addr = srv.bind(1)
        loop = Loop(srv)
        made.append((srv, loop))
        return srv, addr, loop, d

    yield make
    for srv, loop in made:
        loop.close()
        srv.close()


def raw(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=10)


def test_connections_over_the_cap_are_closed_at_once_and_counted(make_server):
    srv, addr, loop, _ = make_server(max_conns=3)
    clients = [Client(addr) for _ in range(3)]
    extra = [raw(addr) for _ in range(5)]
    for s in extra:  # closed without a greeting
        assert closed_by_server(s), "a connection over the cap stayed open"
        s.close()
    with loop.lock:
        assert (srv.stats.refused, srv.connections()) == (5, 3), srv.summary()
    for i, c in enumerate(clients):  # the admitted ones keep serving
        c.send(req(P.CMD_WRITE, i * 4096, 4096, cookie=i, data=bytes([i]) * 4096))
        assert c.reply()[:2] == (0, i)
        c.close()


def test_a_new_handshake_evicts_the_oldest_stalled_one(make_server):
    srv, addr, loop, _ = make_server(max_handshakes=2)
    first, second = raw(addr), raw(addr)
    wait_for(lambda: srv.connections() == 2, what="two connections")
    good = Client(addr)  # needs a handshake slot: the oldest stalled one goes
    assert closed_by_server(first, 5)
    assert srv.stats.evicted == 1
    good.send(req(P.CMD_READ, 0, 512, cookie=1))
    assert good.reply(512)[:2] == (0, 1)
    for s in (first, second):
        s.close()
    good.close()


def test_handshake_timeout_closes_a_stalled_client(make_server):
    srv, addr, loop, _ = make_server(handshake_timeout_s=0.3)
    stalled = raw(addr)
    stalled.sendall(struct.pack(">I", 3) + opt(P.OPT_LIST)[:10])  # half an option, then nothing
    good = Client(addr)  # in transmission: the handshake timeout is not for it
    t0 = time.monotonic()
    assert closed_by_server(stalled, 5)
    assert 0.25 < time.monotonic() - t0 + 0.05 and srv.stats.handshake_timeouts == 1
    good.send(req(P.CMD_READ, 0, 512, cookie=2))
    assert good.reply(512)[:2] == (0, 2)
    stalled.close()
    good.close()


def test_stalled_transmission_is_cut_and_an_idle_one_is_not(make_server):
    srv, addr, loop, _ = make_server(stall_timeout_s=0.3, idle_timeout_s=60)
    idle = Client(addr)
    stalled = Client(addr)
    stalled.send(req(P.CMD_WRITE, 0, 4096, cookie=1, data=b"x" * 100))  # 100 of 4096 bytes
    assert closed_by_server(stalled.s, 5)
    assert srv.stats.stall_timeouts == 1 and srv.stats.idle_timeouts == 0
    idle.send(req(P.CMD_READ, 0, 512, cookie=3))
    assert idle.reply(512)[:2] == (0, 3)
    idle.close()
    stalled.close()


def test_idle_timeout(make_server):
    srv, addr, loop, _ = make_server(idle_timeout_s=0.3)
    c = Client(addr)
    assert closed_by_server(c.s, 5)
    assert srv.stats.idle_timeouts == 1
    c.close()


def test_options_sent_without_reading_stop_being_read(make_server):
    srv, addr, loop, _ = make_server()
    lim = srv.limits
    flood = raw(addr)
    flood.setblocking(False)
    data = memoryview(struct.pack(">I", 3) + opt(P.OPT_LIST) * (4 * MiB // 16))
    good = Client(addr)
    sent = 0
    end = time.monotonic() + 5
    while time.monotonic() < end and sent < len(data):  # kernel buffers take most of it
        try:
            sent += flood.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)

    def flood_conn():
        return next(p.conn for p in srv.conns.values() if not p.conn.transmission)

    def blocked() -> bool:  # its unsent replies reached the cap: no more decoding for it
        with loop.lock:
            return flood_conn().out_bytes() >= lim.hs_out
    wait_for(blocked, what="the flood to fill its reply cap")
    with loop.lock:
        c = flood_conn()
        decoded = srv.stats.decoded
        assert c.in_bytes() <= lim.hs_in
        assert c.out_bytes() <= lim.hs_out + P.MAX_LIST_REPLY + 4096
    for i in range(20):  # meanwhile another client is served
        good.send(req(P.CMD_READ, 0, 4096, cookie=i))
        assert good.reply(4096)[:2] == (0, i)
    with loop.lock:
        assert srv.stats.decoded - decoded == 20  # those, and nothing more of the flood
        assert flood_conn().in_bytes() <= lim.hs_in
    flood.close()
    good.close()


def test_decode_budget_per_turn():
    d = MemDModule(1, {1: (4 * MiB,)})
    srv = S.NbdServer(d, 1, lambda ident: ("127.0.0.1", 0),
                      limits=replace(Limits(), turn_decode=100))
    addr = srv.bind(1)
    loop = Loop(srv)
    try:
        c = Client(addr)
        loop.close()  # from here the test turns the loop itself
        decoded = srv.stats.decoded
        c.send(b"".join(req(99, 0, 0, cookie=i) for i in range(3000)))  # invalid: no jobs
        turns = 0
        while srv.stats.decoded < decoded + 3000:
            before = srv.stats.decoded
            pump(srv, timeout_ms=50)
            assert srv.stats.decoded - before <= 100
            turns += 1
            assert turns < 1000
        assert turns >= 30
        assert [c.reply()[:2] for _ in range(3000)] == [(P.EINVAL, i) for i in range(3000)]
        c.close()
    finally:
        loop.close()
        srv.close()


def test_the_pool_bounds_memory_and_reserves_keep_a_compliant_client_going(make_server):
    srv, addr, loop, d = make_server(shared=8 * MiB, max_conns=8)
    lim = srv.limits
    greedy = [Client(addr) for _ in range(6)]
    for g in greedy:  # 30 MiB writes (above the advertised maximum), 12 MiB of each sent
        g.s.setblocking(False)
        try:
            g.send(req(P.CMD_WRITE, 0, 30 * MiB, cookie=1) + b"g" * (12 * MiB))
        except BlockingIOError:
            pass
    good = Client(addr)
    payload = bytes(range(256)) * (MiB // 256)
    for i in range(8):  # writes of the advertised maximum go through on the reserve
        good.send(req(P.CMD_WRITE, i * MiB, MiB, cookie=i, data=payload))
        assert good.reply()[:2] == (0, i)
    good.send(req(P.CMD_READ, 3 * MiB, MiB, cookie=99))
    assert good.reply(MiB) == (0, 99, payload)
    with loop.lock:
        held = srv.held_bytes()
        assert held <= lim.shared + len(srv.conns) * (lim.res_in + lim.res_out), held
        assert srv.pool.used <= lim.shared
    for g in greedy:
        g.close()
    good.close()


EMFILE_SERVER = textwrap.dedent("""
    import json, os, resource, socket, sys, time
    import zmq
    from domains.mem_dmodule import MemDModule
    from domains.nbd_server import NbdServer
    srv = NbdServer(MemDModule(1), 1, lambda ident: ("127.0.0.1", 0))
    addr = srv.bind(1)
    control, _peer = socket.socketpair()  # the guest's loop always polls its control socket

    def pump(srv, timeout_ms):  # one turn of the guest's loop (domains/guest.py)
        p = zmq.Poller()
        p.register(control, zmq.POLLIN)
        for fd, ev in srv.poll_fds().items():
            p.register(fd, ev)
        srv.service(dict(p.poll(0 if srv.busy() else timeout_ms)))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(json.dumps({"port": addr[1]}), flush=True)
    sys.stdin.readline()  # the client is in the backlog now
    t0, turns = time.monotonic(), 0
    while time.monotonic() - t0 < 1.0:
        pump(srv, timeout_ms=100)
        turns += 1
    stuck = {"turns": turns, "backoffs": srv.stats.accept_backoffs}
    for fd in filler:
        os.close(fd)
    t0 = time.monotonic()
    while srv.stats.served < 1 and time.monotonic() - t0 < 10:
        pump(srv, timeout_ms=20)
    stuck["served"] = srv.stats.served
    print(json.dumps(stuck), flush=True)
""")


def test_emfile_on_accept_backs_off_instead_of_spinning():
    p = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(p.stdout.readline())["port"]
        s = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued in the backlog
        p.stdin.write("go\n")
        p.stdin.flush()
        s.settimeout(10)
        greeting = s.recv(18)  # answered once the server has descriptors again
        assert greeting[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3) + opt(P.OPT_EXPORT_NAME, b"lun0") + req(P.CMD_FLUSH))
        got = json.loads(p.stdout.readline())
        assert 1 <= got["backoffs"] <= 15, got  # about one per 0.1 s pause
        assert got["turns"] < 100, got  # the loop slept; a spinning one turns thousands of times
        assert got["served"] == 1
        s.close()
    finally:
        p.kill()
        p.wait(10)
