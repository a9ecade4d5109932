"""The mirror receiver's input checks (an untrusted peer), and a sender and a receiver in one
process over real ZeroMQ sockets: resync in the background, batches, the ack gate."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from domains.mirror import Copy, MirrorReceiver, MirrorSender, check_spans
from vmemu.bus import codec
from vmemu.datadir import RunDir
from vmemu.errors import BadRequest

SIZE = 1 << 16


def req(op: str, **args: Any) -> codec.Request:
    return codec.Request(7, op, args)


@pytest.mark.parametrize("spans, data_len", [
    ("x", 0), ([[0]], 1), ([[0, 1, 2]], 1), ([["0", 1]], 1), ([[True, 1]], 1),
    ([[0, 1.0]], 1), ([[-1, 2]], 2), ([[0, 0]], 0), ([[SIZE - 4, 8]], 8), ([[2**70, 1]], 1),
    ([[10, 4], [12, 4]], 8),  # overlapping
    ([[10, 4], [0, 4]], 8),  # not ascending
    ([[0, 4]], 5), ([[0, 4]], 3),  # not exactly the data frame
    ([[i * 2, 1] for i in range(70_000)], 70_000),  # too many
])
def test_bad_spans_are_refused(spans: Any, data_len: int) -> None:
    with pytest.raises(BadRequest):
        check_spans(spans, data_len, SIZE)


def test_good_spans() -> None:
    assert check_spans([[0, 4], [4, 4], [SIZE - 1, 1]], 9, SIZE) == [(0, 4), (4, 4), (SIZE - 1, 1)]


def receiver() -> MirrorReceiver:
    # Not started: _handle is called directly, as the thread would.
    return MirrorReceiver(zmq.Context.instance(), "inproc://unused", SIZE, owners={1})


def test_begin_checks_owner_size_and_takes_no_frozen_copy() -> None:
    rx = receiver()
    with pytest.raises(BadRequest):
        rx._handle(req("begin", region=5, owner=2, size=SIZE, session=1), None)
    with pytest.raises(BadRequest):
        rx._handle(req("begin", region=5, owner=1, size=SIZE * 2, session=1), None)
    with pytest.raises(BadRequest):
        rx._handle(req("begin", region=5, owner=1, size=SIZE, session=0), None)
    assert rx._handle(req("begin", region=5, owner=1, size=SIZE, session=1), None) == {"ok": True}
    assert rx.take_copy(5) == bytearray(SIZE)
    with pytest.raises(BadRequest):  # frozen for a takeover: no new session empties it
        rx._handle(req("begin", region=5, owner=1, size=SIZE, session=2), None)


def test_a_stale_begin_does_not_empty_a_newer_session() -> None:
    rx = receiver()
    rx._handle(req("begin", region=5, owner=1, size=SIZE, session=4), None)
    rx._handle(req("batch", region=5, session=4, spans=[[0, 2]]), memoryview(b"ok"))
    for stale in (3, 4):
        with pytest.raises(BadRequest):
            rx._handle(req("begin", region=5, owner=1, size=SIZE, session=stale), None)
    assert rx.copies[5].data[:2] == b"ok" and rx.copies[5].session == 4


def test_batches_apply_whole_or_not_at_all() -> None:
    rx = receiver()
    rx._handle(req("begin", region=5, owner=1, size=SIZE, session=3), None)
    good = req("batch", region=5, session=3, spans=[[0, 2], [100, 3]])
    assert rx._handle(good, memoryview(b"abXYZ")) == {"ok": True}
    copy = rx.copies[5].data
    assert copy[:2] == b"ab" and copy[100:103] == b"XYZ"
    before = bytes(copy)
    for bad, data in [
        (req("batch", region=5, session=3, spans=[[0, 2], [SIZE - 1, 3]]), b"qqqqq"),
        (req("batch", region=5, session=3, spans=[[0, 2]]), None),  # no data frame
        (req("batch", region=5, session=2, spans=[[0, 2]]), b"qq"),  # a stale session
        (req("batch", region=6, session=3, spans=[[0, 2]]), b"qq"),  # no such copy
        (req("batch", region=5, session=3, spans="nope"), b"qq"),
        (req("nonsense", region=5, session=3), b""),
    ]:
        with pytest.raises(BadRequest):
            rx._handle(bad, None if data is None else memoryview(data))
    assert bytes(copy) == before
    rx.take_copy(5)
    with pytest.raises(BadRequest):  # a dead owner's late batch does not touch a taken copy
        rx._handle(good, memoryview(b"abXYZ"))


def test_one_current_copy_per_owner_plus_the_one_before() -> None:
    rx = receiver()
    for region in (11, 12, 13):
        rx._handle(req("begin", region=region, owner=1, size=SIZE, session=1), None)
    assert set(rx.copies) == {12, 13}
    assert isinstance(rx.copies[13], Copy)


# -- a sender and a receiver over real sockets ---------------------------------------------------

class Domain0:
    """The control endpoint, as far as mirror_state goes: answers and remembers."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.states: list[bool] = []

    def serve(self) -> None:
        while self.sock.poll(0):
            peer, frame = self.sock.recv_multipart()
            r = codec.decode(frame)
            assert isinstance(r, codec.Request) and r.op == "mirror_state"
            self.states.append(r.args["in_sync"])
            self.sock.send_multipart([peer, codec.encode_result(r.id, {})])


