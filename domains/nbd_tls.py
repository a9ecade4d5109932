"""TLS for an NBD connection, sans I/O: Python's ssl.SSLObject between two MemoryBIOs.

The transport (domains/nbd_server.py) puts what it received from the socket in with
`receive`, takes plaintext for the protocol machine with `read` (which also drives the
handshake), hands plaintext replies to `encrypt`, and sends what `unsent` holds. Nothing here
blocks or touches a socket, so a TLS connection lives in the same non-blocking loop, under
the same caps, as a plaintext one: the bytes held here are counted as the connection's
(`Conn.wire_in` / `wire_out`), ciphertext is received only into the connection's room, and
at most `CHUNK` bytes of plaintext are encrypted before what they became has been sent
(what is held beyond the counted bytes: domains/nbd_limits.TLS_EXTRA).

The credentials are the cluster's (vmemu/tls.py, made at `up`): every guest loads the same
server certificate, whose subject names every node's NBD address, so a client that
reconnects after a takeover meets the same certificate at the same address. TLS 1.2 at
least (the NBD spec: MUST support 1.2, SHOULD NOT offer older). With `verify_peer`, a client
must present a certificate of the cluster's CA (`client-cert.pem`, in the same directory;
libnbd and qemu load it from there by themselves).
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Callable

from domains.nbd_conn import Conn
from domains.nbd_limits import Stats
from vmemu import tls as creds

CHUNK = 64 << 10  # plaintext encrypted at a time (then sent before more is); see TLS_EXTRA


def server_context(tls_dir: Path, verify_peer: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_dir / creds.SERVER, tls_dir / creds.SERVER_KEY)
    if verify_peer:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls_dir / creds.CA))
    return ctx


class TlsChannel:
    """One connection's TLS session, server side."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.handshaken = False
        self.failed = False  # counted as a TLS failure already
        self.eof = False  # the peer closed (close_notify, or its side of the stream)
        self.unsent = memoryview(b"")  # ciphertext taken from the BIO, not yet sent

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Ciphertext from the socket (b"": the peer closed its side)."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def read(self, n: int) -> bytes | None:
        """Up to `n` bytes of plaintext; None: nothing (more) until more ciphertext comes;
        b"": the peer closed. Raises ssl.SSLError when the peer breaks TLS (a failed
        handshake: it did not trust us, or it is not speaking TLS)."""
        if self.eof:
            return b""
        try:
            if not self.handshaken:
                self._obj.do_handshake()
                self.handshaken = True
            data = self._obj.read(n)
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            if not self.handshaken:
                raise
            self.eof = True  # close_notify, or a peer that just closed: both end the stream
            return b""
        if not data:  # CPython reads a close_notify as b"" (no SSLZeroReturnError)
            self.eof = True
        return data

    def encrypt(self, plain: bytes | memoryview) -> None:
        self._obj.write(plain)

    def in_pending(self) -> int:
        """Bytes held here on the way in: ciphertext not yet decrypted, plaintext not read."""
        return self._in.pending + self._obj.pending()

    def out_pending(self) -> int:
        return self.unsent.nbytes + self._out.pending

    def to_send(self) -> memoryview:
        """Ciphertext to send next (empty: nothing); `sent(n)` after the socket took n."""
        if not self.unsent.nbytes and self._out.pending:
            self.unsent = memoryview(self._out.read())
        return self.unsent

    def sent(self, n: int) -> None:
        self.unsent = self.unsent[n:]

    def close_notify(self) -> bytes:
        """The close_notify alert (and whatever was still unsent), for a last best-effort
        send before the socket closes: a clean end of the TLS session for the client."""
        if self.handshaken and not self.eof:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: it waits for the peer's close_notify; we do not
        data = bytes(self.unsent) + self._out.read()
        self.unsent = memoryview(b"")
        return data


# -- the transport's side: one connection's socket, its channel, its Conn -----------------------
def recv(sock: socket.socket, chan: TlsChannel, conn: Conn, buf: memoryview, per_turn: int,
         now: float) -> None:
    """Receive ciphertext into the connection's room (what `Conn.room_in` allows, this
    channel's bytes counted) and decrypt what can be. Raises ssl.SSLError."""
    got = 0
    room = conn.room_in()
    while room > 0 and got < per_turn:
        want = min(room, len(buf))
        try:
            n = sock.recv_into(buf, want)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            conn.dead = True
            return
        chan.receive(buf[:n])
        decrypt(chan, conn, now)
        if n < want or conn.dead:  # drained, or the peer closed its side
            break
        got += n
        room = conn.room_in()


