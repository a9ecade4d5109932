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
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from domains.dmodule import DModule
from vmemu import datadir
from vmemu.bus import codec
from vmemu.bus.rpc import RpcServer
from vmemu.errors import BadRequest, VmemuError


class BlockProtocol:
    """Turns one decoded request into a D-module call; knows nothing about sockets."""

    def __init__(self, dmodule: DModule, node: int) -> None:
        self.d = dmodule
        self.node = node

    def handle(self, identity: int, req: codec.Request) -> Any:
        op = req.op
        if op == "write":
            lun = codec.arg(req, "lun", int)
            offset = codec.arg(req, "offset", int)
            data = codec.arg(req, "data", bytes)
            client = codec.arg(req, "client", int, 0)
            if not 0 <= client < 2**63:
                raise BadRequest("write: client id out of range")
            return {"seq": self.d.write(identity, lun, offset, data, client, req.id)}
        if op == "read":
            lun = codec.arg(req, "lun", int)
            return self.d.read(identity, lun, codec.arg(req, "offset", int),
                               codec.arg(req, "length", int))
        if op == "flush":
            self.d.flush(identity, codec.arg(req, "lun", int))
            return {}
        if op == "info":
            served = self.d.served.get(identity)
            luns = [] if served is None else [{"lun": l.index, "size": l.size} for l in served.luns]
            return {"identity": f"node{identity}", "served_by": f"node{self.node}", "luns": luns}
        raise BadRequest(f"unknown block op {op!r}")


class NModule:
    def __init__(self, ctx: zmq.Context, cluster_id: str, dmodule: DModule, node: int,
                 on_first_request: Callable[[int, float], None]) -> None:
        self.ctx = ctx
        self.cluster_id = cluster_id
        self.protocol = BlockProtocol(dmodule, node)
        self.listeners: dict[int, RpcServer] = {}
        self.on_first_request = on_first_request
        self.first_pending: set[int] = set()
        self.errors = 0

    def bind(self, identity: int, deadline_s: float = 5.0) -> None:
        """Assume an identity: bind its endpoint (free the instant its last holder died)."""
        endpoint = datadir.identity_endpoint(self.cluster_id, identity)
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.listeners[identity] = RpcServer(self.ctx, endpoint)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > end:
                    raise
                time.sleep(0.001)
        self.first_pending.add(identity)

    def unbind(self, identity: int) -> None:
        srv = self.listeners.pop(identity, None)
        if srv is not None:
            srv.close()
        self.first_pending.discard(identity)

    def sockets(self) -> dict[zmq.Socket, int]:
        return {srv.sock: ident for ident, srv in self.listeners.items()}

    def serve_ready(self, identity: int, budget: int = 256) -> None:
        """Answer what is queued on one identity's socket (bounded, so heartbeats keep flowing)."""
        srv = self.listeners.get(identity)
        if srv is None:
            return
        for _ in range(budget):
            if not srv.sock.poll(0):
                return
            inc = srv.recv()
            if inc is None:
                continue
            try:
                result = self.protocol.handle(identity, inc.request)
            except VmemuError as exc:
                self.errors += 1
                srv.reply_error(inc.peer, inc.request.id, exc)
                continue
            srv.reply(inc.peer, inc.request.id, result)
            self.note_served(identity)

    def note_served(self, identity: int) -> None:
        """A request of `identity` was answered, by this transport or NBD's
        (domains/nbd_server.py): the first one after a bind is reported (takeover timing)."""
        if identity in self.first_pending:
            self.first_pending.discard(identity)
            self.on_first_request(identity, time.monotonic())

    def close(self) -> None:
        for ident in list(self.listeners):
            self.unbind(ident)
