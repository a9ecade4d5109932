"""A small pipelined NBD client with the block client's interface, for `vmemu load --target nbd://`.

Fixed-newstyle handshake with NBD_OPT_GO, simple replies, READ/WRITE/FLUSH. When the connection
drops (the owner died; its partner is taking over the address) it reconnects to the same URI,
negotiates again and resends every request that had no reply. NBD has no request ids that
survive a connection, so unlike the native protocol a resent write may be applied twice; the
load generator never has two writes to one range in flight, which keeps that harmless.
"""

from __future__ import annotations

import errno
import itertools
import secrets
import select
import socket
import struct
import time
from typing import Any
from urllib.parse import urlparse

from clients.block import Completion, Pending
from vmemu.errors import BadRequest, Timeout, VmemuError

# The wire constants live with the server's protocol machine: one declaration of the format.
from domains.nbd_proto import (  # noqa: E402
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_EXPORT,
    OPT_GO, OPT_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
)
from domains.nbd_proto import IHAVEOPT as _IHAVEOPT, NBDMAGIC as _NBDMAGIC  # noqa: E402

NBDMAGIC = struct.pack(">Q", _NBDMAGIC)
IHAVEOPT = struct.pack(">Q", _IHAVEOPT)
CMD = {"read": CMD_READ, "write": CMD_WRITE, "flush": CMD_FLUSH}
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdError(VmemuError):
    code = "nbd_error"


def parse_uri(uri: str) -> tuple[str, int, str]:
    u = urlparse(uri)
    if u.scheme != "nbd" or not u.hostname:
        raise BadRequest(f"not an nbd:// URI: {uri!r} (example: nbd://127.0.10.1:10809/lun0)")
    return u.hostname, u.port or 10809, u.path.lstrip("/")


