"""The NBD transport (domains/nbd_server.py) over real loopback sockets, on a fake D-module that
enforces the D-module's limits and records every call: splitting, read-modify-write, zeros
through the log, acknowledgement order, bounded work per loop turn, unbind, errors."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest
import zmq

from domains import nbd_proto as P
from domains import nbd_server as S
from storage.lun import MAX_IO, SECTOR
from tests.unit.test_nbd_proto import Wire, info_data, opt, req
from vmemu.errors import BadRequest, Fenced, OutOfRange, UnknownLun

MiB = 1 << 20


class FakeLun:
    def __init__(self, index: int, size: int) -> None:
        self.index, self.size = index, size
        self.name = f"lun{index}"
        self.mem = bytearray(size)


class FakeServed:
    def __init__(self, luns: list[FakeLun]) -> None:
        self.luns = luns


class FakeD:
    """The D-module's client interface with its checks (sector multiples, <= 1 MiB)."""

    def __init__(self, identity: int = 1, sizes: tuple[int, ...] = (8 * MiB, 4 * MiB)) -> None:
        self.served = {identity: FakeServed([FakeLun(i, s) for i, s in enumerate(sizes)])}
        self.calls: list[tuple[str, int, int, int]] = []
        self.fail: BaseException | None = None

    def lun(self, identity: int, index: int) -> FakeLun:
        s = self.served.get(identity)
        if s is None or not 0 <= index < len(s.luns):
            raise UnknownLun(f"no lun{index}")
        return s.luns[index]

    def _check(self, lun: FakeLun, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or not 0 < length <= MAX_IO:
            raise BadRequest(f"D-module limits broken: {offset}+{length}")
        if offset + length > lun.size:
            raise OutOfRange("past the end")

    def write(self, identity: int, index: int, offset: int, data: Any, client: int,
              request: int) -> int:
        if self.fail is not None:
            raise self.fail
        lun = self.lun(identity, index)
        self._check(lun, offset, len(data))
        assert client == 0  # NBD has no retry ids: no exactly-once table
        self.calls.append(("w", index, offset, len(data)))
        lun.mem[offset:offset + len(data)] = data
        return len(self.calls)

    def read(self, identity: int, index: int, offset: int, length: int) -> bytes:
        lun = self.lun(identity, index)
        self._check(lun, offset, length)
        self.calls.append(("r", index, offset, length))
        return bytes(lun.mem[offset:offset + length])

    def flush(self, identity: int, index: int) -> None:
        self.lun(identity, index)
        self.calls.append(("f", index, 0, 0))


def pump(srv: S.NbdServer, timeout_ms: int = 20) -> dict:
    p = zmq.Poller()
    for fd, ev in srv.poll_fds().items():
        p.register(fd, ev)
    ready = dict(p.poll(0 if srv.busy() else timeout_ms))
    srv.service(ready)
    return ready


class Loop:
    """The guest's loop, in a thread."""

    def __init__(self, srv: S.NbdServer) -> None:
        self.srv = srv
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                pump(self.srv)

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)


@pytest.fixture
def server():
    d = FakeD()
    served: list[int] = []
    srv = S.NbdServer(d, 2, lambda ident: ("127.0.0.1", 0), served.append)
    addr = srv.bind(1)
    loop = Loop(srv)
    yield d, srv, addr, served, loop
    loop.close()
    srv.close()


