"""The chaos run's clients: concurrent readers and writers of a few hot blocks, recorded.

Each client is one thread playing one Jepsen "process" at a time: it invokes one operation,
waits for its completion, records both (CLOCK_MONOTONIC ns), and goes on. An operation whose
outcome is unknown (a timeout, a connection cut by a crash) is recorded `info`, and the
thread continues as a fresh process (a new number): a process has at most one op open, and
an indeterminate write stays open to the end of the history.

Every write carries a value no other write carries (`<process>.<seq>`), framed in the block
with a checksum, so each read names exactly one write, or none (null: the block was never
written), or says it read something no client wrote (`corrupt:<crc>`: a torn or flipped
block, which the checker reports as a phantom).

Two transports, both real: the vmemu block protocol (clients/block.py: a write retried after
a takeover carries the same (client, request) ids and is applied once) and NBD
(clients/nbd_client.py). NBD has no exactly-once: a write resent on a new connection could be
applied twice, after another client's write in between, which no single-register history
explains. So the NBD client here never resends: a request cut by a lost connection is
recorded `info` and the client reconnects for its next op, as a careful NBD user would.

The `client_cut` fault (`ClientCut`, set by the nemesis) makes clients hang up on purpose in
the middle of a request: the request sent, then the connection closed before the reply (and,
for NBD writes, also mid-frame: the header and half the payload, then close). The op is
recorded `info` and the client goes on, on a new connection, as a new process. Half the
cut block-protocol writes are instead sent again on the new connection by the same client
with the same ids, as the block client does after a failover: applied once, and recorded
by their reply.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from clients.block import BlockClient
from clients.nbd_client import NbdClient
from vmemu.errors import Timeout, VmemuError

BLOCK = 4096
MAGIC = b"VMCHAOS1"
_HEAD = struct.Struct(">8sHI")  # magic, value length, crc32 of the value


def encode_value(value: str) -> bytes:
    v = value.encode()
    return (_HEAD.pack(MAGIC, len(v), zlib.crc32(v)) + v).ljust(BLOCK, b"\0")


def decode_value(data: bytes) -> str | None:
    """The value a block holds: None for a block never written (all zeros)."""
    if not any(data):
        return None
    if len(data) >= _HEAD.size and data[:8] == MAGIC:
        _, n, crc = _HEAD.unpack_from(data)
        v = bytes(data[_HEAD.size:_HEAD.size + n])
        if len(v) == n and zlib.crc32(v) == crc and not any(data[_HEAD.size + n:]):
            return v.decode(errors="replace")
    return f"corrupt:{zlib.crc32(data):08x}"


@dataclass(frozen=True)
class Target:
    identity: str  # "node<N>"
    endpoint: str  # the identity's block-protocol endpoint
    nbd_uri: str | None  # lun0's nbd:// URI


class History:
    """The shared, append-only op log (thread-safe)."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._procs = itertools.count()

    def new_process(self) -> int:
        with self._lock:
            return next(self._procs)

    def add(self, process: int, type_: str, f: str, block: str, value: str | None) -> None:
        with self._lock:  # the time taken inside: lines in time order across threads
            self.ops.append({"process": process, "type": type_, "f": f, "block": block,
                             "value": value, "time": time.monotonic_ns()})


class _NbdOnce(NbdClient):
    """An NBD client that never resends (see the module docstring)."""

    def __init__(self, uri: str, give_up_after: float) -> None:
        self.lost: list[int] = []
        super().__init__(uri, give_up_after=give_up_after)

    def _reconnect(self) -> None:
        self.lost.extend(self.pending)
        self.pending.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.reconnects += 1
        # Out of poll/submit, whose callers record the op as cut; the next op reconnects.
        raise ConnectionResetError("the NBD connection was lost")


CUT_SHARE = 0.5  # of a cutting client's ops: the others complete, so the identity answers
CUT_SEED = 0x5C07  # the cut draws come from a stream of their own: the ops stay the seed's


