"""The storage targets of `python -m tests.fuzz` (`--target nvram|disk_header`): long runs.

Each target feeds N mutated inputs (seeded, reproducible: a failure is reported with the
seed and input number that replay it) to the same ``check`` the CI tests run with
hypothesis, and reports inputs tried, failures (properties broken, uncaught exceptions),
hangs (an input over --hang-s seconds), inputs per second and the slowest input. Results go
to DIR/fuzz-latest.json (default bench/results/). Exit status 1 if any target failed.

Targets:
  nvram        an NVRAM region read back at takeover (tests/fuzz/nvram.py)
  disk_header  a disk image's header stamped and opened (tests/fuzz/disk_header.py)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tests.fuzz import disk_header, nvram

TARGETS = ("nvram", "disk_header")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench" / "results"
SAMPLES = 64  # NVRAM base regions, built once, mutated per input


def log(msg: str) -> None:
    print(f"[fuzz {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _drive(name: str, n: int, seed: int, hang_s: float,
           one: Callable[[random.Random], tuple[list[str], Any]]) -> dict[str, Any]:
    rng = random.Random(seed)
    failures: list[dict[str, Any]] = []
    slowest = 0.0
    hang_count = 0
    t0 = time.monotonic()
    next_log = t0 + 10
    for i in range(n):
        t = time.monotonic()
        bad, what = one(rng)
        dt = time.monotonic() - t
        slowest = max(slowest, dt)
        if dt > hang_s:
            hang_count += 1
            bad = bad + [f"took {dt:.2f} s"]
        if bad:
            failures.append({"input": i, "seed": seed, "mutations": repr(what)[:2000],
                             "problems": bad})
            if len(failures) <= 5:
                log(f"{name} input {i}: {bad[0][:500]}")
        if time.monotonic() > next_log:
            next_log += 10
            log(f"{name}: {i + 1}/{n} inputs, {len(failures)} failures")
    secs = time.monotonic() - t0
    return {"inputs": n, "failures": len(failures), "hangs": hang_count,
            "seconds": round(secs, 1), "inputs_per_s": round(n / secs, 1) if secs else None,
            "slowest_input_s": round(slowest, 4), "first_failures": failures[:20]}


def run_nvram(n: int, seed: int, hang_s: float) -> dict[str, Any]:
    samples = [nvram.build(seed * 1000 + k) for k in range(SAMPLES)]
    log(f"nvram: {len(samples)} regions built, {sum(len(s.records) for s in samples)} records")

    def one(rng: random.Random) -> tuple[list[str], Any]:
        k = rng.randrange(len(samples))
        muts = nvram.random_mutations(samples[k], rng)
        return nvram.check(samples[k], muts), (k, muts)

    return _drive("nvram", n, seed, hang_s, one)


def run_disk_header(n: int, seed: int, hang_s: float) -> dict[str, Any]:
    targets = [disk_header.Target(seed * 1000 + k) for k in range(4)]
    try:
        def one(rng: random.Random) -> tuple[list[str], Any]:
            t = rng.choice(targets)
            muts = t.random_mutations(rng)
            return t.check(muts), (targets.index(t), muts)

        return _drive("disk_header", n, seed, hang_s, one)
    finally:
        for t in targets:
            t.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.storage_runner",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per target (100000)")
    ap.add_argument("--only", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-s", type=float, default=1.0, help="an input slower than this is a hang")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    from storage import nvlog_check, replay

    replay.warm()
    nvlog_check.warm()
    runners = {"nvram": run_nvram, "disk_header": run_disk_header}
    from bench.common import machine_facts

    # the commit (-dirty if so), the machine and the date, as every results file records them
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "seed": args.seed, "machine": machine_facts(), "targets": {}}
    for part in parts:
        log(f"{part}: {args.inputs} inputs, seed {args.seed}")
        results["targets"][part] = runners[part](args.inputs, args.seed, args.hang_s)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fuzz-latest.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'target':<12} {'inputs':>8} {'failures':>9} {'hangs':>6} {'inputs/s':>9} "
          f"{'slowest s':>10}")
    for name, r in results["targets"].items():
        print(f"{name:<12} {r['inputs']:>8} {r['failures']:>9} {r['hangs']:>6} "
              f"{r['inputs_per_s']:>9} {r['slowest_input_s']:>10}")
    print(f"\nwrote {path}")
    return 1 if any(r["failures"] for r in results["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
