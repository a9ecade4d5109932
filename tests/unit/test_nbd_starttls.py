"""NBD_OPT_STARTTLS in the protocol machine (domains/nbd_proto.py) and in a connection's
flow (domains/nbd_conn.py, domains/nbd_stream.py): pure, no sockets, no TLS. Every rule of
the spec's TLS section that the machine keeps has a test here that fails if the rule breaks.
(TLS itself, over real sockets and with real clients: tests/unit/test_nbd_tls.py and
tests/e2e/test_nbd_tls.py.)"""

from __future__ import annotations

import struct

import pytest

from domains import nbd_proto as P
from domains.mem_dmodule import MemDModule
from domains.nbd_conn import Conn
from domains.nbd_limits import Limits, Pool, Stats
from domains.nbd_requests import exports_of
from domains.nbd_stream import serve_stream
from tests.unit.test_nbd_proto import EXPORTS, Wire, info_data, opt, req, send

FLAGS = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
GO = opt(P.OPT_GO, info_data("lun0"))


def machine(tls: str) -> tuple[P.ServerProto, Wire]:
    m = P.ServerProto(EXPORTS, tls=tls)
    w = Wire(m.data_to_send())
    w.take(18)
    return m, w


def go_replies(w: Wire) -> list[int]:
    types = []
    while True:
        option, rtype, _ = w.opt_reply()
        assert option == P.OPT_GO
        types.append(rtype)
        if rtype != P.REP_INFO:
            return types


def started(tls: str = "on", before: bytes = b"") -> tuple[P.ServerProto, Wire]:
    """A machine that acknowledged STARTTLS (after `before`) and was told TLS is up."""
    m, w = machine(tls)
    events = send(m, w, FLAGS + before + opt(P.OPT_STARTTLS))
    assert events == [P.StartTls(b"")]
    m.tls_started()
    return m, w


def test_tls_mode_is_checked():
    with pytest.raises(ValueError):
        P.ServerProto(EXPORTS, tls="maybe")


def test_off_refuses_starttls_by_policy_and_negotiation_goes_on():
    m, w = machine("off")
    events = send(m, w, FLAGS + opt(P.OPT_STARTTLS))
    assert events == []  # no StartTls: the transport never starts TLS
    option, rtype, msg = w.opt_reply()
    assert (option, rtype) == (P.OPT_STARTTLS, P.REP_ERR_POLICY) and b"--nbd-tls" in msg
    send(m, w, GO)
    assert go_replies(w)[-1] == P.REP_ACK and m.transmission and not m.tls_active


@pytest.mark.parametrize("tls", ["on", "require"])
def test_starttls_is_acked_then_nothing_is_decoded_until_tls_is_up(tls):
    m, w = machine(tls)
    # A client that pipelines (it must not): what follows STARTTLS is TLS, handed over.
    after = opt(P.OPT_LIST) + b"\x16\x03\x01"
    events = send(m, w, FLAGS + opt(P.OPT_STARTTLS) + after)
    assert events == [P.StartTls(after)]
    assert w.opt_reply() == (P.OPT_STARTTLS, P.REP_ACK, b"") and w.empty()
    assert m.buffered() == 0  # nothing kept: it was TLS
    assert send(m, w, opt(P.OPT_LIST)) == [] and w.empty()  # waiting for TLS: no LIST reply
    m2, w2 = machine(tls)
    send(m2, w2, FLAGS + opt(P.OPT_STARTTLS))
    w2.opt_reply()
    m2.tls_started()
    send(m2, w2, opt(P.OPT_LIST))  # once TLS is up, haggling goes on
    assert w2.opt_reply()[1] == P.REP_SERVER and m2.tls_active


def test_tls_started_without_an_acknowledged_starttls_is_a_bug():
    m, _ = machine("on")
    with pytest.raises(RuntimeError):
        m.tls_started()


@pytest.mark.parametrize("tls", ["on", "require"])
def test_starttls_with_data_is_invalid(tls):
    m, w = machine(tls)
    assert send(m, w, FLAGS + opt(P.OPT_STARTTLS, b"x")) == []
    assert w.opt_reply()[:2] == (P.OPT_STARTTLS, P.REP_ERR_INVALID)
    assert send(m, w, opt(P.OPT_STARTTLS)) == [P.StartTls(b"")]  # a proper one still works


@pytest.mark.parametrize("tls", ["on", "require"])
def test_a_second_starttls_is_invalid(tls):
    m, w = started(tls)
    w.opt_reply()
    assert send(m, w, opt(P.OPT_STARTTLS)) == []
    assert w.opt_reply()[:2] == (P.OPT_STARTTLS, P.REP_ERR_INVALID)
    send(m, w, GO)
    assert go_replies(w)[-1] == P.REP_ACK and m.transmission


def test_what_plaintext_negotiated_is_forgotten_over_tls():
    m, w = started("on", before=opt(P.OPT_STRUCTURED_REPLY))
    assert w.opt_reply() == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")
    w.opt_reply()  # STARTTLS's ACK
    assert not m.structured  # negotiated in plaintext: does not bind the TLS session
    send(m, w, GO)
    go_replies(w)
    assert not m.tflags & P.TFLAG_SEND_DF
    [ev] = send(m, w, req(P.CMD_READ, 0, 512, cookie=3))
    m.reply_read(ev, bytes(512))
    w.feed(m.data_to_send())
    assert w.simple(512)[:2] == (0, 3)  # a simple reply: no structured replies over TLS


