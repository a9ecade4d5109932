"""NBD transport of the N-module: non-blocking TCP, driven by the guest's poll loop.

Per identity this domain serves, one listening socket on the identity's own loopback address
(`vmemu.config.nbd_address`: node N is base + N, 127.0.10.N by default), so a takeover is a
real address takeover: the partner binds the failed node's address and clients reconnecting
to the same URI reach it. `unbind(identity)` closes the listener and every connection of the
identity (giveback, shutdown).

The guest's loop registers `poll_fds()` with its zmq.Poller (which polls raw descriptors as
well as ZeroMQ sockets) and hands what was ready to `service()`. The protocol itself is the
pure machine of domains/nbd_proto.py; here are only sockets, buffers and the mapping of
requests onto D-module calls:

- every D-module call stays within its limits (sector-aligned, at most 1 MiB): a longer
  request is split into 1 MiB pieces, and an unaligned one read-modify-writes its first and
  last sector, reading them in the same step that writes them back;
- a write (WRITE, and TRIM / WRITE_ZEROES, which write zeros) is acknowledged only once every
  piece of it returned from the D-module, i.e. is in the NVLog, NVRAM, which is stable
  storage: so FUA needs nothing more, and FLUSH, taken in order after everything before it
  on the connection, just checks the LUN;
- work per loop turn is bounded (pieces and bytes), so control requests and the heartbeat's
  view of the loop keep flowing under load; `busy()` tells the loop not to sleep;
- NBD has no retry ids: writes go to the D-module with client id 0 (no exactly-once table).
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from typing import Any, Callable

import zmq

from domains import nbd_proto as P
from storage.lun import MAX_IO, SECTOR
from vmemu.errors import BadRequest, Fenced, NoSpace, OutOfRange, UnknownLun, VmemuError

TURN_PIECES = 512  # D-module calls per loop turn, over all connections
TURN_BYTES = 8 << 20  # bytes moved through the D-module per loop turn
RECV_CHUNK = 256 << 10
RECV_PER_TURN = 4 << 20  # per connection
MAX_JOBS = 64  # decoded requests queued per connection before we stop reading it
OUT_HIGH = 16 << 20  # queued reply bytes before a connection's work and reading pause
IN_HIGH = 64 << 20  # received but unfinished request bytes before we stop reading a connection
CLOSING_GRACE_S = 10.0  # a closing connection whose peer does not read its last replies
ACCEPT_PER_TURN = 32
_ZEROS = bytes(MAX_IO)


class _Job:
    __slots__ = ("req", "pos", "buf")

    def __init__(self, req: P.Request) -> None:
        self.req = req
        self.pos = -1  # next (aligned) offset to do; -1: not started
        self.buf: bytearray | None = None  # READ: the aligned range read so far


class _Conn:
    def __init__(self, sock: socket.socket, identity: int, lun_of: dict[str, int],
                 proto: P.ServerProto, peer: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.identity = identity
        self.lun_of = lun_of
        self.proto = proto
        self.peer = peer
        self.jobs: deque[_Job] = deque()
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.eof = False
        self.closing: P.Close | None = None
        self.closing_since = 0.0
        self.dead = False
        self.starved = False  # the machine needs more input before it can decode anything
        self.queued_bytes = 0  # WRITE payload held by queued jobs

    def queue_output(self) -> None:
        for b in self.proto.pop_output():
            mv = memoryview(b).cast("B")
            if mv.nbytes:
                self.out.append(mv)
                self.out_bytes += mv.nbytes

    def wants_input(self) -> bool:
        return (not self.eof and self.closing is None and len(self.jobs) < MAX_JOBS
                and self.out_bytes < OUT_HIGH
                and self.queued_bytes + self.proto.buffered() < IN_HIGH)

    def can_decode(self) -> bool:
        return (self.closing is None and not self.starved and not self.dead
                and len(self.jobs) < MAX_JOBS and self.out_bytes < OUT_HIGH)

    def runnable(self) -> bool:
        """Has work, and its peer is reading the replies (memory stays bounded)."""
        return bool(self.jobs) and not self.dead and self.out_bytes < OUT_HIGH


class NbdServer:
    def __init__(self, dmodule: Any, node: int, address_of: Callable[[int], tuple[str, int]],
                 on_request: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        """`dmodule`: write/read/flush/served as domains.dmodule.DModule;
        `address_of(identity) -> (host, port)`; `on_request(identity)` after each answer."""
        self.d = dmodule
        self.node = node
        self.address_of = address_of
        self.on_request = on_request
        self.log = log or (lambda msg: None)
        self.listeners: dict[int, socket.socket] = {}  # identity -> listening socket
        self.by_listener_fd: dict[int, int] = {}  # fd -> identity
        self.conns: dict[int, _Conn] = {}  # fd -> connection
        self.served_requests = 0
        self.errors = 0
        self._rr = 0

    # -- identities --------------------------------------------------------------------------
    def bind(self, identity: int, deadline_s: float = 5.0) -> tuple[str, int]:
        """Listen on the identity's address. Retries EADDRINUSE until the deadline (the old
        holder's socket may take an instant to go); then raises."""
        if identity in self.listeners:
            return self.listeners[identity].getsockname()[:2]
        host, port = self.address_of(identity)
        end = time.monotonic() + deadline_s
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(128)
                s.setblocking(False)
                break
            except OSError as exc:
                s.close()
                if exc.errno != errno.EADDRINUSE or time.monotonic() > end:
                    raise VmemuError(f"node{self.node}: cannot serve NBD for node{identity} on "
                                     f"{host}:{port}: {exc.strerror}") from None
                time.sleep(0.005)
        self.listeners[identity] = s
        self.by_listener_fd[s.fileno()] = identity
        return s.getsockname()[:2]

    def unbind(self, identity: int) -> None:
        s = self.listeners.pop(identity, None)
        if s is not None:
            self.by_listener_fd.pop(s.fileno(), None)
            s.close()
        for c in [c for c in self.conns.values() if c.identity == identity]:
            self._drop(c)

    def close(self) -> None:
        for ident in list(self.listeners):
            self.unbind(ident)
        for c in list(self.conns.values()):
            self._drop(c)

    def connections(self, identity: int | None = None) -> int:
        return sum(1 for c in self.conns.values() if identity is None or c.identity == identity)

    # -- the loop's side ---------------------------------------------------------------------
    def poll_fds(self) -> dict[int, int]:
        """Descriptors to register with the loop's zmq.Poller, with their events."""
        fds = {fd: zmq.POLLIN for fd in self.by_listener_fd}
        for fd, c in self.conns.items():
            ev = (zmq.POLLIN if c.wants_input() else 0) | (zmq.POLLOUT if c.out else 0)
            if ev:
                fds[fd] = ev
        return fds

    def busy(self) -> bool:
        """Work is waiting that needs no new input: the loop should poll without sleeping."""
        return any(c.runnable() or c.can_decode() for c in self.conns.values())

    def service(self, ready: dict[Any, int]) -> None:
        """One turn: accept, read, run a bounded amount of work, write, close what is done."""
        for fd, ident in list(self.by_listener_fd.items()):
            if ready.get(fd, 0) & zmq.POLLIN:
                self._accept(ident)
        for fd, c in list(self.conns.items()):
            ev = ready.get(fd, 0)
            if ev & zmq.POLLIN and c.wants_input():
                self._read(c)
            if ev & zmq.POLLERR:
                c.dead = True
        self._run_jobs()
        commit = getattr(self.d, "commit_pending_writes", None)
        if commit is not None:
            try:
                commit()  # --ha-mode none: the turn's writes are durable before any reply leaves
            except Fenced:
                raise  # a stale incarnation: the loop ends it
            except Exception as exc:  # noqa: BLE001 - whatever it was, those acks must not go
                self.log(f"group commit failed ({exc}); dropping connections with replies queued")
                for c in self.conns.values():
                    if c.out:
                        c.dead = True
        now = time.monotonic()
        for c in list(self.conns.values()):
            if c.out and not c.dead:
                self._write(c)
            if c.dead or (c.closing is not None and not c.jobs and not c.out):
                self._drop(c)
            elif c.closing is not None and now - c.closing_since > CLOSING_GRACE_S:
                self._drop(c)

    # -- sockets -----------------------------------------------------------------------------
    def _accept(self, identity: int) -> None:
        lst = self.listeners.get(identity)
        if lst is None:
            return
        for _ in range(ACCEPT_PER_TURN):
            try:
                sock, peer = lst.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log(f"nbd accept on node{identity}'s address: {exc}")
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            exports, lun_of = self._exports(identity)
            c = _Conn(sock, identity, lun_of, P.ServerProto(exports), peer)
            c.queue_output()  # the greeting
            self.conns[c.fd] = c

    def _exports(self, identity: int) -> tuple[list[P.Export], dict[str, int]]:
        served = self.d.served.get(identity)
        luns = [] if served is None else served.luns
        exports: list[P.Export] = []
        lun_of: dict[str, int] = {}
        for l in luns:
            # Every LUN answers to "lunN"; a LUN in a volume also to its path ("vol0/lun0").
            for name in dict.fromkeys((f"lun{l.index}", l.name)):
                exports.append(P.Export(name, l.size, f"vmemu node{identity} {l.name}, "
                                                      f"served by node{self.node}"))
                lun_of[name] = l.index
        return exports, lun_of

    def _read(self, c: _Conn) -> None:
        got = 0
        while got < RECV_PER_TURN:
            try:
                data = c.sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                c.dead = True
                return
            c.starved = False
            if not data:
                c.eof = True
                c.proto.receive_data(b"")
                break
            c.proto.receive_data(data)
            got += len(data)
            if len(data) < RECV_CHUNK:
                break
        self._decode(c)

    def _decode(self, c: _Conn) -> None:
        """Move decoded requests into the job queue (bounded)."""
        while c.closing is None and len(c.jobs) < MAX_JOBS:
            try:
                ev = c.proto.next_event()
            except Exception as exc:  # a bug in the machine: never take the domain down for it
                self.errors += 1
                self.log(f"nbd protocol error on node{c.identity}'s connection from {c.peer}: {exc!r}")
                c.closing, c.closing_since = P.Close(f"internal error {exc!r}", False), time.monotonic()
                break
            if ev is None:
                c.starved = True
                break
            if isinstance(ev, P.Close):
                c.closing, c.closing_since = ev, time.monotonic()
                break
            c.jobs.append(_Job(ev))
            c.queued_bytes += len(ev.data)
        c.queue_output()

    def _write(self, c: _Conn) -> None:
        while c.out:
            bufs = []
            for i, b in enumerate(c.out):
                if i >= 64:
                    break
                bufs.append(b)
            try:
                sent = c.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                c.dead = True
                return
            c.out_bytes -= sent
            while sent:
                head = c.out[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    c.out.popleft()
                else:
                    c.out[0] = head[sent:]
                    sent = 0

    def _drop(self, c: _Conn) -> None:
        self.conns.pop(c.fd, None)
        c.jobs.clear()
        c.queued_bytes = 0
        c.out.clear()
        try:
            c.sock.close()
        except OSError:
            pass

    # -- requests -> D-module ----------------------------------------------------------------
    def _run_jobs(self) -> None:
        pieces = 0
        moved = 0
        conns = [c for c in self.conns.values() if not c.dead]
        if not conns:
            return
        self._rr = (self._rr + 1) % len(conns)
        order = conns[self._rr:] + conns[:self._rr]
        progress = True
        while progress and pieces < TURN_PIECES and moved < TURN_BYTES:
            progress = False
            for c in order:
                if c.dead or c.identity not in self.listeners:
                    continue
                if c.can_decode():
                    self._decode(c)
                if not c.runnable():
                    continue
                # A connection runs a few pieces before the next gets its turn.
                for _ in range(16):
                    if not c.runnable() or pieces >= TURN_PIECES or moved >= TURN_BYTES:
                        break
                    moved += self._step(c, c.jobs[0])
                    pieces += 1
                    progress = True
                c.queue_output()

    def _step(self, c: _Conn, job: _Job) -> int:
        """Do one piece of the oldest request of a connection; returns bytes moved."""
        req = job.req
        lun = c.lun_of.get(req.export.name, -1)
        try:
            if req.cmd == P.CMD_READ:
                n = self._read_piece(c, job, lun)
            elif req.cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
                n = self._write_piece(c, job, lun)
            elif req.cmd == P.CMD_FLUSH:
                # Everything acknowledged before is in the NVLog (NVRAM: stable storage).
                self.d.flush(c.identity, lun)
                self._done(c, lambda: c.proto.reply_ok(req))
                n = 0
            else:  # the machine only lets valid commands through
                self._done(c, lambda: c.proto.reply_error(req, P.EINVAL, "unsupported command"))
                n = 0
        except Fenced as exc:
            # This incarnation may no longer write: answering anything would be a lie.
            self.log(f"nbd: node{c.identity} fenced, closing connection from {c.peer}: {exc.message}")
            c.dead = True
            return 0
        except OutOfRange as exc:
            err = P.ENOSPC if req.cmd != P.CMD_READ and req.cmd != P.CMD_TRIM else P.EINVAL
            self._fail(c, req, err, exc.message)
            return 0
        except (BadRequest, UnknownLun) as exc:
            self._fail(c, req, P.EINVAL, exc.message)
            return 0
        except NoSpace as exc:  # NVLog full while the disks refuse CPs: what NBD calls ENOSPC
            self._fail(c, req, P.ENOSPC, exc.message)
            return 0
        except VmemuError as exc:
            self._fail(c, req, P.EIO, exc.message)
            return 0
        except Exception as exc:  # an I/O error of the disk, or a bug: fail this request only
            self.log(f"nbd: {req.name} on node{c.identity} failed: {exc!r}")
            self._fail(c, req, P.EIO, f"{type(exc).__name__}: {exc}")
            return 0
        return n

    def _done(self, c: _Conn, reply: Callable[[], None]) -> None:
        job = c.jobs.popleft()
        c.queued_bytes -= len(job.req.data)
        reply()
        self.served_requests += 1
        if self.on_request is not None:
            self.on_request(c.identity)

    def _fail(self, c: _Conn, req: P.Request, err: int, message: str) -> None:
        self.errors += 1
        self._done(c, lambda: c.proto.reply_error(req, err, message))

    def _read_piece(self, c: _Conn, job: _Job, lun: int) -> int:
        req = job.req
        if req.length == 0:
            self._done(c, lambda: c.proto.reply_read(req, b""))
            return 0
        start = req.offset - req.offset % SECTOR
        end = -(-(req.offset + req.length) // SECTOR) * SECTOR
        if job.buf is None:
            job.pos = start
            if end - start <= MAX_IO:
                # The common case: one piece, answered straight from the D-module.
                data = self.d.read(c.identity, lun, start, end - start)
                if len(data) != req.length:
                    data = memoryview(data)[req.offset - start:req.offset - start + req.length]
                self._done(c, lambda: c.proto.reply_read(req, data))
                return end - start
            job.buf = bytearray(end - start)
        n = min(MAX_IO, end - job.pos)
        data = self.d.read(c.identity, lun, job.pos, n)
        job.buf[job.pos - start:job.pos - start + n] = data
        job.pos += n
        if job.pos >= end:
            view = memoryview(job.buf)[req.offset - start:req.offset - start + req.length]
            self._done(c, lambda: c.proto.reply_read(req, view))
        return n

    def _write_piece(self, c: _Conn, job: _Job, lun: int) -> int:
        req = job.req
        if req.length == 0:
            self._done(c, lambda: c.proto.reply_ok(req))
            return 0
        off, end = req.offset, req.offset + req.length
        start = off - off % SECTOR
        aend = -(-end // SECTOR) * SECTOR
        if job.pos < 0:
            job.pos = start
        s = job.pos
        t = min(s + MAX_IO, aend)
        zeros = req.cmd != P.CMD_WRITE
        if s >= off and t <= end:
            piece: bytes | bytearray | memoryview = (
                memoryview(_ZEROS)[:t - s] if zeros else memoryview(req.data)[s - off:t - off])
        else:
            # Read-modify-write of the partial first and/or last sector, in this same step,
            # so no other request's write to those sectors can fall in between.
            buf = bytearray(t - s)
            if s < off:
                buf[:SECTOR] = self.d.read(c.identity, lun, s, SECTOR)
            if t > end and not (s < off and t - s == SECTOR):
                buf[t - s - SECTOR:] = self.d.read(c.identity, lun, t - SECTOR, SECTOR)
            lo, hi = max(s, off), min(t, end)
            buf[lo - s:hi - s] = _ZEROS[:hi - lo] if zeros else memoryview(req.data)[lo - off:hi - off]
            piece = buf
        self.d.write(c.identity, lun, s, piece, 0, 0)
        job.pos = t
        if t >= aend:
            self._done(c, lambda: c.proto.reply_ok(req))
        return t - s
