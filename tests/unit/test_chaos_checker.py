"""The linearizability checker: it finds and names hand-made anomalies, agrees with a brute-force
checker on small random histories, and says "unknown", never "valid", when out of budget."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from tests.unit.chaos_synth import simulate
from vmemu.chaos.anomalies import without
from vmemu.chaos.checker import check, check_block, search
from vmemu.chaos.history import Op


class H:
    """A hand-made history on one block: H().w(...).r(...) with explicit times."""

    def __init__(self, block: str = "b") -> None:
        self.block = block
        self.ops: list[Op] = []

    def _add(self, f: str, p: int, value: str | None, a: int, b: int | None, kind: str) -> H:
        self.ops.append(Op(len(self.ops), p, f, self.block, value, kind, a, b))
        return self

    def w(self, p: int, value: str, a: int, b: int | None, kind: str = "ok") -> H:
        return self._add("write", p, value, a, b, kind)

    def r(self, p: int, value: str | None, a: int, b: int | None, kind: str = "ok") -> H:
        return self._add("read", p, value, a, b, kind)


def brute(ops: Sequence[Op], initial: str | None = None) -> bool:
    """Linearizable by trying every order consistent with real time, written from the
    definition alone: failed writes never happened; failed and info reads say nothing; an info
    write may happen at any time after its invoke (or never: last is as good as never)."""
    live = [op for op in ops if (op.f == "write" and op.type != "fail")
            or (op.f == "read" and op.type == "ok")]
    end = [op.complete if op.type == "ok" else math.inf for op in live]

    def go(left: frozenset[int], state: str | None) -> bool:
        if not left:
            return True
        for i in left:
            if any(end[j] < live[i].invoke for j in left):
                continue  # something still left had completed before i was invoked
            op = live[i]
            if op.f == "read" and op.value != state:
                continue
            if go(left - {i}, op.value if op.f == "write" else state):
                return True
        return False

    return go(frozenset(range(len(live))), initial)


def kinds(ops: list[Op], **kw: object) -> list[str]:
    return [a.kind for a in check(ops, **kw).anomalies]  # type: ignore[arg-type]


# -- hand-made anomalies ------------------------------------------------------------------------
def test_stale_read_is_named() -> None:
    # a then b, both acknowledged; a read after b's ack returns a; a later read returns b
    h = H().w(0, "a", 0, 10).w(0, "b", 11, 20).r(1, "a", 21, 22).r(1, "b", 23, 24)
    v = check(h.ops)
    assert v.valid is False and [a.kind for a in v.anomalies] == ["stale"]
    assert [op.index for op in v.anomalies[0].ops] == [2, 0, 1]


def test_stale_read_after_another_read_saw_the_newer_value() -> None:
    # b is still in flight, but one read has seen it: a later read may not go back to a
    h = H().w(0, "a", 0, 10).w(0, "b", 11, 100).r(1, "b", 20, 30).r(2, "a", 31, 40)
    v = check(h.ops)
    assert [a.kind for a in v.anomalies] == ["stale"]
    assert [op.index for op in v.anomalies[0].ops] == [3, 0, 2, 1]
    assert not brute([h.ops[i] for i in (0, 1, 2, 3)])


def test_lost_write_is_named() -> None:
    # b acknowledged, then every read returns a: b vanished (the failover bug)
    h = H().w(0, "a", 0, 10).w(0, "b", 11, 20).r(1, "a", 21, 22).r(1, "a", 23, 24)
    v = check(h.ops)
    assert v.valid is False and kinds(h.ops) == ["lost"]  # one write lost, shown twice
    assert [op.index for op in v.anomalies[0].ops] == [1, 0, 2]  # b, then a, then the read
    assert v.anomalies[0].detail.startswith("write 'b' by p0 (op 1) completed, then read 'a'")


def test_lost_write_to_a_never_written_block() -> None:
    h = H().w(0, "a", 0, 10).r(1, None, 11, 12)
    assert kinds(h.ops) == ["lost"]
    assert check(h.ops, initial={"b": "x"}).valid is False  # null is a phantom then
    assert kinds(h.ops, initial={"b": "x"}) == ["phantom"]


def test_phantom_value_is_named() -> None:
    h = H().w(0, "a", 0, 10).r(1, "zz", 11, 12)
    v = check(h.ops)
    assert [a.kind for a in v.anomalies] == ["phantom"]
    assert "no write wrote" in v.anomalies[0].detail


def test_a_failed_write_seen_is_a_phantom() -> None:
    h = H().w(0, "a", 0, 10, kind="fail").r(1, "a", 11, 12)
    v = check(h.ops)
    assert [a.kind for a in v.anomalies] == ["phantom"]
    assert "failed" in v.anomalies[0].detail and len(v.anomalies[0].ops) == 2


def test_read_that_sees_a_write_before_it_was_invoked() -> None:
    h = H().r(1, "a", 0, 5).w(0, "a", 6, 10)
    v = check(h.ops)
    assert [a.kind for a in v.anomalies] == ["future-read"]
    assert [op.index for op in v.anomalies[0].ops] == [0, 1]


def test_reordered_writes_are_nonlinearizable_with_the_ops_that_cannot_be_ordered() -> None:
    # a and b concurrent, both done by 10; reads see a, then b, then a again: no order of the
    # two writes explains that. Lots of unrelated traffic around it.
    h = H()
    for k in range(20):
        h.w(3, f"x{k}", 100 * k - 1000, 100 * k - 950).r(4, f"x{k}", 100 * k - 940, 100 * k - 930)
    h.w(0, "a", 0, 10).w(1, "b", 0, 10).r(2, "a", 11, 12).r(2, "b", 13, 14).r(2, "a", 15, 16)
    for k in range(20):
        h.w(3, f"y{k}", 100 * k + 100, 100 * k + 150).r(4, f"y{k}", 100 * k + 160, 100 * k + 170)
    v = check(h.ops)
    (a,) = v.anomalies
    assert a.kind == "nonlinearizable" and a.minimal
    # the core: both writes and two reads that disagree on their order
    core = sorted(op.index for op in a.ops)
    assert len(core) == 4 and {40, 41} < set(core)
    assert not brute(a.ops)
    for op in a.ops:  # and every op of it is needed
        assert brute(without(a.ops, {op.index}, None))


@pytest.mark.parametrize("ops", [
    H().w(0, "a", 0, 10).r(1, "a", 5, 6).ops,  # a read may see a write in flight
    H().w(0, "a", 0, 10).r(1, None, 5, 6).r(2, "a", 7, 8).ops,  # ... or not yet
    H().w(0, "a", 0, 10).w(1, "b", 5, 15).r(2, "a", 16, 17).ops,  # concurrent writes: a last
    H().w(0, "a", 0, 10).w(1, "b", 10, 15).r(2, "a", 15, 17).ops,  # equal times are concurrent
    H().w(0, "a", 0, 10, kind="fail").r(1, None, 11, 12).ops,  # a failed write never happened
    H().w(0, "a", 0, None, kind="info").r(1, "a", 1000, 1001).ops,  # info: applied late
    H().w(0, "a", 0, 5, kind="info").r(1, None, 1000, 1001).ops,  # ... or never
    H().w(0, "a", 0, 10).r(1, "zz", 11, 12, kind="info").r(2, "q", 13, 14, kind="fail").ops,
    H().w(0, "a", 0, 10).w(1, "b", 20, 30).r(2, "b", 25, 26).r(3, "b", 27, 28).ops,
])
def test_valid_histories_pass(ops: list[Op]) -> None:
    assert brute(ops)
    v = check(ops)
    assert v.valid is True and v.anomalies == []


def test_initial_value_is_a_parameter() -> None:
    h = H().r(0, "seed", 0, 1).w(1, "a", 2, 3).r(0, "a", 4, 5)
    assert check(h.ops).valid is False
    assert check(h.ops, initial={"b": "seed"}).valid is True
    assert check(h.ops, initial=lambda block: "seed").valid is True


def test_blocks_are_independent_and_counted() -> None:
    ok = H("x").w(0, "a", 0, 10).r(1, "a", 11, 12).ops
    bad = H("y").w(2, "c", 0, 10).r(3, None, 11, 12).ops
    v = check(ok + [Op(op.index + 2, op.process, op.f, op.block, op.value, op.type, op.invoke,
                      op.complete) for op in bad])
    assert (v.valid, v.blocks, v.ops) == (False, 2, 4)
    assert {a.block for a in v.anomalies} == {"y"}
    assert v.to_json()["anomalies"][0]["block"] == "y"


def test_many_stale_reads_are_listed_a_few_and_counted() -> None:
    h = H().w(0, "a", 0, 10).w(0, "b", 11, 20)
    for k in range(30):
        h.r(1, "a", 30 + 2 * k, 31 + 2 * k)
    h.r(2, "b", 200, 201)  # b was not lost, only missed by those reads
    v = check(h.ops)
    assert len(v.anomalies) == 5 and v.omitted == 25
    assert v.to_json()["anomalies_omitted"] == 25


# -- against brute force ------------------------------------------------------------------------
@st.composite
def small_histories(draw: st.DrawFn) -> tuple[list[Op], str | None]:
    """Up to 8 ops of up to 4 processes on one register that really runs (each op takes effect
    at a drawn moment inside its interval), then some reads are corrupted (so about half the
    histories are invalid, for all sorts of reasons); times advance by 0 to 2 so ties happen."""
    initial = draw(st.sampled_from([None, None, "init"]))
    n = draw(st.integers(1, 8))
    state = initial
    t = 0
    made: list[dict] = []
    open_: dict[int, dict] = {}
    while len(made) < n or open_:
        t += draw(st.integers(0, 2))
        idle = [p for p in range(4) if p not in open_]
        if len(made) < n and idle and (not open_ or draw(st.booleans())):
            p = draw(st.sampled_from(idle))
            f = draw(st.sampled_from(["read", "write"]))
            op = dict(p=p, f=f, value=f"v{len(made)}" if f == "write" else None, invoke=t,
                      applied=False)
            made.append(op)
            open_[p] = op
            continue
        op = open_[draw(st.sampled_from(sorted(open_)))]
        if not op["applied"] and draw(st.booleans()):
            op["applied"] = True  # takes effect now, stays open
            if op["f"] == "write":
                state = op["value"]
            else:
                op["value"] = state
            continue
        del open_[op["p"]]
        kind = draw(st.sampled_from(["ok", "ok", "ok", "info"] if op["applied"]
                                    else ["ok", "ok", "ok", "fail", "info"]))
        if kind == "ok" and not op["applied"]:  # takes effect as it completes
            if op["f"] == "write":
                state = op["value"]
            else:
                op["value"] = state
        if op["f"] == "read" and kind != "ok":
            op["value"] = None
        op.update(type=kind, complete=None if kind == "info" and draw(st.booleans()) else t)
    written = [o["value"] for o in made if o["f"] == "write"]
    for o in made:  # corrupt some reads, mostly with values that were really written
        if o["f"] == "read" and o["type"] == "ok" and draw(st.integers(0, 2)) == 0:
            o["value"] = draw(st.sampled_from(written) if written and draw(st.integers(0, 5))
                              else st.sampled_from([None, "init", "ghost"]))
    ops = [Op(i, o["p"], o["f"], "b", o["value"], o["type"], o["invoke"], o["complete"])
           for i, o in enumerate(made)]
    return ops, initial


@st.composite
def racing_writes(draw: st.DrawFn) -> tuple[list[Op], str | None]:
    """2 to 4 overlapping writes, and reads during and after them that return written values
    at random: the histories whose faults only the search can find (reordered writes)."""
    ops: list[Op] = []
    for k in range(draw(st.integers(2, 4))):
        a = draw(st.integers(0, 6))
        ops.append(Op(k, k, "write", "b", f"v{k}", "ok", a, a + draw(st.integers(0, 8))))
    t = draw(st.integers(0, 10))
    for k in range(draw(st.integers(2, 4))):
        a = t + draw(st.integers(0, 2))
        t = a + draw(st.integers(0, 3))
        ops.append(Op(len(ops), 10 + k % 2, "read", "b", draw(st.sampled_from(
            [op.value for op in ops if op.f == "write"])), "ok", a, t))
    return ops, None


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.one_of(small_histories(), racing_writes()))
def test_checker_agrees_with_brute_force(case: tuple[list[Op], str | None]) -> None:
    ops, initial = case
    truth = brute(ops, initial)
    res = check_block("b", ops, initial)
    assert res.valid is truth
    assert search(ops, initial) is truth  # the search alone, no named anomalies
    assert check_block("b", ops, initial, named=False).valid is truth
    for a in res.anomalies:  # each anomaly is a proof on its own
        assert not brute(a.ops, initial), a
        assert a.minimal


@settings(PROPERTY, max_examples=250)
@given(st.one_of(small_histories(), racing_writes()))
def test_nonlinearizable_cores_are_minimal(case: tuple[list[Op], str | None]) -> None:
    ops, initial = case
    res = check_block("b", ops, initial, named=False)
    if res.valid is True:
        return
    (a,) = res.anomalies
    assert a.kind == "nonlinearizable" and a.minimal and not brute(a.ops, initial)
    for op in a.ops:
        assert brute(without(a.ops, {op.index}, initial), initial)


def test_the_generators_make_every_case_the_properties_need() -> None:
    # the property tests are worth something only if all these come up
    quick = settings(max_examples=2000, deadline=None, database=None, phases=[Phase.generate])
    find(small_histories(), lambda c: brute(*c) and len(c[0]) >= 6
         and any(op.type == "info" for op in c[0]), settings=quick)
    for kind in ("phantom", "future-read", "stale", "lost"):
        find(small_histories(), lambda c: not brute(*c) and
             check_block("b", *c).anomalies[0].kind == kind, settings=quick)
    find(racing_writes(), lambda c: brute(*c), settings=quick)
    find(racing_writes(), lambda c: not brute(*c) and
         check_block("b", *c).anomalies[0].kind == "nonlinearizable", settings=quick)


# -- budgets ------------------------------------------------------------------------------------
def hard(n: int) -> list[Op]:
    """n concurrent writes, then reads that saw w0 and then w1: no order works, and the search
    can only find that out by trying the subsets of the other writes."""
    h = H()
    for k in range(n):
        h.w(k, f"w{k}", 0, 100)
    return h.r(n, "w0", 200, 210).r(n, "w1", 220, 230).ops


def ticking() -> itertools.count:
    return itertools.count()  # every look at this clock is one second later


def test_out_of_time_is_unknown_never_valid() -> None:
    ops = hard(22)
    res = check_block("b", ops, budget=0.5, clock=ticking().__next__)
    assert res.valid == "unknown" and res.anomalies == []
    v = check(ops, budget=0.5, clock=ticking().__next__)
    assert v.valid == "unknown" and v.unknown_blocks == ["b"] and v.exit_code() == 2


def test_out_of_memo_room_is_unknown() -> None:
    assert check_block("b", hard(22), max_states=5000).valid == "unknown"


def test_a_small_hard_history_is_decided() -> None:
    v = check(hard(8))
    assert v.valid is False and v.anomalies[0].kind == "nonlinearizable"
    assert len(v.anomalies[0].ops) == 4  # w0, w1 and the two reads


def test_unknown_blocks_do_not_hide_invalid_ones() -> None:
    bad = H("z").w(0, "a", 0, 10).r(1, "q", 11, 12).ops
    v = check(hard(22) + [Op(100 + o.index, o.process, o.f, o.block, o.value, o.type, o.invoke,
                            o.complete) for o in bad], budget=0.5, clock=ticking().__next__)
    assert v.valid is False and v.unknown_blocks == ["b"] and v.exit_code() == 1


def test_a_valid_history_with_many_processes_on_one_block_is_decided_in_linear_room() -> None:
    # the prunings keep the search to about two memoised configurations an op (a count, not a
    # time, so this holds on a loaded machine); without them it needs dozens
    ops = simulate(3000, processes=20, hot=1, hot_share=1.0, seed=7)
    assert check(ops, max_states=4 * len(ops)).valid is True


def test_a_corrupted_synthetic_history_is_caught() -> None:
    ops = simulate(3000, processes=10, hot=2, cold=10, seed=3)
    reads = [i for i, op in enumerate(ops) if op.f == "read" and op.type == "ok"
             and op.block == "hot0" and op.value is not None]
    i = reads[len(reads) // 2]
    victim = ops[i]
    # the read returns the value of the first write on its block instead
    first = next(op for op in ops if op.block == "hot0" and op.f == "write" and op.type == "ok")
    ops[i] = Op(victim.index, victim.process, "read", "hot0", first.value, "ok", victim.invoke,
                victim.complete)
    v = check(ops)
    assert v.valid is False and {a.block for a in v.anomalies} == {"hot0"}
