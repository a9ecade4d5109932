"""The NBD protocol machine (domains/nbd_proto.py) on its own: no sockets, a fake backend.

A small client-side encoder/decoder here speaks the wire format from the spec, so every
handshake message and every command is checked byte for byte; hypothesis then throws random
bytes at a fresh machine and at one in transmission: it may answer or close, never raise.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains import nbd_proto as P

MiB = 1 << 20
EXPORTS = [P.Export("lun0", 8 * MiB, "first"), P.Export("lun1", 4 * MiB, "second")]


# -- a client-side codec (what the spec says the client sends and reads) ----------------------
def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def info_data(name: str, *infos: int) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
        data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


class Wire:
    """Reads what the server sent, message by message."""

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)

    def feed(self, data: bytes) -> "Wire":
        self.buf += data
        return self

    def take(self, n: int) -> bytes:
        assert len(self.buf) >= n, f"wanted {n} bytes, have {len(self.buf)}"
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.take(20))
        assert magic == P.OPT_REPLY_MAGIC
        return option, rtype, self.take(length)

    def simple(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", self.take(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return err, cookie, self.take(data_len) if not err else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", self.take(20))
        assert magic == P.STRUCTURED_REPLY_MAGIC
        return flags, rtype, cookie, self.take(length)

    def empty(self) -> bool:
        return not self.buf


def fresh(exports=EXPORTS) -> tuple[P.ServerProto, Wire]:
    m = P.ServerProto(exports)
    w = Wire(m.data_to_send())
    magic, ihaveopt, flags = struct.unpack(">QQH", w.take(18))
    assert (magic, ihaveopt) == (P.NBDMAGIC, P.IHAVEOPT)
    assert flags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    return m, w


def send(m: P.ServerProto, w: Wire, data: bytes) -> list[P.Event]:
    m.receive_data(data)
    events = []
    while (ev := m.next_event()) is not None:
        events.append(ev)
    w.feed(m.data_to_send())
    return events


def connected(structured: bool = True, export: str = "lun0") -> tuple[P.ServerProto, Wire]:
    m, w = fresh()
    data = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
    if structured:
        data += opt(P.OPT_STRUCTURED_REPLY)
    data += opt(P.OPT_GO, info_data(export, P.INFO_BLOCK_SIZE))
    assert send(m, w, data) == []
    if structured:
        assert w.opt_reply() == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")
    while True:
        option, rtype, _ = w.opt_reply()
        assert option == P.OPT_GO
        if rtype == P.REP_ACK:
            break
        assert rtype == P.REP_INFO
    assert m.transmission and w.empty()
    return m, w


class Backend:
    """Carries out the machine's requests on in-memory exports, as the server layer would."""

    def __init__(self) -> None:
        self.data = {e.name: bytearray(e.size) for e in EXPORTS}
        self.flushes = 0

    def serve(self, m: P.ServerProto, events: list[P.Event]) -> list[P.Close]:
        closes = []
        for ev in events:
            if isinstance(ev, P.Close):
                closes.append(ev)
                continue
            mem = self.data[ev.export.name]
            # the machine lets only valid requests through (FLUSH ignores offset and length)
            assert ev.cmd == P.CMD_FLUSH or ev.offset + ev.length <= len(mem)
            if ev.cmd == P.CMD_READ:
                m.reply_read(ev, bytes(mem[ev.offset:ev.offset + ev.length]))
            elif ev.cmd == P.CMD_WRITE:
                assert len(ev.data) == ev.length
                mem[ev.offset:ev.offset + ev.length] = ev.data
                m.reply_ok(ev)
            elif ev.cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                mem[ev.offset:ev.offset + ev.length] = bytes(ev.length)
                m.reply_ok(ev)
            elif ev.cmd == P.CMD_FLUSH:
                self.flushes += 1
                m.reply_ok(ev)
            else:
                raise AssertionError(f"unexpected command {ev.cmd}")
        return closes


def run(m: P.ServerProto, w: Wire, b: Backend, data: bytes) -> list[P.Close]:
    m.receive_data(data)
    closes = []
    while (ev := m.next_event()) is not None:
        closes += b.serve(m, [ev])
    w.feed(m.data_to_send())
    return closes


