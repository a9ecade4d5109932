"""Availability of a chaos run, judged from hand-made ops, faults and cluster events."""

from __future__ import annotations

from typing import Any

import pytest

from vmemu.chaos import availability as av
from vmemu.chaos.campaign import summarize
from vmemu.chaos.run import failed

DET = 1.0  # detection time: heartbeat_ms x misses


def partner(node: str) -> str:
    return {"node1": "node2", "node2": "node1"}[node]


def oks(ident: str, *times: float, step: float = 0.0, until: float | None = None
        ) -> list[dict[str, Any]]:
    """ok completions on `ident` at `times`, or every `step` from times[0] to `until`."""
    if step:
        n = int(round((until - times[0]) / step))  # type: ignore[operator]
        times = tuple(times[0] + i * step for i in range(n + 1))
    return [{"block": f"{ident}/lun0/0", "type": "ok", "time": int(t * 1e9)} for t in times]


def steady(ident: str, start: float, end: float, holes: list[tuple[float, float]] = ()
           ) -> list[dict[str, Any]]:
    """An op every 50 ms from start to end, none inside the holes (a, b)."""
    return [o for o in oks(ident, start, step=0.05, until=end)
            if not any(a < o["time"] / 1e9 < b for a, b in holes)]


def ev(kind: str, mono: float, node: str, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "mono": mono, "node": node, **kw}


def judge(ops, faults, events=(), t0=0.0, t_end=30.0, slack=1.0) -> dict[str, Any]:
    return av.judge(ops, faults, list(events), t0, t_end, DET, partner, slack)


def kill(index: int, at: float, ended: float, target: str = "node1", kind: str = "kill",
         kills: list | None = None, **kw: Any) -> dict[str, Any]:
    kills = kills if kills is not None else [[target, at]]
    return {"index": index, "kind": kind, "target": target, "started": at - 0.01, "mono": at,
            "killed": [n for n, _ in kills], "kills": kills, "ended": ended, **kw}


def test_a_kill_answered_within_a_second_passes_and_its_outage_is_measured_from_the_kill():
    ops = steady("node1", 0, 30, [(10.0, 10.4), (14.0, 14.3)]) + steady("node2", 0, 30)
    events = [ev("giveback_started", 14.0, "node1", **{"from": "node2"})]
    a = judge(ops, [kill(0, 10.0, 15.0)], events)
    assert a["ok"] and a["violations"] == []
    node1 = [(o["what"], o["at_s"], o["gap_s"]) for o in a["outages"] if o["identity"] == "node1"]
    # from the kill to the first op after it, then from the giveback to the first op after
    assert node1 == [("kill", 10.0, pytest.approx(0.4, abs=0.001)),
                     ("giveback", 14.0, pytest.approx(0.3, abs=0.001))]
    assert {o["budget_s"] for o in a["outages"]} == {1.0}
    # the partner's own identity is watched through the fault too
    assert [o["what"] for o in a["outages"] if o["identity"] == "node2"] == ["kill", "giveback"]


def test_a_kill_answered_too_late_fails_the_run_naming_the_fault():
    ops = steady("node1", 0, 30, [(20.0, 21.7)]) + steady("node2", 0, 30)
    faults = [{"index": 0, "kind": "pause_short", "target": "node2", "mono": 5.0,
               "ended": 5.4, "held_s": 0.4},
              kill(1, 20.0, 25.0, kind="kill_in_cp")]
    a = judge(ops, faults)
    assert not a["ok"]
    [v] = a["violations"]
    assert v["identity"] == "node1" and v["what"] == "kill" and v["budget_s"] == 1.0
    assert v["fault"] == {"index": 1, "kind": "kill_in_cp", "target": "node1"}
    assert v["gap_s"] == pytest.approx(1.7, abs=0.001)
    line = av.describe(v)
    assert line == ("node1: no op answered for 1.70s from t+20.0s (fault 1, kill_in_cp node1: "
                    "after a kill), budget 1s")
    # the same run on a host allowed twice the time passes
    assert judge(ops, faults, slack=2.0)["ok"]


def test_the_giveback_gap_counts_against_the_giveback_budget_not_the_kill():
    ops = steady("node1", 0, 30, [(10.0, 10.3), (16.0, 17.5)]) + steady("node2", 0, 30)
    events = [ev("giveback_started", 16.0, "node1", **{"from": "node2"})]
    [v] = judge(ops, [kill(0, 10.0, 18.0)], events)["violations"]
    assert (v["what"], v["at_s"]) == ("giveback", 16.0)


def test_a_hang_may_last_the_detection_time_plus_a_second():
    fault = {"index": 0, "kind": "pause_long", "target": "node2", "mono": 8.0, "ended": 12.0,
             "killed": ["node2"], "fenced_while_stopped": True}
    within = steady("node2", 0, 30, [(8.0, 9.8)]) + steady("node1", 0, 30)
    assert judge(within, [fault])["ok"]
    past = steady("node2", 0, 30, [(8.0, 10.3)]) + steady("node1", 0, 30)
    [v] = judge(past, [fault])["violations"]
    assert (v["what"], v["budget_s"]) == ("hang", DET + 1.0)


