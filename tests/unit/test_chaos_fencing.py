"""The split-brain verdict (vmemu/chaos/fencing.py) and the bus faults' place in a run's
schedule and availability, from hand-made ops, faults and events."""

from __future__ import annotations

from typing import Any

import pytest

from vmemu.chaos import availability as av
from vmemu.chaos import fencing, schedule
from vmemu.chaos.campaign import summarize
from vmemu.chaos.run import failed


def ev(kind: str, mono: float, node: str, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "mono": mono, "node": node, **kw}


def op(process: int, ident: str, invoke: float, done: float, kind: str = "ok"
       ) -> list[dict[str, Any]]:
    block = f"{ident}/lun0/0"
    return [{"process": process, "type": "invoke", "f": "write", "block": block,
             "time": int(invoke * 1e9)},
            {"process": process, "type": kind, "f": "write", "block": block,
             "time": int(done * 1e9)}]


LOSS = {"index": 0, "kind": "heartbeat_loss", "target": "node1", "mono": 10.0,
        "ended": 20.0, "unheard": "node1", "killed": ["node1"]}
RIGHT = [ev("heartbeat_missed", 11.0, "node1"), ev("failure_detected", 11.0, "node1"),
         ev("fenced", 11.1, "node1", exit_code=-9),
         ev("partner_alerted", 11.11, "node2", identity="node1"),
         ev("identity_assumed", 11.3, "node2", identity="node1")]


def test_a_live_node_fenced_before_its_identity_moved_and_served_by_nobody_between_passes():
    ops = (op(1, "node1", 10.5, 10.6)  # the old owner, alive and unheard: may serve
           + op(1, "node1", 11.05, 11.35)  # sent after the fence, answered by node2
           + op(2, "node2", 11.15, 11.2))  # another identity: not judged
    assert fencing.judge(ops, [LOSS], RIGHT) == []


def test_an_identity_moved_before_its_live_owner_was_fenced_is_a_split_brain():
    events = [RIGHT[0], RIGHT[1], RIGHT[3], RIGHT[2], RIGHT[4]]  # alerted, then fenced
    events[2] = dict(events[2], mono=11.05)
    [v] = fencing.judge([], [LOSS], events)
    assert v["what"] == "moved_before_fence" and v["fault"] == {
        "index": 0, "kind": "heartbeat_loss", "target": "node1"}
    assert "partner_alerted of node1 by node2" in fencing.describe(v)
    # never fenced at all, and taken over anyway
    [v] = fencing.judge([], [LOSS], [e for e in RIGHT if e["kind"] != "fenced"])
    assert v["what"] == "moved_before_fence" and "never fenced" in v["detail"]


def test_an_op_answered_between_the_fence_and_the_takeover_is_a_split_brain():
    ops = op(3, "node1", 11.15, 11.2) + op(4, "node1", 11.12, 11.5, kind="info")
    [v] = fencing.judge(ops, [LOSS], RIGHT)
    assert v["what"] == "served_while_fenced" and len(v["ops"]) == 1
    assert "1 op(s) on node1 invoked after its fence" in v["detail"]
    res = {"valid": True, "availability_ok": True, "fencing_violations": [v], "seed": 1}
    assert failed(res) and summarize([res])["split_brain"] == 1


def test_only_faults_that_leave_their_target_alive_are_judged():
    kill = dict(LOSS, kind="kill")
    woke = dict(LOSS, kind="pause_long", fenced_while_stopped=False)
    moved_early = [RIGHT[3], dict(RIGHT[2], mono=11.5)]
    assert fencing.judge([], [kill, woke], moved_early) == []
    assert fencing.judge([], [dict(woke, fenced_while_stopped=True)], moved_early) != []


@pytest.mark.parametrize("kind", schedule.BUS_KINDS)
def test_bus_faults_draw_their_side_seed_and_strength_from_the_schedules_seed(kind):
    a = schedule.generate(5, 60, 2, (kind,))
    assert a == schedule.generate(5, 60, 2, (kind,)) and a.faults
    for f in a.faults:
        assert f.params["side"] in ("dom0", "guest") and isinstance(f.params["seed"], int)
        assert (kind == "heartbeat_loss") == ("hold_s" not in f.params)
    assert schedule.DEFAULT_KINDS == schedule.generate.__defaults__[0]
    assert not set(schedule.BUS_KINDS) & set(schedule.DEFAULT_KINDS)  # old seeds unchanged


def test_a_bus_fault_is_judged_on_a_short_budget_and_heartbeat_loss_like_a_hang():
    def partner(n: str) -> str:
        return {"node1": "node2", "node2": "node1"}[n]

    ops = [{"block": f"{i}/lun0/0", "type": "ok", "time": int(t * 1e9)}
           for i in ("node1", "node2") for t in [x * 0.05 for x in range(600)]
           if not (i == "node1" and 10.0 < t < 11.3)]
    bus = {"index": 0, "kind": "bus_dup", "target": "node2", "mono": 5.0, "ended": 8.0}
    loss = dict(LOSS, index=1)
    a = av.judge(ops, [bus, loss], RIGHT, 0.0, 30.0, 1.0, partner)
    got = {(o["identity"], o["what"]): o["budget_s"] for o in a["outages"]}
    assert got == {("node1", "bus"): 1.0, ("node2", "bus"): 1.0,
                   ("node1", "unheard"): 2.0, ("node2", "unheard"): 2.0}
    assert a["ok"]
    tight = av.judge(ops, [bus, loss], RIGHT, 0.0, 30.0, 1.0, partner, slack=0.5)
    [v] = tight["violations"]
    assert v["what"] == "unheard" and v["identity"] == "node1"
    assert "heartbeat_loss node1: after its heartbeats were lost" in av.describe(v)
