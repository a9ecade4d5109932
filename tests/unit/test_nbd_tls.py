"""NBD over TLS: the sans-I/O channel (domains/nbd_tls.py) against an in-process ssl client
over MemoryBIOs, and the transport (domains/nbd_server.py) with `tls="require"` over real
loopback and Unix sockets: STARTTLS, plaintext refused at the handshake, a stalled or broken
TLS handshake ending only its connection, held bytes within the caps."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from domains import nbd_proto as P
from domains import nbd_server as S
from domains import nbd_tls
from domains.nbd_limits import Limits
from tests.unit.test_nbd_proto import Wire, info_data, opt, req
from tests.unit.test_nbd_server import Client, FakeD, Loop
from vmemu import tls as creds

MiB = 1 << 20


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return creds.ensure(tmp_path_factory.mktemp("tls"), ["127.0.0.1"], "unit")


def client_ctx(tls_dir: Path, trust: bool = True, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust:
        ctx.load_verify_locations(cafile=str(tls_dir / creds.CA))
    else:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(tls_dir / creds.CLIENT, tls_dir / creds.CLIENT_KEY)
    return ctx


class MemClient:
    """An ssl client between MemoryBIOs, wired to a server TlsChannel by hand."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.i, self.o = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.i, self.o, server_hostname="127.0.0.1")

    def exchange(self, chan: nbd_tls.TlsChannel, rounds: int = 10) -> bool:
        """Run the handshake; True when both ends have it done."""
        for _ in range(rounds):
            try:
                self.obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if self.o.pending:
                chan.receive(self.o.read())
            assert chan.read(1 << 16) is None  # no application data yet
            out = chan.to_send()
            if out.nbytes:
                self.i.write(bytes(out))
                chan.sent(out.nbytes)
            if done and chan.handshaken:
                return True
        return False


def test_channel_handshake_and_data_both_ways(tls_dir):
    chan = nbd_tls.TlsChannel(nbd_tls.server_context(tls_dir))
    cl = MemClient(client_ctx(tls_dir))
    assert cl.exchange(chan)
    assert cl.obj.version() in ("TLSv1.2", "TLSv1.3")
    cl.obj.write(b"NBD options, encrypted")
    chan.receive(cl.o.read())
    assert chan.in_pending() > 0  # ciphertext held until read: what Conn.wire_in counts
    assert chan.read(1 << 16) == b"NBD options, encrypted"
    assert chan.read(1 << 16) is None and chan.in_pending() == 0
    chan.encrypt(b"a reply")
    assert chan.out_pending() > len(b"a reply")
    out = chan.to_send()
    cl.i.write(bytes(out))
    chan.sent(out.nbytes)
    assert cl.obj.read(100) == b"a reply" and chan.out_pending() == 0
    try:  # the client's close_notify
        cl.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    chan.receive(cl.o.read())
    assert chan.read(10) == b"" and chan.eof
    assert chan.close_notify() == b""  # the peer ended the session: nothing more to say


def test_channel_refused_by_a_client_that_does_not_trust_it(tls_dir, tmp_path):
    other = creds.ensure(tmp_path, ["127.0.0.1"], "another cluster")  # another CA
    chan = nbd_tls.TlsChannel(nbd_tls.server_context(tls_dir))
    cl = MemClient(client_ctx(other))
    with pytest.raises(ssl.SSLCertVerificationError):
        cl.exchange(chan)
    chan.receive(cl.o.read())  # the client's alert
    with pytest.raises(ssl.SSLError):
        chan.read(10)


@pytest.mark.parametrize("with_cert", [False, True])
def test_channel_verify_peer_wants_the_clusters_client_certificate(tls_dir, with_cert):
    chan = nbd_tls.TlsChannel(nbd_tls.server_context(tls_dir, verify_peer=True))
    cl = MemClient(client_ctx(tls_dir, cert=with_cert))
    if with_cert:
        assert cl.exchange(chan)
        return
    with pytest.raises(ssl.SSLError):  # the server refuses (in TLS 1.3 once the client's
        cl.exchange(chan)              # Finished arrives), and says so in an alert
        cl.obj.write(b"x")
        chan.receive(cl.o.read())
        chan.read(10)