def test_a_double_failure_is_out_until_a_node_returns_and_then_has_a_second():
    # node1 killed at 10, node2 at 10.1: nobody can serve until node1 registers at 16.0
    # (node2, booting slower, at 19.0: Domain 0 keeps its identity for it)
    fault = kill(0, 10.0, 20.0, kind="kill_pair", kills=[["node1", 10.0], ["node2", 10.1]])
    # node2's takeover of node1, asked for before its own death reached Domain 0, is logged
    # just after it: no return
    events = [ev("partner_alerted", 10.105, "node2", identity="node1"),
              ev("registered", 16.0, "node1"), ev("assign", 16.01, "node1", identity="node1"),
              ev("registered", 19.0, "node2"), ev("assign", 19.01, "node2", identity="node2")]
    ops = steady("node1", 0, 30, [(10.0, 16.5)]) + steady("node2", 0, 30, [(10.1, 19.4)])
    a = judge(ops, [fault], events)
    assert a["ok"], a["violations"]
    by = {(o["identity"], o["what"]): o for o in a["outages"]}
    assert by["node1", "down"]["gap_s"] == pytest.approx(5.9, abs=0.001)  # not judged
    assert "budget_s" not in by["node1", "down"]
    assert by["node1", "double"]["at_s"] == 16.0
    assert by["node1", "double"]["gap_s"] == pytest.approx(0.5, abs=0.001)
    assert by["node2", "double"]["at_s"] == 19.0
    # slow after its node returned: a violation of the double failure's budget
    slow = steady("node1", 0, 30, [(10.0, 17.5)]) + steady("node2", 0, 30, [(10.1, 19.4)])
    [v] = judge(slow, [fault], events)["violations"]
    assert (v["identity"], v["what"], v["at_s"]) == ("node1", "double", 16.0)
    assert v["fault"]["kind"] == "kill_pair"


def test_a_second_kill_after_the_first_victim_came_back_is_a_kill_not_a_double_failure():
    # kill_in_giveback, the releaser killed: node1 is up again, so node2's kill is one failure
    fault = kill(0, 5.0, 14.0, kind="kill_in_giveback",
                 kills=[["node1", 5.0], ["node2", 9.02]], victim="releaser")
    events = [ev("registered", 8.0, "node1"),
              ev("giveback_started", 9.0, "node1", **{"from": "node2"})]
    ops = steady("node1", 0, 30, [(5.0, 5.3), (9.0, 9.8)]) + \
        steady("node2", 0, 30, [(9.02, 9.6)])
    a = judge(ops, [fault], events)
    assert a["ok"], a["violations"]
    assert [(o["what"], o["at_s"]) for o in a["outages"] if o["identity"] == "node2"] == \
        [("kill", 5.0), ("giveback", 9.0), ("kill", 9.02)]
    assert not any(o["what"] in ("down", "double") for o in a["outages"])


def test_kills_are_read_from_the_crash_requests_when_the_record_has_none():
    fault = kill(0, 10.0, 20.0, kind="kill_in_replay")
    del fault["kills"]
    fault["killed"] = ["node1", "node2"]
    events = [ev("crash_requested", 10.002, "node1"), ev("crash_requested", 10.05, "node2"),
              ev("registered", 14.0, "node2"), ev("assign", 14.01, "node2", identity="node2"),
              ev("registered", 15.0, "node1"), ev("assign", 15.01, "node1", identity="node1")]
    ops = steady("node1", 0, 30, [(10.0, 15.2)]) + steady("node2", 0, 30, [(10.05, 14.2)])
    a = judge(ops, [fault], events)
    assert a["ok"], a["violations"]
    assert {(o["identity"], o["at_s"]) for o in a["outages"] if o["what"] == "double"} == \
        {("node1", 15.0), ("node2", 14.0)}


def test_a_long_gap_no_fault_explains_fails_as_unexplained_and_a_short_one_does_not():
    ops = steady("node1", 0, 30, [(3.0, 7.0)]) + steady("node2", 0, 30, [(20.0, 22.0)])
    a = judge(ops, [])
    [v] = a["violations"]
    assert (v["identity"], v["what"], v["fault"]) == ("node1", "unexplained", None)
    assert v["gap_s"] == pytest.approx(4.0, abs=0.001) and v["budget_s"] == av.UNEXPLAINED_S
    assert "unexplained" in av.describe(v)
    assert a["identities"]["node2"]["unexplained_s"] == pytest.approx(2.0, abs=0.001)
    # a stall that began before a fault is the fault's only from the fault's moment on
    ops = steady("node1", 0, 30, [(3.0, 10.2)]) + steady("node2", 0, 30)
    [v] = judge(ops, [kill(0, 10.0, 12.0)])["violations"]
    assert v["what"] == "unexplained" and v["gap_s"] == pytest.approx(7.0, abs=0.001)


