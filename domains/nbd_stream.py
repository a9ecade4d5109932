"""Serve one NBD connection from a byte stream, like `nbdkit -s`: bytes in, bytes out.

No sockets: `serve_stream` runs the same `Conn` (domains/nbd_conn.py) the TCP transport
runs, with the real protocol machine and the real mapping of requests onto D-module calls,
over the in-memory D-module of domains/mem_dmodule.py, and the same memory limits and
per-turn budgets. The end of the input is the client closing its side: what it sent before
is answered, as the server answers requests received before a disconnect.

`peer_reads=False` plays a client that reads nothing until the server stops taking input:
then the server's caps, not the reader, bound what is buffered (and the result says how
much was). `max_output` plays one that hangs up after so many bytes. `tls` ("off", "on",
"require") is the machine's TLS mode; once NBD_OPT_STARTTLS is acknowledged, the rest of the
stream is taken as what the client sends inside TLS (a null cipher), so the haggling before
and after STARTTLS is what is served, as with a real TLS client; TLS itself (Python's ssl) is
not what is fuzzed here. What the fuzzers of tests/fuzz drive; also a command:

    python -m domains.nbd_stream < client-bytes > server-bytes
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from domains import nbd_proto as P
from domains.mem_dmodule import MemDModule
from domains.nbd_conn import Conn
from domains.nbd_limits import Limits, Pool, Stats
from domains.nbd_requests import exports_of


@dataclass(frozen=True)
class Reply:
    """One transmission reply the machine made, in output order."""

    cookie: int
    ok: bool
    read_length: int  # data bytes it carries (a successful READ)
    request: P.Request | None  # None: the machine refused the request itself


@dataclass
class StreamResult:
    output: bytes
    requests: list[P.Request] = field(default_factory=list)  # let through, in order
    replies: list[Reply] = field(default_factory=list)
    via_export_name: bool = False  # transmission began with NBD_OPT_EXPORT_NAME
    tls_started: bool = False  # STARTTLS was acknowledged and (null) TLS began
    no_zeroes: bool = False
    close: P.Close | None = None
    peak_in: int = 0  # most bytes the connection held, each direction, in transmission
    peak_out: int = 0
    hs_peak_in: int = 0  # the same during the handshake
    hs_peak_out: int = 0
    peak_pool: int = 0
    stalled: bool = False  # neither side could go on (a bug when the peer reads)
    hung_up: bool = False  # the peer left after `max_output` bytes
    turns: int = 0
    stats: Stats = field(default_factory=Stats)


def serve_stream(data: bytes, dmodule: Any | None = None, identity: int = 1,
                 limits: Limits | None = None, chunk: int = 1 << 16,
                 peer_reads: bool = True, max_output: int | None = None,
                 max_turns: int = 1_000_000, tls: str = "off") -> StreamResult:
    """Serve `data` as one connection's input; see the module docstring. `max_output`: the
    peer hangs up once it has read that much (the connection is dropped mid-work)."""
    d = dmodule if dmodule is not None else MemDModule(identity)
    lim = limits or Limits()
    exports, lun_of = exports_of(d, identity, getattr(d, "node", identity))
    stats = Stats()
    res = StreamResult(b"", stats=stats)
    conn = Conn(_Recording(exports, res, tls), identity, lun_of, d, lim, Pool(lim.shared),
                stats, peer="stream")
    out: list[bytes] = []
    out_len = 0
    pos = 0
    eof_sent = False
    for res.turns in range(1, max_turns + 1):
        progress = False
        if conn.tls_ready():  # the acknowledgement has left: "TLS" is up
            leftover = conn.tls_begun()
            res.tls_started = progress = True
            if leftover:
                conn.feed(leftover)
        room = conn.room_in()
        if room > 0 and pos < len(data):
            n = min(room, chunk, len(data) - pos)
            conn.feed(data[pos:pos + n])
            pos += n
            progress = True
            _peaks(res, conn)
        elif room > 0 and not eof_sent:
            conn.feed(b"")
            eof_sent = progress = True
        if conn.decode(lim.turn_decode):
            progress = True
        if conn.runnable() and conn.run(0, 0, lim.turn_pieces)[0]:
            progress = True
        _peaks(res, conn)
        if conn.out and (peer_reads or not progress):
            # The peer reads: everything now, or (a late reader) once the server is stuck.
            n = sum(b.nbytes for b in conn.out)
            out.extend(bytes(b) for b in conn.out)
            out_len += n
            conn.consume(n)
            progress = True
        if conn.finished():
            break
        if max_output is not None and out_len >= max_output:
            res.hung_up = True
            break
        if not progress:
            res.stalled = True
            break
    res.output = b"".join(out)
    res.close = conn.proto.closed
    conn.drop()
    return res


def _peaks(res: StreamResult, conn: Conn) -> None:
    if conn.transmission:
        res.peak_in = max(res.peak_in, conn.in_bytes())
        res.peak_out = max(res.peak_out, conn.out_bytes())
    else:
        res.hs_peak_in = max(res.hs_peak_in, conn.in_bytes())
        res.hs_peak_out = max(res.hs_peak_out, conn.out_bytes())
    res.peak_pool = max(res.peak_pool, conn.pool.used)


class _Recording(P.ServerProto):
    """The machine, noting every request it lets through and every reply it makes, in
    order (the fuzzers check the output against it)."""

    def __init__(self, exports: list[P.Export], res: StreamResult, tls: str = "off") -> None:
        super().__init__(exports, tls=tls)
        self._res = res
        self._failing: P.Request | None = None

    def decode_one(self) -> P.Event | None:
        ev = super().decode_one()
        if isinstance(ev, P.Request):
            self._res.requests.append(ev)
        return ev

    def _on_option(self, opt: int, data: bytes) -> None:
        super()._on_option(opt, data)
        if opt == P.OPT_EXPORT_NAME and self.export is not None:
            self._res.via_export_name = True
            self._res.no_zeroes = self._no_zeroes

    def reply_read(self, req: P.Request, data: bytes | bytearray | memoryview) -> None:
        if len(data) == req.length:
            self._res.replies.append(Reply(req.cookie, True, req.length, req))
        super().reply_read(req, data)

    def reply_ok(self, req: P.Request) -> None:
        if req.cmd != P.CMD_READ:
            self._res.replies.append(Reply(req.cookie, True, 0, req))
        super().reply_ok(req)

    def reply_error(self, req: P.Request, error: int, message: str = "") -> None:
        self._failing = req
        try:
            super().reply_error(req, error, message)
        finally:
            self._failing = None

    def _error(self, cookie: int, error: int, message: str) -> None:
        # Also the machine's own refusals (a request it did not let through): no Request.
        self._res.replies.append(Reply(cookie, False, 0, self._failing))
        super()._error(cookie, error, message)


def main() -> int:
    res = serve_stream(sys.stdin.buffer.read())
    sys.stdout.buffer.write(res.output)
    sys.stdout.buffer.flush()
    print(f"{len(res.requests)} requests; closed: {res.close.reason if res.close else 'no'}; "
          f"peak buffered {res.peak_in} in, {res.peak_out} out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
