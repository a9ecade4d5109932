"""RPC over ZeroMQ: request ids, timeouts, structured errors.

Three pieces, because the processes use the bus in three ways:
- `RpcServer` (ROUTER): answers requests, now or later (a deferred reply keeps the routing id).
- `RpcClient` (DEALER): a blocking call with a deadline, for the CLI and for a guest's uplink.
- `AsyncRpcClient` (DEALER): fire a call, get a callback from the owner's poll loop; the
  hypervisor uses it so that a slow guest never stalls heartbeat monitoring.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import zmq

from vmemu.bus import codec
from vmemu.errors import Timeout, VmemuError, from_wire


# Messages queued per peer, each way. With MAXMSGSIZE this bounds what one peer can make a
# process hold in memory (ZeroMQ counts messages, not bytes, so both limits are needed).
HWM = 1000


def make_socket(ctx: zmq.Context, kind: int, max_msg: int = codec.MAX_FRAME) -> zmq.Socket:
    sock = ctx.socket(kind)
    # A closed socket must never block process exit, and peers come and go by design.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 5)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 50)
    # A frame larger than this is refused by ZeroMQ while it arrives (the peer is disconnected)
    # instead of being taken into memory whole and then found too big.
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


def ready_replies(sock: zmq.Socket, limit: int = 1024) -> Iterator[codec.Reply]:
    """Replies already queued on a DEALER (at most `limit`: the rest wait for the next turn),
    decoded; undecodable frames are dropped."""
    for _ in range(limit):
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = codec.decode(frame)
        except codec.FrameError:
            continue
        if isinstance(msg, codec.Reply):
            yield msg


@dataclass
class Incoming:
    peer: bytes
    request: codec.Request


class RpcServer:
    def __init__(self, ctx: zmq.Context, endpoint: str, max_msg: int = codec.MAX_FRAME) -> None:
        self.sock = make_socket(ctx, zmq.ROUTER, max_msg)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.max_msg = max_msg
        self.bad_frames = 0

    def recv(self) -> Incoming | None:
        """One request, or None when the frame was bad (answered if it carried an id)."""
        parts = self.sock.recv_multipart(copy=True)
        if len(parts) != 2:
            self.bad_frames += 1
            return None
        peer, frame = parts
        try:
            msg = codec.decode(frame, self.max_msg)
        except codec.FrameError as exc:
            self.bad_frames += 1
            if exc.request_id is not None:
                self.reply_error(peer, exc.request_id, exc)
            return None
        if not isinstance(msg, codec.Request):
            self.bad_frames += 1
            return None
        return Incoming(peer, msg)

    def reply(self, peer: bytes, req_id: int, result: Any) -> None:
        if req_id:
            self.sock.send_multipart([peer, codec.encode_result(req_id, result)])

    def reply_error(self, peer: bytes, req_id: int, err: VmemuError) -> None:
        if req_id:
            self.sock.send_multipart([peer, codec.encode_error(req_id, err)])

    def close(self) -> None:
        self.sock.close(0)


class RpcClient:
    """Blocking request/reply with a deadline; replies to abandoned calls are discarded."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float = 5.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)

    def notify(self, op: str, args: dict[str, Any] | None = None) -> None:
        try:
            self.sock.send(codec.encode_request(0, op, args), zmq.NOBLOCK)
        except zmq.Again:
            pass  # a notification is best effort: heartbeats must never block a domain

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        req_id = next(self._ids)
        self.sock.send(codec.encode_request(req_id, op, args))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise Timeout(f"no answer to {op!r} from {self.endpoint} within "
                                  f"{self.timeout if timeout is None else timeout:.1f}s")
                continue
            try:
                msg = codec.decode(self.sock.recv())
            except codec.FrameError:
                continue
            if isinstance(msg, codec.Reply) and msg.id == req_id:
                if msg.ok:
                    return msg.result
                raise from_wire(msg.error or {})

    def close(self) -> None:
        self.sock.close(0)


Callback = Callable[[Any, VmemuError | None], None]


class AsyncRpcClient:
    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[float, str, Callback]] = {}

    def call(self, op: str, args: dict[str, Any], timeout: float, callback: Callback) -> None:
        req_id = next(self._ids)
        self._pending[req_id] = (time.monotonic() + timeout, op, callback)
        self.sock.send(codec.encode_request(req_id, op, args))

    def on_readable(self) -> None:
        for msg in ready_replies(self.sock):
            entry = self._pending.pop(msg.id, None)
            if entry is None:
                continue  # the call already timed out
            _, _, cb = entry
            cb(msg.result, None if msg.ok else from_wire(msg.error or {}))

    def expire(self, now: float) -> None:
        for req_id, (deadline, op, cb) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[req_id]
                cb(None, Timeout(f"no answer to {op!r} from {self.endpoint}"))

    def fail_all(self, err: VmemuError) -> None:
        pending, self._pending = self._pending, {}
        for _, _, cb in pending.values():
            cb(None, err)

    def close(self) -> None:
        self.sock.close(0)
