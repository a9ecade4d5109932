"""Every verdict of a bench run, computed from the figures measured in that run.

Each target is a comparison of one measured figure (a ratio against a same-run baseline where
the machine's speed matters) with a threshold; `evaluate` gives {key: {label, value, target,
pass}} with pass None when the figure is missing (never a pass by default). The one verdict
that combines several figures is `stall_verdict`. tests/unit/test_bench_verdicts.py feeds
every verdict figures that must fail.
"""

from __future__ import annotations

from typing import Any

# (key, label, how to get the figure, comparison, target, unit)
TARGETS: list[tuple[str, str, tuple[str, ...], str, float, str]] = [
    # A takeover's replay as a takeover runs it (DModule.replay_chain), storage-OS default.
    ("takeover_replay_gbps", "takeover replay, real path (replay_chain, RAID-4) GB/s",
     ("takeover_replay_gbps", "gbps"), ">=", 2.0, "GB/s"),
    ("takeover_replay_vs_memcpy", "takeover replay, real path / memcpy of the same bytes",
     ("takeover_replay_gbps", "ratio_memcpy"), ">=", 0.3, "x"),
    ("replay_vs_python", "replay kernel only: numba / python (same slice)",
     ("replay_gbps", "ratio_python"), ">=", 50.0, "x"),
    ("takeover_p99", "takeover p99", ("takeover_ms", "p99"), "<", 200.0, "ms"),
    # A run whose trials failed, or whose log was not half full at the crash, measured
    # something else than the target says.
    ("takeover_failed_trials", "failed takeover trials (recovered, excluded)",
     ("takeover_ms", "failed_trials"), "==", 0, ""),
    ("takeover_fill", "NVLog fill at crash (min)", ("takeover_ms", "fill", "min"), ">=", 0.45,
     ""),
    ("up_warm", "up --nodes 4, warm", ("up_s", "warm"), "<", 3.0, "s"),
    ("ha_shm_vs_none", "ha: shm / none IOPS", ("ha_modes", "ratio_shm_none"), ">=", 3.0, "x"),
    # The job: fio 4k randwrite qd16 over NBD, the same in every mode.
    ("ha_fio_shm_vs_none", "ha fio: shm / none IOPS", ("ha_modes", "fio_ratio_shm_none"), ">=",
     3.0, "x"),
    ("nbd_vs_nbdkit", "NBD: vmemu / nbdkit memory IOPS", ("nbd_randwrite", "ratio"), ">=", 0.25,
     "x"),
    # Storage OS: a CP moves user data at >= half the disks' sequential-write speed (same run).
    ("cp_vs_seq", "CP / sequential write MB/s", ("cp_mbps", "ratio"), ">=", 0.5, "x"),
    # lz4 in the NVLog has to store fewer bytes than it is given on the mixed workload.
    ("nvlog_lz4_ratio", "NVLog lz4: logical / stored bytes", ("nvlog_lz4", "ratio"), ">", 1.0,
     "x"),
]

# Figures reported beside the targets without a pass/fail: (key, label, path, unit).
REPORTED: list[tuple[str, str, tuple[str, ...], str]] = [
    # shm / mirror: what the patent saves over a mirror with group commit and pipelining; no
    # target (a faster mirror lowers it, and that is the point of making mirror fast).
    ("ha_shm_vs_mirror", "ha: shm / mirror IOPS", ("ha_modes", "ratio_shm_mirror"), "x"),
    ("ha_fio_shm_vs_mirror", "ha fio: shm / mirror IOPS", ("ha_modes", "fio_ratio_shm_mirror"),
     "x"),
    ("replay_vs_memcpy", "replay kernel only (replay_region, not a takeover) / memcpy",
     ("replay_gbps", "ratio_memcpy"), "x"),
    ("takeover_replay_flat_vs_memcpy", "takeover replay, real path, flat LUNs / memcpy",
     ("takeover_replay_gbps", "flat_ratio_memcpy"), "x"),
    ("raid_rebuild_vs_seq", "RAID rebuild / sequential write MB/s",
     ("raid_rebuild_mbps", "ratio"), "x"),
    ("nvlog_lz4_vs_raw", "NVLog append lz4 / raw MB/s", ("nvlog_lz4", "mbps_vs_raw"), "x"),
    ("fs_vs_flat", "fs randwrite: storage OS / flat LUN IOPS", ("fs_randwrite_iops", "ratio"),
     "x"),
]

# "No stalls a CP could have avoided" (issue 12): the thresholds of stall_verdict.
GAP_MS_MAX = 20.0  # longest stretch without a write completing, strictly below
P99_VS_FLAT_MAX = 2.0  # storage-OS p99 at most this many times the flat path's, same run


