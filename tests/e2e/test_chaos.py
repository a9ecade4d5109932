"""vmemu chaos end to end: real clusters, real clients, real faults, the checker's verdict.

Short runs (a few seconds of clients, one or two faults each): the campaign's machinery and
the verdict's power to fail are what is tested here; the long campaigns are for users.

Runs that must pass are judged with the availability budgets x50 (SLACK, see there): under
`-n 2`, with the campaign's two clusters beside another test's on two shared cores, a hang
was measured at 2.01 s against its 2 s, and a partner fenced after a takeover cost 11 s. The budgets themselves are unit-tested
(tests/unit/test_chaos_availability.py), and a replay judged with budgets a thousand times
too tight must fail.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


# The runs that must pass here judge linearizability and the machinery; their availability
# is judged with budgets x50, because on CI's two cores shared by other clusters a takeover
# after a kill once took over 5 s (a partner starved of heartbeats: a finding of its own, in
# docs/chaos.md). The budgets themselves are shown failing with --availability-slack 0.001
# below, and judged at x1 in real campaigns.
SLACK = "50"


def chaos(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_a_broken_build_that_acknowledges_unlogged_writes_is_judged_not_linearizable(tmp_path):
    """The checker must be able to fail: a guest that acknowledges writes it never put in
    NVRAM loses them at a takeover, and the run says so, naming the reads that missed them."""
    p = chaos(tmp_path, "--seed", "3", "--duration", "6s", "--faults", "kill",
              "--broken", "unlogged_ack", "--json", "--out", "runs")
    assert p.returncode == 1, p.stderr
    res = json.loads(p.stdout)
    assert res["valid"] is False and res["faults"] == {"kill": 1} and res["broken"]
    run = tmp_path / "runs" / "seed-3"
    verdict = json.loads((run / "verdict.json").read_text())
    kinds = {a["kind"] for a in verdict["anomalies"]}
    assert kinds & {"lost", "stale"}, kinds
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "broken_build" for e in events)  # never silently broken
    assert (run / "cluster").is_dir()  # a failing run keeps everything
    # and the checker alone agrees, on the file
    p2 = subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", "check",
                         str(run / "history.jsonl")], capture_output=True, text=True)
    assert p2.returncode == 1 and "NOT linearizable" in p2.stdout


def test_a_run_through_a_phase_fault_is_linearizable_available_and_replays_the_same_schedule(
        tmp_path):
    """The replay is judged with budgets a thousand times too tight: the same faults, and now
    a run that fails on availability alone, naming the fault whose outage broke its budget."""
    p = chaos(tmp_path, "--seed", "11", "--duration", "8s", "--availability-slack", SLACK,
              "--faults", "kill_in_replay,pause_long", "--json", "--out", "runs")
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["valid"] is True and sum(res["faults"].values()) == 1, res
    assert res["ops"]["ok"] > 100
    assert res["availability_ok"] is True and res["availability_violations"] == []
    judged = [o for o in res["outages"] if "budget_s" in o]
    assert {o["identity"] for o in judged} == {"node1", "node2"}
    assert all(o["fault"]["index"] == 0 and 0 <= o["gap_s"] <= o["budget_s"] for o in judged)
    run = tmp_path / "runs" / "seed-11"
    for name in ("schedule.json", "spec.json", "history.jsonl", "verdict.json",
                 "events.jsonl", "faults.jsonl", "result.json", "timeline.png"):
        assert (run / name).stat().st_size > 0, name
    assert not (run / "cluster").exists()  # a passing run keeps only its record
    applied = [json.loads(x) for x in (run / "faults.jsonl").read_text().splitlines()]
    assert applied[0].get("trigger") in (None, "partner_alerted")
    p = chaos(tmp_path, "--replay", str(run), "--availability-slack", "0.001", "--out", "again")
    assert p.returncode == 1, p.stdout + p.stderr
    assert json.loads((tmp_path / "again" / "schedule.json").read_text()) == \
        json.loads((run / "schedule.json").read_text())
    again = [json.loads(x) for x in (tmp_path / "again" / "faults.jsonl").read_text()
             .splitlines()]
    assert [(a["kind"], a["target"]) for a in again] == \
        [(a["kind"], a["target"]) for a in applied]
    res2 = json.loads((tmp_path / "again" / "result.json").read_text())
    assert res2["valid"] is True and res2["availability_ok"] is False
    v = next(v for v in res2["availability_violations"] if v["fault"])
    assert v["fault"] == {"index": 0, "kind": again[0]["kind"], "target": again[0]["target"]}
    assert v["gap_s"] > v["budget_s"] and v["budget_s"] <= 0.003
    out = " ".join(p.stdout.split())  # rich wraps long lines
    assert "out of service past its budget" in out
    assert f"(fault 0, {again[0]['kind']} {again[0]['target']}: after" in out


@pytest.mark.parametrize("args,says", [
    (["--faults", "nuke"], "unknown fault kind nuke"),
    (["--duration", "soon"], "is not a duration"),
    (["--replay", "."], "not a chaos run directory"),
    (["--runs", "0"], "--runs"),
])
def test_chaos_cli_mistakes_are_one_line_and_exit_3(tmp_path, args, says):
    p = chaos(tmp_path, *args, timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    assert says in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_campaign_of_five_fixed_seeds_runs_them_two_at_a_time_and_sums_them_up(tmp_path):
    """CI's campaign: seeds 1471-1475 are four short SIGSTOPs and one kill -9 (each run's one
    fault lands 2-3 s in; at 4 s of clients, runs whose fault would land later have none),
    so the hang, kill and giveback budgets are all judged. About 50 s on two
    shared cores, most of it guests booting."""
    p = chaos(tmp_path, "--runs", "5", "--jobs", "2", "--seed", "1471", "--duration", "4s",
              "--faults", "pause_short,kill", "--availability-slack", SLACK, "--json",
              "--out", "camp")
    results = {d.name: json.loads((d / "result.json").read_text())
               for d in (tmp_path / "camp").glob("seed-*") if (d / "result.json").exists()}
    why = {k: (r["valid"], r.get("availability_violations"), r.get("nemesis_error"))
           for k, r in results.items()}
    assert p.returncode == 0, (p.stdout + p.stderr, why)
    s = json.loads(p.stdout)
    assert (s["runs"], s["valid"], s["invalid"], s["unknown"], s["unavailable"],
            s["failing_seeds"]) == (5, 5, 0, 0, 0, [])
    assert s["faults"] == {"kill": 1, "pause_short": 4} and s["ops"] > 500
    assert json.loads((tmp_path / "camp" / "summary.json").read_text())["runs"] == 5
    assert set(results) == {f"seed-{n}" for n in range(1471, 1476)}
    judged = {o["what"] for r in results.values() for o in r["outages"] if "budget_s" in o}
    # The giveback after the kill is judged too when it comes within the run; on a loaded host
    # the partner was once fenced after the takeover (11 s for both identities: the finding in
    # docs/chaos.md), and the giveback then falls outside the 4 s of clients.
    assert {"hang", "kill"} <= judged <= {"hang", "kill", "giveback"}


def test_the_chaos_demo_tells_its_faults_and_its_verdict(tmp_path):
    from rich.console import Console

    from vmemu.chaos.lesson import lesson_failed, run_lesson

    buf = io.StringIO()
    res = run_lesson(Console(file=buf, width=200), fast=True, out=tmp_path / "lesson",
                     availability_slack=float(SLACK))
    out = " ".join(buf.getvalue().split())
    assert not lesson_failed(res), out
    assert "kill_in_replay node2" in out and "Verdict: linearizable" in out
    assert "fenced while stopped" in out
