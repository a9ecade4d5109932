"""The RPC layer under bus faults, on real ZeroMQ sockets in one process.

What a duplicated, delayed or lost message must never do: run a request twice, apply a
reply to a call that is over, or take down the loop that reads it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import pytest
import zmq

from vmemu.bus import codec, faults
from vmemu.bus.faults import TO_DOM0, TO_GUEST, Rules, Tap
from vmemu.bus.rpc import AsyncRpcClient, RpcClient, RpcServer, make_socket
from vmemu.errors import InvalidState, Timeout


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def endpoint() -> str:
    return f"ipc://@vmemu-test-{uuid.uuid4().hex}"


def rules_with(**kw: Any) -> Rules:
    rs = Rules()
    rs.install(faults.parse({"duration_s": 60, **kw}, 2, faults.BUS_OPS, time.monotonic(), 1))
    return rs


def serve(srv: RpcServer, until: float, answer: Any = "ok") -> list[codec.Request]:
    """Answer every request that arrives (or is let go) before `until`; what was done."""
    done = []
    while time.monotonic() < until:
        if srv.pending() or srv.sock.poll(5):
            inc = srv.recv()
            if inc is not None:
                done.append(inc.request)
                srv.reply(inc.peer, inc.request.id, answer)
    return done


def pump(client: AsyncRpcClient, until: float) -> None:
    while time.monotonic() < until:
        if client.sock.poll(5):
            client.on_readable()
        client.expire(time.monotonic())


@pytest.mark.parametrize("dedup,done_times", [(True, 1), (False, 2)])
def test_a_request_sent_twice_is_done_once_by_a_deduplicating_server(ctx, dedup, done_times):
    ep = endpoint()
    srv = RpcServer(ctx, ep, dedup=dedup)
    raw = make_socket(ctx, zmq.DEALER)
    raw.connect(ep)
    try:
        frame = codec.encode_request(7, "assign", {"identity": 1})
        raw.send(frame)
        raw.send(frame)
        raw.send(codec.encode_request(0, "heartbeat", {}))  # notifications are never repeats
        raw.send(codec.encode_request(0, "heartbeat", {}))
        done = serve(srv, time.monotonic() + 0.5)
        assert [r.op for r in done].count("assign") == done_times
        assert [r.op for r in done].count("heartbeat") == 2
        assert srv.duplicates == (1 if dedup else 0)
        replies = []
        while raw.poll(100):
            replies.append(codec.decode(raw.recv()))
        assert [r.id for r in replies] == [7] * done_times
    finally:
        raw.close(0)
        srv.close()


def test_a_duplicated_call_through_a_tap_gets_one_answer_and_one_callback(ctx):
    ep = endpoint()
    srv = RpcServer(ctx, ep, dedup=True)
    cli = AsyncRpcClient(ctx, ep)
    cli.tap, cli.tap_node = Tap(rules_with(dup=1.0, direction=TO_GUEST)), 2
    calls: list[Any] = []
    try:
        cli.call("release", {"identity": 1}, 5.0, lambda res, err: calls.append((res, err)))
        done = serve(srv, time.monotonic() + 0.4, answer={"cp_ms": 1.0})
        pump(cli, time.monotonic() + 0.2)
        assert [r.op for r in done] == ["release"] and srv.duplicates == 1
        assert calls == [({"cp_ms": 1.0}, None)]
    finally:
        cli.close()
        srv.close()


def test_a_reply_that_comes_after_its_call_timed_out_is_dropped_not_applied(ctx):
    ep = endpoint()
    srv = RpcServer(ctx, ep)
    cli = AsyncRpcClient(ctx, ep)
    cli.tap, cli.tap_node = Tap(rules_with(delay_ms=300, direction=TO_DOM0)), 2
    calls: list[Any] = []
    try:
        cli.call("assign", {}, 0.1, lambda res, err: calls.append((res, err)))
        serve(srv, time.monotonic() + 0.1)
        pump(cli, time.monotonic() + 0.15)
        assert len(calls) == 1 and isinstance(calls[0][1], Timeout)
        pump(cli, time.monotonic() + 0.4)  # the reply is let go now: nobody waits for it
        assert len(calls) == 1 and len(cli.tap) == 0  # type: ignore[arg-type]
    finally:
        cli.close()
        srv.close()


def test_expiring_calls_survive_a_callback_that_fences_the_node(ctx):
    """Regression: `expire` once deleted each timed-out call by key after calling the one
    before it; a callback that fails them all (Domain 0 fencing the node on an unanswered
    assign) made that a KeyError in Domain 0's loop."""
    cli = AsyncRpcClient(ctx, endpoint())  # nobody answers
    calls: list[Any] = []

    def fence(res: Any, err: Any) -> None:
        calls.append(("first", type(err)))
        cli.fail_all(InvalidState("node2 was fenced"))
        cli.close()

    try:
        cli.call("assign", {}, 0.0, fence)
        cli.call("map", {}, 0.0, lambda res, err: calls.append(("second", type(err))))
        cli.expire(time.monotonic() + 1)
        assert calls == [("first", Timeout), ("second", InvalidState)]
    finally:
        cli.close()


