"""NVLog mirroring over the bus: the `--ha-mode mirror` baseline, what came before the patent.

Without shared memory, a partner can replay a failed node's log only if every record was also
copied to it before the client was acknowledged, as classic HA pairs do over an interconnect.
The owner sends each span it writes in its NVRAM region to its partner and waits for the
partner's acknowledgement; the partner keeps a byte-for-byte copy of the region in its own
memory and replays that copy at takeover.

The receiving side runs in a thread with its own socket, so two partners mirroring to each
other never wait on each other's main loops (which would deadlock).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import zmq

from vmemu.bus import codec
from vmemu.datadir import RunDir
from vmemu.bus.rpc import RpcClient, RpcServer
from vmemu.errors import BadRequest, VmemuError

MIRROR_TIMEOUT_S = 0.5


class MirrorReceiver:
    """Holds copies of partners' regions, written only by this thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, region_size: int,
                 owners: set[int]) -> None:
        """`region_size`: the cluster's NVRAM region size, the only size a copy may have;
        `owners`: the nodes whose partner we are, the only ones that may mirror to us."""
        self.ctx = ctx
        self.endpoint = endpoint
        self.region_size = region_size
        self.owners = owners
        self.copies: dict[int, bytearray] = {}  # region -> copy
        self.owner_of: dict[int, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirror-receiver", daemon=True)
        self.received = 0
        self.errors = 0

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def copy_of(self, region: int) -> bytearray | None:
        with self.lock:
            return self.copies.get(region)

    def _run(self) -> None:
        # A sync carries a whole region: the one frame here that may pass the bus's usual limit.
        srv = RpcServer(self.ctx, self.endpoint, max_msg=self.region_size + (1 << 20))
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not srv.sock.poll(100):
                    continue
                inc = srv.recv()
                if inc is None:
                    continue
                try:
                    srv.reply(inc.peer, inc.request.id, self._handle(inc.request))
                except VmemuError as exc:
                    srv.reply_error(inc.peer, inc.request.id, exc)
                except Exception as exc:  # noqa: BLE001 - a bad span must not end the thread
                    self.errors += 1
                    srv.reply_error(inc.peer, inc.request.id,
                                    VmemuError(f"mirror: internal error: {exc!r}"))
        finally:
            srv.close()

    def _handle(self, req: codec.Request) -> Any:
        region = codec.int_arg(req, "region", 1, codec.U63)
        if req.op == "sync":
            size = codec.arg(req, "size", int)
            snap = codec.arg(req, "data", bytes)
            owner = codec.arg(req, "owner", int)
            if owner not in self.owners:
                raise BadRequest(f"mirror sync: node{owner} does not mirror to this node")
            if size != self.region_size or len(snap) > size:
                raise BadRequest(f"mirror sync: a copy is {self.region_size} bytes, not {size} "
                                 f"(with {len(snap)} bytes of data)")
            copy = bytearray(size)
            copy[:len(snap)] = snap
            with self.lock:
                # One current copy per owner, plus the one before (it may still be in a chain).
                old = [r for r, o in self.owner_of.items() if o == owner and r != region]
                for r in old[:-1]:
                    self.copies.pop(r, None)
                    self.owner_of.pop(r, None)
                self.copies[region] = copy
                self.owner_of[region] = owner
            return {"ok": True}
        if req.op == "span":
            copy = self.copies.get(region)
            if copy is None:
                raise BadRequest(f"mirror: no copy of region {region:#x}; sync first")
            spans = codec.arg(req, "spans", list)
            for span in spans:  # all checked before any is applied: a bad one changes nothing
                if not (isinstance(span, list) and len(span) == 2 and isinstance(span[0], int)
                        and isinstance(span[1], bytes) and 0 <= span[0] <= len(copy) - len(span[1])):
                    raise BadRequest("mirror: a span is not [start, bytes] inside the region")
            for start, data in spans:
                copy[start:start + len(data)] = data
            self.received += 1
            return {"ok": True}
        raise BadRequest(f"unknown mirror op {req.op!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class MirrorSender:
    """The owner's side: every span written to the region goes to the partner before the ack."""

    def __init__(self, ctx: zmq.Context, run: RunDir, owner: int, partner: int | None,
                 region_id: int, region: Any, on_state: Callable[[bool], None]) -> None:
        self.ctx = ctx
        self.run = run
        self.owner = owner
        self.partner = partner
        self.region_id = region_id
        self.region = region
        self.client: RpcClient | None = None
        self.in_sync = False
        self.sent = 0
        self.degraded_at: float | None = None
        self.on_state = on_state

    def sync(self, used: int) -> bool:
        """Copy the used part of the region to the partner; mirror every span from then on."""
        if self.partner is None:
            return False
        if self.client is None:
            self.client = RpcClient(self.ctx, self.run.mirror(self.partner),
                                    timeout=MIRROR_TIMEOUT_S)
        try:
            self.client.call("sync", {"region": self.region_id, "owner": self.owner,
                                      "size": len(self.region), "data": bytes(self.region[:used])},
                             timeout=5.0)
        except VmemuError:
            self._degrade()
            return False
        self.in_sync = True
        self.degraded_at = None
        self.on_state(True)
        return True

    def send(self, spans: list[tuple[int, int]]) -> None:
        """Block until the partner holds these region bytes (or give up and degrade)."""
        if not self.in_sync or self.client is None:
            return
        payload = [(a, bytes(self.region[a:b])) for a, b in spans]
        try:
            self.client.call("span", {"region": self.region_id, "spans": payload})
            self.sent += 1
        except VmemuError:
            self._degrade()

    def _degrade(self) -> None:
        # The partner is gone or stuck: keep serving (the region itself is still NVRAM, held
        # by the hypervisor), but the partner's copy is no longer complete.
        was = self.in_sync
        self.in_sync = False
        self.degraded_at = time.monotonic()
        if self.client is not None:
            self.client.close()
            self.client = None
        if was:
            self.on_state(False)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