def decrypt(chan: TlsChannel, conn: Conn, now: float) -> None:
    """Hand the connection every byte of plaintext there is. Plaintext is never longer than
    the ciphertext it came from, so this moves bytes already counted, never adds any; it
    must not wait for room, or a connection whose room is all ciphertext would never move."""
    try:
        while not conn.eof:
            data = chan.read(CHUNK)
            if data is None:
                break
            conn.feed(data, now)  # b"": the peer closed
    finally:
        conn.set_wire(chan.in_pending(), chan.out_pending())  # out: handshake messages


def send(sock: socket.socket, chan: TlsChannel, conn: Conn, now: float) -> None:
    """Send pending ciphertext; when all of it has left, encrypt up to CHUNK more bytes of
    the connection's replies, and so on until the socket is full or nothing is left."""
    try:
        while True:
            out = chan.to_send()
            if out.nbytes:
                try:
                    n = sock.send(out)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    conn.dead = True
                    return
                chan.sent(n)
                if n < out.nbytes:
                    return
                continue
            if not conn.out or not chan.handshaken:
                return
            parts, size = [], 0
            for mv in conn.out:
                take = min(mv.nbytes, CHUNK - size)
                parts.append(mv[:take])
                size += take
                if size >= CHUNK:
                    break
            chan.encrypt(b"".join(parts))
            conn.consume(size, now)
    finally:
        conn.set_wire(conn.wire_in, chan.out_pending())


class ServerTls:
    """The transport's TLS: one context for every connection, the counters, and a log
    throttled to a line a second (a scanner failing TLS in a loop must not fill the log)."""

    def __init__(self, ctx: ssl.SSLContext, stats: Stats, log: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.stats = stats
        self.log = log
        self._last_log = -1e9

    def start(self, conn: Conn, now: float) -> TlsChannel:
        """The STARTTLS acknowledgement has left: from here on, TLS (the handshake timeout
        still runs: it covers the TLS handshake too)."""
        chan = TlsChannel(self.ctx)
        self.stats.tls_sessions += 1
        leftover = conn.tls_begun()
        if leftover:
            chan.receive(leftover)
        try:
            decrypt(chan, conn, now)
        except ssl.SSLError as exc:
            self.failed(chan, conn, exc.reason or str(exc))
        return chan

    def recv(self, sock: socket.socket, chan: TlsChannel, conn: Conn, buf: memoryview,
             per_turn: int, now: float) -> None:
        try:
            recv(sock, chan, conn, buf, per_turn, now)
        except ssl.SSLError as exc:
            self.failed(chan, conn, exc.reason or str(exc))

    def send(self, sock: socket.socket, chan: TlsChannel, conn: Conn, now: float) -> None:
        try:
            send(sock, chan, conn, now)
        except ssl.SSLError as exc:  # e.g. the peer's close_notify came first
            self.failed(chan, conn, exc.reason or str(exc))

    def end(self, sock: socket.socket, chan: TlsChannel, conn: Conn) -> None:
        """Before the socket closes: a peer that left in the middle of the TLS handshake
        (a client that did not trust us may just hang up) is a failure too; a session that
        was up gets a close_notify, if the socket takes it."""
        if not chan.handshaken and not chan.failed:
            self.failed(chan, conn, "the handshake did not finish")
        try:
            sock.send(chan.close_notify())
        except (OSError, ssl.SSLError):
            pass

    def failed(self, chan: TlsChannel, conn: Conn, why: str) -> None:
        """The peer broke TLS (did not trust our certificate, does not speak TLS, went
        away): that connection ends; counted, and logged at most once a second."""
        chan.failed = True
        conn.dead = True
        self.stats.tls_failures += 1
        now = time.monotonic()
        if now - self._last_log > 1.0:
            self._last_log = now
            self.log(f"nbd: TLS with {conn.peer} (node{conn.identity}) failed: {why} "
                     f"({self.stats.tls_failures} so far)")