# -- handshake --------------------------------------------------------------------------------
def test_greeting_then_unknown_client_flags_close():
    m, w = fresh()
    events = send(m, w, struct.pack(">I", 1 | 4))
    assert len(events) == 1 and isinstance(events[0], P.Close) and not events[0].clean
    assert m.next_event() is None  # Close comes once; then nothing
    m.receive_data(b"anything")
    assert m.next_event() is None


def test_list_exports_and_invalid_list():
    m, w = fresh()
    send(m, w, struct.pack(">I", 1) + opt(P.OPT_LIST) + opt(P.OPT_LIST, b"x"))
    seen = []
    for _ in EXPORTS:
        option, rtype, data = w.opt_reply()
        assert (option, rtype) == (P.OPT_LIST, P.REP_SERVER)
        (n,) = struct.unpack(">I", data[:4])
        seen.append((data[4:4 + n].decode(), data[4 + n:].decode()))
    assert seen == [("lun0", "first"), ("lun1", "second")]
    assert w.opt_reply() == (P.OPT_LIST, P.REP_ACK, b"")
    option, rtype, msg = w.opt_reply()
    assert rtype == P.REP_ERR_INVALID and msg


def parse_infos(w: Wire, option: int) -> dict[int, bytes]:
    infos = {}
    while True:
        o, rtype, data = w.opt_reply()
        assert o == option
        if rtype == P.REP_ACK:
            return infos
        assert rtype == P.REP_INFO
        (itype,) = struct.unpack(">H", data[:2])
        assert itype not in infos
        infos[itype] = data[2:]


def test_info_then_go_default_export():
    m, w = fresh()
    send(m, w, struct.pack(">I", 3) + opt(P.OPT_INFO, info_data("lun1", P.INFO_NAME,
                                                                 P.INFO_DESCRIPTION,
                                                                 P.INFO_BLOCK_SIZE, 999)))
    infos = parse_infos(w, P.OPT_INFO)
    size, tflags = struct.unpack(">QH", infos[P.INFO_EXPORT])
    assert size == 4 * MiB
    want = (P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM
            | P.TFLAG_SEND_WRITE_ZEROES)
    assert tflags & want == want and not tflags & P.TFLAG_READ_ONLY
    assert not tflags & P.TFLAG_SEND_DF  # only with structured replies
    assert infos[P.INFO_NAME] == b"lun1" and infos[P.INFO_DESCRIPTION] == b"second"
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (512, 4096, MiB)
    assert not m.transmission
    # "" is the default export (lun0); GO without requests still gets EXPORT (and BLOCK_SIZE)
    send(m, w, opt(P.OPT_GO, info_data("", P.INFO_NAME)))
    infos = parse_infos(w, P.OPT_GO)
    assert struct.unpack(">Q", infos[P.INFO_EXPORT][:8])[0] == 8 * MiB
    assert infos[P.INFO_NAME] == b"lun0"  # the canonical name
    assert m.transmission and m.export is not None and m.export.name == "lun0"


def test_go_unknown_export_then_retry():
    m, w = fresh()
    send(m, w, struct.pack(">I", 1) + opt(P.OPT_GO, info_data("nope")))
    option, rtype, msg = w.opt_reply()
    assert (option, rtype) == (P.OPT_GO, P.REP_ERR_UNKNOWN) and b"nope" in msg
    assert not m.transmission
    send(m, w, opt(P.OPT_GO, info_data("lun1")))
    assert P.INFO_EXPORT in parse_infos(w, P.OPT_GO) and m.transmission


@pytest.mark.parametrize("data", [
    b"",  # too short
    b"\0\0\0\x09lun0\0\0",  # name length beyond the data
    struct.pack(">I", 4) + b"lun0" + struct.pack(">H", 2) + b"\0\x01",  # 2 requests, 1 sent
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
])
def test_go_malformed_is_invalid(data):
    m, w = fresh()
    send(m, w, struct.pack(">I", 1) + opt(P.OPT_GO, data))
    option, rtype, _ = w.opt_reply()
    assert (option, rtype) == (P.OPT_GO, P.REP_ERR_INVALID) and not m.transmission


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(no_zeroes):
    m, w = fresh()
    send(m, w, struct.pack(">I", 1 | (2 if no_zeroes else 0)) + opt(P.OPT_EXPORT_NAME, b"lun1"))
    size, tflags = struct.unpack(">QH", w.take(10))
    assert size == 4 * MiB and tflags & P.TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert w.take(124) == bytes(124)
    assert w.empty() and m.transmission