def test_sender_and_receiver_end_to_end(tmp_path: Path) -> None:
    ctx = zmq.Context()
    run = RunDir(tmp_path)
    region = bytearray(random.Random(1).randbytes(SIZE))
    used = SIZE // 2
    rx = MirrorReceiver(ctx, run.mirror(2), SIZE, owners={1})
    rx.start()
    d0 = Domain0(ctx, run.control())
    tx = MirrorSender(ctx, run, 1, 2, 99, region, run.control(), lambda: "tok", lambda: used)
    tx.link.chunk = 4096  # several turns of resync
    rng = random.Random(2)
    held: list[tuple[int, int, bytes]] = []

    def turn(write: bool) -> None:
        now = time.monotonic()
        tx.on_ready(now)
        d0.serve()
        if write:  # a write anywhere in the region, logged while the resync runs
            at = rng.randrange(0, SIZE - 64)
            data = rng.randbytes(64)
            region[at:at + 64] = data
            tx.add_spans([(at, at + 64)])
            held.append((tx.ticket(), at, data))
        tx.end_turn(now)

    try:
        tx.request_resync(time.monotonic())
        end = time.monotonic() + 30
        while not tx.in_sync() and time.monotonic() < end:
            turn(write=True)
            zmq.select([s for s in tx.sockets()] + [d0.sock], [], [], 0.01)
        assert tx.in_sync(), tx.stats()
        assert tx.link.stats.resync_bytes == used
        for _ in range(50):
            turn(write=True)
        t_last = tx.ticket()
        while not tx.releasable(t_last) and time.monotonic() < end:
            turn(write=False)
            zmq.select(tx.sockets() + [d0.sock], [], [], 0.01)
        assert tx.releasable(t_last)
        while d0.states[-1:] != [True] and time.monotonic() < end:
            turn(write=False)
            time.sleep(0.001)
        assert d0.states == [True]  # never false: it never was in sync before
        copy = rx.take_copy(99)
        assert copy is not None and copy[:used] == region[:used]
        for _, at, data in held:
            assert bytes(copy[at:at + 64]) == bytes(region[at:at + 64])
        st = tx.stats()
        assert st["mode"] == "sync" and st["degrades"] == 0 and st["acks"] >= st["batches"] - 1
    finally:
        tx.close()
        rx.stop()
        d0.sock.close(0)
        ctx.term()
