"""Bus fault rules and taps (vmemu/bus/faults.py) as pure state: messages in, fates out.

No socket and no clock: `now` is handed in, so delays, windows and deadlines are exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from domains.rdb_host import RdbHost
from vmemu.bus import faults
from vmemu.bus.faults import TO_DOM0, TO_GUEST, Rules, Tap
from vmemu.errors import BadRequest
from vmemu.hypervisor.main import GUEST_OPS

ROOT = Path(__file__).resolve().parents[2]


def rule(now: float = 0.0, node: int = 2, rule_id: int = 1, **kw: Any) -> faults.Rule:
    args = {"duration_s": 10.0, **kw}
    return faults.parse(args, node, faults.BUS_OPS, now, rule_id)


def rules(*rs: faults.Rule) -> Rules:
    out = Rules()
    for r in rs:
        out.install(r)
    return out


def fates(rs: Rules, n: int, op: str = "heartbeat", now: float = 0.0,
          direction: str = TO_DOM0) -> list[Any]:
    out = []
    for _ in range(n):
        d = rs.decide(direction, 2, op, now)
        out.append(None if d is None else d.delays)
    return out


# -- parsing: untrusted input ----------------------------------------------------------------
def test_a_rule_is_parsed_with_its_deadline_and_its_defaults():
    r = rule(now=100.0, drop=0.5, ops=["heartbeat"], seed=7)
    assert (r.node, r.direction, r.ops, r.drop, r.dup, r.reorder, r.seed) == \
        (2, "both", frozenset({"heartbeat"}), 0.5, 0.0, 0, 7)
    assert r.until == 110.0
    assert rule(drop=0.5).spec()["duration_s"] == 10.0


@pytest.mark.parametrize("args,says", [
    ({"drop": 0.5}, "duration_s is required"),
    ({"drop": 0.5, "duration_s": 0}, "duration_s must be"),
    ({"drop": 0.5, "duration_s": 601}, "duration_s must be"),
    ({"drop": 0.5, "duration_s": float("inf")}, "duration_s must be"),
    ({"drop": 1.5, "duration_s": 1}, "drop must be"),
    ({"drop": -0.1, "duration_s": 1}, "drop must be"),
    ({"drop": True, "duration_s": 1}, "drop must be"),
    ({"drop": "0.5", "duration_s": 1}, "drop must be"),
    ({"dup": float("nan"), "duration_s": 1}, "dup must be"),
    ({"delay_ms": -1, "duration_s": 1}, "delay_ms must be"),
    ({"delay_ms": 10_001, "duration_s": 1}, "delay_ms must be"),
    ({"jitter_ms": 2**70, "duration_s": 1}, "jitter_ms must be"),
    ({"reorder": 1, "duration_s": 1}, "reorder must be"),
    ({"reorder": 65, "duration_s": 1}, "reorder must be"),
    ({"reorder": 2.0, "duration_s": 1}, "reorder must be"),
    ({"reorder": 4, "reorder_ms": 0, "duration_s": 1}, "reorder_ms must be"),
    ({"drop": 1, "direction": "sideways", "duration_s": 1}, "direction must be"),
    ({"drop": 1, "ops": "heartbeat", "duration_s": 1}, "ops must be a list"),
    ({"drop": 1, "ops": ["heartbeat", "launch_missiles"], "duration_s": 1},
     "unknown op 'launch_missiles' in ops"),
    ({"drop": 1, "skip_ops": [3], "duration_s": 1}, "skip_ops must be a list"),
    ({"drop": 1, "ops": ["event"] * 33, "duration_s": 1}, "at most 32"),
    ({"drop": 1, "seed": -1, "duration_s": 1}, "seed must be"),
    ({"drop": 1, "seed": 2**63, "duration_s": 1}, "seed must be"),
    ({"drop": 1, "dorp": 1, "duration_s": 1}, "unknown field 'dorp'"),
    ({"duration_s": 1}, "the rule does nothing"),
])
def test_a_bad_rule_is_refused_naming_the_field(args, says):
    with pytest.raises(BadRequest, match=re.escape(says)):
        faults.parse(args, 2, faults.BUS_OPS, 0.0, 1)


def test_the_op_names_a_rule_may_name_are_every_op_on_the_bus():
    """BUS_OPS is written out in faults.py; it must follow what really travels."""
    guest_ops = set(re.findall(r'req\.op == "(\w+)"', (ROOT / "domains/guest.py").read_text()))
    assert guest_ops - {"bus_fault", "mirror_request"} <= faults.BUS_OPS
    dom0_calls = set(re.findall(r'g\.call\("(\w+)"', (ROOT / "vmemu/hypervisor/main.py")
                                .read_text()))
    assert dom0_calls <= faults.BUS_OPS and "assign" in dom0_calls
    assert set(GUEST_OPS) <= faults.BUS_OPS and RdbHost.OPS <= faults.BUS_OPS
    assert not faults.EXEMPT & faults.BUS_OPS


# -- decisions: scope, seeds, shares, deadlines --------------------------------------------------
def test_a_rule_touches_only_its_node_direction_and_ops():
    rs = rules(rule(drop=1.0, direction=TO_DOM0, ops=["heartbeat", "event"],
                    skip_ops=["event"]))
    assert rs.decide(TO_DOM0, 2, "heartbeat", 0.0).delays == ()  # dropped
    assert rs.decide(TO_DOM0, 1, "heartbeat", 0.0) is None  # another node
    assert rs.decide(TO_GUEST, 2, "heartbeat", 0.0) is None  # the other way
    assert rs.decide(TO_DOM0, 2, "event", 0.0) is None  # skipped
    assert rs.decide(TO_DOM0, 2, "grants", 0.0) is None  # not named
    assert rs.decide(TO_DOM0, 2, "bus_fault", 0.0) is None  # never faulted
    assert rs.view(0.0)[0]["matched"] == 1 and rs.view(0.0)[0]["dropped"] == 1


def test_the_same_seed_gives_every_message_the_same_fate_whatever_else_travels():
    def heartbeats(seed: int, other_traffic: int) -> list[Any]:
        rs = rules(rule(drop=0.3, dup=0.3, delay_ms=50, jitter_ms=40, seed=seed))
        out = []
        for i in range(200):
            for _ in range(other_traffic if i % 3 == 0 else 0):
                rs.decide(TO_DOM0, 2, "event", 0.0)
                rs.decide(TO_GUEST, 2, "heartbeat", 0.0)  # same op, the other way
            d = rs.decide(TO_DOM0, 2, "heartbeat", 0.0)
            out.append(d.delays)
        return out

    a = heartbeats(42, 0)
    assert a == heartbeats(42, 0) == heartbeats(42, 5)
    assert a != heartbeats(43, 0)
    assert {len(x) for x in a} == {0, 1, 2}  # dropped, passed, duplicated: all three happen
    assert all(0.010 - 1e-9 <= t <= 0.090 + 1e-9 for x in a for t in x)  # 50 +- 40 ms


def test_a_drop_share_is_kept_over_many_messages():
    rs = rules(rule(drop=0.3, seed=1))
    dropped = sum(1 for x in fates(rs, 4000) if x == ())
    assert 0.26 * 4000 < dropped < 0.34 * 4000
    assert rs.view(0.0)[0]["dropped"] == dropped


def test_a_rule_ends_at_its_deadline_on_its_own():
    rs = rules(rule(now=100.0, drop=1.0, duration_s=2.0))
    assert fates(rs, 1, now=101.9) == [()]
    assert fates(rs, 1, now=102.0) == [None]  # past its deadline: untouched even before expire()
    assert rs.expire(101.0) == []
    [gone] = rs.expire(102.0)
    assert gone["rule"] == 1 and gone["dropped"] == 1 and not rs and rs.view() == []


def test_clear_removes_one_nodes_rules_or_all_and_rules_are_bounded():
    rs = rules(rule(node=1, drop=1.0), rule(node=2, rule_id=2, drop=1.0))
    assert [v["node"] for v in rs.clear(1)] == ["node1"]
    assert [v["node"] for v in rs.view()] == ["node2"]
    rs.clear()
    assert not rs
    for i in range(faults.MAX_RULES):
        rs.install(rule(rule_id=i, drop=0.1))
    with pytest.raises(BadRequest, match="rules are in force"):
        rs.install(rule(rule_id=99, drop=0.1))


# -- taps: what is held, and when it leaves ----------------------------------------------------
def test_a_tap_passes_everything_while_no_rule_is_in_force():
    tap = Tap(Rules())
    assert tap.admit(TO_DOM0, 2, "heartbeat", "m", 0.0) == ["m"]
    assert len(tap) == 0 and tap.next_due() is None and tap.due(99.0) == []


def test_a_delayed_message_is_held_until_its_time_then_let_go_in_time_order():
    tap = Tap(rules(rule(delay_ms=100, jitter_ms=80, seed=3)))
    for i in range(20):
        assert tap.admit(TO_GUEST, 2, "assign", i, 0.001 * i) == []
    assert len(tap) == 20
    first = tap.next_due()
    assert 0.020 <= first <= 0.2
    assert tap.due(first - 1e-6) == []
    out = tap.due(first)
    assert out and len(tap) == 20 - len(out)
    out += tap.due(10.0)
    assert sorted(out) == list(range(20)) and out != list(range(20))  # jitter reorders
    assert len(tap) == 0 and tap.next_due() is None


def test_a_duplicated_message_is_delivered_twice():
    tap = Tap(rules(rule(dup=1.0)))
    assert tap.admit(TO_DOM0, 2, "event", "m", 0.0) == ["m", "m"]


def test_a_reorder_window_lets_its_messages_go_shuffled_when_full_or_when_its_time_is_up():
    tap = Tap(rules(rule(reorder=8, reorder_ms=50, seed=5)))
    got: list[int] = []
    for i in range(8):
        got += tap.admit(TO_DOM0, 2, "event", i, 0.0)
    assert sorted(got) == list(range(8)) and got != list(range(8))  # full: out at once
    assert tap.admit(TO_DOM0, 2, "event", 8, 1.0) == []
    assert tap.admit(TO_DOM0, 2, "event", 9, 1.01) == []
    assert tap.next_due() == pytest.approx(1.05)
    assert tap.due(1.049) == []
    assert sorted(tap.due(1.05)) == [8, 9]  # not full, but held long enough


def test_a_full_tap_lets_messages_through_at_once_and_counts_them():
    rs = rules(rule(delay_ms=1000))
    tap = Tap(rs, limit=3)
    assert [tap.admit(TO_DOM0, 2, "event", i, 0.0) for i in range(5)] == [[], [], [], [3], [4]]
    assert len(tap) == 3 and rs.view()[0]["overflow"] == 2