def test_export_name_unknown_closes():
    m, w = fresh()
    events = send(m, w, struct.pack(">I", 1) + opt(P.OPT_EXPORT_NAME, b"lun9"))
    assert isinstance(events[-1], P.Close) and not events[-1].clean and w.empty()


def test_abort_acks_then_closes_cleanly():
    m, w = fresh()
    events = send(m, w, struct.pack(">I", 1) + opt(P.OPT_ABORT))
    assert w.opt_reply() == (P.OPT_ABORT, P.REP_ACK, b"")
    assert isinstance(events[-1], P.Close) and events[-1].clean


# (NBD_OPT_STARTTLS is known: tests/unit/test_nbd_starttls.py)
@pytest.mark.parametrize("option", [P.OPT_LIST_META_CONTEXT,
                                    P.OPT_SET_META_CONTEXT, P.OPT_EXTENDED_HEADERS, 4, 12345])
def test_unknown_options_unsupported(option):
    m, w = fresh()
    send(m, w, struct.pack(">I", 1) + opt(option, b"\0" * 10))
    o, rtype, _ = w.opt_reply()
    assert (o, rtype) == (option, P.REP_ERR_UNSUP)
    send(m, w, opt(P.OPT_LIST))  # and negotiation goes on
    assert w.opt_reply()[1] == P.REP_SERVER


def test_structured_reply_option():
    m, w = fresh()
    send(m, w, struct.pack(">I", 1) + opt(P.OPT_STRUCTURED_REPLY, b"x"))
    assert w.opt_reply()[1] == P.REP_ERR_INVALID and not m.structured
    send(m, w, opt(P.OPT_STRUCTURED_REPLY))
    assert w.opt_reply() == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"") and m.structured


def test_bad_option_magic_closes():
    m, w = fresh()
    events = send(m, w, struct.pack(">I", 1) + struct.pack(">QII", 0x1234, P.OPT_LIST, 0))
    assert isinstance(events[-1], P.Close) and not events[-1].clean


def test_big_options_are_skipped_or_close():
    m, w = fresh()
    big = 100 << 10
    send(m, w, struct.pack(">I", 1) + opt(4242, b"\0" * big) + opt(P.OPT_GO, b"\0" * big))
    assert w.opt_reply()[1] == P.REP_ERR_UNSUP
    assert w.opt_reply()[1] == P.REP_ERR_TOO_BIG
    events = send(m, w, struct.pack(">QII", P.IHAVEOPT, 4242, 2 * MiB))
    assert isinstance(events[-1], P.Close) and not events[-1].clean


def test_split_delivery_byte_by_byte():
    m, w = fresh()
    b = Backend()
    script = (struct.pack(">I", 3) + opt(P.OPT_STRUCTURED_REPLY)
              + opt(P.OPT_GO, info_data("lun0")) + req(P.CMD_WRITE, 512, 4, data=b"abcd")
              + req(P.CMD_READ, 512, 4, cookie=8))
    for i in range(len(script)):
        assert run(m, w, b, script[i:i + 1]) == []
    assert w.opt_reply()[1] == P.REP_ACK
    parse_infos(w, P.OPT_GO)
    assert w.simple() == (0, 7, b"")
    flags, rtype, cookie, payload = w.chunk()
    assert (flags, rtype, cookie) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 8)
    assert payload == struct.pack(">Q", 512) + b"abcd"


