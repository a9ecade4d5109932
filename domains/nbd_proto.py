"""NBD (Network Block Device) server protocol, sans I/O: bytes in, bytes and requests out.

No sockets here: the transport (domains/nbd_server.py) feeds what it received with
`receive_data`, takes decoded requests from `next_event`, answers them with `reply_read`,
`reply_ok` or `reply_error`, and sends what `pop_output` returns. The machine never raises on
any input: a client that breaks a mandatory rule of the protocol gets a `Close` event (the
transport then sends what is queued and closes the connection), everything else gets an
error reply and the connection keeps serving.

What is spoken (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):

- fixed newstyle handshake; handshake flags FIXED_NEWSTYLE | NO_ZEROES;
- options GO, INFO, LIST, EXPORT_NAME, ABORT, STRUCTURED_REPLY, STARTTLS (see "TLS"); any
  other option (metadata contexts, extended headers, ...) is answered NBD_REP_ERR_UNSUP;
- NBD_INFO_EXPORT, NAME and DESCRIPTION (when asked) and BLOCK_SIZE (always: minimum 512,
  preferred 4096, maximum 1 MiB, see "Sizes" below);
- transmission flags HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES |
  CAN_MULTI_CONN (every connection of a domain shares one cache and an acknowledged write
  is already in NVRAM), plus SEND_DF once structured replies are negotiated;
- commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC. With structured replies, a READ is
  answered by one OFFSET_DATA chunk (so DF always holds) and errors carry a message in an
  ERROR chunk; without them, simple replies.

Validation done here, so the transport only sees requests it can carry out: unknown command
or flag -> EINVAL; a range past the end of the export -> ENOSPC for WRITE and WRITE_ZEROES,
EINVAL for READ and TRIM; READ, WRITE or WRITE_ZEROES longer than MAX_REQUEST (32 MiB) ->
EINVAL (a too-long WRITE's payload is read and dropped, never buffered; one longer than
64 MiB is taken as a denial of service and closes the connection, as the spec allows). TRIM
may be as long as the export. Requests need not be aligned: the advertised minimum of 512 is
what clients should use, and the transport read-modify-writes the rest. Zero-length requests
succeed and do nothing.

Sizes. The advertised maximum block size is 1 MiB (the D-module's largest call), not the
32 MiB the spec suggests: it is what a connection's memory reserve must hold in each
direction (domains/nbd_conn.py), so it is what makes the transport's memory bound small.
Clients that read NBD_INFO_BLOCK_SIZE keep to it (qemu-img, nbdcopy split their requests);
fio's nbd engine does not (a --bs of 4M is sent as is), so requests up to MAX_REQUEST
(32 MiB, the spec's interoperable default) are still served, from memory shared by the
domain's connections. Handshake input is bounded too: option data above MAX_OPTION is
skipped (never buffered), an NBD_OPT_LIST reply stops at MAX_LIST_REPLY bytes (exports left
out stay reachable by name), and `decode_one` handles one option or request at a time, so
the transport can stop decoding a client that does not read its replies.

TLS (`tls`: "off", "on" or "require", the spec's NOTLS, SELECTIVETLS with no TLS-only export,
and FORCEDTLS). The machine haggles; the transport encrypts (domains/nbd_tls.py). Off:
NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY. Otherwise the first one is acknowledged
and `decode_one` returns a `StartTls` event carrying whatever the client sent after it (the
start of its TLS handshake, to be fed to TLS, not to the machine); the machine then decodes
nothing until the transport calls `tls_started`, after which option haggling goes on over
TLS with what was negotiated before forgotten (structured replies), as nbdkit does: nothing
said in plaintext binds the encrypted session. A STARTTLS once TLS is up, or with data, is
NBD_REP_ERR_INVALID. With "require", before TLS every option but STARTTLS and ABORT is
answered NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot be refused) closes the
connection; after TLS, TLS_REQD is never sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence, Union

# -- constants (names as in the spec) ---------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_WRITE_ZEROES: "WRITE_ZEROES"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) | 1

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MIN_BLOCK = 512
PREFERRED_BLOCK = 4096
MAX_BLOCK = 1 << 20  # advertised maximum (see "Sizes" in the docstring)
MAX_REQUEST = 32 << 20  # longest READ/WRITE/WRITE_ZEROES served
DOS_PAYLOAD = 64 << 20  # a WRITE payload above this closes the connection
MAX_OPTION = 16 << 10  # option data we buffer (a 4096-byte name and then some); up to
MAX_OPTION_SKIP = 1 << 20  # MAX_OPTION_SKIP is read and dropped, more closes the connection
MAX_STRING = 4096
MAX_LIST_REPLY = 32 << 10  # NBD_REP_SERVER bytes answered to one NBD_OPT_LIST
MAX_REPLY = 20 + 6 + MAX_STRING  # the longest reply to a transmission request, READ data aside

TRANSMISSION_FLAGS = (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
                      | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN)

_GREETING = struct.Struct(">QQH")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ERR_PAYLOAD = struct.Struct(">IH")

KNOWN_OPTIONS = {OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY,
                 OPT_STARTTLS}
TLS_MODES = ("off", "on", "require")


@dataclass(frozen=True)
class Export:
    name: str
    size: int
    description: str = ""


@dataclass
class Request:
    """A valid transmission request; `data` is the payload of a WRITE (bytes) or b""."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    export: Export
    data: bytes = b""

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, str(self.cmd))