class ClientCut:
    """The `client_cut` switch the nemesis sets and the clients read: per identity, until when
    its clients hang up mid-request. A deadline rather than an on/off flag, so a switch the
    nemesis never turns off (the run ending under it) still ends. Thread-safe."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}

    def begin(self, identity: str, until: float) -> None:
        with self._lock:
            self._until[identity] = until
            self.counts[identity] = {}

    def end(self, identity: str) -> dict[str, int]:
        """Stop cutting; how many ops were cut, by how."""
        with self._lock:
            self._until.pop(identity, None)
            return dict(self.counts.get(identity, {}))

    def active(self, identity: str) -> bool:
        return time.monotonic() < self._until.get(identity, 0.0)

    def note(self, identity: str, how: str) -> None:
        with self._lock:
            c = self.counts.setdefault(identity, {})
            c[how] = c.get(how, 0) + 1


@dataclass
class Mix:
    hot: int = 4  # blocks every client hammers: where operations really overlap
    spread: int = 60  # further blocks, touched now and then
    hot_share: float = 0.75
    write_share: float = 0.5
    op_timeout: float = 10.0  # then the op is indeterminate (info)


class Client(threading.Thread):
    """One client thread against one identity; `kind` is "block" or "nbd"."""

    def __init__(self, kind: str, target: Target, mix: Mix, history: History, seed: int,
                 stop: threading.Event, cut: ClientCut | None = None) -> None:
        super().__init__(name=f"chaos-{kind}-{target.identity}", daemon=True)
        self.kind, self.target, self.mix, self.h, self.stop = kind, target, mix, history, stop
        self.rng = random.Random(seed)
        self.process = history.new_process()
        self.seq = 0
        self.counts = {"ok": 0, "fail": 0, "info": 0}
        self.touched: set[int] = set()
        self._conn: Any = None
        self.cut = cut
        self.cut_rng = random.Random(seed ^ CUT_SEED)

    def block_name(self, index: int) -> str:
        return f"{self.target.identity}/lun0/{index * BLOCK}"

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.one_op()
        finally:
            self._close()

    def one_op(self) -> None:
        m = self.mix
        index = (self.rng.randrange(m.hot) if self.rng.random() < m.hot_share
                 else m.hot + self.rng.randrange(m.spread))
        self.touched.add(index)
        if self.rng.random() < m.write_share:
            self.seq += 1
            value = f"{self.process}.{self.seq}"
            self._op("write", index, value)
        else:
            self._op("read", index, None)

    def _op(self, f: str, index: int, value: str | None) -> None:
        block = self.block_name(index)
        self.h.add(self.process, "invoke", f, block, value)
        if self.cut is not None and self.cut.active(self.target.identity) \
                and self.cut_rng.random() < CUT_SHARE:
            outcome, got = self._cut(f, index * BLOCK, value), None
        else:
            outcome, got = self._do(f, index * BLOCK, value)
        self.h.add(self.process, outcome, f, block, got if f == "read" else value)
        self.counts[outcome] += 1
        if outcome == "info":  # the op stays open for good: go on as a new process
            self.process = self.h.new_process()
            self.seq = 0
        elif outcome == "fail":
            self.stop.wait(0.05)  # an identity that refuses: do not spin against it

    def _do(self, f: str, offset: int, value: str | None) -> tuple[str, str | None]:
        try:
            conn = self._connect()
            if conn is None:
                return ("info" if f == "write" else "fail"), None
            if self.kind == "block":
                return self._do_block(conn, f, offset, value)
            return self._do_nbd(conn, f, offset, value)
        except Timeout:
            return ("info" if f == "write" else "fail"), None
        except VmemuError:
            # An error reply: for a read, nothing was read; for a write we cannot tell, from
            # here, how far it got: indeterminate (the checker keeps it open).
            return ("info" if f == "write" else "fail"), None
        except OSError:
            self._close()
            return ("info" if f == "write" else "fail"), None

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        t = self.target
        if self.kind == "block":
            self._conn = BlockClient(t.endpoint, give_up_after=self.mix.op_timeout)
        else:
            assert t.nbd_uri is not None
            try:
                self._conn = _NbdOnce(t.nbd_uri, give_up_after=self.mix.op_timeout)
            except (Timeout, OSError, VmemuError):
                self.stop.wait(0.1)
                return None
        return self._conn

    def _do_block(self, conn: BlockClient, f: str, offset: int,
                  value: str | None) -> tuple[str, str | None]:
        if f == "write":
            conn.call("write", {"lun": 0, "offset": offset, "data": encode_value(value or "")},
                      timeout=self.mix.op_timeout)
            return "ok", value
        data = conn.call("read", {"lun": 0, "offset": offset, "length": BLOCK},
                         timeout=self.mix.op_timeout)
        return "ok", decode_value(data)

    def _do_nbd(self, conn: _NbdOnce, f: str, offset: int,
                value: str | None) -> tuple[str, str | None]:
        args = ({"offset": offset, "data": encode_value(value or "")} if f == "write"
                else {"offset": offset, "length": BLOCK})
        rid = conn.submit(f, args)
        end = time.monotonic() + self.mix.op_timeout
        while time.monotonic() < end:
            for c in conn.poll(0.05):
                if c.req_id != rid:
                    continue
                if not c.ok:
                    return ("info" if f == "write" else "fail"), None
                return "ok", (value if f == "write" else decode_value(c.result))
        self._close()
        return ("info" if f == "write" else "fail"), None

    def _cut(self, f: str, offset: int, value: str | None) -> str:
        """Send the request and hang up before its reply (an NBD write: now and then after
        half its payload); the op's outcome is unknown: `info`. A block-protocol write is
        now and then sent again instead, as the same client on a new connection, with the
        same (client, request) ids: the D-module must apply it once, and its reply says
        how it went."""
        assert self.cut is not None
        try:
            conn = self._connect()
            if conn is None:
                return "info"
            data = encode_value(value or "") if f == "write" else b""
            if self.kind == "block":
                args = ({"lun": 0, "offset": offset, "data": data} if f == "write"
                        else {"lun": 0, "offset": offset, "length": BLOCK})
                rid = conn.submit(f, args)
                if f == "write" and self.cut_rng.random() < 0.5:
                    time.sleep(self.cut_rng.uniform(0, 0.004))
                    return self._resend_as_same_client(conn, rid, args)
                how = "block"
            else:
                args = ({"offset": offset, "data": data} if f == "write"
                        else {"offset": offset, "length": BLOCK})
                frame = conn.frame(f, args, conn.next_id())
                half = f == "write" and self.cut_rng.random() < 0.5
                conn.send_bytes(frame[:len(frame) - len(data) // 2] if half else frame)
                how = "nbd_half_frame" if half else "nbd"
            # A moment for the request to reach the server, or not: cut before it arrived,
            # while it is served, or with its reply on the way.
            time.sleep(self.cut_rng.uniform(0, 0.004))
        except (OSError, VmemuError):
            how = "failed_to_send"
        self._hang_up()
        self.cut.note(self.target.identity, how)
        return "info"

    def _resend_as_same_client(self, old: BlockClient, rid: int, args: dict[str, Any]) -> str:
        assert self.cut is not None
        self._hang_up()
        self._conn = BlockClient(self.target.endpoint, client_id=old.client_id,
                                 give_up_after=self.mix.op_timeout, first_id=rid + 1)
        self.cut.note(self.target.identity, "block_resent")
        try:
            self._conn.submit("write", args, req_id=rid)
            end = time.monotonic() + self.mix.op_timeout
            while time.monotonic() < end:
                for c in self._conn.poll(0.05):
                    if c.req_id == rid:
                        return "ok" if c.ok else "info"
        except (OSError, VmemuError):
            self._close()
        return "info"

    def _hang_up(self) -> None:
        """Close without a goodbye: no NBD_CMD_DISC, nothing flushed or drained."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self.kind == "nbd":
                conn.hang_up()
            else:
                conn.close()  # LINGER 0: an unsent request is dropped, a reply never read
        except (OSError, VmemuError):
            pass

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except (OSError, VmemuError):
                pass


def final_reads(targets: list[Target], blocks: dict[str, set[int]], history: History,
                timeout: float, alive: Callable[[], bool] = lambda: True) -> int:
    """After the faults and the healing: read every block touched once more (as one more
    process), so that a write lost without any later read seeing it is still caught."""
    n = 0
    for t in targets:
        with BlockClient(t.endpoint, give_up_after=timeout) as c:
            for index in sorted(blocks.get(t.identity, ())):
                if not alive():
                    return n
                p = history.new_process()
                name = f"{t.identity}/lun0/{index * BLOCK}"
                history.add(p, "invoke", "read", name, None)
                try:
                    data = c.call("read", {"lun": 0, "offset": index * BLOCK, "length": BLOCK},
                                  timeout=timeout)
                except VmemuError:
                    history.add(p, "fail", "read", name, None)
                    continue
                history.add(p, "ok", "read", name, decode_value(data))
                n += 1
    return n