class Client:
    def __init__(self, addr: tuple[str, int], export: str = "lun0", structured: bool = True) -> None:
        self.s = socket.create_connection(addr, timeout=10)
        self.w = Wire()
        self._need(18)
        self.w.take(18)
        msg = struct.pack(">I", 3)
        if structured:
            msg += opt(P.OPT_STRUCTURED_REPLY)
        self.s.sendall(msg + opt(P.OPT_GO, info_data(export)))
        if structured:
            assert self.opt_reply()[1] == P.REP_ACK
        while (r := self.opt_reply())[1] != P.REP_ACK:
            assert r[1] == P.REP_INFO, r
        self.structured = structured

    def _need(self, n: int) -> None:
        while len(self.w.buf) < n:
            data = self.s.recv(1 << 20)
            if not data:
                raise EOFError("server closed the connection")
            self.w.feed(data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        self._need(20)
        n = struct.unpack(">I", bytes(self.w.buf[16:20]))[0]
        self._need(20 + n)
        return self.w.opt_reply()

    def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data) of the next reply."""
        self._need(4)
        if struct.unpack(">I", bytes(self.w.buf[:4]))[0] == P.SIMPLE_REPLY_MAGIC:
            self._need(16)
            err = struct.unpack(">I", bytes(self.w.buf[4:8]))[0]
            self._need(16 + (0 if err else read_len))
            return self.w.simple(read_len)
        self._need(20)
        n = struct.unpack(">I", bytes(self.w.buf[16:20]))[0]
        self._need(20 + n)
        flags, rtype, cookie, payload = self.w.chunk()
        assert flags & P.REPLY_FLAG_DONE
        if rtype == P.REPLY_TYPE_ERROR:
            return struct.unpack(">I", payload[:4])[0], cookie, payload[6:]
        if rtype == P.REPLY_TYPE_OFFSET_DATA:
            return 0, cookie, payload[8:]
        return 0, cookie, b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def close(self) -> None:
        self.s.close()


def test_large_write_is_split_and_acked_after_all_pieces(server):
    d, srv, addr, served, loop = server
    c = Client(addr)
    data = bytes(range(256)) * (2 * MiB // 256)
    c.send(req(P.CMD_WRITE, MiB, len(data), cookie=1, data=data))
    assert c.reply()[:2] == (0, 1)
    with loop.lock:  # both pieces were logged before the acknowledgement was sent
        assert [x for x in d.calls if x[0] == "w"] == [("w", 0, MiB, MiB), ("w", 0, 2 * MiB, MiB)]
    c.send(req(P.CMD_READ, MiB + 1000, 2 * MiB - 2000, cookie=2))
    err, cookie, got = c.reply(2 * MiB - 2000)
    assert (err, cookie) == (0, 2) and got == data[1000:-1000]
    assert all(x[3] <= MAX_IO and x[2] % SECTOR == 0 for x in d.calls)
    assert served and set(served) == {1}
    c.close()


@pytest.mark.parametrize("structured", [False, True])
def test_unaligned_writes_read_modify_write(server, structured):
    d, srv, addr, served, loop = server
    lun = d.served[1].luns[0]
    lun.mem[:] = bytes(range(256)) * (len(lun.mem) // 256)
    before = bytes(lun.mem)
    c = Client(addr, structured=structured)
    d.calls.clear()
    c.send(req(P.CMD_WRITE, 1000, 10, cookie=1, data=b"0123456789"))
    assert c.reply()[:2] == (0, 1)
    assert d.calls == [("r", 0, 512, 512), ("w", 0, 512, 512)]  # one sector: read once
    d.calls.clear()
    c.send(req(P.CMD_WRITE, 1000, 100, cookie=2, data=b"x" * 100))
    assert c.reply()[:2] == (0, 2)
    assert d.calls == [("r", 0, 512, 512), ("r", 0, 1024, 512), ("w", 0, 512, 1024)]
    d.calls.clear()
    c.send(req(P.CMD_WRITE_ZEROES, 3000, 5000, cookie=3))  # unaligned zeros: RMW too
    assert c.reply()[:2] == (0, 3)
    want = bytearray(before)
    want[1000:1100] = b"x" * 100
    want[3000:8000] = bytes(5000)
    assert bytes(lun.mem) == bytes(want)
    c.send(req(P.CMD_READ, 999, 103, cookie=4) + req(P.CMD_READ, 0, 16, cookie=5)
           + req(P.CMD_READ, 4000, 96, cookie=6) + req(P.CMD_READ, 511, 2 * MiB, cookie=7))
    assert c.reply(103) == (0, 4, bytes(want[999:1102]))
    assert c.reply(16) == (0, 5, bytes(want[:16]))
    assert c.reply(96) == (0, 6, bytes(want[4000:4096]))
    assert c.reply(2 * MiB) == (0, 7, bytes(want[511:511 + 2 * MiB]))
    c.close()


def test_trim_and_write_zeroes_are_logged_writes(server):
    d, srv, addr, served, loop = server
    lun = d.served[1].luns[1]
    lun.mem[:] = b"\xff" * len(lun.mem)
    c = Client(addr, export="lun1")
    d.calls.clear()
    c.send(req(P.CMD_TRIM, 0, 3 * MiB, cookie=1)
           + req(P.CMD_WRITE_ZEROES, 3 * MiB, 4096, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA,
                 cookie=2) + req(P.CMD_FLUSH, cookie=3))
    assert [c.reply()[:2] for _ in range(3)] == [(0, 1), (0, 2), (0, 3)]
    assert d.calls == [("w", 1, 0, MiB), ("w", 1, MiB, MiB), ("w", 1, 2 * MiB, MiB),
                       ("w", 1, 3 * MiB, 4096), ("f", 1, 0, 0)]
    assert lun.mem[:3 * MiB + 4096] == bytes(3 * MiB + 4096) and lun.mem[-1] == 0xFF
    c.close()


def test_errors_from_the_dmodule(server):
    d, srv, addr, served, loop = server
    c = Client(addr)
    d.fail = OSError(5, "disk on fire")
    c.send(req(P.CMD_WRITE, 0, 512, cookie=1, data=b"a" * 512))
    err, cookie, msg = c.reply()
    assert (err, cookie) == (P.EIO, 1) and b"fire" in msg
    d.fail = None
    c.send(req(P.CMD_WRITE, 0, 512, cookie=2, data=b"a" * 512))
    assert c.reply()[:2] == (0, 2)
    d.fail = Fenced("epoch moved on")
    c.send(req(P.CMD_WRITE, 0, 512, cookie=3, data=b"b" * 512))
    with pytest.raises(EOFError):  # a fenced incarnation answers nothing: the connection goes
        c.reply()
    c.close()
    d.fail = None
    c2 = Client(addr)
    c2.send(req(P.CMD_READ, 0, 512, cookie=4))
    assert c2.reply(512) == (0, 4, b"a" * 512)
    c2.close()


def test_protocol_violation_closes_only_that_connection(server):
    d, srv, addr, served, loop = server
    good = Client(addr)
    bad = socket.create_connection(addr, timeout=10)
    bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
    bad.settimeout(10)
    got = b""
    while chunk := bad.recv(4096):
        got += chunk
    assert got.startswith(b"NBDMAGIC")  # the greeting, then the close
    bad.close()
    good.send(req(P.CMD_READ, 0, 512, cookie=9))
    assert good.reply(512)[:2] == (0, 9)
    good.close()


def test_unbind_closes_listener_and_connections(server):
    d, srv, addr, served, loop = server
    c = Client(addr)
    with loop.lock:
        srv.unbind(1)
        assert srv.connections() == 0
    with pytest.raises(EOFError):
        c.reply()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=2)
    c.close()


def test_disc_and_eof_close_after_pending_work(server):
    d, srv, addr, served, loop = server
    c = Client(addr)
    c.send(req(P.CMD_WRITE, 0, 4096, cookie=1, data=b"z" * 4096) + req(P.CMD_DISC))
    assert c.reply()[:2] == (0, 1)  # work before DISC is done and answered
    with pytest.raises(EOFError):
        c.reply()
    c.close()
    assert d.served[1].luns[0].mem[:4096] == b"z" * 4096
    deadline = time.monotonic() + 5
    while srv.connections() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.connections() == 0


def test_work_per_turn_is_bounded():
    d = FakeD(sizes=(64 * MiB,))
    srv = S.NbdServer(d, 1, lambda ident: ("127.0.0.1", 0))
    srv.bind(1)
    addr = srv.listeners[1].getsockname()
    box: dict[str, Any] = {}

    def client() -> None:
        box["c"] = c = Client(addr)
        payload = b"\x11" * (32 * MiB)
        c.send(req(P.CMD_WRITE, 0, len(payload), cookie=1, data=payload)
               + b"".join(req(P.CMD_WRITE, 32 * MiB + i * 4096, 4096, cookie=2 + i,
                              data=b"\x22" * 4096) for i in range(2000)))
        box["replies"] = [c.reply()[:2] for _ in range(2001)]

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while "replies" not in box and time.monotonic() < deadline:
            n0 = len(d.calls)
            moved0 = sum(x[3] for x in d.calls)
            pump(srv)
            assert len(d.calls) - n0 <= srv.limits.turn_pieces
            assert sum(x[3] for x in d.calls) - moved0 <= srv.limits.turn_bytes + MAX_IO
        t.join(10)
        assert box["replies"] == [(0, i) for i in range(1, 2002)]
        assert len([x for x in d.calls if x[3] == MiB]) == 32
    finally:
        if "c" in box:
            box["c"].close()
        srv.close()


def test_bind_refuses_a_taken_address():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        srv = S.NbdServer(FakeD(), 1, lambda ident: holder.getsockname())
        with pytest.raises(Exception, match="cannot serve NBD"):
            srv.bind(1, deadline_s=0.2)
        srv.close()
    finally:
        holder.close()


def test_memory_stays_bounded_when_the_client_does_not_read():
    d = FakeD(sizes=(64 * MiB,))
    srv = S.NbdServer(d, 1, lambda ident: ("127.0.0.1", 0))
    addr = srv.bind(1)
    n = 24
    box: dict[str, Any] = {}

    def connect() -> None:
        box["c"] = Client(addr)
        box["c"].send(b"".join(req(P.CMD_READ, (i % 2) * 32 * MiB, 32 * MiB, cookie=i)
                               for i in range(n)))

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    while t.is_alive():
        pump(srv, timeout_ms=5)
    c = box["c"]
    try:
        peak = 0
        for _ in range(300):  # the client reads nothing meanwhile
            pump(srv, timeout_ms=2)
            peak = max(peak, srv.held_bytes())
        lim = srv.limits
        assert peak <= lim.conn_max + lim.res_in, peak  # its replies, and a few requests
        assert not srv.busy()  # waiting for the peer, not spinning

        def reader() -> None:
            box["r"] = [c.reply(32 * MiB)[:2] for _ in range(n)]

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            pump(srv, timeout_ms=5)
        t.join(1)
        assert box["r"] == [(0, i) for i in range(n)]
    finally:
        c.close()
        srv.close()
