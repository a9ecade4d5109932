"""NBD transport of the N-module: non-blocking TCP and Unix sockets, driven by the guest's
poll loop.

Per identity this domain serves, a listening socket on the identity's own loopback address
(`vmemu.config.nbd_address`: node N is base + N, 127.0.10.N by default) and/or on its Unix
socket in the private run dir (`--nbd-socket`), so a takeover is a real address takeover:
the partner binds the failed node's address and socket path, and clients reconnecting to
the same URI reach it. A listener that cannot be bound (another user took the address) does
not keep the identity from being served: it is retried in the background
(domains/nbd_listen.py). `unbind(identity)` closes the listeners and every connection of the
identity (giveback, shutdown). With an ssl context (`--nbd-tls on|require`) the machine
acknowledges NBD_OPT_STARTTLS and the connection goes on over TLS (domains/nbd_tls.py).

The guest's loop registers `poll_fds()` with its zmq.Poller (which polls raw descriptors as
well as ZeroMQ sockets) and hands what was ready to `service()`. The protocol is the pure
machine of domains/nbd_proto.py, a connection's work and memory accounting the socket-free
`Conn` of domains/nbd_conn.py; here are sockets, and the bounds across connections
(`Limits`, defaults in domains/nbd_limits.py):

- at most `max_conns` connections a domain (64): more are accepted and closed at once
  (counted in `stats.refused`), never left in the backlog to make the listener spin; at most
  `max_handshakes` (16) of them in the handshake, a newer one evicts the oldest;
- a connection that has not reached transmission within `handshake_timeout_s` (10 s) is
  closed; in transmission, one whose peer neither sends nor reads for `stall_timeout_s`
  (60 s) while it holds buffers, or for `idle_timeout_s` (1 h) while it holds nothing;
- per loop turn, at most `turn_decode` options and requests decoded, `turn_pieces` D-module
  calls and `turn_bytes` bytes moved, over all connections, so control requests and the
  heartbeat's view of the loop keep flowing under any load; `busy()` tells the loop not to
  sleep while budgeted work waits;
- EMFILE, ENFILE, ENOBUFS or ENOMEM on accept stop polling the listeners for
  `accept_backoff_s` (0.1 s) instead of spinning on a listener that stays readable;
- every per-connection step runs inside a boundary: an exception ends that connection
  (counted in `stats.internal`, logged), never the domain.

Memory bound. Everything the NBD service buffers is counted (domains/nbd_conn.py): a
connection holds at most its reserve, 1 MiB + 64 KiB each way in transmission (32 KiB each
way, plus one option's replies, in the handshake), and beyond it a share of one pool of
64 MiB for the whole domain. So all of a domain's NBD connections together hold at most
`Limits().bound()` = 64 x (2 MiB + 132 KiB + 160 KiB for TLS) + 64 MiB, about 210 MiB
(200 MiB of counted bytes; the rest is OpenSSL's, domains/nbd_limits.TLS_EXTRA), plus transient
per-step buffers (one received chunk of 256 KiB, one 1 MiB piece), however many clients
connect and whatever they send or fail to read. Kernel socket buffers are the kernel's
(bounded by net.ipv4.tcp_rmem/tcp_wmem) and not in the domain's RSS.
"""

from __future__ import annotations

import errno
import itertools
import socket
import ssl
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import zmq

from domains import nbd_proto as P
from domains import nbd_tls
from domains.nbd_conn import Conn
from domains.nbd_limits import Limits, Pool, Stats
from domains.nbd_listen import Endpoint, Listeners
from domains.nbd_requests import exports_of
from vmemu.errors import Fenced

_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Peer:
    __slots__ = ("sock", "fd", "conn", "tls")

    def __init__(self, sock: socket.socket, conn: Conn) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.tls: nbd_tls.TlsChannel | None = None


