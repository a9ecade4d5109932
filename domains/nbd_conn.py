"""One NBD connection without its socket: protocol machine, request queue, memory accounting,
and the mapping of requests onto D-module calls.

The TCP transport (domains/nbd_server.py) and the byte-stream entry (domains/nbd_stream.py,
what the fuzzers drive) both serve a connection through `Conn`, so what is fuzzed is what
serves. The transport adds sockets, accept, timeouts and the per-turn budgets across
connections; here is everything that happens to one connection's bytes.

How a request becomes D-module calls is domains/nbd_requests.py (`RequestRunner`, which
`Conn` is); here is when it may run.

Memory. A connection's bytes are counted in two directions: `in_bytes` (received and not yet
carried out: the machine's buffer and queued WRITE payloads) and `out_bytes` (replies not yet
sent, and a multi-piece READ being assembled). During the handshake a connection holds at
most `hs_in` in and `hs_out` plus one option's replies out, and is neither read nor decoded
beyond that: a client that sends options and never reads its replies stops being read (then
the transport's handshake timeout closes it). In transmission each connection has a reserve
of `res_in` and `res_out` (one request of the advertised maximum block size each way, and
some pipelining), so no connection is ever starved of memory by the others; beyond its
reserve it draws on a `Pool` shared by all connections of the domain, up to `conn_max` a
direction. Work that would need more waits: reading stops, a READ waits to start.

TLS. After NBD_OPT_STARTTLS is acknowledged (`tls_wanted`), nothing more is read or decoded
until the transport has sent that reply and started TLS (`tls_begun`). The transport's
encrypted bytes, received and not yet decrypted (`wire_in`) or encrypted and not yet sent
(`wire_out`), count as this connection's: they take from the same room, are held against
the same caps, and a connection is not finished while its last replies are still encrypted
bytes on their way out.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from domains import nbd_proto as P
from domains.nbd_limits import Limits, Pool, Stats
from domains.nbd_requests import Job, RequestRunner
from storage.lun import SECTOR

_PIECE_OVERHEAD = 64  # bytes charged per queued reply piece besides its data (object headers)
_REPLY_ROOM = P.MAX_REPLY + 2 * _PIECE_OVERHEAD  # room one reply needs, READ data aside
_READ = P.CMD_READ


class Conn(RequestRunner):
    """One connection's state and work; no sockets, no clocks but the `now` it is given."""

    def __init__(self, proto: P.ServerProto, identity: int, lun_of: dict[str, int], dmodule: Any,
                 limits: Limits, pool: Pool, stats: Stats, peer: Any = None, now: float = 0.0,
                 on_request: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.proto = proto
        self.identity = identity
        self.lun_of = lun_of
        self.d = dmodule
        self.limits = limits
        self.pool = pool
        self.stats = stats
        self.peer = peer
        self.on_request = on_request
        self.log = log or (lambda msg: None)
        self.jobs: deque[Job] = deque()
        self.out: deque[memoryview] = deque()
        # --ha-mode mirror: replies not yet allowed out, with their tickets (see `release`);
        # counted in out_held like `out`. None of them is the peer's to read yet.
        self.gate = getattr(dmodule, "ack_gate", None)
        self.held: deque[tuple[int, memoryview]] = deque()
        # Bytes in `out` (with _PIECE_OVERHEAD for each piece) and in a READ being assembled.
        self.out_held = 0
        self.queued_bytes = 0  # WRITE payload held by queued jobs
        self.eof = False
        self.closing: P.Close | None = None
        self.closing_since = 0.0
        self.dead = False
        self.starved = False  # the machine needs more input before it can decode anything
        self.excess = 0  # what this connection holds of the pool
        self.tls_wanted: P.StartTls | None = None  # STARTTLS acknowledged, TLS not up yet
        self.wire_in = 0  # the transport's TLS bytes, received and not decrypted yet
        self.wire_out = 0  # the transport's TLS bytes, encrypted and not sent yet
        self.created = now
        self.last_io = now
        self._queue_output()  # the greeting

    # -- accounting ----------------------------------------------------------------------------
    # Called several times a loop turn per connection: attribute arithmetic, few calls.
    @property
    def transmission(self) -> bool:
        return self.proto.export is not None

    def in_bytes(self) -> int:
        return self.proto.buffered() + self.queued_bytes + self.wire_in

    def out_bytes(self) -> int:
        return self.out_held + self.wire_out

    def sync(self) -> None:
        """Settle what this connection holds of the pool after its buffers changed."""
        new = 0
        if self.proto.export is not None and not self.dead:
            lim = self.limits
            e_in = self.proto.buffered() + self.queued_bytes + self.wire_in - lim.res_in
            e_out = self.out_held + self.wire_out - lim.res_out
            new = (e_in if e_in > 0 else 0) + (e_out if e_out > 0 else 0)
        if new != self.excess:
            self.pool.used += new - self.excess
            self.excess = new

    def _settle(self) -> None:
        """`sync`, unless nothing is or was beyond the reserves (the common case, no call)."""
        lim = self.limits
        if self.excess or self.out_held + self.wire_out > lim.res_out \
                or self.proto.buffered() + self.queued_bytes + self.wire_in > lim.res_in:
            self.sync()

    def _allowance(self, held: int, reserve: int) -> int:
        """Bytes one direction may hold in transmission, given the pool's state now: its
        reserve, what it holds of the pool already, and what the pool has free."""
        pool = self.pool
        mine = held - reserve if held > reserve else 0
        allowed = reserve + mine + pool.size - pool.used
        return allowed if allowed < self.limits.conn_max else self.limits.conn_max

    def room_in(self) -> int:
        """Bytes that may be received now (0: do not read this connection)."""
        lim = self.limits
        if self.eof or self.closing is not None or self.dead or len(self.jobs) >= lim.max_jobs \
                or self.tls_wanted is not None:
            return 0
        held_in = self.proto.buffered() + self.queued_bytes + self.wire_in
        if self.proto.export is None:  # the handshake
            return 0 if self.out_held >= lim.hs_out or held_in >= lim.hs_in else lim.hs_in - held_in
        if self.out_held > lim.res_out:
            return 0  # the peer is behind on reading its replies: take no new requests
        if held_in < lim.res_in and not self.excess:
            return lim.res_in - held_in  # the reserve's room; the pool's is looked at beyond it
        room = self._allowance(held_in, lim.res_in) - held_in
        return room if room > 0 else 0

    def _out_limit(self) -> int:
        """Most reply bytes this connection may hold now. Constant while it only adds output
        (what it takes beyond its reserve it takes from what the pool had free), so a loop
        that adds replies computes it once."""
        lim = self.limits
        if self.proto.export is None:
            return lim.hs_out - 1  # below the cap, one more option may be decoded
        return self._allowance(self.out_held, lim.res_out)

    def _room_out(self, need: int) -> bool:
        held = self.out_held
        if self.proto.export is None:
            return held < self.limits.hs_out  # then one more option's replies, whatever they are
        if held + need <= self.limits.res_out:
            return True  # within the reserve: no need to look at the pool
        return held + need <= self._out_limit()

    def _need(self, job: Job) -> int:
        """Reply room the job's next piece needs: a reply, and a READ's data when it starts."""
        r = job.req
        if r.cmd != P.CMD_READ or job.buf is not None:
            return _REPLY_ROOM
        return _REPLY_ROOM + -(-(r.offset + r.length) // SECTOR) * SECTOR - r.offset + r.offset % SECTOR

    def can_decode(self) -> bool:
        return (self.closing is None and not self.starved and not self.dead
                and self.tls_wanted is None
                and len(self.jobs) < self.limits.max_jobs and self._room_out(_REPLY_ROOM))

    def runnable(self) -> bool:
        """Has work it has the memory for (its peer is reading the replies)."""
        jobs = self.jobs
        return bool(jobs) and not self.dead and self._room_out(self._need(jobs[0]))

    def finished(self) -> bool:
        return self.dead or (self.closing is not None and not self.jobs and not self.out
                             and not self.held and not self.wire_out)

    def waiting_on_peer(self) -> bool:
        """Holds bytes only the peer can release: unread replies, or half a request."""
        return bool(self.out) or self.wire_out > 0 or (
            self.starved and self.proto.buffered() + self.wire_in > 0)

    def tls_ready(self) -> bool:
        """STARTTLS was acknowledged and the acknowledgement has left: TLS may start."""
        return self.tls_wanted is not None and not self.out and not self.dead

    def tls_begun(self) -> bytes:
        """The transport has started TLS: haggling goes on over it. Returns what the client
        sent after STARTTLS (TLS bytes, for the transport's TLS)."""
        assert self.tls_wanted is not None
        leftover, self.tls_wanted = self.tls_wanted.leftover, None
        self.proto.tls_started()
        self.starved = False
        return leftover

    def set_wire(self, wire_in: int, wire_out: int) -> None:
        """The transport's TLS bytes now held: settled against the pool at once, so a
        record being assembled takes room like any other byte of this connection."""
        if wire_in != self.wire_in or wire_out != self.wire_out:
            self.wire_in, self.wire_out = wire_in, wire_out
            self._settle()

    # -- input ---------------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> None:
        """Received bytes (b"": the peer closed its side)."""
        self.starved = False
        self.last_io = now
        if not data:
            self.eof = True
        self.proto.receive_data(data)
        self._settle()

    def decode(self, budget: int, now: float = 0.0) -> int:
        """Move decoded requests into the job queue; returns the messages decoded (<= budget)."""
        if self.closing is not None or self.starved or self.dead or self.tls_wanted is not None:
            return 0
        used = 0
        proto, jobs, max_jobs = self.proto, self.jobs, self.limits.max_jobs
        try:
            if proto.export is None:
                used = self._decode_options(budget, now)
            if proto.export is not None and used < budget and self.closing is None \
                    and not self.starved:
                # Requests: what each may add is one refusal at most (an error reply), counted
                # as such, and queued at the end.
                room = self._out_limit() - self.out_held
                while used < budget and len(jobs) < max_jobs and room >= _REPLY_ROOM:
                    ev = proto.decode_one()
                    if ev is None:
                        if proto.need_input:
                            self.starved = True
                            break
                        used += 1
                        room -= _REPLY_ROOM
                        continue
                    used += 1
                    if ev.__class__ is P.Close:
                        self.closing, self.closing_since = ev, now
                        break
                    jobs.append(Job(ev))
                    self.queued_bytes += len(ev.data)
                    room -= _REPLY_ROOM
                self._queue_output()
            self.stats.decoded += used
        except Exception as exc:  # a bug in the machine: never take the domain down for it
            self.stats.internal += 1
            self.log(f"nbd protocol error on node{self.identity}'s connection from {self.peer}: "
                     f"{exc!r}")
            self.closing, self.closing_since = P.Close(f"internal error {exc!r}", False), now
        self._settle()
        return used

    def _decode_options(self, budget: int, now: float) -> int:
        """The handshake: one option at a time, its replies counted before the next (their
        size varies), until transmission starts or a cap or the budget is reached."""
        proto, used = self.proto, 0
        limit = self.limits.hs_out
        while used < budget and proto.export is None and self.out_held < limit:
            ev = proto.decode_one()
            self._queue_output()
            if ev is None:
                if proto.need_input:
                    self.starved = True
                    break
                used += 1
                continue
            used += 1  # only a Close or a StartTls comes out of the handshake
            if ev.__class__ is P.Close:
                self.closing, self.closing_since = ev, now
            elif ev.__class__ is P.StartTls:
                self.tls_wanted = ev
            break
        return used

    # -- output --------------------------------------------------------------------------------
    def _queue_output(self) -> int:
        """Take the machine's replies into `out`; returns the bytes they are counted as."""
        added = 0
        gate = self.gate if self.proto.export is not None else None  # the handshake: no data
        ticket = -1
        for b in self.proto.pop_output():
            mv = memoryview(b)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            if mv.nbytes:
                if gate is not None:
                    # Every reply, a read's too: it may show a write the partner lacks.
                    if ticket < 0:
                        ticket = gate.ticket()
                    if self.held or not gate.releasable(ticket):
                        self.held.append((ticket, mv))
                        added += mv.nbytes + _PIECE_OVERHEAD
                        continue
                self.out.append(mv)
                added += mv.nbytes + _PIECE_OVERHEAD
        self.out_held += added
        return added

    def release(self) -> bool:
        """Move the held replies the gate now allows into `out`, in order; True if any."""
        held, gate, moved = self.held, self.gate, False
        while held and gate.releasable(held[0][0]):
            self.out.append(held.popleft()[1])
            moved = True
        return moved

    def consume(self, sent: int, now: float = 0.0) -> None:
        """`sent` bytes from the head of `out` left (the transport's write, the stream's read)."""
        if not sent:
            return
        self.last_io = now
        while sent:
            head = self.out[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                self.out_held -= head.nbytes + _PIECE_OVERHEAD
                self.out.popleft()
            else:
                self.out[0] = head[sent:]
                self.out_held -= sent
                sent = 0
        if self.excess:  # less held: give the pool back what is no longer beyond the reserve
            self.sync()

    def drop(self) -> None:
        """Forget every buffer (the connection is gone) and give back the pool share."""
        self.dead = True
        self.jobs.clear()
        self.queued_bytes = 0
        self.out.clear()
        self.held.clear()
        self.out_held = 0
        self.proto.pop_output()
        self.sync()

    # -- requests -> D-module ------------------------------------------------------------------
    def run(self, pieces: int, moved: int, turn: int = 16) -> tuple[int, int]:
        """Up to `turn` pieces of this connection's work while the turn's budget allows and
        its replies fit; returns the budget used as (pieces, bytes)."""
        lim = self.limits
        jobs = self.jobs
        max_p = min(turn, lim.turn_pieces - pieces)
        max_m = lim.turn_bytes - moved
        # What the pieces run here may add is counted as what each needed (an upper bound),
        # and the replies are queued once at the end.
        room = self._out_limit() - self.out_held
        p = m = 0
        while jobs and p < max_p and m < max_m and not self.dead:
            job = jobs[0]
            need = _REPLY_ROOM if job.req.cmd != _READ or job.buf is not None else self._need(job)
            if need > room:
                break
            room -= need
            m += self._step(job)
            p += 1
        self._queue_output()
        self._settle()
        return p, m
