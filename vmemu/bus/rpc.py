"""RPC over ZeroMQ: request ids, timeouts, structured errors.

Three pieces, because the processes use the bus in three ways:
- `RpcServer` (ROUTER): answers requests, now or later (a deferred reply keeps the routing id).
- `RpcClient` (DEALER): a blocking call with a deadline, for the CLI and for a guest's uplink.
- `AsyncRpcClient` (DEALER): fire a call, get a callback from the owner's poll loop; the
  hypervisor uses it so that a slow guest never stalls heartbeat monitoring.

Each may carry a fault `tap` (vmemu/bus/faults.py, for the chaos campaign's bus faults): None
unless a fault was set, so the hot path pays one attribute check. A tapped socket hands each
message it sends or receives to the tap, and its owner's loop lets held ones go (`pending`,
`flush`, `expire`): nothing sleeps per message.

`RpcServer(dedup=True)` answers each (peer, request id) once: a request duplicated on the way
(or resent by a confused peer) is dropped, not done twice, and so never gets a second reply
that a reordering could deliver first. Domain 0's and every guest's control endpoints use it;
the identity endpoints do not (their clients resend with the same id on purpose, and the
D-module's exactly-once table answers those).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import zmq

from vmemu.bus import codec
from vmemu.bus.faults import TO_DOM0, TO_GUEST, Tap
from vmemu.errors import Timeout, VmemuError, from_wire


DEDUP_WINDOW = 4096  # (peer, id) pairs a deduplicating server remembers
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
    def __init__(self, ctx: zmq.Context, endpoint: str, max_msg: int = codec.MAX_FRAME,
                 dedup: bool = False) -> None:
        self.sock = make_socket(ctx, zmq.ROUTER, max_msg)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.max_msg = max_msg
        self.bad_frames = 0
        self.duplicates = 0  # requests dropped as repeats (dedup)
        self._seen: OrderedDict[tuple[bytes, int], None] | None = OrderedDict() if dedup else None
        # Fault injection (off: tap None). `tap_node` names the guest whose traffic a request
        # is (None: not a guest's, never faulted); `tap_in` is the direction requests travel.
        self.tap: Tap | None = None
        self.tap_node: Callable[[codec.Request], int | None] = lambda req: None
        self.tap_in = TO_DOM0
        self._ready: deque[Incoming] = deque()
        self._reply_to: OrderedDict[tuple[bytes, int], tuple[int, str]] = OrderedDict()

    def set_tap(self, tap: Tap, node_of: Callable[[codec.Request], int | None],
                incoming: str) -> None:
        self.tap, self.tap_node, self.tap_in = tap, node_of, incoming

    def pending(self, now: float | None = None) -> bool:
        """Let go what the tap held that is due; is a request ready without reading the
        socket? (The owner's loop drains when this or the socket says so.)"""
        if self.tap is not None:
            for kind, item in self.tap.due(time.monotonic() if now is None else now):
                if kind == "out":
                    self.sock.send_multipart(item)
                elif self._fresh(item):
                    self._ready.append(item)
        return bool(self._ready)

    def recv(self) -> Incoming | None:
        """One request, or None when the frame was bad (answered if it carried an id), a
        repeat, or taken by a fault. Requests a fault let go come first."""
        if self._ready:
            return self._ready.popleft()
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
        inc = Incoming(peer, msg)
        if self.tap is not None:
            node = self.tap_node(msg)
            if node is not None:
                return self._admit(inc, node)
        if self._seen is not None and not self._fresh(inc):
            return None
        return inc

    def _admit(self, inc: Incoming, node: int) -> Incoming | None:
        req = inc.request
        if req.id:  # its reply travels the other way, through the same faults
            self._reply_to[(inc.peer, req.id)] = (node, req.op)
            while len(self._reply_to) > DEDUP_WINDOW:
                self._reply_to.popitem(last=False)
        for kind, item in self.tap.admit(self.tap_in, node, req.op, ("in", inc),  # type: ignore[union-attr]
                                         time.monotonic()):
            if self._fresh(item):
                self._ready.append(item)
        return self._ready.popleft() if self._ready else None

    def _fresh(self, inc: Incoming) -> bool:
        """Not a repeat of a request already taken (dedup servers; notifications pass)."""
        if self._seen is None or not inc.request.id:
            return True
        key = (inc.peer, inc.request.id)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        return True

    def _send_tapped(self, peer: bytes, req_id: int, frame: bytes) -> None:
        key = self._reply_to.pop((peer, req_id), None)
        if key is None:  # not a guest's request: never faulted
            self.sock.send_multipart([peer, frame])
            return
        out = TO_GUEST if self.tap_in == TO_DOM0 else TO_DOM0
        for _, item in self.tap.admit(out, key[0], key[1], ("out", [peer, frame]),  # type: ignore[union-attr]
                                      time.monotonic()):
            self.sock.send_multipart(item)

    def reply(self, peer: bytes, req_id: int, result: Any) -> None:
        if req_id:
            if self.tap is None:
                self.sock.send_multipart([peer, codec.encode_result(req_id, result)])
            else:
                self._send_tapped(peer, req_id, codec.encode_result(req_id, result))

    def reply_error(self, peer: bytes, req_id: int, err: VmemuError) -> None:
        if req_id:
            if self.tap is None:
                self.sock.send_multipart([peer, codec.encode_error(req_id, err)])
            else:
                self._send_tapped(peer, req_id, codec.encode_error(req_id, err))

    def close(self) -> None:
        self.sock.close(0)


class RpcClient:
    """Blocking request/reply with a deadline; replies to abandoned calls are discarded.

    A guest's uplink may be tapped (`tap`, `tap_node`): what it sends travels `to_dom0`,
    the replies it reads `to_guest`. Its owner calls `flush()` now and then for held
    notifications; a call lets its own held messages go while it waits."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float = 5.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)
        self.tap: Tap | None = None
        self.tap_node = 0

    def _send_nb(self, frame: bytes) -> None:
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # a notification is best effort: heartbeats must never block a domain

    def notify(self, op: str, args: dict[str, Any] | None = None) -> None:
        frame = codec.encode_request(0, op, args)
        if self.tap is not None:
            for _, f in self.tap.admit(TO_DOM0, self.tap_node, op, ("out", frame),
                                       time.monotonic()):
                self._send_nb(f)
            return
        self._send_nb(frame)

    def flush(self, now: float | None = None) -> None:
        """Send the held messages that are due (replies held for a call now over are
        dropped: nobody waits for them)."""
        if self.tap is not None:
            for kind, item in self.tap.due(time.monotonic() if now is None else now):
                if kind == "out":
                    self._send_nb(item)

    def next_due(self) -> float | None:
        return None if self.tap is None else self.tap.next_due()

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        req_id = next(self._ids)
        frame = codec.encode_request(req_id, op, args)
        if self.tap is None:
            self.sock.send(frame)
        else:
            for _, f in self.tap.admit(TO_DOM0, self.tap_node, op, ("out", frame),
                                       time.monotonic()):
                self.sock.send(f)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            now = time.monotonic()
            if self.tap is not None:
                for kind, item in self.tap.due(now):
                    if kind == "out":
                        self.sock.send(item)
                    elif item.id == req_id:
                        return _result(item)
            left = deadline - now
            nd = self.next_due()
            wait = left if nd is None else min(left, max(0.0, nd - now))
            if left <= 0 or not self.sock.poll(int(wait * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise Timeout(f"no answer to {op!r} from {self.endpoint} within "
                                  f"{self.timeout if timeout is None else timeout:.1f}s")
                continue
            try:
                msg = codec.decode(self.sock.recv())
            except codec.FrameError:
                continue
            if not isinstance(msg, codec.Reply):
                continue
            got = [msg] if self.tap is None else [
                m for _, m in self.tap.admit(TO_GUEST, self.tap_node, op, ("in", msg),
                                             time.monotonic())]
            for m in got:
                if m.id == req_id:
                    return _result(m)

    def close(self) -> None:
        self.sock.close(0)


def _result(msg: codec.Reply) -> Any:
    if msg.ok:
        return msg.result
    raise from_wire(msg.error or {})


Callback = Callable[[Any, VmemuError | None], None]


class AsyncRpcClient:
    """Calls answered through callbacks from the owner's loop (`on_readable`, `expire`).

    Domain 0's client of a guest may be tapped (`tap`, `tap_node`): requests travel
    `to_guest`, replies `to_dom0`; `expire` (every loop turn) lets held ones go. A reply is
    matched to its call by request id only, so one that comes late (after its call timed
    out) or twice is dropped, never applied."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[float, str, Callback]] = {}
        self.tap: Tap | None = None
        self.tap_node = 0

    def call(self, op: str, args: dict[str, Any], timeout: float, callback: Callback) -> None:
        req_id = next(self._ids)
        self._pending[req_id] = (time.monotonic() + timeout, op, callback)
        frame = codec.encode_request(req_id, op, args)
        if self.tap is None:
            self.sock.send(frame)
            return
        for _, f in self.tap.admit(TO_GUEST, self.tap_node, op, ("out", frame),
                                   time.monotonic()):
            self.sock.send(f)

    def on_readable(self) -> None:
        for msg in ready_replies(self.sock):
            if self.tap is None:
                entry = self._pending.pop(msg.id, None)
                if entry is not None:  # else: the call already timed out
                    entry[2](msg.result, None if msg.ok else from_wire(msg.error or {}))
            else:
                entry = self._pending.get(msg.id)
                for _, m in self.tap.admit(TO_DOM0, self.tap_node, entry[1] if entry else "",
                                           ("in", msg), time.monotonic()):
                    self._dispatch(m)
            if self.sock.closed:
                return  # a callback closed us (its node was fenced): read no further

    def _dispatch(self, msg: codec.Reply) -> None:
        entry = self._pending.pop(msg.id, None)
        if entry is None:
            return  # the call already timed out, or this is a second copy
        _, _, cb = entry
        cb(msg.result, None if msg.ok else from_wire(msg.error or {}))

    def expire(self, now: float) -> None:
        if self.tap is not None:
            for kind, item in self.tap.due(now):
                if self.sock.closed:
                    return
                if kind == "out":
                    self.sock.send(item)
                else:
                    self._dispatch(item)
        for req_id, (deadline, op, cb) in list(self._pending.items()):
            # pop, not del: an earlier callback may have failed them all (a fence)
            if now >= deadline and self._pending.pop(req_id, None) is not None:
                cb(None, Timeout(f"no answer to {op!r} from {self.endpoint}"))

    def fail_all(self, err: VmemuError) -> None:
        pending, self._pending = self._pending, {}
        for _, _, cb in pending.values():
            cb(None, err)

    def close(self) -> None:
        self.sock.close(0)