def test_a_blocking_call_waits_out_a_held_request_and_a_held_reply(ctx):
    ep = endpoint()
    srv = RpcServer(ctx, ep)
    cli = RpcClient(ctx, ep, timeout=2.0)
    cli.tap, cli.tap_node = Tap(rules_with(delay_ms=150)), 2  # both ways
    import threading

    stop = time.monotonic() + 1.5
    t = threading.Thread(target=serve, args=(srv, stop, [1, 2]), daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        assert cli.call("grants", {"node": 2}) == [1, 2]
        assert time.monotonic() - t0 >= 0.3  # held going, and held coming back
    finally:
        t.join()
        cli.close()
        srv.close()


def test_a_blocking_call_whose_reply_is_lost_times_out(ctx):
    ep = endpoint()
    srv = RpcServer(ctx, ep)
    cli = RpcClient(ctx, ep, timeout=0.3)
    cli.tap, cli.tap_node = Tap(rules_with(drop=1.0, direction=TO_GUEST)), 2
    import threading

    t = threading.Thread(target=serve, args=(srv, time.monotonic() + 0.6), daemon=True)
    t.start()
    try:
        with pytest.raises(Timeout):
            cli.call("mirror_state", {})
    finally:
        t.join()
        cli.close()
        srv.close()


def test_a_server_holds_a_guests_requests_and_faults_its_replies_to_them(ctx):
    """Domain 0's control endpoint: a guest's report held, then let go by `pending`; the
    reply to its call goes the other way, through the rule's other direction."""
    ep = endpoint()
    srv = RpcServer(ctx, ep, dedup=True)
    srv.set_tap(Tap(rules_with(delay_ms=100, direction=TO_DOM0)),
                lambda req: req.args.get("node"), TO_DOM0)
    raw = make_socket(ctx, zmq.DEALER)
    raw.connect(ep)
    try:
        raw.send(codec.encode_request(0, "heartbeat", {"node": 2}))
        raw.send(codec.encode_request(0, "status", {}))  # not a guest's: never held
        t0 = time.monotonic()
        assert srv.sock.poll(1000)
        first = srv.recv()
        while first is None:  # the heartbeat was read and held; the status comes next
            first = srv.recv()
        assert first.request.op == "status"
        while not srv.pending():
            time.sleep(0.005)
        assert time.monotonic() - t0 >= 0.09
        assert srv.recv().request.op == "heartbeat"  # type: ignore[union-attr]
        # now drop the replies that go back to node2 (and only those)
        srv.tap.rules.clear()  # type: ignore[union-attr]
        srv.tap.rules.install(faults.parse(  # type: ignore[union-attr]
            {"duration_s": 60, "drop": 1.0, "direction": TO_GUEST}, 2, faults.BUS_OPS,
            time.monotonic(), 2))
        raw.send(codec.encode_request(5, "grants", {"node": 2}))
        raw.send(codec.encode_request(6, "grants", {"node": 1}))
        for _ in range(2):
            assert srv.sock.poll(1000)
            inc = srv.recv()
            srv.reply(inc.peer, inc.request.id, [])  # type: ignore[union-attr]
        assert raw.poll(1000)
        assert codec.decode(raw.recv()).id == 6 and not raw.poll(200)
    finally:
        raw.close(0)
        srv.close()
