"""What `vmemu chaos` prints and returns: one run, a campaign, a replay or a shrink."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmemu.chaos import campaign as camp, fencing
from vmemu.chaos.availability import describe
from vmemu.chaos.run import RunSpec, failed, run
from vmemu.chaos.schedule import KINDS, ScheduleError
from vmemu.chaos.workload import Mix

BAD_INPUT = 3
NO_FARM = 2  # --scheduler given, but dask is not installed or the scheduler not reachable
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 20s, 2m)")
    seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if not 1 <= seconds <= 7 * 86400:
        raise click.BadParameter("--duration must be between 1s and 7 days")
    return seconds


def _fail(msg: str) -> int:
    click.echo(f"vmemu: {msg}", err=True)
    return BAD_INPUT


def main(*, seed: int | None, duration: str, runs: int, jobs: int, out: str | None, nodes: int,
         kinds: str, replay: str | None, shrink: str | None, budget: float, as_json: bool,
         broken: str, slack: float | None = None, scheduler: str | None = None) -> int:
    console = Console(stderr=as_json)
    try:
        dur = parse_duration(duration)
    except click.BadParameter as exc:
        return _fail(exc.format_message())
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in kind_list if k not in KINDS]
    if unknown or not kind_list:
        return _fail(f"unknown fault kind {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(KINDS)}")
    farm: Any = None
    if scheduler is not None:
        if replay or shrink:
            return _fail("--scheduler farms out a campaign's runs, not --replay or --shrink")
        from vmemu.chaos import farm  # dask only when asked for

        try:
            farm.check_address(scheduler)
            farm.require()
        except ValueError as exc:
            return _fail(str(exc))
        except farm.FarmUnavailable as exc:
            click.echo(f"vmemu: {exc}", err=True)
            return NO_FARM
    try:
        if shrink:
            res = camp.shrink(Path(shrink), progress=lambda m: console.print(f"  {m}"),
                              slack=slack)
            _print(res, as_json, lambda: _shrink_lines(console, res))
            return 0 if res.get("reproduced") else 1
        if replay:
            dest = Path(out) if out else Path(replay) / "replay"
            res = camp.replay(Path(replay), dest, slack=slack)
            _print(res, as_json, lambda: _run_lines(console, res))
            return 1 if failed(res) else 0
    except ScheduleError as exc:
        return _fail(str(exc))
    if seed is None:
        seed = secrets.randbelow(1 << 31)
        console.print(f"seed {seed} (drawn; --seed {seed} runs it again)")
    spec = RunSpec(seed=seed, duration=dur, nodes=nodes, kinds=kind_list, budget_s=budget,
                   broken=broken, mix=Mix(), availability_slack=slack or 1.0)
    base = Path(out) if out else Path("chaos-runs")
    if runs == 1 and farm is None:
        res = run(spec, base / f"seed-{seed}", progress=lambda r: console.print(_fault_line(r)))
        _print(res, as_json, lambda: _run_lines(console, res))
        return 1 if failed(res) else 0
    with Progress(TextColumn("chaos"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[bad]} failing"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("runs", total=runs, bad=0)
        bad = 0

        def tick(r: dict[str, Any]) -> None:
            nonlocal bad
            bad += failed(r)
            bar.update(task, advance=1, bad=bad)

        if farm is None:
            summary = camp.campaign(spec, runs, base, jobs, tick)
        else:
            try:
                summary = farm.farm_campaign(spec, runs, base, str(scheduler), tick)
            except farm.FarmUnavailable as exc:  # the scheduler went away, or never was
                bar.stop()
                click.echo(f"vmemu: {exc}", err=True)
                return NO_FARM
    _print(summary, as_json, lambda: _summary_lines(console, summary, base))
    return 1 if summary["failing_seeds"] else 0


def _print(obj: dict[str, Any], as_json: bool, human: Any) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=1, default=str))
    else:
        human()


def _fault_line(rec: dict[str, Any]) -> str:
    what = rec.get("skipped") or rec.get("error") or _bus_text(rec) or (
        f"killed {', '.join(rec['killed'])}" if rec.get("killed") else
        f"clients cut {sum((rec.get('cuts') or {}).values())} ops in {rec.get('held_s')}s"
        if rec.get("cut") else
        f"paused {rec.get('paused')} {rec.get('held_s', '')}" if rec.get("paused") else
        _disk_line(rec))
    heal = f", healed in {rec['healed_s']:.1f}s" if "healed_s" in rec else ""
    return f"  t+{rec['at']:5.1f}s {rec['kind']:<17} {rec['target']}: {what}{heal}"


def _disk_line(rec: dict[str, Any]) -> str:
    """A disk fault (vmemu/chaos/nemesis_disk.py): which disk, for how long or which bits."""
    out = f"d{rec.get('disk')}"
    if "flips" in rec:
        out += f", {len(rec['flips'])} bits flipped"
    elif "held_s" in rec:
        out += f" for {rec['held_s']}s"
    replaced = (rec.get("disks") or {}).get("replaced")
    return out + (f", replaced {', '.join(replaced)}" if replaced else "")


def _bus_text(rec: dict[str, Any]) -> str:
    if rec.get("unheard"):
        return (f"heartbeats lost ({rec['side']} side), fenced after "
                f"{rec.get('fenced_ms', 0):.0f} ms")
    if rec.get("bus"):
        c = {k: n for k, n in (rec.get("counts") or {}).items() if n and k != "matched"}
        return (f"bus rule ({rec['side']} side): {(rec.get('counts') or {}).get('matched', 0)}"
                f" messages, {c or 'none touched'}; {rec.get('answered', 0)}/"
                f"{rec.get('pokes', 0)} CPs answered")
    return ""


def _run_lines(console: Console, r: dict[str, Any]) -> None:
    ops = r.get("ops") or {}
    verdict = {True: "[green]linearizable[/]", False: "[red]NOT linearizable[/]",
               "unknown": "[yellow]unknown[/]"}[r["valid"]]
    if r.get("availability_ok") is not None:
        verdict += (", within its availability budgets" if r["availability_ok"] else
                    ", [red]out of service past its budget[/]")
    console.print(f"seed {r['seed']}: {verdict}; {sum(ops.values())} ops "
                  f"({ops.get('ok', 0)} ok, {ops.get('fail', 0)} failed, "
                  f"{ops.get('info', 0)} indeterminate); faults {r.get('faults') or 'none'}")
    for ident, a in (r.get("availability") or {}).items():
        console.print(f"  {ident}: unavailable {a['unavailable_s']:.1f}s "
                      f"({a['explained_s']:.1f}s explained by the faults, "
                      f"{a['unexplained_s']:.1f}s not)")
    for v in r.get("availability_violations") or []:
        console.print(f"  [red]unavailable[/] {describe(v)}")
    for v in r.get("fencing_violations") or []:
        console.print(f"  [red]split brain[/] {fencing.describe(v)}")
    if r.get("nemesis_error"):
        console.print(f"  [red]fault or healing failed[/]: {r['nemesis_error']}")
    if r["valid"] is not True:
        console.print(f"  anomalies: {r.get('anomalies')} (see {r['out']}/verdict.json, "
                      f"or: vmemu chaos check {r['out']}/history.jsonl)")
    console.print(f"  run dir: {r['out']} (schedule.json, history.jsonl, verdict.json, "
                  "timeline.png)")


def _summary_lines(console: Console, s: dict[str, Any], base: Path) -> None:
    t = Table(title=f"vmemu chaos: {s['runs']} runs in {s['seconds']:.0f}s")
    for col in ("passed", "invalid", "unknown", "unavailable", "fault/heal errors", "ops"):
        t.add_column(col, justify="right")
    t.add_row(str(s["valid"]), str(s["invalid"]), str(s["unknown"]), str(s["unavailable"]),
              str(s["nemesis_errors"]), str(s["ops"]))
    console.print(t)
    console.print("faults: " + (", ".join(f"{k} {n}" for k, n in s["faults"].items())
                                or "none"))
    if s["failing_seeds"]:
        seeds = ", ".join(map(str, s["failing_seeds"][:20]))
        console.print(f"[red]failing seeds[/]: {seeds}  (kept in {base}/seed-N; "
                      f"vmemu chaos --replay {base}/seed-N)")


def _shrink_lines(console: Console, r: dict[str, Any]) -> None:
    if not r.get("reproduced"):
        console.print(f"the failure did not reproduce in {r['attempts']} tries: nothing to "
                      "shrink")
        return
    console.print(f"shrunk from {r['faults_before']} faults to {r['faults_after']} in "
                  f"{r['attempts']} runs; schedule: shrunk-schedule.json; failing run: "
                  f"{r['failing_run']}")