# -- transmission -----------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [False, True])
def test_commands(structured):
    m, w = connected(structured)
    b = Backend()
    pattern = bytes(range(256)) * 32  # 8 KiB
    run(m, w, b, req(P.CMD_WRITE, 4096, len(pattern), cookie=1, data=pattern)
        + req(P.CMD_WRITE, 100, 3, flags=P.CMD_FLAG_FUA, cookie=2, data=b"xyz")
        + req(P.CMD_FLUSH, cookie=3)
        + req(P.CMD_READ, 4096, len(pattern), cookie=4))
    assert [w.simple()[:2] for _ in range(3)] == [(0, 1), (0, 2), (0, 3)]
    if structured:
        flags, rtype, cookie, payload = w.chunk()
        assert (flags, rtype, cookie) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 4)
        assert payload == struct.pack(">Q", 4096) + pattern
    else:
        assert w.simple(len(pattern)) == (0, 4, pattern)
    assert b.flushes == 1 and b.data["lun0"][100:103] == b"xyz"
    run(m, w, b, req(P.CMD_TRIM, 4096, 1024, cookie=5)
        + req(P.CMD_WRITE_ZEROES, 6144, 512, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA, cookie=6)
        + req(P.CMD_READ, 0, 0, cookie=9))
    assert w.simple()[:2] == (0, 5) and w.simple()[:2] == (0, 6)
    if structured:  # a zero-length read: no data chunk, just DONE
        assert w.chunk() == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 9, b"")
    else:
        assert w.simple() == (0, 9, b"")
    mem = b.data["lun0"]
    assert mem[4096:5120] == bytes(1024) and mem[6144:6656] == bytes(512)
    assert mem[5120:6144] == pattern[1024:2048] and mem[6656:12288] == pattern[2560:]
    closes = run(m, w, b, req(P.CMD_DISC) + req(P.CMD_READ, 0, 512))  # nothing after DISC
    assert closes == [P.Close("client sent NBD_CMD_DISC", clean=True)] and w.empty()


def error_of(w: Wire, structured: bool) -> tuple[int, int, str]:
    if not structured:
        err, cookie, _ = w.simple()
        return err, cookie, ""
    flags, rtype, cookie, payload = w.chunk()
    assert flags == P.REPLY_FLAG_DONE and rtype == P.REPLY_TYPE_ERROR
    err, n = struct.unpack(">IH", payload[:6])
    assert len(payload) == 6 + n
    return err, cookie, payload[6:].decode()


@pytest.mark.parametrize("structured", [False, True])
def test_errors_keep_the_connection(structured):
    m, w = connected(structured)
    b = Backend()
    size = 8 * MiB
    cases = [
        (req(P.CMD_READ, size - 512, 1024, cookie=1), P.EINVAL),
        (req(P.CMD_WRITE, size, 512, cookie=2, data=b"w" * 512), P.ENOSPC),
        (req(P.CMD_WRITE_ZEROES, size - 512, 4096, cookie=3), P.ENOSPC),
        (req(P.CMD_TRIM, 2**63, 512, cookie=4), P.EINVAL),
        (req(P.CMD_READ, 0, 32 * MiB + 512, cookie=5), P.EINVAL),  # beyond the maximum block
        (req(P.CMD_CACHE, 0, 512, cookie=6), P.EINVAL),  # not offered
        (req(P.CMD_BLOCK_STATUS, 0, 512, cookie=7), P.EINVAL),
        (req(99, 0, 0, cookie=8), P.EINVAL),
        (req(P.CMD_WRITE, 0, 512, flags=P.CMD_FLAG_NO_HOLE, cookie=9, data=b"n" * 512), P.EINVAL),
        (req(P.CMD_WRITE_ZEROES, 0, 512, flags=P.CMD_FLAG_FAST_ZERO, cookie=10), P.EINVAL),
        (req(P.CMD_READ, 0, 512, flags=1 << 9, cookie=11), P.EINVAL),
    ]
    if not structured:
        cases.append((req(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF, cookie=12), P.EINVAL))
    for data, want in cases:
        assert run(m, w, b, data) == []
        err, cookie, msg = error_of(w, structured)
        assert err == want, (cookie, msg)
        if structured:
            assert msg  # a human-readable reason rides along
        assert w.empty()
    assert b.data["lun0"] == bytes(size)  # nothing was written
    # and the connection still serves
    run(m, w, b, req(P.CMD_WRITE, 0, 512, cookie=20, data=b"k" * 512))
    assert w.simple()[:2] == (0, 20)


def test_df_allowed_with_structured_replies():
    m, w = connected(structured=True)
    run(m, w, Backend(), req(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF, cookie=3))
    assert w.chunk()[:3] == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 3)