class NbdClient:
    def __init__(self, uri: str, give_up_after: float = 60.0, retry_after: float = 1.0) -> None:
        self.uri = uri
        self.endpoint = uri
        self.host, self.port, self.export = parse_uri(uri)
        self.give_up_after = give_up_after
        self.retry_after = retry_after
        self.client_id = secrets.randbits(62) | 1
        self._ids = itertools.count(1)
        self.pending: dict[int, Pending] = {}
        self.retries = 0
        self.reconnects = 0
        self.size = 0
        self.sock: socket.socket | None = None
        self.rbuf = bytearray()
        self._connect(deadline=time.monotonic() + 10.0)

    # -- connection ------------------------------------------------------------------------
    def _connect(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection((self.host, self.port), timeout=2.0)
                self._handshake(s)
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock = s
                self.rbuf.clear()
                return
            except (OSError, NbdError) as exc:
                last = exc
                time.sleep(0.005)
        raise Timeout(f"cannot reach {self.uri}: {last}")

    def _recv_exact(self, s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise OSError(errno.ECONNRESET, "server closed the connection in the handshake")
            buf += chunk
        return bytes(buf)

    def _handshake(self, s: socket.socket) -> None:
        hello = self._recv_exact(s, 18)
        if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
            raise NbdError(f"{self.uri} does not speak newstyle NBD")
        flags = struct.unpack(">H", hello[16:18])[0]
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.uri} lacks fixed newstyle negotiation")
        s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self._recv_exact(s, 20))
            body = self._recv_exact(s, length) if length else b""
            if magic != OPT_REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            if rtype & 0x80000000:
                raise NbdError(f"{self.uri}: export {self.export!r} refused "
                               f"(error {rtype & 0x7FFFFFFF}) {body[:200]!r}")
            if rtype == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
                self.size = struct.unpack(">Q", body[2:10])[0]
            if rtype == REP_ACK:
                return

    def _reconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.reconnects += 1
        self._connect(deadline=time.monotonic() + self.give_up_after)
        now = time.monotonic()
        for p in self.pending.values():
            self.retries += 1
            p.attempts += 1
            p.last_sent = now
            self._send(p.frame)

    def _send(self, frame: bytes) -> None:
        assert self.sock is not None
        view = memoryview(frame)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)

    # -- the block client's interface --------------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def info(self) -> dict[str, Any]:
        lun = int(self.export[3:]) if self.export.startswith("lun") and self.export[3:].isdigit() else 0
        return {"identity": self.uri, "luns": [{"lun": lun, "size": self.size}]}

    def submit(self, op: str, args: dict[str, Any], tag: Any = None, req_id: int | None = None) -> int:
        req_id = self.next_id() if req_id is None else req_id
        frame = self.frame(op, args, req_id)
        length = len(frame) - _REQ.size if op == "write" else int(args.get("length", 0))
        now = time.monotonic()
        self.pending[req_id] = Pending(frame, op, now, now, 1, (tag, length))
        try:
            self._send(frame)
        except OSError:
            self._reconnect()
        return req_id

    def frame(self, op: str, args: dict[str, Any], req_id: int) -> bytes:
        """A request as it goes on the wire: the header, then a WRITE's payload."""
        if op not in CMD:
            raise BadRequest(f"nbd client: unsupported op {op!r}")
        data = args.get("data", b"") if op == "write" else b""
        length = len(data) if op == "write" else int(args.get("length", 0))
        return _REQ.pack(REQUEST_MAGIC, 0, CMD[op], req_id, int(args.get("offset", 0)),
                         length) + data

    def send_bytes(self, data: bytes) -> None:
        """Raw bytes on the connection, untracked: part of a frame, to hang up after it."""
        if self.sock is None:
            raise OSError(errno.ENOTCONN, "not connected")
        self._send(data)

    def hang_up(self) -> None:
        """Close without NBD_CMD_DISC: to the server, a connection lost mid-request."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.pending.clear()

    def poll(self, timeout: float) -> list[Completion]:
        out: list[Completion] = []
        end = time.monotonic() + timeout
        while not out:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                ready, _, _ = select.select([self.sock], [], [], min(left, 0.05))
                if ready:
                    chunk = self.sock.recv(1 << 20)  # type: ignore[union-attr]
                    if not chunk:
                        raise OSError(errno.ECONNRESET, "connection closed")
                    self.rbuf += chunk
                    self._parse(out)
            except OSError:
                self._reconnect()
        self._expire(out)
        return out

    def _parse(self, out: list[Completion]) -> None:
        while len(self.rbuf) >= _REPLY.size:
            magic, err, handle = _REPLY.unpack_from(self.rbuf)
            if magic != SIMPLE_REPLY_MAGIC:
                raise OSError(errno.EPROTO, "bad reply magic")
            p = self.pending.get(handle)
            need = p.tag[1] if p is not None and p.op == "read" and not err else 0
            if len(self.rbuf) < _REPLY.size + need:
                return
            data = bytes(self.rbuf[_REPLY.size:_REPLY.size + need])
            del self.rbuf[:_REPLY.size + need]
            if p is None:
                continue
            del self.pending[handle]
            error = NbdError(f"{p.op} failed with NBD error {err}") if err else None
            result = data if p.op == "read" else {"seq": 0}
            out.append(Completion(handle, not err, None if err else result, error,
                                  time.monotonic() - p.first_sent, p.attempts, p.tag[0]))

    def _expire(self, out: list[Completion]) -> None:
        now = time.monotonic()
        for rid, p in list(self.pending.items()):
            if now - p.first_sent > self.give_up_after:
                del self.pending[rid]
                out.append(Completion(rid, False, None, Timeout(f"{p.op} got no answer from {self.uri}"),
                                      now - p.first_sent, p.attempts, p.tag[0]))

    def call(self, op: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        rid = self.submit(op, args)
        end = time.monotonic() + (timeout or self.give_up_after)
        while time.monotonic() < end:
            for c in self.poll(0.1):
                if c.req_id == rid:
                    if c.ok:
                        return c.result
                    raise c.error  # type: ignore[misc]
        raise Timeout(f"{op} got no answer from {self.uri}")

    def read(self, lun: int, offset: int, length: int) -> bytes:
        return self.call("read", {"offset": offset, "length": length})

    def write(self, lun: int, offset: int, data: bytes) -> int:
        self.call("write", {"offset": offset, "data": data})
        return 0

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.sendall(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