def get(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = results
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if _num(a) and _num(b) and b else None


OPS = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t,
       "<=": lambda v, t: v <= t, "==": lambda v, t: v == t}


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """{key: {label, value, target, pass}}; pass is None when the figure is missing (and then
    "na" says why, where there is something to say) or for a figure that is only reported."""
    out: dict[str, Any] = {}
    for key, label, path, op, target, unit in TARGETS:
        v = get(results, path)
        ok = None if not _num(v) else bool(OPS[op](v, target))
        out[key] = {"label": label, "value": v, "target": f"{op} {target:g} {unit}".strip(),
                    "pass": ok}
    for key, label, path, unit in REPORTED:
        v = get(results, path)
        if v is None and key == "nvlog_lz4_vs_raw":  # results written before the field existed
            lz = results.get("nvlog_lz4") or {}
            v = _ratio(lz.get("mbps"), lz.get("raw_mbps"))
        out[key] = {"label": label, "value": v, "target": "reported", "unit": unit, "pass": None}
    if isinstance(results.get("fs_randwrite_iops"), dict):
        out["cp_no_stall"] = stall_verdict(results["fs_randwrite_iops"],
                                           get(results, ("cp_mbps", "cp_mbps")))
    return out


def stall_verdict(fr: dict[str, Any], cp_mbps: float | None = None) -> dict[str, Any]:
    """No stall a CP could have avoided, on the storage OS (the fs cluster of fs_randwrite):

    - ``stalls``: 0 writes waited for NVLog space (node1's ``cp_stalls`` over the run), while
      the disks can absorb the ingest rate: ingest (IOPS x 4 KiB) <= what a CP moves per second,
      the CP part's figure of this run (`cp_mbps`), else the run's own CPs (``cp_mbps_in_run``).
      Only when ingest exceeds it are stalls unavoidable by a CP, and then they are excused and
      the excuse is named. A full NVLog (a ``log_full`` CP) is no excuse: it is the stall.
    - ``gap_ms``: the longest stretch without a write completing < GAP_MS_MAX.
    - ``p99_vs_flat``: p99 latency <= P99_VS_FLAT_MAX x the flat path's, same run.

    pass: False if any measured check fails; True only if every check was measured and holds;
    None (with ``na``) otherwise.
    """
    stalls = fr.get("cp_stalls")
    ingest = fr.get("ingest_mbps")
    if not _num(ingest) and _num(fr.get("fs_iops")):
        ingest = round(fr["fs_iops"] * 4096 / 1e6, 1)  # results written before the field
    absorb, absorb_from = (cp_mbps, "cp part, same run") if _num(cp_mbps) else \
        (fr.get("cp_mbps_in_run"), "this job's CPs")
    checks: dict[str, dict[str, Any]] = {}

    s: dict[str, Any] = {"value": stalls, "target": "== 0 while the disks absorb the ingest",
                         "pass": None}
    if _num(stalls):
        if stalls == 0:
            s["pass"] = True
        elif _num(ingest) and _num(absorb):
            if ingest > absorb:
                s["excused"] = (f"ingest {ingest:g} MB/s > {absorb:g} MB/s through a CP "
                                f"({absorb_from}): the disks could not absorb it")
            else:
                s["pass"] = False
        else:
            s["na"] = "no ingest or CP rate to tell whether a CP could have avoided them"
    else:
        s["na"] = "no cp_stalls figure"
    checks["stalls"] = s

    gap = fr.get("gap_ms")
    checks["gap_ms"] = {"value": gap, "target": f"< {GAP_MS_MAX:g} ms",
                        "pass": bool(gap < GAP_MS_MAX) if _num(gap) else None}
    r = _ratio(fr.get("fs_p99_us"), fr.get("flat_p99_us"))
    checks["p99_vs_flat"] = {"value": r, "target": f"<= {P99_VS_FLAT_MAX:g} x",
                             "pass": bool(r <= P99_VS_FLAT_MAX) if r is not None else None}

    verdicts = [c["pass"] for name, c in checks.items()
                if not (name == "stalls" and c.get("excused"))]
    failed = [name for name, c in checks.items() if c["pass"] is False]
    ok: bool | None = False if failed else (True if all(v is True for v in verdicts) else None)
    res: dict[str, Any] = {
        "label": "no stall a CP could have avoided (stalls, gap, p99 vs flat)",
        "target": f"0 stalls, gap < {GAP_MS_MAX:g} ms, p99 <= {P99_VS_FLAT_MAX:g}x flat",
        "value": stalls, "pass": ok, "failed": failed, "checks": checks,
        "ingest_mbps": ingest, "absorb_mbps": absorb, "absorb_from": absorb_from if
        _num(absorb) else None, "stall_ms": fr.get("cp_stall_ms"),
    }
    if ok is None:
        res["na"] = "; ".join(f"{n}: {c.get('na', 'not measured')}" for n, c in checks.items()
                              if c["pass"] is None and not c.get("excused"))
    return res
