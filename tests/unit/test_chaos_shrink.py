"""Shrinking a failing schedule, with the runs replaced by a rule (which faults make it fail)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vmemu.chaos import campaign, schedule
from vmemu.chaos.run import RunSpec
from vmemu.chaos.schedule import Fault, Schedule


def recorded_run(tmp_path: Path, faults: tuple[Fault, ...]) -> Path:
    d = tmp_path / "seed-1"
    d.mkdir()
    schedule.save(Schedule(1, 60.0, 2, faults), d / "schedule.json")
    (d / "spec.json").write_text(json.dumps(asdict(RunSpec(seed=1))))
    return d


def test_shrink_keeps_only_the_faults_the_failure_needs(tmp_path: Path, monkeypatch):
    faults = tuple(Fault(float(i), k, "node1") for i, k in
                   enumerate(["kill", "pause_short", "kill_in_cp", "pause_long", "kill"]))
    d = recorded_run(tmp_path, faults)
    runs: list[int] = []

    def fake_run(spec: RunSpec, out: Path, sched: Schedule | None = None, **_: Any) -> dict:
        runs.append(len(sched.faults))
        kinds = [f.kind for f in sched.faults]
        bad = "kill_in_cp" in kinds and "pause_long" in kinds  # needs both
        return {"valid": not bad, "out": str(out), "nemesis_error": None}

    monkeypatch.setattr(campaign, "run", fake_run)
    res = campaign.shrink(d, tries=1)
    assert res["reproduced"] and res["faults_after"] == 2
    assert [f["kind"] for f in res["schedule"]["faults"]] == ["kill_in_cp", "pause_long"]
    assert schedule.load(d / "shrunk-schedule.json").faults == (faults[2], faults[3])


def test_a_failure_that_does_not_come_back_is_said_to_not_reproduce(tmp_path: Path, monkeypatch):
    d = recorded_run(tmp_path, (Fault(1.0, "kill", "node2"),))
    monkeypatch.setattr(campaign, "run", lambda spec, out, sched=None, **_: {
        "valid": True, "out": str(out), "nemesis_error": None})
    res = campaign.shrink(d, tries=2)
    assert res == {"reproduced": False, "attempts": 2, "faults": 1}
