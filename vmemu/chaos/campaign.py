"""Many chaos runs (a campaign), one run again (replay), and a failing run made small (shrink).

A campaign runs seeds `seed, seed+1, ...`, `jobs` at a time, each in a process of its own
(each run owns a cluster: its own data dir, sockets, NBD addresses), and keeps the whole
run directory of every failing seed; a passing run keeps its small files only.

Shrinking removes faults from a failing schedule, one at a time from the last, keeping a
removal when the run still fails. A run is not deterministic to the microsecond (real
processes on real cores), so each candidate is tried `tries` times and counts as failing if
any try fails: the result is a schedule that failed with fewer faults, not a proof that
every fault left is needed.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

from vmemu.chaos import schedule as sched_mod
from vmemu.chaos.run import RunSpec, failed, run
from vmemu.chaos.workload import Mix
from vmemu.privfs import ensure_private_dir


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    return asdict(spec)


def spec_from_dict(d: dict[str, Any]) -> RunSpec:
    known = {f.name for f in fields(RunSpec)}
    args = {k: v for k, v in d.items() if k in known}
    if isinstance(args.get("mix"), dict):
        mix_known = {f.name for f in fields(Mix)}
        args["mix"] = Mix(**{k: v for k, v in args["mix"].items() if k in mix_known})
    if "kinds" in args:
        args["kinds"] = tuple(args["kinds"])
    return RunSpec(**args)


def _one(spec_d: dict[str, Any], out: str, sched_path: str | None) -> dict[str, Any]:
    spec = spec_from_dict(spec_d)
    sched = sched_mod.load(Path(sched_path)) if sched_path else None
    try:
        return run(spec, Path(out), sched)
    except Exception as exc:  # noqa: BLE001 - a run that could not even finish is a finding
        return {"seed": spec.seed, "valid": "unknown", "out": out, "ops": {}, "faults": {},
                "nemesis_error": f"the run failed: {type(exc).__name__}: {exc}",
                "run_error": f"{type(exc).__name__}: {exc}"}


def campaign(base: RunSpec, runs: int, out: Path, jobs: int = 1,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    out = ensure_private_dir(out, "campaign dir")
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")  # no forked ZeroMQ contexts or threads
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        futs = []
        for i in range(runs):
            spec = spec_from_dict(dict(spec_to_dict(base), seed=base.seed + i))
            futs.append(pool.submit(_one, spec_to_dict(spec), str(out / f"seed-{spec.seed}"),
                                    None))
        for fut in as_completed(futs):
            r = fut.result()
            results.append(r)
            if progress:
                progress(r)
    summary = summarize(results)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    faults: dict[str, int] = {}
    ops = 0
    for r in results:
        for k, n in (r.get("faults") or {}).items():
            faults[k] = faults.get(k, 0) + n
        ops += sum((r.get("ops") or {}).values())
    return {"runs": len(results),
            "valid": sum(1 for r in results if not failed(r)),
            "invalid": sum(1 for r in results if r["valid"] is False),
            "unknown": sum(1 for r in results if r["valid"] == "unknown"),
            # linearizable or not, out of service past a budget (a run may be both)
            "unavailable": sum(1 for r in results if r.get("availability_ok") is False),
            "nemesis_errors": sum(1 for r in results if r.get("nemesis_error")),
            # an identity moved before its live old owner was fenced (fencing.py)
            "split_brain": sum(1 for r in results if r.get("fencing_violations")),
            "faults": dict(sorted(faults.items())), "ops": ops,
            "failing_seeds": sorted(r["seed"] for r in results if failed(r)),
            # runs that could not be run at all (also counted in unknown and nemesis_errors)
            "run_errors": sum(1 for r in results if r.get("run_error"))}


def load_run(run_dir: Path, slack: float | None = None
             ) -> tuple[RunSpec, sched_mod.Schedule]:
    """A recorded run's spec and schedule; `slack` (if given) judges its availability anew:
    how long a takeover may take is the host's business, not the schedule's."""
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        raise sched_mod.ScheduleError(f"{run_dir} is not a chaos run directory (no spec.json)")
    try:
        spec = spec_from_dict(json.loads(spec_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise sched_mod.ScheduleError(f"{spec_path}: {exc}") from None
    if slack is not None:
        spec = replace(spec, availability_slack=slack)
    return spec, sched_mod.load(run_dir / "schedule.json")


def replay(run_dir: Path, out: Path, slack: float | None = None) -> dict[str, Any]:
    """The same spec and the same schedule again (same seed: same faults, same workload)."""
    spec, sched = load_run(run_dir, slack)
    return run(spec, out, sched)


def shrink(run_dir: Path, tries: int = 2, progress: Callable[[str], None] | None = None,
           slack: float | None = None) -> dict[str, Any]:
    spec, sched = load_run(run_dir, slack)
    work = ensure_private_dir(run_dir / "shrink", "shrink dir")
    attempt = 0

    def still_fails(candidate: sched_mod.Schedule) -> dict[str, Any] | None:
        nonlocal attempt
        for _ in range(tries):
            attempt += 1
            r = run(spec, work / f"try-{attempt}", candidate)
            if failed(r):
                return r
        return None

    first = still_fails(sched)
    if first is None:
        return {"reproduced": False, "attempts": attempt, "faults": len(sched.faults)}
    best, best_run = sched, first
    for i in reversed(range(len(sched.faults))):
        drop = {j for j, f in enumerate(sched.faults) if f not in best.faults} | {i}
        if len(drop) == len(sched.faults) - len(best.faults):
            continue  # already gone
        candidate = sched.without(drop)
        r = still_fails(candidate)
        if progress:
            progress(f"without fault {i} ({sched.faults[i].kind} {sched.faults[i].target}): "
                     f"{'still fails' if r else 'passes: kept'}")
        if r is not None:
            best, best_run = candidate, r
    sched_mod.save(best, run_dir / "shrunk-schedule.json")
    return {"reproduced": True, "attempts": attempt, "faults_before": len(sched.faults),
            "faults_after": len(best.faults), "schedule": best.to_dict(),
            "failing_run": best_run["out"]}