def test_oversized_write_payload_is_dropped_then_serves():
    m, w = connected(structured=True)
    b = Backend()
    n = 32 * MiB + 4096
    events = run(m, w, b, req(P.CMD_WRITE, 0, n, cookie=1))
    assert events == [] and w.empty()
    for _ in range(n // MiB):  # the payload is read and dropped, never buffered
        run(m, w, b, b"\xab" * MiB)
        assert m.buffered() == 0
    run(m, w, b, b"\xab" * (n % MiB) + req(P.CMD_READ, 0, 512, cookie=2))
    err, cookie, msg = error_of(w, True)
    assert (err, cookie) == (P.EINVAL, 1) and "maximum" in msg
    assert w.chunk()[2] == 2 and b.data["lun0"] == bytes(8 * MiB)


def test_absurd_write_closes():
    m, w = connected()
    closes = run(m, w, Backend(), req(P.CMD_WRITE, 0, 0xFFFFFFFF, cookie=1))
    assert len(closes) == 1 and not closes[0].clean


def test_bad_request_magic_closes():
    m, w = connected()
    closes = run(m, w, Backend(), struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512))
    assert len(closes) == 1 and not closes[0].clean and "magic" in closes[0].reason


def test_eof_between_and_in_the_middle():
    m, w = connected()
    m.receive_data(b"")
    ev = m.next_event()
    assert isinstance(ev, P.Close) and ev.clean
    m, w = connected()
    m.receive_data(req(P.CMD_WRITE, 0, 512)[:40])
    assert m.next_event() is None
    m.receive_data(b"")
    ev = m.next_event()
    assert isinstance(ev, P.Close) and not ev.clean


def test_requests_before_disc_are_still_answered():
    m, w = connected(structured=False)
    b = Backend()
    m.receive_data(req(P.CMD_READ, 0, 512, cookie=1) + req(P.CMD_DISC))
    r = m.next_event()
    assert isinstance(r, P.Request)
    assert m.next_event() == P.Close("client sent NBD_CMD_DISC", clean=True)
    m.reply_read(r, b"\1" * 512)  # outstanding work is finished and answered
    w.feed(m.data_to_send())
    assert w.simple(512) == (0, 1, b"\1" * 512) and w.empty()


def test_wrong_read_length_becomes_an_error_reply():
    m, w = connected(structured=True)
    m.receive_data(req(P.CMD_READ, 0, 1024, cookie=4))
    r = m.next_event()
    m.reply_read(r, b"\0" * 512)
    w.feed(m.data_to_send())
    assert error_of(w, True)[:2] == (P.EIO, 4)


def test_decode_one_takes_one_option_at_a_time():
    m, w = fresh()
    m.receive_data(struct.pack(">I", 3) + opt(P.OPT_LIST) * 3 + opt(P.OPT_LIST)[:5])
    assert m.decode_one() is None and not m.need_input  # the client flags
    for _ in range(3):
        assert m.decode_one() is None and not m.need_input
        w.feed(m.data_to_send())
        while w.opt_reply()[1] != P.REP_ACK:  # one LIST answered, nothing after it
            pass
        assert w.empty()
    assert m.decode_one() is None and m.need_input and m.buffered() == 5


def test_list_reply_is_bounded():
    many = [P.Export(f"lun{i}", MiB, "d" * 200) for i in range(1000)]
    m, w = fresh(many)
    send(m, w, struct.pack(">I", 3) + opt(P.OPT_LIST))
    names = []
    while (r := w.opt_reply())[1] != P.REP_ACK:
        names.append(r[2][4:4 + struct.unpack(">I", r[2][:4])[0]])
    assert 0 < len(names) < 1000 and names == [f"lun{i}".encode() for i in range(len(names))]
    assert sum(20 + 4 + len(n) + 200 for n in names) <= P.MAX_LIST_REPLY
    send(m, w, opt(P.OPT_GO, info_data("lun999")))  # left out of the list, still served
    assert parse_infos(w, P.OPT_GO) and m.transmission


