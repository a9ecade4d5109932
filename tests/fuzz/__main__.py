"""Long fuzz runs on demand: `python -m tests.fuzz --target nbd --inputs 100000`.

Feeds the targets of tests/fuzz/targets.py inputs made by tests/fuzz/mutate.py from the
recorded seeds (tests/fuzz/corpus; one in five generated from scratch instead), from a
seeded random generator, so a run is reproducible from its --seed. Reports, per target:
inputs tried, findings (an exception or a failed property), grouped by kind and place, each
group's first reproducer saved under tests/fuzz/crashes/<target>/ (input, and a .json with
the traceback), inputs that took more than --hang-s (1 s) of CPU time (saved the same way;
CPU time, because on a shared machine wall time measures the neighbours; the slowest wall
time is reported too, and an input still running after --kill-s is interrupted), and the
process's peak RSS. `--replay FILE` runs one saved input again.

The CI runs the same targets through hypothesis for a few seconds (tests/fuzz/test_fuzz_*.py);
this is the long run. It lives here, beside the targets, mutators and corpus it drives,
rather than in bench/: it measures no performance figure, it looks for bugs.

`--target nvram` and `--target disk_header` (and `all`) also fuzz what vmemu reads back from
NVRAM and disk headers (tests/fuzz/storage_runner.py: mutations of real regions and images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from domains.block_stream import join_frames, split_frames
from tests.fuzz import mutate, seeds, targets

CRASHES = Path(__file__).resolve().parent / "crashes"


class Hang(Exception):
    pass


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def nbd_input(rnd: random.Random) -> tuple[bytes, dict[str, Any]]:
    pool = seeds.nbd_seeds()
    if rnd.random() < 0.2 or not pool:
        data = mutate.generate_stream(rnd)
    else:
        _, seed = rnd.choice(pool)
        data = mutate.mutate_stream(rnd, seed, rnd.choice(pool)[1])
    return data, {"peer_reads": rnd.random() < 0.8}


def frames_input(rnd: random.Random) -> tuple[bytes, dict[str, Any]]:
    pool = seeds.frame_seeds()
    if rnd.random() < 0.2 or not pool:
        frames = mutate.generate_frames(rnd)
    else:
        _, seed = rnd.choice(pool)
        frames = mutate.mutate_frames(rnd, list(seed), list(rnd.choice(pool)[1]))
    return join_frames(frames), {}


def run_nbd(data: bytes, opts: dict[str, Any]) -> None:
    targets.nbd(data, opts.get("peer_reads", True))


def run_frames(data: bytes, opts: dict[str, Any]) -> None:
    targets.frames(split_frames(data))


TARGETS: dict[str, tuple[Callable[[random.Random], tuple[bytes, dict]], Callable[[bytes, dict], None]]] = {
    "nbd": (nbd_input, run_nbd),
    "codec": (frames_input, run_frames),
}


def where(tb: traceback.StackSummary) -> str:
    """The innermost frame in the project's code: what groups findings."""
    for fr in reversed(tb):
        if "/site-packages/" not in fr.filename and "/lib/python" not in fr.filename:
            return f"{Path(fr.filename).name}:{fr.lineno}"
    return "?"


def save(target: str, kind: str, data: bytes, opts: dict, text: str) -> Path:
    d = CRASHES / target
    d.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(data + json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]
    p = d / f"{kind}-{name}.bin"
    p.write_bytes(data)
    p.with_suffix(".json").write_text(json.dumps(dict(opts, finding=text), indent=1) + "\n")
    return p


