"""The mirror sender's state machine (domains/mirror_link.py): events in, actions out.

The scenario tests walk the modes by hand; the model test drives the machine with random
writes, answers, delays, partner deaths and Domain 0 answers against a model of the partner's
copy and of what Domain 0 believes, and checks the one rule that matters: whenever Domain 0
would let a takeover replay the copy, the copy holds every write that was acknowledged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from domains import mirror_link as L
from domains.mirror_link import BEGIN, COPY, DOWN, SYNC, TAIL, Batch, Begin, Drop, Link, Report


def kinds(actions: list[L.Action]) -> list[type]:
    return [type(a) for a in actions]


def synced(used: int = 1000, chunk: int = 400) -> tuple[Link, float]:
    """A link brought to SYNC by hand; returns it and the time."""
    link = Link(True, lambda: used, chunk=chunk, deadline_s=0.25)
    t = 1.0
    (begin,) = link.request_resync(t)
    assert isinstance(begin, Begin) and link.mode == BEGIN
    link.reply(begin.id, True, t)
    assert link.mode == COPY
    while link.mode == COPY:
        (b,) = link.turn(t)
        link.reply(b.id, True, t)
    assert link.mode == SYNC
    assert link.hv_sent is True
    link.reported(True, True, t)
    assert link.hv_known is True
    return link, t


def test_merge_makes_sorted_disjoint_ranges() -> None:
    assert L.merge([(10, 20), (0, 5), (5, 8), (15, 30), (40, 40)]) == [(0, 8), (10, 30)]
    assert L.merge([]) == []


def test_a_fresh_link_holds_nothing_and_drops_spans() -> None:
    link = Link(True, lambda: 100)
    link.spans([(0, 10)])
    assert link.mode == DOWN and link.stats.dropped_spans == 1
    assert link.releasable(link.ticket())
    assert link.turn(0.0) == []


def test_resync_copies_in_bounded_chunks_while_writes_flow_unheld() -> None:
    link = Link(True, lambda: 1000, chunk=300, window=600)
    (begin,) = link.request_resync(0.0)
    assert begin == Begin(1, 1)
    link.spans([(2000, 2100)])  # a write before the partner answered: sent, not held
    (b,) = link.turn(0.0)
    assert b.ranges == [(2000, 2100)] and link.releasable(link.ticket())
    assert link.busy() is False  # no chunk before the partner answered the begin
    link.reply(begin.id, True, 0.0)
    assert link.mode == COPY and link.busy()
    link.spans([(2100, 2200)])
    (c1,) = link.turn(0.0)
    assert c1.ranges == [(0, 300), (2100, 2200)]  # one chunk and the turn's spans, one message
    assert link.releasable(link.ticket())  # Domain 0 does not count on the copy yet
    (c2,) = link.turn(0.0)
    assert c2.ranges == [(300, 600)]
    assert not link.busy() and link.turn(0.0) == []  # the window (600 bytes) is full
    link.reply(c2.id, True, 0.0)  # acknowledges c1 as well
    assert link.inflight_chunk == 0
    (c3,) = link.turn(0.0)
    (c4,) = link.turn(0.0)
    assert c3.ranges == [(600, 900)] and c4.ranges == [(900, 1000)]
    assert link.mode == TAIL and link.last_chunk_id == c4.id
    link.spans([(2200, 2300)])  # after the last chunk: held until the partner has it
    t = link.ticket()
    assert not link.releasable(t)
    (b5,) = link.turn(0.0)
    link.reply(c4.id, True, 0.0)
    assert link.mode == SYNC and link.hv_sent is True
    assert not link.releasable(t)
    link.reply(b5.id, True, 0.0)
    assert link.releasable(t)
    assert link.stats.resync_bytes == 1000


def test_in_sync_writes_are_held_until_the_partner_answers_pipelined() -> None:
    link, t = synced()
    link.spans([(5000, 5100)])
    t1 = link.ticket()
    (b1,) = link.turn(t)
    link.spans([(5100, 5200), (100, 108)])
    t2 = link.ticket()
    (b2,) = link.turn(t)  # sent before b1 was answered
    assert b2.ranges == [(100, 108), (5100, 5200)]
    assert not link.releasable(t1) and not link.releasable(t2)
    link.reply(b1.id, True, t + 0.001)
    assert link.releasable(t1) and not link.releasable(t2)
    link.reply(b2.id, True, t + 0.002)
    assert link.releasable(t2)
    assert link.stats.rtt_max_ms == pytest.approx(2.0)


def test_a_partner_that_stops_answering_costs_one_deadline_then_unholds() -> None:
    link, t = synced()
    link.spans([(5000, 5100)])
    ticket = link.ticket()
    link.turn(t)
    assert link.turn(t + 0.2) == []
    out = link.turn(t + 0.26)
    assert kinds(out) == [Drop, Report] and out[1] == Report(False) and link.mode == DOWN
    assert not link.releasable(ticket)  # not before Domain 0 knows the copy is incomplete
    link.reported(False, True, t + 0.261)
    assert link.releasable(ticket)
    link.spans([(5100, 5200)])
    assert link.releasable(link.ticket()) and link.turn(t + 0.3) == []  # DOWN: nothing sent
    # A retry after the backoff: a new session with a new connection
    assert link.next_wakeup() == pytest.approx(t + 0.26 + L.RETRY_S)
    (begin,) = link.turn(t + 0.26 + L.RETRY_S)
    assert isinstance(begin, Begin) and begin.session == 2


def test_a_partner_dying_mid_resync_holds_nothing() -> None:
    link = Link(True, lambda: 10_000, chunk=100, deadline_s=0.25)
    (begin,) = link.request_resync(0.0)
    link.reply(begin.id, True, 0.0)
    now = 0.0
    for _ in range(20):
        link.spans([(20_000, 20_100)])
        assert link.releasable(link.ticket())
        link.turn(now)
        now += 0.01
    while link.mode != DOWN:
        link.spans([(20_000, 20_100)])
        assert link.releasable(link.ticket())  # never held, the whole time
        out = link.turn(now)
        now += 0.01
    assert kinds(out) == [Drop]  # Domain 0 already knew: no report
    assert now < 0.25 + 0.03


def test_a_partner_that_registers_again_gets_a_new_session_after_domain0_knows() -> None:
    link, t = synced()
    out = link.request_resync(t)
    assert kinds(out) == [Drop, Report]  # Domain 0 must stop counting on the old copy first
    assert link.mode == DOWN
    out = link.reported(False, True, t)
    assert kinds(out) == [Begin]  # ...and only then is the copy emptied


def test_a_true_report_that_got_no_answer_is_taken_as_applied() -> None:
    link = Link(True, lambda: 10, deadline_s=0.25)
    (begin,) = link.request_resync(0.0)
    link.reply(begin.id, True, 0.0)
    (b,) = link.turn(0.0)
    out = link.reply(b.id, True, 0.0)
    assert out == [Report(True)]
    assert link.reported(True, False, 0.1) == []
    assert link.hv_known is None
    out = link.turn(0.1 + L.REPORT_RETRY_S)
    assert out == [Report(True)]  # said again, after a pause
    # Degrading meanwhile: nothing is unheld until a "false" is confirmed.
    link.spans([(0, 5)])
    ticket = link.ticket()
    link.turn(0.3)
    out = link.turn(0.6)
    assert kinds(out) == [Drop]  # the "true" is still unanswered: one report at a time
    assert not link.releasable(ticket)
    assert link.reported(True, True, 0.61) == [Report(False)]
    assert not link.releasable(ticket)
    link.reported(False, True, 0.62)
    assert link.releasable(ticket)


def test_partner_taken_over_stops_waiting_at_once() -> None:
    link, t = synced()
    link.spans([(5000, 5100)])
    ticket = link.ticket()
    link.turn(t)
    out = link.partner_gone(t + 0.01)
    assert kinds(out) == [Drop, Report]
    link.reported(False, True, t + 0.02)
    assert link.releasable(ticket)
    assert link.turn(t + 100) == []  # and no retries: the partner is dead


def test_refused_batch_and_stray_answers() -> None:
    link, t = synced()
    assert link.reply(999, True, t) == []  # no such batch in flight: ignored
    link.spans([(0, 1)])
    (b,) = link.turn(t)
    out = link.reply(b.id, False, t)
    assert kinds(out) == [Drop, Report] and link.mode == DOWN


def test_resync_rate_paces_chunks() -> None:
    link = Link(True, lambda: 1000, chunk=100, rate=1000.0)  # 1000 bytes/s
    (begin,) = link.request_resync(0.0)
    link.reply(begin.id, True, 0.0)
    assert not link.busy()
    assert link.turn(0.05) == []  # 50 bytes allowed: less than a chunk
    assert link.next_wakeup() == pytest.approx(0.1)
    (b,) = link.turn(0.1)
    assert b.ranges == [(0, 100)]


def test_no_partner_means_never_held() -> None:
    link = Link(False, lambda: 10)
    assert link.request_resync(0.0) == []
    link.spans([(0, 10)])
    assert link.releasable(link.ticket()) and link.mode == DOWN


# -- the model test ------------------------------------------------------------------------------

@dataclass
class Msg:
    session: int
    id: int
    begin: bool
    cells: dict[int, int]  # what the message carries, read from the region when it was sent
    conn: int  # the connection it went on


@dataclass
class Partner:
    alive: bool = True
    copy: dict[int, int] | None = None
    session: int = 0
    inbox: list[Msg] = field(default_factory=list)


def run_model(seed: int, steps: int = 600) -> tuple[int, int]:
    """One random run; (turns spent in SYNC, writes acknowledged while in SYNC)."""
    rng = random.Random(seed)
    size = 32
    region = [0] * size
    stamp = 0
    link = Link(True, lambda: size, chunk=rng.choice([4, 8, 32]), window=16, deadline_s=0.25,
                retry_s=0.05, retry_max_s=0.2)
    partner = Partner()
    conn = 0  # the owner's connection; a Drop or a Begin opens a new one
    replies: list[tuple[int, int, bool]] = []  # (conn, id, ok) on their way back
    hv = {"state": False, "inbox": []}  # what Domain 0 believes; reports on their way
    held: list[tuple[int, int, int]] = []  # (ticket, cell, stamp) of writes not yet answered
    acked: dict[int, int] = {}  # cell -> newest acknowledged stamp
    now = 0.0

    def do(actions: list[L.Action]) -> None:
        nonlocal conn
        for a in actions:
            if isinstance(a, Begin):
                conn += 1
                partner.inbox.append(Msg(a.session, a.id, True, {}, conn))
            elif isinstance(a, Batch):
                cells = {i: region[i] for s, e in a.ranges for i in range(s, e)}
                partner.inbox.append(Msg(a.session, a.id, False, cells, conn))
            elif isinstance(a, Drop):
                conn += 1
            elif isinstance(a, Report):
                hv["inbox"].append(a.in_sync)

    def check() -> None:
        # A takeover now would replay the copy if Domain 0 says in sync and the copy exists.
        if hv["state"] and partner.alive and partner.copy is not None:
            for cell, s in acked.items():
                assert partner.copy.get(cell, 0) >= s, (seed, cell, s, partner.copy.get(cell))

    in_sync_turns = acked_in_sync = 0
    do(link.request_resync(now))
    for _ in range(steps):
        now += rng.choice([0.0, 0.0, 0.001, 0.001, 0.002, 0.01]) if rng.random() < 0.99 else 0.3
        r = rng.random()
        if r < 0.3:  # a write
            stamp += 1
            cell = rng.randrange(size)
            region[cell] = stamp
            link.spans([(cell, cell + 1)])
            held.append((link.ticket(), cell, stamp))
        elif r < 0.6 and partner.inbox and partner.alive:  # the partner takes a message
            # In order on each connection; across connections (an old one's leftovers and a
            # new one's) in any order.
            first = rng.choice(sorted({x.conn for x in partner.inbox}))
            m = partner.inbox.pop(next(i for i, x in enumerate(partner.inbox) if x.conn == first))
            if m.begin:  # as the receiver: never back to an older session
                ok = m.session > partner.session
                if ok:
                    partner.copy, partner.session = {}, m.session
            elif partner.copy is not None and m.session == partner.session:
                partner.copy.update(m.cells)
                ok = True
            else:
                ok = False
            replies.append((m.conn, m.id, ok))
        elif r < 0.8 and replies:
            c, i, ok = replies.pop(0)
            if c == conn:  # answers on a closed connection are lost
                do(link.reply(i, ok, now))
        elif r < 0.9 and hv["inbox"]:
            v = hv["inbox"].pop(0)
            hv["state"] = v
            if rng.random() < 0.9:
                do(link.reported(v, True, now))
            else:
                do(link.reported(v, False, now))  # applied, but the answer was lost
        elif r < 0.905:  # the partner dies; a new incarnation comes up and asks for a copy
            partner = Partner()
            replies.clear()
            do(link.request_resync(now))
        elif r < 0.91:
            partner.alive = False  # stuck: messages pile up unanswered
        elif r < 0.93:
            partner.alive = True
        do(link.turn(now))
        still = []
        in_sync_turns += link.mode == SYNC
        for t, cell, s in held:  # the transports release what the link allows
            if link.releasable(t):
                acked[cell] = max(acked.get(cell, 0), s)
                acked_in_sync += link.mode == SYNC
            else:
                still.append((t, cell, s))
        held = still
        check()
    return in_sync_turns, acked_in_sync


@pytest.mark.parametrize("seed", range(300))
def test_model_acknowledged_writes_are_in_any_copy_domain0_counts_on(seed: int) -> None:
    run_model(seed)


def test_model_is_not_vacuous() -> None:
    """The random runs do reach SYNC, and acknowledge writes through the partner there."""
    runs = [run_model(seed) for seed in range(40)]
    assert sum(1 for turns, _ in runs if turns) >= 10
    assert sum(n for _, n in runs) >= 50


def test_resync_rate_config_is_checked() -> None:
    from vmemu.config import ClusterConfig
    from vmemu.errors import BadRequest

    assert ClusterConfig(nodes=2).mirror_resync_mb_s == 0.0
    with pytest.raises(BadRequest):
        ClusterConfig(nodes=2, mirror_resync_mb_s=-1.0)


def test_resync_copies_only_the_ranges_used() -> None:
    """The header and each log half up to its tail: not the stale bytes between."""
    link = Link(True, lambda: [(1000, 1020), (0, 10), (100, 150)], chunk=30)
    (begin,) = link.request_resync(0.0)
    link.reply(begin.id, True, 0.0)
    got = []
    while link.mode == COPY:
        (b,) = link.turn(0.0)
        got.append(b.ranges)
        link.reply(b.id, True, 0.0)
    assert got == [[(0, 10), (100, 120)], [(120, 150)], [(1000, 1020)]]
    assert link.copy_end == 80 and link.stats.resync_bytes == 80 and link.mode == SYNC
