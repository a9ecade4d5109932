"""The block client: pipelined requests to an identity endpoint, retried across failover.

Every request carries (client id, request id). A request that got no answer is sent again,
with the same ids, when the connection to the identity comes back (a partner bound it after a
takeover, or the owner after giveback) or when its retry timer fires; the D-module's
exactly-once table makes sure a retried write is applied once.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from vmemu.bus import codec
from vmemu.bus.rpc import make_socket, ready_replies
from storage.lun import MAX_IO
from vmemu.errors import BadRequest, Timeout, VmemuError, from_wire

# What an identity endpoint takes in one frame (domains.nmodule.IDENTITY_MAX_MSG): a client
# may import the storage constant but not the domain's module.
FRAME_LIMIT = MAX_IO + (64 << 10)


@dataclass
class Pending:
    frame: bytes
    op: str
    first_sent: float
    last_sent: float
    attempts: int
    tag: Any


@dataclass
class Completion:
    req_id: int
    ok: bool
    result: Any
    error: VmemuError | None
    latency: float  # seconds from first send to the answer
    attempts: int
    tag: Any


# Errors that mean "this server cannot answer for the identity right now": retry elsewhere-in-time.
RETRYABLE = {"fenced", "unavailable"}


class BlockClient:
    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, client_id: int | None = None,
                 retry_after: float = 0.5, give_up_after: float = 60.0,
                 first_id: int = 1) -> None:
        # `client_id` and `first_id`: the same client on a new connection goes on with its
        # ids; a request id used again would be taken for a retry, and not applied.
        self.endpoint = endpoint
        self.own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.client_id = client_id or (secrets.randbits(62) | 1)
        self.retry_after = retry_after
        self.give_up_after = give_up_after
        self._ids = itertools.count(first_id)
        self.pending: dict[int, Pending] = {}
        self.retries = 0
        self.reconnects = 0
        self.sock = make_socket(self.ctx, zmq.DEALER)
        # No backoff: after a takeover the identity comes back within tens of ms, and a growing
        # reconnect interval would add up to its own length to what the client sees.
        self.sock.setsockopt(zmq.RECONNECT_IVL, 2)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self._was_disconnected = False

    # -- asynchronous interface --------------------------------------------------------------
    def next_id(self) -> int:
        """Reserve a request id (a load tags its payload with it before submitting)."""
        return next(self._ids)

    def submit(self, op: str, args: dict[str, Any], tag: Any = None, req_id: int | None = None) -> int:
        req_id = next(self._ids) if req_id is None else req_id
        if op == "write":
            args = dict(args, client=self.client_id)
        frame = codec.encode_request(req_id, op, args)
        if len(frame) > FRAME_LIMIT:
            # The server's socket would drop it, and the connection with it, unanswered.
            raise BadRequest(f"{op}: a request of {len(frame)} bytes is over the "
                             f"{FRAME_LIMIT}-byte frame limit of an identity endpoint "
                             f"(at most {MAX_IO} bytes of data a request)")
        now = time.monotonic()
        self.pending[req_id] = Pending(frame, op, now, now, 1, tag)
        self.sock.send(frame)
        return req_id

    def poll(self, timeout: float) -> list[Completion]:
        """Completions that arrived within `timeout` seconds (resending what needs it)."""
        out: list[Completion] = []
        end = time.monotonic() + timeout
        while True:
            self._watch_connection()
            self._drain(out)
            now = time.monotonic()
            self._resend_overdue(now, out)
            if out or now >= end:
                return out
            wait = min(end - now, 0.05)
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            poller.poll(max(1, int(wait * 1000)))

    def _drain(self, out: list[Completion]) -> None:
        for msg in ready_replies(self.sock):
            p = self.pending.get(msg.id)
            if p is None:
                continue  # an answer to a retry we already had an answer for
            if not msg.ok and (msg.error or {}).get("code") in RETRYABLE:
                continue  # the old server is going away; the retry timer will send it again
            del self.pending[msg.id]
            err = None if msg.ok else from_wire(msg.error or {})
            out.append(Completion(msg.id, msg.ok, msg.result, err, time.monotonic() - p.first_sent,
                                  p.attempts, p.tag))

    def _watch_connection(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                self._was_disconnected = True
            elif ev["event"] == zmq.EVENT_CONNECTED and self._was_disconnected:
                # Someone serves the identity again: what the old server never answered is
                # resent now instead of waiting for its timer.
                self._was_disconnected = False
                self.reconnects += 1
                self._resend_all()

    def _resend_all(self) -> None:
        now = time.monotonic()
        for p in self.pending.values():
            self._resend(p, now)

    def _resend(self, p: Pending, now: float) -> None:
        p.attempts += 1
        p.last_sent = now
        self.retries += 1
        self.sock.send(p.frame)

    def _resend_overdue(self, now: float, out: list[Completion]) -> None:
        for req_id, p in list(self.pending.items()):
            if now - p.first_sent > self.give_up_after:
                del self.pending[req_id]
                out.append(Completion(req_id, False, None,
                                      Timeout(f"{p.op} got no answer from {self.endpoint} in "
                                              f"{self.give_up_after:.0f}s"),
                                      now - p.first_sent, p.attempts, p.tag))
                continue
            backoff = min(self.retry_after * (2 ** min(p.attempts - 1, 4)), 2.0)
            if now - p.last_sent > backoff:
                self._resend(p, now)

    # -- synchronous helpers -----------------------------------------------------------------
    def call(self, op: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """One request, waited for; meant for a client with nothing else in flight."""
        req_id = self.submit(op, args)
        end = time.monotonic() + (timeout or self.give_up_after)
        while time.monotonic() < end:
            for c in self.poll(min(0.1, max(0.0, end - time.monotonic()))):
                if c.req_id == req_id:
                    if c.ok:
                        return c.result
                    raise c.error  # type: ignore[misc]
        self.pending.pop(req_id, None)
        raise Timeout(f"{op} got no answer from {self.endpoint}")

    def info(self) -> dict[str, Any]:
        return self.call("info", {})

    def read(self, lun: int, offset: int, length: int) -> bytes:
        return self.call("read", {"lun": lun, "offset": offset, "length": length})

    def write(self, lun: int, offset: int, data: bytes) -> int:
        return self.call("write", {"lun": lun, "offset": offset, "data": data})["seq"]

    def flush(self, lun: int) -> None:
        self.call("flush", {"lun": lun})

    # By LUN path ("volume/lun"): any node's endpoint serves any volume (the N-module looks
    # the volume up in the VLDB and forwards to the domain that serves it).
    def read_path(self, path: str, offset: int, length: int) -> bytes:
        return self.call("read", {"path": path, "offset": offset, "length": length})

    def write_path(self, path: str, offset: int, data: bytes) -> int:
        return self.call("write", {"path": path, "offset": offset, "data": data})["seq"]

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        if self.own_ctx:
            self.ctx.term()

    def __enter__(self) -> "BlockClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