def fuzz(target: str, inputs: int, seed: int, hang_s: float, kill_s: float) -> dict[str, Any]:
    make, run = TARGETS[target]
    rnd = random.Random(seed)
    try:  # imports and first-use costs (numba comes with the N-module) out of the timings
        run(*make(random.Random(0)))
    except Exception:  # noqa: BLE001 - the loop below finds it again
        pass
    groups: dict[str, dict[str, Any]] = {}
    hangs: list[dict[str, Any]] = []
    slowest = slowest_cpu = 0.0
    total = 0.0
    t_start = time.monotonic()
    rss0 = rss_kib()

    def alarm(*_: Any) -> None:
        raise Hang(f"still running after {kill_s}s")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for i in range(inputs):
            data, opts = make(rnd)
            signal.setitimer(signal.ITIMER_REAL, kill_s)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                run(data, opts)
                err = None
            except Exception as exc:  # noqa: BLE001 - every exception is a finding
                err = exc
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            total += dt
            slowest = max(slowest, dt)
            slowest_cpu = max(slowest_cpu, cpu)
            if err is not None:
                tb = traceback.extract_tb(err.__traceback__)
                key = getattr(err, "key", None) or f"{type(err).__name__} at {where(tb)}"
                g = groups.setdefault(key, {"count": 0, "first_input": i})
                g["count"] += 1
                if g["count"] == 1:
                    text = "".join(traceback.format_exception(err))
                    g["reproducer"] = str(save(target, "crash", data, opts, text))
                    g["message"] = str(err)[:300]
                    print(f"[{target}] input {i}: {key}: {str(err)[:200]}", flush=True)
            elif cpu > hang_s:
                p = save(target, "slow", data, opts, f"{cpu:.3f}s CPU, {dt:.3f}s wall")
                hangs.append({"input": i, "cpu_s": round(cpu, 3), "wall_s": round(dt, 3),
                              "reproducer": str(p)})
                print(f"[{target}] input {i}: {cpu:.2f}s CPU ({len(data)} bytes)", flush=True)
            if (i + 1) % 10000 == 0:
                print(f"[{target}] {i + 1} inputs, {sum(g['count'] for g in groups.values())} "
                      f"findings, {len(hangs)} over {hang_s}s, RSS {rss_kib() // 1024} MiB, "
                      f"{time.monotonic() - t_start:.0f}s", flush=True)
    finally:
        signal.signal(signal.SIGALRM, old)
    return {
        "target": target, "inputs": inputs, "seed": seed,
        "findings": sum(g["count"] for g in groups.values()), "groups": groups,
        "over_hang_s": len(hangs), "hang_s": hang_s, "hangs": hangs[:20],
        "slowest_s": round(slowest, 3), "slowest_cpu_s": round(slowest_cpu, 3), "mean_ms": round(1000 * total / max(1, inputs), 3),
        "wall_s": round(time.monotonic() - t_start, 1),
        "rss_start_mib": rss0 // 1024, "rss_end_mib": rss_kib() // 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def replay(target: str, path: Path) -> int:
    meta = path.with_suffix(".json")
    opts = json.loads(meta.read_text()) if meta.exists() else {}
    t0 = time.perf_counter()
    try:
        TARGETS[target][1](path.read_bytes(), opts)
    except Exception:  # noqa: BLE001 - show it
        traceback.print_exc()
        return 1
    print(f"passes ({time.perf_counter() - t0:.3f}s)")
    return 0


STORAGE_TARGETS = ("nvram", "disk_header")  # bytes read back from NVRAM and disk: storage_runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=[*TARGETS, *STORAGE_TARGETS, "all"], default="all")
    ap.add_argument("--inputs", type=int, default=100_000, help="per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-s", type=float, default=1.0)
    ap.add_argument("--kill-s", type=float, default=30.0)
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--replay", type=Path, help="run one saved input of --target")
    args = ap.parse_args(argv)
    if args.replay:
        return replay("nbd" if args.target == "all" else args.target, args.replay)
    rc = 0
    storage = [t for t in STORAGE_TARGETS if args.target in (t, "all")]
    if storage:  # their own driver: mutations of real regions and disk images, not of bytes
        from tests.fuzz import storage_runner

        rc = storage_runner.main(["--inputs", str(args.inputs), "--seed", str(args.seed),
                                  "--hang-s", str(args.hang_s), "--only", ",".join(storage)])
        if args.target in STORAGE_TARGETS:
            return rc
    names = list(TARGETS) if args.target == "all" else [args.target]
    reports = [fuzz(t, args.inputs, args.seed, args.hang_s, args.kill_s) for t in names]
    for r in reports:
        print(f"{r['target']}: {r['inputs']} inputs in {r['wall_s']}s ({r['mean_ms']} ms mean, "
              f"slowest {r['slowest_cpu_s']}s CPU, {r['slowest_s']}s wall), {r['findings']} "
              f"findings in {len(r['groups'])} groups, {r['over_hang_s']} over {r['hang_s']}s "
              f"CPU, peak RSS {r['peak_rss_mib']} MiB "
              f"(start {r['rss_start_mib']}, end {r['rss_end_mib']})")
        for key, g in r["groups"].items():
            print(f"  {g['count']:6d} x {key}: {g['message'][:120]}  -> {g['reproducer']}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return 1 if rc or any(r["findings"] or r["over_hang_s"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
