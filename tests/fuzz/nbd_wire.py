"""What an NBD client sends, cut into messages, and what the server answers, checked.

`split` cuts a client's byte stream into its messages (client flags, options, requests, and
whatever tail does not parse): the mutators edit length fields and repeat messages with it,
the corpus recorder trims long runs with it. `check_replies` reads the server's answer to
one stream as a client would and asserts it is well formed (tests/fuzz/targets.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from domains import nbd_proto as P
from domains.nbd_stream import StreamResult

_IHAVEOPT = struct.pack(">Q", P.IHAVEOPT)
_REQ_MAGIC = struct.pack(">I", P.REQUEST_MAGIC)


@dataclass(frozen=True)
class Msg:
    kind: str  # "flags", "option", "request", "tail"
    start: int
    end: int
    code: int = 0  # option number or command
    length_at: int = -1  # offset of its 32-bit length field in the stream (-1: none)


def split(data: bytes) -> list[Msg]:
    """Messages of a client stream, read as a well-behaved client writes them."""
    out: list[Msg] = []
    pos = 0
    if len(data) >= 4:
        out.append(Msg("flags", 0, 4))
        pos = 4
    while pos + 16 <= len(data) and data[pos:pos + 8] == _IHAVEOPT:
        opt, n = struct.unpack_from(">II", data, pos + 8)
        end = min(len(data), pos + 16 + n)
        out.append(Msg("option", pos, end, opt, pos + 12))
        pos = end
        if opt == P.OPT_EXPORT_NAME:
            break
    while pos + 28 <= len(data) and data[pos:pos + 4] == _REQ_MAGIC:
        cmd, n = struct.unpack_from(">H", data, pos + 6)[0], struct.unpack_from(">I", data, pos + 24)[0]
        end = pos + 28 + (n if cmd == P.CMD_WRITE else 0)
        out.append(Msg("request", pos, min(end, len(data)), cmd, pos + 24))
        pos = min(end, len(data))
    if pos < len(data):
        out.append(Msg("tail", pos, len(data)))
    return out


def trim(data: bytes, per_kind: int = 6, total: int = 48, max_payload: int = 4096) -> bytes:
    """A shorter stream of the same shape: the handshake whole, then at most `per_kind`
    requests of each (command, flags) and `total` in all, WRITE payloads cut to
    `max_payload` bytes (their length field edited to match), and the closing DISC."""
    out = bytearray()
    seen: dict[tuple[int, int], int] = {}
    kept = 0
    for m in split(data):
        chunk = data[m.start:m.end]
        if m.kind != "request":
            out += chunk
            continue
        flags = struct.unpack_from(">H", chunk, 4)[0]
        key = (m.code, flags)
        if m.code != P.CMD_DISC and (seen.get(key, 0) >= per_kind or kept >= total):
            continue
        seen[key] = seen.get(key, 0) + 1
        kept += 1
        if m.code == P.CMD_WRITE and len(chunk) > 28 + max_payload:
            chunk = chunk[:24] + struct.pack(">I", max_payload) + chunk[28:28 + max_payload]
        elif m.code != P.CMD_WRITE and m.code in (P.CMD_READ,) and \
                struct.unpack_from(">I", chunk, 24)[0] > max_payload:
            chunk = chunk[:24] + struct.pack(">I", max_payload)
        out += chunk
    return bytes(out)


def request_cookies(data: bytes) -> set[int]:
    """Every cookie a request header anywhere in the stream could carry (decoder-agnostic)."""
    cookies = set()
    i = data.find(_REQ_MAGIC)
    while i >= 0:
        if i + 16 <= len(data):
            cookies.add(struct.unpack_from(">Q", data, i + 8)[0])
        i = data.find(_REQ_MAGIC, i + 1)
    return cookies


def option_codes(data: bytes) -> set[int]:
    codes = set()
    i = data.find(_IHAVEOPT)
    while i >= 0:
        if i + 12 <= len(data):
            codes.add(struct.unpack_from(">I", data, i + 8)[0])
        i = data.find(_IHAVEOPT, i + 1)
    return codes


class Malformed(AssertionError):
    pass


def check_replies(sent: bytes, res: StreamResult) -> int:
    """Parse the server's output `res.output` to the client stream `sent` as a client would:
    every message has a valid magic and its stated length, every option reply names an
    option the client sent, every transmission reply a cookie it sent and is the reply the
    machine made (`res.replies`, in order), and every request the machine let through is
    answered exactly once. Returns the number of transmission replies."""
    out = res.output
    pos = 0

    class Cut(Exception):
        pass

    def need(n: int) -> None:
        if pos + n > len(out):
            if res.hung_up:
                raise Cut()  # the client left after max_output bytes: the rest is not there
            raise Malformed(f"output ends inside a message at {pos} (wants {n} bytes)")

    n_replies = 0
    try:
        need(18)
        if out[:16] != struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT):
            raise Malformed("bad greeting")
        pos = 18
        opts = option_codes(sent)
        cookies = request_cookies(sent)
        transmission = False
        while pos < len(out):
            if not transmission and out[pos:pos + 8] == struct.pack(">Q", P.OPT_REPLY_MAGIC):
                need(20)
                _, opt, rtype, n = struct.unpack_from(">QIII", out, pos)
                if opt not in opts:
                    raise Malformed(f"option reply for option {opt} the client never sent")
                need(20 + n)
                pos += 20 + n
                continue
            if not transmission and res.via_export_name:
                need(10 if res.no_zeroes else 134)
                pos += 10 if res.no_zeroes else 134
                transmission = True
                continue
            transmission = True
            if n_replies >= len(res.replies):
                raise Malformed(f"more replies than the machine made, at {pos}")
            want = res.replies[n_replies]
            need(16)
            magic = struct.unpack_from(">I", out, pos)[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                _, err, cookie = struct.unpack_from(">IIQ", out, pos)
                ok, data = err == 0, (want.read_length if err == 0 else 0)
                need(16 + data)
                pos += 16 + data
            elif magic == P.STRUCTURED_REPLY_MAGIC:
                need(20)
                _, flags, rtype, cookie, n = struct.unpack_from(">IHHQI", out, pos)
                need(20 + n)
                if not flags & P.REPLY_FLAG_DONE:
                    raise Malformed("a chunk without DONE (the server sends one chunk a reply)")
                ok = rtype != P.REPLY_TYPE_ERROR
                if rtype == P.REPLY_TYPE_OFFSET_DATA:
                    if n != 8 + want.read_length:
                        raise Malformed(f"OFFSET_DATA chunk of {n} bytes for a {want.read_length}-byte read")
                elif rtype == P.REPLY_TYPE_ERROR:
                    if n < 6 or 6 + struct.unpack_from(">H", out, pos + 24)[0] != n:
                        raise Malformed("ERROR chunk with a bad message length")
                elif rtype != P.REPLY_TYPE_NONE or want.read_length:
                    raise Malformed(f"chunk type {rtype} where {want} was due")
                pos += 20 + n
            else:
                raise Malformed(f"bad reply magic {magic:#x} at {pos}")
            if cookie not in cookies:
                raise Malformed(f"reply cookie {cookie} was never sent")
            if (cookie, ok) != (want.cookie, want.ok):
                raise Malformed(f"reply {n_replies} is ({cookie}, ok={ok}), the machine made {want}")
            n_replies += 1
    except Cut:
        pass
    if res.hung_up:
        return n_replies  # what came before the client left was checked; the rest never came
    if n_replies != len(res.replies):
        raise Malformed(f"{len(res.replies) - n_replies} replies the machine made are missing")
    answered = [id(r.request) for r in res.replies if r.request is not None]
    if sorted(answered) != sorted(id(r) for r in res.requests):
        raise Malformed("a request let through was not answered exactly once")
    return n_replies
