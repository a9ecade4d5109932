"""`python -m bench [--quick] [--out DIR]`: measure, write DIR/latest.json and latest.md, print a table.

Figures (all measured in this run, on this machine):
  replay_gbps  KERNEL ONLY: numba replay_region vs the pure-Python reference vs memcpy of the
               same size (not what a takeover runs)
  takeover_replay_gbps  the real path: DModule.replay_chain (scan, verify, plan, into the cache
               or onto the disks) of a half-full 64 MiB NVRAM vs memcpy of the same bytes
  takeover_ms  kill -9 to the first successful client op on the failed node's identity
  up_s         4-node cluster start to all-serving, cold and warm numba cache
  bus_overhead vmemu RPC round trip vs bare pyzmq REQ/REP echo, 4 KiB
  ha_modes     the same randwrite load in HA modes shm, mirror, none (and fio over NBD if exported)
  nbd_randwrite  fio over NBD: vmemu LUN vs nbdkit memory (skipped without fio/nbdkit/export)
  failover_timeline  client throughput through kill -9, takeover, restart, giveback (PNGs)
  cp_mbps      WAFL consistency point on RAID-4 over disk files vs sequential pwrite of the same
               disks (target: >= 0.5x)
  raid_rebuild_mbps  RAID-4 rebuild of one member vs sequential pwrite into it (reported)
  nvlog_lz4    NVLog with lz4 payloads on a mixed workload: ratio (target > 1), append and replay
               MB/s vs the same log raw
  fs_randwrite_iops  4k randwrite qd16 (fio over NBD, else vmemu load) on the storage OS (raid4)
               beside the flat-LUN path (raid none): IOPS ratio (reported), CPs during the run,
               cp_stalls (target: no write waits for a CP unless the NVLog is full; n/a without
               the field)
  baseline     machine facts and a memcpy figure
Targets are reported as pass/fail (bench/verdicts.py); the run does not fail on a missed target.
`--docs` measures nothing: it rewrites the docs' tables from OUT/latest.json (bench/docs_tables.py).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import (bus_overhead, cp_bench, failover_timeline, fs_randwrite_bench, ha_modes_bench,
                   nbd_bench, nvlog_lz4_bench, raid_rebuild_bench, replay_bench, report,
                   takeover_bench, takeover_replay_bench, up_bench)
from bench.common import MiB, log, machine_facts, memcpy_gbps, processes_mentioning, shm_entries

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PARTS = ("replay", "takeover_replay", "takeover", "up", "bus_overhead", "ha_modes", "nbd_randwrite",
         "failover_timeline", "cp", "raid_rebuild", "nvlog_lz4", "fs_randwrite")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (8 MiB log, 3 takeovers)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results dir (bench/results)")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--trials", type=int, default=None, help="takeover trials (10; quick 3)")
    ap.add_argument("--takeover-offsets", choices=("seq", "random"), default="seq",
                    help="where the takeover fill writes: fresh sequential blocks (default) "
                         "or random blocks over each LUN")
    ap.add_argument("--docs", action="store_true",
                    help="measure nothing: rewrite the docs' bench tables from OUT/latest.json")
    args = ap.parse_args(argv)
    if args.docs:
        from bench import docs_tables

        return docs_tables.main([str(args.out / "latest.json")])
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    shm_before = shm_entries()
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "version": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "baseline": {},
    }
    errors: dict[str, str] = {}
    log(f"{'quick' if args.quick else 'full'} run: {', '.join(parts)}")
    base = machine_facts()
    base["memcpy_gbps"] = round(memcpy_gbps(64 * MiB)["gbps"], 3)
    base["memcpy_note"] = "np.copyto of 64 MiB, best of 9, same run"
    results["baseline"] = base

    runners = {
        "replay": ("replay_gbps", lambda: replay_bench.run(args.quick)),
        "takeover_replay": ("takeover_replay_gbps", lambda: takeover_replay_bench.run(args.quick)),
        "takeover": ("takeover_ms", lambda: takeover_bench.run(args.quick, args.trials,
                                                               args.takeover_offsets, args.out)),
        "up": ("up_s", lambda: up_bench.run(args.quick)),
        "bus_overhead": ("bus_overhead", lambda: bus_overhead.run(args.quick)),
        "ha_modes": ("ha_modes", lambda: ha_modes_bench.run(args.quick)),
        "nbd_randwrite": ("nbd_randwrite", lambda: nbd_bench.run(args.quick)),
        "failover_timeline": ("failover_timeline",
                              lambda: failover_timeline.run(args.quick, args.out)),
        "cp": ("cp_mbps", lambda: cp_bench.run(args.quick)),
        "raid_rebuild": ("raid_rebuild_mbps", lambda: raid_rebuild_bench.run(args.quick)),
        "nvlog_lz4": ("nvlog_lz4", lambda: nvlog_lz4_bench.run(args.quick)),
        "fs_randwrite": ("fs_randwrite_iops", lambda: fs_randwrite_bench.run(args.quick)),
    }
    for part in parts:
        key, fn = runners[part]
        try:
            results[key] = fn()
        except Exception as exc:  # keep going: the other figures are still worth having
            errors[part] = f"{type(exc).__name__}: {exc}"
            log(f"{part} failed:\n{traceback.format_exc()}")
    if "replay_gbps" in results:
        results["baseline"]["memcpy_same_size_gbps"] = results["replay_gbps"]["memcpy"]

    results["duration_s"] = round(time.monotonic() - t_start, 1)
    results["targets"] = report.evaluate(results)
    shm_left = sorted(shm_entries() - shm_before)
    procs_left = [p for p in processes_mentioning("vmemu-bench-")]
    results["hygiene"] = {"new_dev_shm_entries": shm_left, "processes_left": procs_left}
    if errors:
        results["errors"] = errors
    j, m = report.write(results, args.out)
    print(report.table(results))
    print(f"\nwrote {j} and {m} ({results['duration_s']} s)")
    if shm_left or procs_left:
        print(f"WARNING: left behind: /dev/shm {shm_left}, processes {procs_left}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