@dataclass(frozen=True)
class Close:
    """The connection is over: send what is queued, then close. `clean`: the client asked."""

    reason: str
    clean: bool


@dataclass(frozen=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: once that reply is sent, the transport starts TLS
    (server side), feeds it `leftover` (what the client sent after the option), and calls
    `tls_started`."""

    leftover: bytes


Event = Union[Request, Close, StartTls]

# parser states
_S_CLIENT_FLAGS = "client_flags"
_S_OPTION = "option"
_S_OPTION_DATA = "option_data"
_S_OPTION_SKIP = "option_skip"
_S_REQUEST = "request"
_S_WRITE_DATA = "write_data"
_S_WRITE_SKIP = "write_skip"
_S_TLS = "tls"  # STARTTLS acknowledged: nothing is decoded until the transport has TLS up
_S_CLOSED = "closed"


class ServerProto:
    """One NBD connection, server side. See the module docstring."""

    def __init__(self, exports: Sequence[Export], default: str | None = None,
                 tls: str = "off") -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        self.tls = tls
        self.tls_active = False  # TLS is up (tls_started was called)
        self._tls_event: StartTls | None = None
        self.exports = list(exports)
        self.default = default if default is not None else (self.exports[0].name if self.exports else "")
        self._in = bytearray()
        self._pos = 0
        self._eof = False
        self._out: list[bytes | memoryview] = []
        self._state = _S_CLIENT_FLAGS
        self._need = 4
        self._no_zeroes = False
        self.structured = False
        self.export: Export | None = None  # set when transmission starts
        self.closed: Close | None = None
        self._close_pending: Close | None = None
        self._opt = 0  # option being read
        self._hdr: tuple[int, int, int, int, int] | None = None  # request being read
        self._skip = 0
        self.requests = 0
        self.errors = 0
        self.need_input = False  # set by decode_one: nothing more decodes without more input
        self._out.append(_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # -- public ------------------------------------------------------------------------------
    @property
    def transmission(self) -> bool:
        return self.export is not None and self.closed is None

    @property
    def tflags(self) -> int:
        return TRANSMISSION_FLAGS | (TFLAG_SEND_DF if self.structured else 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; b"" means the peer closed its side."""
        if self.closed is not None:
            return
        if not data:
            self._eof = True
            return
        if self._pos and self._pos >= len(self._in):
            self._in.clear()
            self._pos = 0
        self._in += data

    def buffered(self) -> int:
        """Received bytes not yet consumed."""
        return len(self._in) - self._pos

    def next_event(self) -> Event | None:
        """The next request, or Close (once), or None when more input is needed."""
        while self.closed is None:
            ev = self.decode_one()
            if ev is not None or self.need_input:
                return ev
        return None

    def decode_one(self) -> Event | None:
        """Decode at most one message (an option, a request with its payload, or what has
        arrived of a skipped payload): its event, or None. After None, `need_input` tells
        whether anything more can be decoded before more input arrives (False: call again)."""
        self.need_input = False
        while self.closed is None:
            if self._close_pending is not None:
                return self._close(self._close_pending)
            before = (self._pos, self._state, self._skip)
            ev = self._step()
            if ev is not None:
                return ev
            if self._close_pending is not None:
                return self._close(self._close_pending)
            if self._tls_event is not None:
                ev, self._tls_event = self._tls_event, None
                return ev
            if (self._pos, self._state, self._skip) == before:
                # Nothing more can be decoded from what is buffered.
                if self._eof:
                    between = self._avail() == 0 and self._state in (_S_OPTION, _S_REQUEST)
                    return self._close(Close("client closed the connection"
                                             + ("" if between else " in the middle of a message"),
                                             clean=between))
                self._compact()
                self.need_input = True
                return None
            if self._state == _S_OPTION or self._state == _S_REQUEST:
                return None  # a message is done (an option answered): that is one
        return None

    def has_output(self) -> bool:
        return bool(self._out)

    def pending_output(self) -> int:
        """Bytes queued by the machine and not yet taken with pop_output."""
        return sum(len(b) for b in self._out)

    def pop_output(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def data_to_send(self) -> bytes:
        return b"".join(self.pop_output())

    def reply_read(self, req: Request, data: bytes | bytearray | memoryview) -> None:
        """Successful READ: `data` must be exactly `req.length` bytes. Replies stay possible
        after a Close: requests received before NBD_CMD_DISC are still answered."""
        if len(data) != req.length:
            self.reply_error(req, EIO, f"server read {len(data)} of {req.length} bytes")
            return
        if not self.structured:
            self._out.append(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, req.cookie))
            if data:
                self._out.append(data)
        elif not data:
            self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                                         req.cookie, 0))
        else:
            self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                         REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len(data))
                             + _U64.pack(req.offset))
            self._out.append(data)

    def reply_ok(self, req: Request) -> None:
        """Success without payload (every command but READ); a simple reply is always allowed."""
        if req.cmd == CMD_READ:
            self.reply_read(req, b"")
            return
        self._out.append(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, req.cookie))

    def reply_error(self, req: Request, error: int, message: str = "") -> None:
        self._error(req.cookie, error or EIO, message)

    # -- internals ---------------------------------------------------------------------------
    def _avail(self) -> int:
        return len(self._in) - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._in) as mv:
            b = bytes(mv[self._pos:self._pos + n])
        self._pos += n
        return b

    def _compact(self) -> None:
        # Called when what is left is less than one message: dropping the consumed bytes is
        # cheap then, and keeps the buffer's memory what the transport counts (`buffered`).
        if self._pos >= len(self._in):
            self._in = bytearray()
            self._pos = 0
        elif self._pos:
            del self._in[:self._pos]
            self._pos = 0

    def _close(self, ev: Close) -> Close:
        self.closed = ev
        self._state = _S_CLOSED
        self._in = bytearray()
        self._pos = 0
        return ev

    def _error(self, cookie: int, error: int, message: str) -> None:
        self.errors += 1
        if self.structured:
            msg = message.encode("utf-8", "replace")[:MAX_STRING]
            payload = _ERR_PAYLOAD.pack(error, len(msg)) + msg
            self._out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                         cookie, len(payload)) + payload)
        else:
            self._out.append(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie))

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _opt_error(self, opt: int, rtype: int, message: str) -> None:
        self._opt_reply(opt, rtype, message.encode("utf-8", "replace")[:MAX_STRING])

    def _lookup(self, name: str) -> Export | None:
        if name == "":
            name = self.default
        for e in self.exports:
            if e.name == name:
                return e
        return None

    def _step(self) -> Event | None:
        """Consume one unit of input if it is all there; maybe return an event."""
        st = self._state
        if st == _S_OPTION_SKIP or st == _S_WRITE_SKIP:
            n = min(self._skip, self._avail())
            self._pos += n
            self._skip -= n
            if self._skip:
                return None
            if st == _S_OPTION_SKIP:
                self._state, self._need = _S_OPTION, 16
                if self._opt == OPT_EXPORT_NAME:
                    self._close_pending = Close("export name too long", clean=False)
                elif self._tls_required(self._opt):
                    pass
                elif self._opt in KNOWN_OPTIONS:
                    self._opt_error(self._opt, REP_ERR_TOO_BIG, "option data too large")
                else:
                    self._opt_error(self._opt, REP_ERR_UNSUP, f"option {self._opt} is not supported")
                return None
            assert self._hdr is not None
            _, _, cookie, _, length = self._hdr
            self._state, self._need = _S_REQUEST, _REQUEST.size
            self._error(cookie, EINVAL, f"write of {length} bytes exceeds the maximum request size "
                                        f"({MAX_REQUEST} bytes)")
            return None
        if self._avail() < self._need:
            return None
        if st == _S_REQUEST:
            return self._on_request_header()
        if st == _S_WRITE_DATA:
            return self._on_write_data()
        if st == _S_OPTION:
            self._on_option_header()
            return None
        if st == _S_OPTION_DATA:
            self._on_option(self._opt, self._take(self._need))
            return None
        if st == _S_CLIENT_FLAGS:
            (flags,) = _U32.unpack(self._take(4))
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                self._close_pending = Close(f"unknown client flags {flags:#x}", clean=False)
                return None
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._state, self._need = _S_OPTION, 16
            return None
        return None

    # -- handshake ---------------------------------------------------------------------------
    def _on_option_header(self) -> None:
        magic, opt, length = _OPT_HDR.unpack_from(self._in, self._pos)
        self._pos += _OPT_HDR.size
        if magic != IHAVEOPT:
            self._close_pending = Close(f"bad option magic {magic:#x}", clean=False)
            return
        self._opt = opt
        if length > MAX_OPTION:
            if length > MAX_OPTION_SKIP:
                self._close_pending = Close(f"option {opt} carries {length} bytes", clean=False)
                return
            self._state, self._skip = _S_OPTION_SKIP, length
            return
        if length == 0:
            self._state, self._need = _S_OPTION, 16
            self._on_option(opt, b"")
            return
        self._state, self._need = _S_OPTION_DATA, length

    def _on_option(self, opt: int, data: bytes) -> None:
        self._state, self._need = _S_OPTION, 16
        if opt == OPT_STARTTLS:
            self._on_starttls(data)
        elif self._tls_required(opt):
            pass
        elif opt == OPT_EXPORT_NAME:
            exp = self._lookup(data.decode("utf-8", "replace"))
            if exp is None:
                self._close_pending = Close("unknown export requested with NBD_OPT_EXPORT_NAME",
                                            clean=False)
                return
            self._out.append(_U64.pack(exp.size) + _U16.pack(self.tflags)
                             + (b"" if self._no_zeroes else bytes(124)))
            self._start(exp)
        elif opt == OPT_ABORT:
            self._opt_reply(opt, REP_ACK)
            self._close_pending = Close("client aborted the negotiation", clean=True)
        elif opt == OPT_LIST:
            if data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return
            room = MAX_LIST_REPLY
            for e in self.exports:
                name = e.name.encode()[:MAX_STRING]
                entry = _U32.pack(len(name)) + name + e.description.encode()[:MAX_STRING]
                room -= _OPT_REPLY.size + len(entry)
                if room < 0:
                    break  # bounded reply; the exports left out are still served by name
                self._opt_reply(opt, REP_SERVER, entry)
            self._opt_reply(opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            self._on_info(opt, data)
        elif opt == OPT_STRUCTURED_REPLY:
            if data:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return
            self.structured = True
            self._opt_reply(opt, REP_ACK)
        else:
            self._opt_error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    def _tls_required(self, opt: int) -> bool:
        """FORCEDTLS before TLS: refuse `opt` (True) unless it is ABORT (or STARTTLS)."""
        if self.tls != "require" or self.tls_active or opt in (OPT_ABORT, OPT_STARTTLS):
            return False
        if opt == OPT_EXPORT_NAME:  # cannot be answered with an error: the spec says close
            self._close_pending = Close("NBD_OPT_EXPORT_NAME without TLS on a server that "
                                        "requires TLS", clean=False)
        else:
            self._opt_error(opt, REP_ERR_TLS_REQD, "this server requires TLS: connect with "
                            "nbds:// (tls-certificates=<data-dir>/tls)")
        return True

    def _on_starttls(self, data: bytes) -> None:
        if self.tls == "off":
            self._opt_error(OPT_STARTTLS, REP_ERR_POLICY, "TLS is off on this server (vmemu up "
                            "--nbd-tls on|require)")
        elif self.tls_active:
            self._opt_error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already on")
        elif data:
            self._opt_error(OPT_STARTTLS, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        else:
            self._opt_reply(OPT_STARTTLS, REP_ACK)
            # What follows the option is TLS, not options: hand it over, keep nothing.
            leftover = bytes(self._in[self._pos:])
            self._in, self._pos = bytearray(), 0
            self._state = _S_TLS
            self._tls_event = StartTls(leftover)

    def tls_started(self) -> None:
        """The transport has TLS up: option haggling starts again, over TLS, from scratch
        (what plaintext negotiated, structured replies, no longer holds)."""
        if self._state != _S_TLS:
            raise RuntimeError("tls_started without an acknowledged NBD_OPT_STARTTLS")
        self.tls_active = True
        self.structured = False
        self._state, self._need = _S_OPTION, 16

    def _on_info(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_error(opt, REP_ERR_INVALID, "option data too short")
            return
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            self._opt_error(opt, REP_ERR_INVALID, "export name length exceeds the option data")
            return
        name = data[4:4 + namelen]
        (nreq,) = _U16.unpack_from(data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * nreq:
            self._opt_error(opt, REP_ERR_INVALID, "information request list does not match the "
                                                  "option length")
            return
        wanted = {_U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            self._opt_error(opt, REP_ERR_INVALID, "export name is not UTF-8")
            return
        exp = self._lookup(text)
        if exp is None:
            known = ", ".join(e.name for e in self.exports) or "none"
            self._opt_error(opt, REP_ERR_UNKNOWN, f"unknown export {text[:256]!r} (exports: {known})")
            return
        self._opt_reply(opt, REP_INFO, _U16.pack(INFO_EXPORT) + _U64.pack(exp.size)
                        + _U16.pack(self.tflags))
        if INFO_NAME in wanted:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in wanted and exp.description:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION) + exp.description.encode())
        self._opt_reply(opt, REP_INFO, _U16.pack(INFO_BLOCK_SIZE)
                        + struct.pack(">III", MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK))
        self._opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._start(exp)

    def _start(self, exp: Export) -> None:
        self.export = exp
        self._state, self._need = _S_REQUEST, _REQUEST.size

    # -- transmission ------------------------------------------------------------------------
    def _on_request_header(self) -> Event | None:
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._in, self._pos)
        self._pos += _REQUEST.size
        if magic != REQUEST_MAGIC:
            return self._close(Close(f"bad request magic {magic:#x}", clean=False))
        if cmd == CMD_DISC:
            return self._close(Close("client sent NBD_CMD_DISC", clean=True))
        self._hdr = (flags, cmd, cookie, offset, length)
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST:
                if length > DOS_PAYLOAD:
                    return self._close(Close(f"write payload of {length} bytes", clean=False))
                self._state, self._skip = _S_WRITE_SKIP, length
                return None
            if length:
                self._state, self._need = _S_WRITE_DATA, length
                return None
        return self._finish_request(b"")

    def _on_write_data(self) -> Event | None:
        data = self._take(self._need)
        self._state, self._need = _S_REQUEST, _REQUEST.size
        return self._finish_request(data)

    def _finish_request(self, data: bytes) -> Event | None:
        assert self._hdr is not None and self.export is not None
        flags, cmd, cookie, offset, length = self._hdr
        self._hdr = None
        err = self._validate(flags, cmd, offset, length)
        if err is not None:
            self._error(cookie, err[0], err[1])
            return None
        self.requests += 1
        return Request(cmd, flags, cookie, offset, length, self.export, data)

    def _validate(self, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str] | None:
        if cmd not in CMD_NAMES:
            return EINVAL, f"command {cmd} is not supported"
        allowed = CMD_FLAG_FUA
        if cmd == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE
        if cmd == CMD_READ and self.structured:
            allowed |= CMD_FLAG_DF
        if flags & ~allowed:
            return EINVAL, f"flags {flags & ~allowed:#x} are not valid for {CMD_NAMES[cmd]}"
        if cmd == CMD_FLUSH:
            return None
        size = self.export.size if self.export else 0
        if offset > size or length > size - offset:
            return (ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL,
                    f"{CMD_NAMES[cmd]} of {length} bytes at {offset} is past the end of "
                    f"{self.export.name if self.export else '?'} ({size} bytes)")
        if length > MAX_REQUEST and cmd != CMD_TRIM:
            return EINVAL, f"{CMD_NAMES[cmd]} of {length} bytes exceeds the maximum request size " \
                           f"({MAX_REQUEST} bytes)"
        return None