def test_plaintext_is_not_tls(tls_dir):
    chan = nbd_tls.TlsChannel(nbd_tls.server_context(tls_dir))
    chan.receive(opt(P.OPT_GO, info_data("lun0")))
    with pytest.raises(ssl.SSLError):
        chan.read(10)


# -- the transport ---------------------------------------------------------------------------------
def tls_server(tls_dir: Path, limits: Limits | None = None, d: FakeD | None = None,
               **kw: Any) -> S.NbdServer:
    return S.NbdServer(d or FakeD(), 2, kw.pop("address_of", lambda ident: ("127.0.0.1", 0)),
                       limits=limits, tls=nbd_tls.server_context(tls_dir), tls_mode="require",
                       **kw)


class TlsClient(Client):
    """Client (tests/unit/test_nbd_server.py) that starts TLS before it haggles."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, export: str = "lun0") -> None:
        self.s, self.w = sock, Wire()
        sock.settimeout(10)
        self._need(18)
        self.w.take(18)
        self.s.sendall(struct.pack(">I", 3) + opt(P.OPT_STARTTLS))
        assert self.opt_reply()[1] == P.REP_ACK
        self.s = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.s.sendall(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_GO, info_data(export)))
        assert self.opt_reply()[1] == P.REP_ACK
        while (r := self.opt_reply())[1] != P.REP_ACK:
            assert r[1] == P.REP_INFO, r
        self.structured = True


def greeted(addr: Any, family: int = socket.AF_INET) -> tuple[socket.socket, Wire]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    w = Wire()
    while len(w.buf) < 18:
        w.feed(s.recv(18 - len(w.buf)))
    assert w.buf[:8] == b"NBDMAGIC" and struct.unpack(">H", w.buf[16:18])[0] & 1
    return s, Wire()


def opt_reply(s: socket.socket, w: Wire) -> tuple[int, int, bytes]:
    while len(w.buf) < 20 or len(w.buf) < 20 + struct.unpack(">I", bytes(w.buf[16:20]))[0]:
        data = s.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        w.feed(data)
    return w.opt_reply()


def closed(s: socket.socket) -> bool:
    try:
        while data := s.recv(65536):
            del data
        return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def test_require_refuses_plaintext_and_serves_tls(tls_dir):
    srv = tls_server(tls_dir)
    addr = srv.bind(1)
    loop = Loop(srv)
    try:
        s, w = greeted(addr)
        s.sendall(struct.pack(">I", 3) + opt(P.OPT_GO, info_data("lun0")))
        _, rtype, msg = opt_reply(s, w)
        assert rtype == P.REP_ERR_TLS_REQD and b"requires TLS" in msg
        s.sendall(opt(P.OPT_EXPORT_NAME, b"lun0"))  # cannot be refused: the server hangs up
        assert closed(s)
        s.close()
        c = TlsClient(socket.create_connection(addr), client_ctx(tls_dir))
        data = bytes(range(256)) * (3 * MiB // 256)
        c.send(req(P.CMD_WRITE, 4096, len(data), cookie=1, data=data))
        assert c.reply()[:2] == (0, 1)
        c.send(req(P.CMD_READ, 4096, len(data), cookie=2))
        assert c.reply(len(data)) == (0, 2, data)
        c.close()
        assert srv.stats.tls_sessions == 1 and srv.stats.tls_failures == 0
    finally:
        loop.close()
        srv.close()


def test_unix_socket_with_tls(tls_dir, tmp_path):
    path = tmp_path / "n1.nbd.s"
    srv = tls_server(tls_dir, address_of=None, socket_of=lambda ident: path)
    assert srv.bind(1) is None and path.is_socket()
    loop = Loop(srv)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        c = TlsClient(s, client_ctx(tls_dir))
        c.send(req(P.CMD_WRITE, 0, 4096, cookie=3, data=b"u" * 4096))
        assert c.reply()[:2] == (0, 3)
        with loop.lock:
            assert next(iter(srv.conns.values())).conn.peer.startswith("unix:pid ")
        c.close()
    finally:
        loop.close()
        srv.close()
    assert not path.exists()  # ours, and unbound: gone


def test_a_stalled_or_broken_tls_handshake_ends_only_its_connection(tls_dir):
    srv = tls_server(tls_dir, Limits(handshake_timeout_s=2.0))
    addr = srv.bind(1)
    loop = Loop(srv)
    try:
        stalled, w = greeted(addr)
        stalled.sendall(struct.pack(">I", 3) + opt(P.OPT_STARTTLS))
        assert opt_reply(stalled, w)[1] == P.REP_ACK  # ... and then nothing: no ClientHello
        broken, w = greeted(addr)
        broken.sendall(struct.pack(">I", 3) + opt(P.OPT_STARTTLS))
        assert opt_reply(broken, w)[1] == P.REP_ACK
        broken.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert closed(broken)
        untrusting, w = greeted(addr)
        untrusting.sendall(struct.pack(">I", 3) + opt(P.OPT_STARTTLS))
        assert opt_reply(untrusting, w)[1] == P.REP_ACK
        with pytest.raises(ssl.SSLCertVerificationError):
            # 127.0.0.2 is not a name of the certificate: the client aborts the handshake
            client_ctx(tls_dir).wrap_socket(untrusting, server_hostname="127.0.0.2")
        ok = TlsClient(socket.create_connection(addr), client_ctx(tls_dir))  # meanwhile
        ok.send(req(P.CMD_FLUSH, cookie=9))
        assert ok.reply()[:2] == (0, 9)
        stalled.settimeout(10)
        t0 = time.monotonic()
        assert closed(stalled)  # the handshake timeout covers the TLS handshake
        assert time.monotonic() - t0 < 5
        end = time.monotonic() + 10
        while srv.connections() > 1 and time.monotonic() < end:
            time.sleep(0.01)
        with loop.lock:
            st = srv.stats
            assert srv.connections() == 1  # `ok` only
            # `broken` for sure; `untrusting` too, unless its reset beat its alert
            assert st.handshake_timeouts == 1 and st.tls_failures >= 1 and st.tls_sessions == 4
        ok.close()
        for s in (stalled, broken, untrusting):
            s.close()
    finally:
        loop.close()
        srv.close()


def test_tls_bytes_count_against_the_caps(tls_dir):
    """A TLS client that writes a lot and reads nothing: what the server holds, ciphertext
    included, stays within a connection's caps; then every reply arrives."""
    srv = tls_server(tls_dir, d=FakeD(sizes=(64 * MiB,)))
    addr = srv.bind(1)
    loop = Loop(srv)
    box: dict[str, Any] = {}
    try:
        c = TlsClient(socket.create_connection(addr), client_ctx(tls_dir))
        n = 4  # 128 MiB of replies: twice what one connection may hold
        c.send(b"".join(req(P.CMD_READ, (i % 2) * 32 * MiB, 32 * MiB, cookie=i)
                        for i in range(n)))
        peak = stuck = 0
        end = time.monotonic() + 30
        while stuck < 20 and time.monotonic() < end:  # the client reads nothing meanwhile
            with loop.lock:
                held = srv.held_bytes()
                wire = max((p.conn.wire_out for p in srv.conns.values()), default=0)
                # at a standstill: replies queued, the socket full, nothing else to do
                stuck = stuck + 1 if held > srv.limits.res_out and not srv.busy() else 0
            peak = max(peak, held)
            assert wire <= nbd_tls.CHUNK + 4096  # encrypted a chunk at a time
            time.sleep(0.005)
        assert stuck, "the server never came to a standstill"
        lim = srv.limits
        assert 0 < peak <= lim.conn_max + lim.res_in, peak
        box["r"] = [c.reply(32 * MiB)[:2] for _ in range(n)]
        assert box["r"] == [(0, i) for i in range(n)]
        c.close()
    finally:
        loop.close()
        srv.close()


def test_a_server_without_tls_refuses_starttls():
    srv = S.NbdServer(FakeD(), 2, lambda ident: ("127.0.0.1", 0))
    addr = srv.bind(1)
    loop = Loop(srv)
    try:
        s, w = greeted(addr)
        s.sendall(struct.pack(">I", 3) + opt(P.OPT_STARTTLS))
        assert opt_reply(s, w)[1] == P.REP_ERR_POLICY
        s.sendall(opt(P.OPT_GO, info_data("lun0")))  # and it goes on in plaintext
        while (r := opt_reply(s, w))[1] != P.REP_ACK:
            assert r[1] == P.REP_INFO, r
        s.close()
    finally:
        loop.close()
        srv.close()