class NbdServer:
    def __init__(self, dmodule: Any, node: int,
                 address_of: Callable[[int], tuple[str, int]] | None,
                 on_request: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None, limits: Limits | None = None,
                 socket_of: Callable[[int], Path] | None = None,
                 tls: ssl.SSLContext | None = None, tls_mode: str = "off",
                 emit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        """`dmodule`: write/read/flush/served as domains.dmodule.DModule;
        `address_of(identity) -> (host, port)` (None: no TCP); `socket_of(identity) -> path`
        (None: no Unix socket); `on_request(identity)` after each answer; `tls`: the server's
        ssl context, `tls_mode` "on" or "require" with it; `emit(kind, fields)`: events."""
        self.d = dmodule
        self.node = node
        self.on_request = on_request
        self.log = log or (lambda msg: None)
        self.limits = limits or Limits()
        self.pool = Pool(self.limits.shared)
        self.stats = Stats()
        self.tls = nbd_tls.ServerTls(tls, self.stats, self.log) if tls is not None else None
        self.tls_mode = tls_mode if tls is not None else "off"
        self.lst = Listeners(node, address_of, socket_of, self.log, emit)
        self.conns: dict[int, _Peer] = {}  # fd -> connection
        self._rr = 0
        self._accept_paused_until = 0.0
        self._last_refusal_log = -1e9
        self._next_expiry = 0.0
        self._rbuf = memoryview(bytearray(self.limits.recv_chunk))

    @property
    def served_requests(self) -> int:
        return self.stats.served

    @property
    def errors(self) -> int:
        return self.stats.errors

    # -- identities --------------------------------------------------------------------------
    @property
    def listeners(self) -> dict[int, socket.socket]:
        """identity -> its TCP listening socket (those bound)."""
        return {i: s for i in self.lst.served if (s := self.lst.tcp_socket(i)) is not None}

    def bind(self, identity: int, deadline_s: float = 5.0,
             retry: bool = False) -> tuple[str, int] | None:
        """Listen for the identity (domains/nbd_listen.py: EADDRINUSE retried until the
        deadline; then raises, or with `retry` serves without that listener and keeps
        trying in the background). Returns the TCP address listened on, if any."""
        self.lst.bind(identity, deadline_s, retry)
        s = self.lst.tcp_socket(identity)
        return s.getsockname()[:2] if s is not None else None

    def unbind(self, identity: int) -> None:
        self.lst.unbind(identity)
        for p in [p for p in self.conns.values() if p.conn.identity == identity]:
            self._drop(p)

    def close(self) -> None:
        self.lst.close()
        for p in list(self.conns.values()):
            self._drop(p)

    def connections(self, identity: int | None = None) -> int:
        return sum(1 for p in self.conns.values() if identity is None or p.conn.identity == identity)

    def summary(self) -> dict[str, Any]:
        """Counters and current figures, for the domain's status (`vmemu status --json`);
        `listeners`: per identity served, per transport, listening or why not."""
        return dict(asdict(self.stats), connections=len(self.conns), held_bytes=self.held_bytes(),
                    pool_used=self.pool.used, listeners=self.lst.view())

    def held_bytes(self) -> int:
        """Bytes all connections hold now (what `Limits.bound()` bounds)."""
        return sum(p.conn.in_bytes() + p.conn.out_bytes() for p in self.conns.values())

    # -- the loop's side ---------------------------------------------------------------------
    def poll_fds(self) -> dict[int, int]:
        """Descriptors to register with the loop's zmq.Poller, with their events."""
        fds: dict[int, int] = {}
        if not self._accept_paused_until or time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            fds = {fd: zmq.POLLIN for fd in self.lst.by_fd}
        for fd, p in self.conns.items():
            c = p.conn
            ev = (zmq.POLLIN if c.room_in() > 0 else 0) | (zmq.POLLOUT if c.out or c.wire_out
                                                            else 0)
            if ev:
                fds[fd] = ev
        return fds

    def busy(self) -> bool:
        """Work is waiting that needs no new input: the loop should poll without sleeping."""
        return any(p.conn.runnable() or p.conn.can_decode() for p in self.conns.values())

    def service(self, ready: dict[Any, int]) -> None:
        """One turn: accept, read, decode and run a bounded amount of work, write, close what
        is done or timed out."""
        now = time.monotonic()
        self.lst.retry(now)
        if not self._accept_paused_until or now >= self._accept_paused_until:
            for fd, ep in list(self.lst.by_fd.items()):
                if ready.get(fd, 0) & zmq.POLLIN:
                    self._accept(ep, now)
        for fd, p in list(self.conns.items()):
            ev = ready.get(fd, 0)
            if ev & zmq.POLLERR:
                p.conn.dead = True
            elif ev & zmq.POLLIN:
                try:
                    self._read(p, now)
                except Exception as exc:  # noqa: BLE001 - the boundary, inline: a hot path
                    self._internal(p, exc)
        self._run(now)
        commit = getattr(self.d, "commit_pending_writes", None)
        if commit is not None:
            try:
                commit()  # --ha-mode none: the turn's writes are durable before any reply leaves
            except Fenced:
                raise  # a stale incarnation: the loop ends it
            except Exception as exc:  # noqa: BLE001 - whatever it was, those acks must not go
                self.log(f"group commit failed ({exc}); dropping connections with replies queued")
                for p in self.conns.values():
                    if p.conn.out:
                        p.conn.dead = True
        expire = now >= self._next_expiry  # timeouts are seconds: look at them every 50 ms
        if expire:
            self._next_expiry = now + 0.05
        for p in list(self.conns.values()):
            c = p.conn
            if (c.out or c.wire_out) and not c.dead:
                try:
                    self._write(p, now)
                except Exception as exc:  # noqa: BLE001 - the boundary, inline: a hot path
                    self._internal(p, exc)
            if c.tls_wanted is not None and c.tls_ready() and self.tls is not None:
                p.tls = self._guard(p, self.tls.start, c, now)
            if c.finished():
                self._drop(p)
            elif expire:
                self._expire(p, now)

    def release(self, now: float) -> None:
        """--ha-mode mirror: send the replies the partner's acknowledgements now allow
        (domains/nbd_conn.Conn.release), without waiting for the next turn."""
        for p in list(self.conns.values()):
            c = p.conn
            if c.held and not c.dead and c.release():
                try:
                    self._write(p, now)
                except Exception as exc:  # noqa: BLE001 - the boundary, inline: a hot path
                    self._internal(p, exc)

    # -- bounds --------------------------------------------------------------------------------
    def _guard(self, p: _Peer, fn: Callable[..., Any], *args: Any) -> Any:
        """The per-connection boundary: whatever one connection's step raises ends that
        connection only (and the step returns None)."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one connection, not the domain
            self._internal(p, exc)
            return None

    def _internal(self, p: _Peer, exc: Exception) -> None:
        self.stats.internal += 1
        self.log(f"nbd: internal error on node{p.conn.identity}'s connection from "
                 f"{p.conn.peer}: {exc!r}")
        p.conn.dead = True

    def _expire(self, p: _Peer, now: float) -> None:
        c, lim, st = p.conn, self.limits, self.stats
        if c.closing is not None:
            if now - c.closing_since > lim.closing_grace_s:
                self._drop(p)
        elif not c.transmission:
            if now - c.created > lim.handshake_timeout_s:
                st.handshake_timeouts += 1
                self._drop(p)
        elif c.waiting_on_peer():
            if now - c.last_io > lim.stall_timeout_s:
                st.stall_timeouts += 1
                self._drop(p)
        elif now - c.last_io > lim.idle_timeout_s and not c.jobs:
            st.idle_timeouts += 1
            self._drop(p)

    # -- sockets -----------------------------------------------------------------------------
    def _accept(self, ep: Endpoint, now: float) -> None:
        lst, identity = ep.sock, ep.identity
        lim = self.limits
        if lst is None:
            return
        for _ in range(lim.accept_per_turn):
            try:
                sock, peer = lst.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _BACKOFF_ERRNOS:
                    # The pending connection stays in the backlog and the listener readable:
                    # polling it now would spin. Look again after a pause.
                    self.stats.accept_backoffs += 1
                    self._accept_paused_until = now + lim.accept_backoff_s
                    self.log(f"nbd accept on node{identity}'s address: {exc.strerror}; "
                             f"pausing accepts for {lim.accept_backoff_s}s")
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection is gone; the next may be fine
                self.log(f"nbd accept on node{identity}'s address: {exc}")
                return
            try:
                self._admit(identity, sock, peer, now)
            except Exception as exc:  # noqa: BLE001 - e.g. the peer reset before setsockopt
                self.log(f"nbd: connection from {peer} to node{identity} not set up: {exc!r}")
                sock.close()

    def _admit(self, identity: int, sock: socket.socket, peer: Any, now: float) -> None:
        lim = self.limits
        if len(self.conns) >= lim.max_conns:
            sock.close()
            self.stats.refused += 1
            if now - self._last_refusal_log > 1.0:
                self._last_refusal_log = now
                self.log(f"nbd: at the cap of {lim.max_conns} connections; refusing more "
                         f"({self.stats.refused} so far)")
            return
        handshaking = [p for p in self.conns.values()
                       if not p.conn.transmission and p.conn.closing is None]
        if len(handshaking) >= lim.max_handshakes:
            self.stats.evicted += 1
            self._drop(min(handshaking, key=lambda p: p.conn.created))
        sock.setblocking(False)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:  # a Unix peer has no address; its credentials say who it is, for the logs
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            peer = f"unix:pid {pid} uid {uid}"
        exports, lun_of = exports_of(self.d, identity, self.node)
        c = Conn(P.ServerProto(exports, tls=self.tls_mode), identity, lun_of, self.d, lim,
                 self.pool, self.stats, peer, now, self.on_request, self.log)
        p = _Peer(sock, c)
        self.conns[p.fd] = p

    def _read(self, p: _Peer, now: float) -> None:
        if p.tls is not None and self.tls is not None:
            self.tls.recv(p.sock, p.tls, p.conn, self._rbuf, self.limits.recv_per_turn, now)
            return
        c = p.conn
        got = 0
        lim = self.limits
        buf = self._rbuf
        room = c.room_in()
        while room > 0 and got < lim.recv_per_turn:
            want = min(room, len(buf))
            try:
                # Into one buffer of the server's: a fresh 256 KiB for every recv costs an
                # allocation (and page faults) per turn, more than the request it carries.
                n = p.sock.recv_into(buf, want)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                c.dead = True
                return
            c.feed(buf[:n], now)  # the machine copies what it keeps
            if n < want:  # drained (or the peer closed its side)
                break
            got += n
            room = c.room_in()

    def _write(self, p: _Peer, now: float) -> None:
        if p.tls is not None and self.tls is not None:
            self.tls.send(p.sock, p.tls, p.conn, now)
            return
        c = p.conn
        while c.out:
            bufs = list(itertools.islice(c.out, 64))
            try:
                sent = p.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                c.dead = True
                return
            c.consume(sent, now)

    def _drop(self, p: _Peer) -> None:
        if self.conns.get(p.fd) is p:
            del self.conns[p.fd]
        p.conn.drop()
        if p.tls is not None and self.tls is not None:
            self.tls.end(p.sock, p.tls, p.conn)
        try:
            p.sock.close()
        except OSError:
            pass

    # -- work across connections ---------------------------------------------------------------
    def _run(self, now: float) -> None:
        """Decode and run work, round robin over connections, within the turn's budgets."""
        lim = self.limits
        peers = [p for p in self.conns.values() if not p.conn.dead]
        if not peers:
            return
        self._rr = (self._rr + 1) % len(peers)
        order = peers[self._rr:] + peers[:self._rr]
        decoded = pieces = moved = 0
        progress = True
        while progress and pieces < lim.turn_pieces and moved < lim.turn_bytes:
            progress = False
            for p in order:
                c = p.conn
                if c.dead or c.identity not in self.lst.served:
                    continue
                if decoded < lim.turn_decode and c.can_decode():
                    # A few messages each, so one pipelining client cannot take the budget.
                    n = c.decode(min(16, lim.turn_decode - decoded), now)
                    decoded += n
                    progress = progress or n > 0
                if pieces < lim.turn_pieces and moved < lim.turn_bytes and c.runnable():
                    dp, dm = self._guard(p, c.run, pieces, moved) or (0, 0)
                    pieces += dp
                    moved += dm
                    progress = progress or dp > 0
