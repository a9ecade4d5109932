"""NVLog mirroring over the bus: the `--ha-mode mirror` baseline, what came before the patent.

Without shared memory, a partner can replay a failed node's log only if every record was also
copied to it before the client was acknowledged, as classic HA pairs do over an interconnect.
The owner sends the region bytes it writes to its partner; the partner keeps a byte-for-byte
copy of the region in its own memory and replays that copy at takeover.

The owner's rules (when a reply may leave, resync, degrading) are the state machine of
domains/mirror_link.py; `MirrorSender` here is its shell: sockets, frames, Domain 0.

Wire format (a DEALER at the owner, the receiver's ROUTER), every message answered in order
with an ordinary bus reply whose id is the message's:

    [request frame op "begin" {region, owner, size, session}]
        an empty copy of `region` for session `session` (a resync starts)
    [request frame op "batch" {region, session, spans: [[start, length], ...]}, data frame]
        the spans' bytes, one after the other, in the data frame

The data frame is sent and received with copy=False: the receiver writes from the frame's
buffer straight into its copy, and pyzmq hands a large frame (a resync chunk, a busy turn's
batch) to ZeroMQ without copying it (below 64 KiB it copies: cheaper than tracking). The
owner does copy the region's bytes once, into that frame, when it sends: a frame handed to
ZeroMQ is read by its I/O thread later, and by then the loop may have reused that part of the
log (a half switch rewrites its header), so a zero-copy view of the live region could carry
bytes of a later state than the batch stands for.

The receiving side runs in a thread with its own socket, so two partners mirroring to each
other never wait on each other's main loops (which would deadlock).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from domains import mirror_link as L
from vmemu.bus import codec
from vmemu.bus.rpc import AsyncRpcClient, make_socket, ready_replies
from vmemu.datadir import RunDir
from vmemu.errors import BadRequest, VmemuError

MAX_SPANS = 1 << 16  # ranges in one batch (a turn's spans are merged: normally a handful)
REPORT_TIMEOUT_S = 2.0  # Domain 0's answer to mirror_state; resent if it does not come


def check_spans(spans: Any, data_len: int, size: int) -> list[tuple[int, int]]:
    """A batch's spans as (start, length), or BadRequest: each inside a region of `size`
    bytes, ascending and disjoint, together exactly the `data_len` bytes of the data frame.
    All are checked before any is applied: a bad batch changes nothing."""
    if not isinstance(spans, list) or len(spans) > MAX_SPANS:
        raise BadRequest(f"mirror: spans must be a list of at most {MAX_SPANS}")
    out: list[tuple[int, int]] = []
    end = total = 0
    for s in spans:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(
                type(v) is int for v in s)):
            raise BadRequest("mirror: a span is not [start, length]")
        start, n = s
        if not (start >= end and 0 < n <= size - start):
            raise BadRequest("mirror: spans must be inside the region, ascending, disjoint")
        out.append((start, n))
        end = start + n
        total += n
    if total != data_len:
        raise BadRequest(f"mirror: spans cover {total} bytes, the data frame has {data_len}")
    return out


@dataclass
class Copy:
    owner: int
    session: int
    data: bytearray
    frozen: bool = False  # taken for a takeover: no later message may change it


class MirrorReceiver:
    """Holds copies of partners' regions, written only by this thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, region_size: int,
                 owners: set[int]) -> None:
        """`region_size`: the cluster's NVRAM region size, the only size a copy may have;
        `owners`: the nodes whose partner we are, the only ones that may mirror to us."""
        self.ctx = ctx
        self.endpoint = endpoint
        self.region_size = region_size
        self.max_msg = region_size + (1 << 20)  # a batch is at most the whole region
        self.owners = owners
        self.copies: dict[int, Copy] = {}  # region -> copy
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirror-receiver", daemon=True)
        self.received = 0
        self.errors = 0
        self.bad_frames = 0

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def take_copy(self, region: int) -> bytearray | None:
        """The copy of `region` for a takeover, frozen: a message of the dead owner still
        queued here must not change it under the replay."""
        with self.lock:
            c = self.copies.get(region)
            if c is None:
                return None
            c.frozen = True
            return c.data

    def _run(self) -> None:
        sock = make_socket(self.ctx, zmq.ROUTER, self.max_msg)
        sock.bind(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                for _ in range(256):
                    if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                        break
                    self._one(sock, sock.recv_multipart(zmq.NOBLOCK, copy=False))
        finally:
            sock.close(0)

    def _one(self, sock: zmq.Socket, parts: list[zmq.Frame]) -> None:
        if len(parts) not in (2, 3):
            self.bad_frames += 1
            return
        peer = parts[0].bytes
        try:
            req = codec.decode(parts[1].bytes, self.max_msg)
        except codec.FrameError as exc:
            self.bad_frames += 1
            if exc.request_id:
                sock.send_multipart([peer, codec.encode_error(exc.request_id, exc)])
            return
        if not isinstance(req, codec.Request):
            self.bad_frames += 1
            return
        try:
            reply = codec.encode_result(req.id, self._handle(req, parts[2].buffer
                                                             if len(parts) == 3 else None))
        except VmemuError as exc:
            reply = codec.encode_error(req.id, exc)
        except Exception as exc:  # noqa: BLE001 - a bad message must not end the thread
            self.errors += 1
            reply = codec.encode_error(req.id, VmemuError(f"mirror: internal error: {exc!r}"))
        if req.id:
            sock.send_multipart([peer, reply])

    def _handle(self, req: codec.Request, data: memoryview | None) -> Any:
        region = codec.int_arg(req, "region", 1, codec.U63)
        session = codec.int_arg(req, "session", 1, codec.U63)
        if req.op == "begin":
            owner = codec.int_arg(req, "owner", 1, codec.U63)
            size = codec.int_arg(req, "size", 0, codec.U63)
            if owner not in self.owners:
                raise BadRequest(f"mirror begin: node{owner} does not mirror to this node")
            if size != self.region_size:
                raise BadRequest(f"mirror begin: a copy is {self.region_size} bytes, not {size}")
            with self.lock:
                old = self.copies.get(region)
                if old is not None and (old.frozen or old.owner != owner):
                    raise BadRequest(f"mirror begin: region {region:#x} is not node{owner}'s "
                                     "to resync")
                if old is not None and session <= old.session:
                    # A begin left over on a connection the owner has since closed, fair-queued
                    # after a newer one: it must not empty a copy the owner now vouches for.
                    raise BadRequest(f"mirror begin: session {session} is not after "
                                     f"{old.session}")
                # One current copy per owner, plus the one before (it may still be in a chain).
                others = [r for r, c in self.copies.items() if c.owner == owner and r != region]
                for r in others[:-1]:
                    del self.copies[r]
                self.copies[region] = Copy(owner, session, bytearray(size))
            return {"ok": True}
        if req.op == "batch":
            spans = codec.arg(req, "spans", list)
            if data is None:
                raise BadRequest("mirror batch: the bytes come in a second frame")
            with self.lock:  # a takeover's take_copy sees a batch wholly or not at all
                c = self.copies.get(region)
                if c is None or c.session != session or c.frozen:
                    raise BadRequest(f"mirror batch: no open copy of region {region:#x} in "
                                     f"session {session}; begin first")
                buf = c.data
                off = 0
                for start, n in check_spans(spans, len(data), len(buf)):
                    buf[start:start + n] = data[off:off + n]
                    off += n
            self.received += 1
            return {"ok": True}
        raise BadRequest(f"unknown mirror op {req.op!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class MirrorSender:
    """The owner's side: the state machine's actions on sockets, its events from them.

    The D-module feeds `add_spans`; the transports ask `ticket`/`releasable` (the ack gate);
    the guest's loop polls `sockets()`, then calls `on_ready` first and `end_turn` last in
    each turn (and polls without sleeping while `busy()`, at most until `next_wakeup()`).
    """

    def __init__(self, ctx: zmq.Context, run: RunDir, owner: int, partner: int | None,
                 region_id: int, region: Any, control: str, token: Callable[[], str],
                 used: Callable[[], int | list[tuple[int, int]]], rate: float = 0.0,
                 emit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        """`emit(kind, fields)`: an event for Domain 0's log (a resync begun, a degrade)."""
        self.ctx = ctx
        self.run = run
        self.owner = owner
        self.partner = partner
        self.region_id = region_id
        self.region = region
        self.control = control
        self.token = token
        self.link = L.Link(partner is not None, used, rate=rate)
        self.sock: zmq.Socket | None = None
        self.hv: AsyncRpcClient | None = None
        self.emit = emit or (lambda kind, fields: None)

    # -- the D-module's and the transports' side -----------------------------------------------
    def add_spans(self, spans: list[tuple[int, int]]) -> None:
        self.link.spans(spans)

    def ticket(self) -> int:
        return self.link.ticket()

    def releasable(self, ticket: int) -> bool:
        return self.link.releasable(ticket)

    # -- the loop's side -----------------------------------------------------------------------
    def sockets(self) -> list[zmq.Socket]:
        return [s for s in (self.sock, self.hv.sock if self.hv else None) if s is not None]

    def busy(self) -> bool:
        return self.link.busy()

    def next_wakeup(self) -> float | None:
        return self.link.next_wakeup()

    def on_ready(self, now: float) -> None:
        """Take the partner's and Domain 0's answers (whatever is queued: cheap if none)."""
        sock = self.sock
        # Looked at before reading: an empty NOBLOCK read raises, twice a turn.
        if sock is not None and sock.get(zmq.EVENTS) & zmq.POLLIN:
            for rep in ready_replies(sock):
                self._do(self.link.reply(rep.id, rep.ok, now), now)
                if self.sock is not sock:
                    break  # degraded: the rest were of a connection now closed
        if self.hv is not None:
            if self.hv.sock.get(zmq.EVENTS) & zmq.POLLIN:
                self.hv.on_readable()
            self.hv.expire(now)

    def end_turn(self, now: float) -> None:
        # Answers that came while this turn ran (a long CP wait, a replay) are not late.
        self.on_ready(now)
        self._do(self.link.turn(now), now)

    def request_resync(self, now: float) -> None:
        self._do(self.link.request_resync(now), now)

    def partner_gone(self, now: float) -> None:
        self._do(self.link.partner_gone(now), now)

    def in_sync(self) -> bool:
        return self.link.in_sync()

    def stats(self) -> dict[str, Any]:
        st = self.link.stats
        return {"mode": self.link.mode, "session": self.link.session,
                "inflight": len(self.link.inflight), "rtt_hist": list(st.rtt_hist),
                **{k: getattr(st, k) for k in (
                    "batches", "bytes", "resync_bytes", "acks", "dropped_spans",
                    "sessions", "syncs", "degrades", "last_degrade", "resync_ms")},
                "rtt_max_ms": round(st.rtt_max_ms, 3),
                "rtt_mean_ms": round(st.rtt_sum_ms / st.acks, 3) if st.acks else None}

    # -- actions -------------------------------------------------------------------------------
    def _do(self, actions: list[L.Action], now: float) -> None:
        for a in actions:
            if isinstance(a, L.Batch):
                self._send_batch(a, now)
            elif isinstance(a, L.Begin):
                self._close()
                self.sock = make_socket(self.ctx, zmq.DEALER)
                self.sock.connect(self.run.mirror(self.partner or 0))
                self._send([codec.encode_request(a.id, "begin", {
                    "region": self.region_id, "owner": self.owner, "size": len(self.region),
                    "session": a.session})], now)
                self.emit("mirror_resync_started", {"partner": f"node{self.partner}",
                                                    "session": a.session,
                                                    "bytes": self.link.copy_end})
            elif isinstance(a, L.Drop):
                self._close()
                self.emit("mirror_degraded", {"partner": f"node{self.partner}",
                                              "reason": a.reason,
                                              "session": self.link.session})
            elif isinstance(a, L.Report):
                self._report(a.in_sync, now)

    def _send_batch(self, a: L.Batch, now: float) -> None:
        total = sum(b - s for s, b in a.ranges)
        frame = bytearray(total)
        off = 0
        with memoryview(self.region) as mv:  # released at once: the mmap may be closed later
            for s, b in a.ranges:
                frame[off:off + b - s] = mv[s:b]
                off += b - s
        header = codec.encode_request(a.id, "batch", {
            "region": self.region_id, "session": a.session,
            "spans": [[s, b - s] for s, b in a.ranges]})
        self._send([header, frame], now)

    def _send(self, frames: list[Any], now: float) -> None:
        if self.sock is None:
            return
        # copy=False: pyzmq still copies a frame below zmq.COPY_THRESHOLD (64 KiB), where a
        # copy is cheaper than tracking the buffer; a larger one (a resync chunk, the batch
        # of a busy turn) goes to ZeroMQ as it is.
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._do(self.link.send_failed(now), now)

    def _report(self, in_sync: bool, now: float) -> None:
        if self.hv is None:
            self.hv = AsyncRpcClient(self.ctx, self.control)

        def done(_res: Any, err: VmemuError | None) -> None:
            self._do(self.link.reported(in_sync, err is None, time.monotonic()),
                     time.monotonic())

        self.hv.call("mirror_state", {"node": self.owner, "region": self.region_id,
                                      "in_sync": in_sync, "token": self.token()},
                     REPORT_TIMEOUT_S, done)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def close(self) -> None:
        self._close()
        if self.hv is not None:
            self.hv.close()
            self.hv = None