# -- fuzz ---------------------------------------------------------------------------------------
def drain(m: P.ServerProto, b: Backend) -> bytes:
    """Pull every event; answer requests; never raise; return what the machine sent.
    Afterwards the machine is closed or waiting for input."""
    for _ in range(10_000):
        ev = m.next_event()
        if ev is None:
            break
        if isinstance(ev, P.Close):
            assert m.closed is ev
            continue
        assert ev.cmd in (P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES)
        if ev.cmd != P.CMD_FLUSH:
            assert ev.offset + ev.length <= ev.export.size
        if ev.cmd in (P.CMD_READ, P.CMD_WRITE):
            assert ev.length <= P.MAX_REQUEST
        b.serve(m, [ev])
    else:
        raise AssertionError("the machine kept producing events without input")
    out = m.data_to_send()
    assert isinstance(out, bytes)
    return out


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans())
def test_fuzz_fresh_machine_never_raises(chunks, eof):
    m = P.ServerProto(EXPORTS)
    b = Backend()
    for c in chunks:
        m.receive_data(c)
        drain(m, b)
    if eof:
        m.receive_data(b"")
        drain(m, b)
        assert m.closed is not None


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=8), st.booleans())
def test_fuzz_after_handshake_never_raises(chunks, structured):
    m, _ = connected(structured)
    b = Backend()
    for c in chunks:
        m.receive_data(c)
        drain(m, b)


request_st = st.builds(
    lambda cmd, flags, cookie, offset, length, payload: req(
        cmd, offset, length, flags, cookie,
        (payload * (length // max(1, len(payload)) + 1))[:length] if cmd == P.CMD_WRITE else b""),
    st.integers(0, 9).filter(lambda c: c != P.CMD_DISC),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, 9 * MiB), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 64 << 10), st.sampled_from([0, 511, 512, 4096, 8 * MiB])),
    st.binary(min_size=1, max_size=16),
)


@FUZZ
@given(st.lists(request_st, min_size=1, max_size=12), st.booleans(), st.integers(1, 5000))
def test_fuzz_requests_always_get_an_answer(requests, structured, split):
    """Well-framed requests with random fields: each gets exactly one final reply, in order."""
    m, w = connected(structured)
    b = Backend()
    stream = b"".join(requests)
    split = max(split, len(stream) // 200)
    for i in range(0, len(stream), split):
        m.receive_data(stream[i:i + split])
        w.feed(drain(m, b))
    cookies = [struct.unpack(">Q", r[8:16])[0] for r in requests]
    for r, cookie in zip(requests, cookies):
        cmd, length = struct.unpack(">H", r[6:8])[0], struct.unpack(">I", r[24:28])[0]
        magic = struct.unpack(">I", w.buf[:4])[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, got, _ = w.simple()
            if not err and cmd == P.CMD_READ:
                w.take(length)
        else:
            flags, rtype, got, _ = w.chunk()
            assert flags & P.REPLY_FLAG_DONE
        assert got == cookie
    assert w.empty() and m.closed is None


FRAGMENTS = [
    struct.pack(">I", 3), struct.pack(">I", 1), opt(P.OPT_LIST), opt(P.OPT_STRUCTURED_REPLY),
    opt(P.OPT_INFO, info_data("lun1", 1, 2, 3)), opt(P.OPT_GO, info_data("lun0")),
    opt(P.OPT_GO, info_data("")), opt(P.OPT_EXPORT_NAME, b"lun1"), opt(P.OPT_ABORT),
    struct.pack(">QI", P.IHAVEOPT, P.OPT_GO), struct.pack(">Q", P.IHAVEOPT),
    req(P.CMD_WRITE, 0, 512, data=b"w" * 512), req(P.CMD_READ, 512, 4096),
    req(P.CMD_WRITE, 0, 40 * MiB), req(P.CMD_FLUSH), req(P.CMD_DISC),
    struct.pack(">IHH", P.REQUEST_MAGIC, 0, P.CMD_WRITE),
]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=64)), max_size=12),
       st.booleans())
def test_fuzz_fragments_never_raise(parts, eof):
    """Valid pieces of every phase mixed with garbage reach the deeper states than pure noise."""
    m = P.ServerProto(EXPORTS)
    b = Backend()
    for part in parts:
        m.receive_data(part)
        drain(m, b)
    if eof:
        m.receive_data(b"")
        drain(m, b)
        assert m.closed is not None
