"""The N-module: client protocol termination, one listener per identity this domain serves.

Transport (a ZeroMQ ROUTER bound at the identity's endpoint) and protocol (vmemu's block
protocol: info, read, write, flush on a LUN, each with a request id) are kept apart, so that a
standard protocol can sit beside this one without touching the D-module: NBD does, on the
identity's own loopback address (domains/nbd_proto.py, the protocol; domains/nbd_server.py,
its TCP transport in the same loop).

Block protocol, carried in bus frames (vmemu.bus.codec):
    info  {}                                            -> {identity, served_by, luns: [{lun, size}]}
    read  {lun, offset, length}                         -> bytes
    write {lun, offset, data, client}   (id = request)  -> {seq}
    flush {lun}                                         -> {}

Instead of `lun` (an index of the identity the endpoint belongs to), a request may name
`path` = "volume/lun": then any node's endpoint serves any volume. The N-module looks the
volume up in the VLDB (its domain's RDB replica, cached until the RDB changes) and forwards
through the CF path: a local call when its own domain serves the owning identity, else a bus
RPC to that identity's endpoint (whoever serves it: after a takeover, the partner). A
forwarded request carries the original request id, so exactly-once holds across the hop, and
is never forwarded twice.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import deque
from typing import Any, Callable

import zmq

from domains.dmodule import DModule
from storage.lun import MAX_IO
from vmemu.bus import codec
from vmemu.datadir import RunDir
from vmemu.bus.rpc import AsyncRpcClient, RpcServer
from vmemu.errors import BadRequest, Fenced, InvalidState, UnknownLun, VmemuError

FORWARD_TIMEOUT_S = 10.0  # a forwarded request outlives a takeover of the owning identity
MAX_LUN = 0xFFFF  # the NVLog's global LUN id keeps the LUN index in 16 bits
# A frame on an identity endpoint: one request of at most MAX_IO bytes, plus its fields
# (clients.block.FRAME_LIMIT says the same on the client's side).
IDENTITY_MAX_MSG = MAX_IO + (64 << 10)


class Forward(Exception):
    """The request belongs to a volume another domain serves: send it on to `owner`."""

    def __init__(self, owner: int) -> None:
        self.owner = owner


class BlockProtocol:
    """Turns one decoded request into a D-module call; knows nothing about sockets."""

    def __init__(self, dmodule: DModule, node: int,
                 vldb: Callable[[str], int] | None = None) -> None:
        self.d = dmodule
        self.node = node
        self.vldb = vldb
        self._vldb_cache: dict[str, int] = {}

    def invalidate_vldb(self) -> None:
        self._vldb_cache.clear()

    def owner_of(self, volume: str) -> int:
        owner = self._vldb_cache.get(volume)
        if owner is None:
            if self.vldb is None:
                raise BadRequest("this endpoint takes LUN indexes only")
            owner = self._vldb_cache[volume] = self.vldb(volume)
        return owner

    def resolve(self, identity: int, req: codec.Request) -> tuple[int, int]:
        """(identity, lun index) a request is for; Forward if another domain serves it."""
        path = req.args.get("path")
        if path is None:
            return identity, codec.arg(req, "lun", int)
        if not isinstance(path, str) or path.count("/") != 1:
            raise BadRequest(f"LUN path {path!r} must be VOLUME/LUN")
        volume = path.split("/")[0]
        owner = identity if volume == "vol0" else self.owner_of(volume)
        served = self.d.served.get(owner)
        if served is None:
            if req.args.get("forwarded"):
                raise BadRequest(f"{path}: forwarded to node{self.node}, which does not serve "
                                 f"node{owner} (the VLDB changed under the request; retry)")
            raise Forward(owner)
        for h in served.luns:
            if h.name == path:
                return owner, h.index
        raise UnknownLun(f"no LUN {path} on node{owner}")

    def handle(self, identity: int, req: codec.Request) -> Any:
        """Check every field at this edge, then make the D-module call.

        Ranges: a LUN index fits the NVLog's 16-bit LUN field, offsets and ids are below
        2**63, a length is at most MAX_IO (the LUN's own check then says whether the range
        fits the LUN). Nothing out of range gets past here into a fixed-width field.
        """
        op = req.op
        if op in ("write", "read", "flush") and "path" in req.args:
            identity, lun_index = self.resolve(identity, req)
            req = codec.Request(req.id, op, dict(req.args, lun=lun_index))
        if op == "write":
            lun = codec.int_arg(req, "lun", 0, MAX_LUN)
            offset = codec.int_arg(req, "offset", 0, codec.U63)
            data = codec.arg(req, "data", bytes)
            client = codec.int_arg(req, "client", 0, codec.U63, 0)
            # The original id, if forwarded (CF path); else the frame's own.
            request = codec.int_arg(req, "request", 0, codec.U63, req.id)
            return {"seq": self.d.write(identity, lun, offset, data, client, request)}
        if op == "read":
            lun = codec.int_arg(req, "lun", 0, MAX_LUN)
            return self.d.read(identity, lun, codec.int_arg(req, "offset", 0, codec.U63),
                               codec.int_arg(req, "length", 0, MAX_IO))
        if op == "flush":
            self.d.flush(identity, codec.int_arg(req, "lun", 0, MAX_LUN))
            return {}
        if op == "info":
            served = self.d.served.get(identity)
            luns = [] if served is None else [{"lun": l.index, "size": l.size} for l in served.luns]
            return {"identity": f"node{identity}", "served_by": f"node{self.node}", "luns": luns}
        raise BadRequest(f"unknown block op {op!r}")


class NModule:
    def __init__(self, ctx: zmq.Context, run: RunDir, dmodule: DModule, node: int,
                 on_first_request: Callable[[int, float], None],
                 vldb: Callable[[str], int] | None = None) -> None:
        self.ctx = ctx
        self.run = run
        self.guards: dict[int, int] = {}  # identity -> fd of its lock file, held while served
        self.protocol = BlockProtocol(dmodule, node, vldb)
        self.forwarders: dict[int, AsyncRpcClient] = {}
        self.forwarded = 0
        self.listeners: dict[int, RpcServer] = {}
        self.on_first_request = on_first_request
        self.first_pending: set[int] = set()
        # --ha-mode mirror: replies waiting for the partner to hold what was logged before
        # them, as (ticket, identity, peer, request id, result), oldest (lowest ticket) first.
        self.gated: deque[tuple[int, int, bytes, int, Any]] = deque()
        self.errors = 0
        self.internal_errors = 0
        self.on_error: Callable[[int, str, Exception], None] = lambda ident, op, exc: None

    def bind(self, identity: int, deadline_s: float = 5.0) -> None:
        """Assume an identity: take its lock (free the instant its last holder died), then
        bind its endpoint.

        Binding a filesystem socket replaces whatever socket had the name, so the lock, not
        the bind, is what makes this the one process serving the identity; the run dir's
        0700 mode keeps every other user from binding (or connecting to) the name at all.
        """
        if identity in self.listeners:
            return
        self.guards[identity] = take_lock(self.run.identity_lock(identity), deadline_s)
        try:
            self.listeners[identity] = RpcServer(self.ctx, self.run.identity(identity),
                                                 max_msg=IDENTITY_MAX_MSG)
        except BaseException:
            os.close(self.guards.pop(identity))
            raise
        self.first_pending.add(identity)

    def unbind(self, identity: int) -> None:
        srv = self.listeners.pop(identity, None)
        if srv is not None:
            srv.close()
        guard = self.guards.pop(identity, None)
        if guard is not None:
            os.close(guard)
        self.first_pending.discard(identity)
        if any(g[1] == identity for g in self.gated):  # never answered: the client retries
            self.gated = deque(g for g in self.gated if g[1] != identity)

    def sockets(self) -> dict[zmq.Socket, int]:
        return {srv.sock: ident for ident, srv in self.listeners.items()}

    def serve_ready(self, identity: int, budget: int = 256) -> None:
        """Answer what is queued on one identity's socket (bounded, so heartbeats keep flowing)."""
        srv = self.listeners.get(identity)
        if srv is None:
            return
        held: list[tuple[Any, Any]] = []  # --ha-mode none: write acks wait for the group CP
        d = self.protocol.d
        gate = getattr(d, "ack_gate", None)
        for _ in range(budget):
            if not srv.sock.poll(0):
                break
            inc = srv.recv()
            if inc is None:
                continue
            try:
                result = self.protocol.handle(identity, inc.request)
            except Forward as fwd:
                self._forward(srv, inc, fwd.owner)
                continue
            except VmemuError as exc:
                self.errors += 1
                srv.reply_error(inc.peer, inc.request.id, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug met by one request fails that
                self.errors += 1      # request only; the domain goes on serving the others
                self.internal_errors += 1
                srv.reply_error(inc.peer, inc.request.id,
                                VmemuError(f"internal error in {inc.request.op!r}: "
                                           f"{type(exc).__name__}: {exc}"))
                self.on_error(identity, inc.request.op, exc)
                continue
            if d.pending_commit and inc.request.op == "write":
                held.append((inc, result))
                continue
            if gate is not None:
                # A read too: it may show a write the partner does not hold yet.
                ticket = gate.ticket()
                if self.gated or not gate.releasable(ticket):
                    self.gated.append((ticket, identity, inc.peer, inc.request.id, result))
                    continue
            srv.reply(inc.peer, inc.request.id, result)
            self.note_served(identity)
        if held:
            try:
                d.commit_pending_writes()
            except Fenced:
                raise  # a stale incarnation: the loop ends it
            except Exception as exc:  # noqa: BLE001 - no ack for a write not made durable
                err = exc if isinstance(exc, VmemuError) else VmemuError(f"commit failed: {exc}")
                for inc, _ in held:
                    srv.reply_error(inc.peer, inc.request.id, err)
                return
            for inc, result in held:
                srv.reply(inc.peer, inc.request.id, result)
            self.note_served(identity)

    def release(self) -> None:
        """Send the gated replies the partner's acknowledgements (or a degraded mirror) now
        allow; tickets only grow, so the first one still held holds the rest."""
        gate = getattr(self.protocol.d, "ack_gate", None)
        g = self.gated
        while g and gate.releasable(g[0][0]):
            _, ident, peer, req_id, result = g.popleft()
            srv = self.listeners.get(ident)
            if srv is not None:
                srv.reply(peer, req_id, result)
                self.note_served(ident)

    # -- CF forwarding to the domain serving another identity ------------------------------------
    def invalidate_vldb(self) -> None:
        self.protocol.invalidate_vldb()

    def _forward(self, srv: RpcServer, inc: Any, owner: int) -> None:
        fwd = self.forwarders.get(owner)
        if fwd is None:
            fwd = self.forwarders[owner] = AsyncRpcClient(self.ctx, self.run.identity(owner))
        req = inc.request
        args = dict(req.args, forwarded=True, request=req.args.get("request", req.id))
        self.forwarded += 1

        def done(res: Any, err: VmemuError | None) -> None:
            if srv.sock.closed:
                return  # the identity was given back meanwhile: the client retries there
            if err is not None:
                srv.reply_error(inc.peer, req.id, err)
            else:
                srv.reply(inc.peer, req.id, res)

        fwd.call(req.op, args, FORWARD_TIMEOUT_S, done)

    def forward_sockets(self) -> dict[zmq.Socket, int]:
        return {f.sock: owner for owner, f in self.forwarders.items()}

    def forward_replies(self, owner: int) -> None:
        f = self.forwarders.get(owner)
        if f is not None:
            f.on_readable()

    def expire(self, now: float) -> None:
        for f in self.forwarders.values():
            f.expire(now)

    def note_served(self, identity: int) -> None:
        """A request of `identity` was answered, by this transport or NBD's
        (domains/nbd_server.py): the first one after a bind is reported (takeover timing)."""
        if identity in self.first_pending:
            self.first_pending.discard(identity)
            self.on_first_request(identity, time.monotonic())

    def close(self) -> None:
        for ident in list(self.listeners):
            self.unbind(ident)
        for f in self.forwarders.values():
            f.close()
        self.forwarders.clear()


def take_lock(path: Any, deadline_s: float) -> int:
    """An exclusive flock on `path`, waiting up to `deadline_s` for a holder to let go (the
    kernel releases it the instant its holder dies); returns the descriptor that holds it."""
    from vmemu.privfs import open_private

    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    end = time.monotonic() + deadline_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > end:
                os.close(fd)
                raise InvalidState(f"{path} is held by another live process: it serves this "
                                   "identity") from None
            time.sleep(0.002)