def test_per_identity_figures_say_what_the_faults_explain():
    ops = oks("node1", 10, 11, 15, 16) + oks("node2", 10, 11, 12, 13)
    ops += [{"block": "node2/lun0/0", "type": "info", "time": 14 * 10**9}]
    fault = {"index": 0, "kind": "kill", "target": "node1", "started": 11.0, "mono": 11.0,
             "killed": ["node1"], "ended": 12.0}
    a = judge(ops, [fault], t0=10.0, t_end=16.0)
    assert a["identities"]["node1"] == {"unavailable_s": 4.0, "explained_s": 4.0,
                                        "unexplained_s": 0.0, "longest_s": 4.0}
    # node2's ops stop at 13, after the fault was healed (12.0) and its grace second:
    # three seconds nothing explains
    assert a["identities"]["node2"]["unexplained_s"] == 3.0
    # and a stall that began before the fault is the fault's only from its moment on
    a = judge(ops, [dict(fault, mono=11.5)], t0=10.0, t_end=16.0)
    assert a["identities"]["node1"]["unexplained_s"] == 0.5


def test_skipped_faults_start_no_clock():
    ops = steady("node1", 0, 30) + steady("node2", 0, 30)
    a = judge(ops, [{"index": 0, "kind": "kill", "target": "node1", "skipped": "booting"}])
    assert a["ok"] and a["outages"] == []


def test_a_run_past_a_budget_fails_and_a_campaign_counts_it_apart():
    ok = {"seed": 1, "valid": True, "availability_ok": True}
    slow = {"seed": 2, "valid": True, "availability_ok": False}
    both = {"seed": 3, "valid": False, "availability_ok": False}
    old = {"seed": 4, "valid": True}  # a result from before availability was judged
    assert [failed(r) for r in (ok, slow, both, old)] == [False, True, True, False]
    s = summarize([ok, slow, both, old])
    assert (s["valid"], s["invalid"], s["unavailable"], s["failing_seeds"]) == (2, 1, 2, [2, 3])


def test_every_fault_kind_has_a_budget():
    from vmemu.chaos.schedule import KINDS

    assert set(av.FIRST_CLOCK) == set(KINDS)
    assert set(av.FIRST_CLOCK.values()) <= set(av.BUDGETS)
    assert av.BUDGETS["hang"].seconds(2.0) == 3.0 and av.BUDGETS["kill"].seconds(2.0, 1.5) == 1.5


def test_a_partner_declared_failed_while_it_served_is_named_beside_the_fault():
    """What a starved host does: node2 took node1 over, then missed its heartbeats while
    node1 booted, and was fenced too. The fault's clock catches the stall; the violation
    says which failure the schedule did not ask for."""
    events = [ev("failure_detected", 10.05, "node1", reason="exit"),
              ev("failure_detected", 14.5, "node2", reason="heartbeat")]
    ops = steady("node1", 0, 30, [(10.0, 10.3), (14.0, 22.0)]) + \
        steady("node2", 0, 30, [(14.0, 25.0)])
    a = judge(ops, [kill(0, 10.0, 26.0)], events)
    v = next(v for v in a["violations"] if v["identity"] == "node2")
    assert (v["what"], v["from_s"], v["to_s"]) == ("kill", 14.0, 25.0)
    assert v["unplanned"] == ["node2 declared failed (heartbeat) at t+14.5s"]
    assert av.describe(v).endswith("budget 1s; node2 declared failed (heartbeat) at t+14.5s, "
                                   "not by the schedule")


def _cut(at: float, ended: float, target: str = "node1") -> dict[str, Any]:
    return {"index": 0, "kind": "client_cut", "target": target, "started": at - 0.01,
            "mono": at, "cut": target, "held_s": ended - at, "ended": ended}


def test_clients_cut_mid_request_have_half_a_second_on_their_own_identity_only():
    """The server never stops serving while clients hang up: a small budget, and the
    partner's identity, which no node stop touches, gets no clock at all."""
    ops = steady("node1", 0, 30, [(10.0, 10.3)]) + steady("node2", 0, 30, [(11.0, 11.9)])
    a = judge(ops, [_cut(10.0, 13.0)])
    assert a["ok"], a["violations"]
    assert [(o["identity"], o["what"], o["budget_s"]) for o in a["outages"]] == \
        [("node1", "cut", 0.5)]
    assert a["outages"][0]["gap_s"] == pytest.approx(0.3, abs=0.001)

    slow = steady("node1", 0, 30, [(11.0, 11.8)]) + steady("node2", 0, 30)
    a = judge(slow, [_cut(10.0, 13.0)])
    assert not a["ok"]
    (v,) = a["violations"]
    assert (v["identity"], v["what"], v["budget_s"]) == ("node1", "cut", 0.5)
    assert v["gap_s"] == pytest.approx(0.8, abs=0.06)
    assert "while its clients hung up mid-request" in av.describe(v)