@pytest.mark.parametrize("option", [P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_INFO, P.OPT_GO,
                                    P.OPT_LIST_META_CONTEXT, 12345])
def test_require_refuses_every_option_before_tls(option):
    m, w = machine("require")
    data = info_data("lun0") if option in (P.OPT_INFO, P.OPT_GO) else b""
    assert send(m, w, FLAGS + opt(option, data)) == []
    o, rtype, msg = w.opt_reply()
    assert (o, rtype) == (option, P.REP_ERR_TLS_REQD) and b"nbds://" in msg and w.empty()
    assert not m.transmission and not m.structured
    # an oversized option is refused the same way (its data skipped, never buffered)
    send(m, w, opt(option, bytes(P.MAX_OPTION + 1)))
    assert w.opt_reply()[:2] == (option, P.REP_ERR_TLS_REQD)


def test_require_closes_on_export_name_before_tls():
    m, w = machine("require")
    events = send(m, w, FLAGS + opt(P.OPT_EXPORT_NAME, b"lun0"))
    assert len(events) == 1 and isinstance(events[0], P.Close) and not events[0].clean
    assert "TLS" in events[0].reason and not m.transmission and w.empty()


def test_require_lets_abort_through_before_tls():
    m, w = machine("require")
    events = send(m, w, FLAGS + opt(P.OPT_ABORT))
    assert w.opt_reply() == (P.OPT_ABORT, P.REP_ACK, b"")
    assert isinstance(events[-1], P.Close) and events[-1].clean


def test_require_never_sends_tls_reqd_once_tls_is_up():
    m, w = started("require")
    w.opt_reply()
    send(m, w, opt(12345) + opt(P.OPT_LIST) + opt(P.OPT_STRUCTURED_REPLY))
    assert w.opt_reply()[1] == P.REP_ERR_UNSUP
    assert w.opt_reply()[1] == P.REP_SERVER
    while (r := w.opt_reply())[0] == P.OPT_LIST:
        assert r[1] in (P.REP_SERVER, P.REP_ACK)
    assert r == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"") and m.structured
    events = send(m, w, opt(P.OPT_EXPORT_NAME, b"lun1"))
    assert events == [] and m.transmission and m.export.name == "lun1"


def test_on_serves_plaintext_clients_without_asking_for_tls():
    m, w = machine("on")
    send(m, w, FLAGS + opt(P.OPT_LIST) + GO)
    while (r := w.opt_reply())[0] == P.OPT_LIST:
        assert r[1] != P.REP_ERR_TLS_REQD
    assert m.transmission and not m.tls_active


def test_eof_while_waiting_for_tls_closes():
    m, w = machine("on")
    send(m, w, FLAGS + opt(P.OPT_STARTTLS))
    m.receive_data(b"")
    ev = m.next_event()
    assert isinstance(ev, P.Close) and not ev.clean


# -- the connection's flow around STARTTLS (domains/nbd_conn.py) ------------------------------
def conn(tls: str) -> Conn:
    d = MemDModule(1)
    exports, lun_of = exports_of(d, 1, 1)
    lim = Limits()
    return Conn(P.ServerProto(exports, tls=tls), 1, lun_of, d, lim, Pool(lim.shared), Stats())


def test_conn_stops_reading_until_the_ack_has_left_and_tls_begins():
    c = conn("on")
    c.consume(sum(b.nbytes for b in c.out))  # the greeting left
    c.feed(FLAGS + opt(P.OPT_STARTTLS) + b"hello")
    c.decode(16)
    assert c.tls_wanted == P.StartTls(b"hello")
    assert c.room_in() == 0 and not c.can_decode()  # no plaintext may be taken now
    assert not c.tls_ready()  # the ACK is still queued
    c.consume(sum(b.nbytes for b in c.out))
    assert c.tls_ready() and c.tls_begun() == b"hello"
    assert c.tls_wanted is None and c.proto.tls_active and c.room_in() > 0


def test_conn_counts_the_transports_tls_bytes():
    c = conn("on")
    base_in, base_out = c.in_bytes(), c.out_bytes()
    room = c.room_in()
    c.wire_in, c.wire_out = 1000, 2000
    assert (c.in_bytes(), c.out_bytes()) == (base_in + 1000, base_out + 2000)
    assert c.room_in() == room - 1000
    c.consume(sum(b.nbytes for b in c.out))
    c.closing = P.Close("done", clean=True)
    assert not c.finished()  # its last replies are still encrypted bytes on their way out
    assert c.waiting_on_peer()
    c.wire_out = 0
    assert c.finished()


# -- the byte-stream entry (what the fuzzers drive): STARTTLS with a null cipher --------------
@pytest.mark.parametrize("tls", ["on", "require"])
def test_serve_stream_goes_on_after_starttls(tls):
    data = (FLAGS + opt(P.OPT_STARTTLS) + opt(P.OPT_STRUCTURED_REPLY) + GO
            + req(P.CMD_WRITE, 0, 512, cookie=5, data=b"w" * 512)
            + req(P.CMD_READ, 0, 512, cookie=6) + req(P.CMD_DISC))
    res = serve_stream(data, tls=tls)
    assert res.tls_started and res.close is not None and res.close.clean
    assert [(r.cookie, r.ok) for r in res.replies] == [(5, True), (6, True)]


def test_serve_stream_require_without_starttls_serves_nothing():
    res = serve_stream(FLAGS + GO + req(P.CMD_READ, 0, 512, cookie=6), tls="require")
    assert not res.tls_started and not res.requests and not res.replies
    assert struct.pack(">I", P.REP_ERR_TLS_REQD) in res.output
