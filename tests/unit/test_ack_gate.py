"""The transports' ack gate (--ha-mode mirror): an NBD reply, a read's too, leaves only once the
D-module's `ack_gate` allows its ticket; the loop's `release` sends it without a new request."""

from __future__ import annotations

import select
import threading
import time

import pytest
import zmq

from domains import nbd_proto as P
from domains import nbd_server as S
from tests.unit.test_nbd_proto import req
from tests.unit.test_nbd_server import Client, FakeD


class Gate:
    """Tickets count writes; the test says how far the "partner" has acknowledged."""

    def __init__(self) -> None:
        self.logged = 0
        self.acked = 0

    def ticket(self) -> int:
        return self.logged

    def releasable(self, ticket: int) -> bool:
        return ticket <= self.acked


class GatedD(FakeD):
    def __init__(self) -> None:
        super().__init__()
        self.ack_gate = Gate()

    def write(self, *args, **kw) -> int:  # type: ignore[no-untyped-def]
        n = super().write(*args, **kw)
        self.ack_gate.logged += 1
        return n


class GatedLoop:
    """The guest's loop as far as NBD goes: service, then release what the gate allows."""

    def __init__(self, srv: S.NbdServer) -> None:
        self.srv = srv
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                p = zmq.Poller()
                for fd, ev in self.srv.poll_fds().items():
                    p.register(fd, ev)
                self.srv.service(dict(p.poll(0 if self.srv.busy() else 5)))
                self.srv.release(time.monotonic())
            time.sleep(0)  # let the test take the lock


@pytest.fixture
def gated():
    d = GatedD()
    srv = S.NbdServer(d, 2, lambda ident: ("127.0.0.1", 0))
    addr = srv.bind(1)
    loop = GatedLoop(srv)
    yield d, srv, addr, loop
    loop.stop.set()
    loop.t.join(5)
    srv.close()


def held_replies(srv: S.NbdServer, lock: threading.Lock, n: int) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with lock:
            if sum(len(p.conn.held) for p in srv.conns.values()) >= n:
                return
        time.sleep(0.002)
    raise AssertionError(f"{n} replies were never held")


def nothing_to_read(c: Client) -> bool:
    return not c.w.buf and not select.select([c.s], [], [], 0)[0]


def test_replies_wait_for_the_gate_and_keep_their_order(gated) -> None:
    d, srv, addr, loop = gated
    gate = d.ack_gate
    c = Client(addr)
    c.send(req(P.CMD_WRITE, 0, 4096, cookie=1, data=b"a" * 4096))
    held_replies(srv, loop.lock, 1)
    assert nothing_to_read(c)
    # A read behind the held write may show it: it waits too.
    c.send(req(P.CMD_READ, 0, 4096, cookie=2))
    held_replies(srv, loop.lock, 2)
    assert nothing_to_read(c)
    with loop.lock:
        gate.acked = gate.logged
    assert c.reply()[:2] == (0, 1)
    err, cookie, data = c.reply(4096)
    assert (err, cookie, data) == (0, 2, b"a" * 4096)
    # Nothing unacknowledged logged: a read goes at once.
    c.send(req(P.CMD_READ, 0, 4096, cookie=3))
    assert c.reply(4096)[:2] == (0, 3)
    c.close()


def test_a_connection_closing_with_held_replies_waits_for_them(gated) -> None:
    d, srv, addr, loop = gated
    c = Client(addr)
    c.send(req(P.CMD_WRITE, 4096, 4096, cookie=5, data=b"b" * 4096) + req(P.CMD_DISC))
    held_replies(srv, loop.lock, 1)
    with loop.lock:
        assert len(srv.conns) == 1  # not dropped with its reply unsent
        d.ack_gate.acked = d.ack_gate.logged
    assert c.reply()[:2] == (0, 5)
    c.close()
