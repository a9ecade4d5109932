"""Every verdict of the bench can fail: made-up figures past each threshold must FAIL, figures
inside it must PASS, and a missing figure is never a pass."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report, verdicts

# The run issue 12 quotes: fio over NBD on the storage OS, 20.8k IOPS (85 MB/s in) against a
# CP of 321 MB/s, p99 4.5 ms against 1.4 ms on the flat path, NVLog full.
ISSUE_RUN = {"fs_iops": 20839.0, "flat_iops": 37323.3, "cp_stalls": 47, "nvlog_full": True,
             "cp_reasons": {"log_half_full": 17, "log_full": 25}, "gap_ms": 123.0,
             "fs_p99_us": 4489.2, "flat_p99_us": 1417.2, "cp_mbps_in_run": 93.0}
GOOD_RUN = {"fs_iops": 20000.0, "cp_stalls": 0, "gap_ms": 12.0, "fs_p99_us": 1500.0,
            "flat_p99_us": 1000.0, "cp_mbps_in_run": 300.0}


def _at(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
    cur[path[-1]] = value
    return out


def _failing(op: str, t: float) -> float:
    return {">=": t * 0.99 - 0.001, ">": t, "<": t, "<=": t * 1.01 + 0.001, "==": t + 1}[op]


def _passing(op: str, t: float) -> float:
    return {">=": t, ">": t * 1.01 + 0.001, "<": t * 0.99 - 0.001, "<=": t, "==": t}[op]


@pytest.mark.parametrize("key,label,path,op,target,unit", verdicts.TARGETS,
                         ids=[t[0] for t in verdicts.TARGETS])
def test_every_target_fails_past_its_threshold_and_passes_inside(key, label, path, op, target,
                                                                  unit):
    bad = _at(path, _failing(op, target))
    ev = verdicts.evaluate(bad)
    assert ev[key]["pass"] is False, (key, ev[key])
    bad["targets"] = ev
    assert "FAIL" in report.table(bad)  # the rendering says so too
    assert verdicts.evaluate(_at(path, _passing(op, target)))[key]["pass"] is True
    assert verdicts.evaluate({})[key]["pass"] is None  # not measured: never a pass


def test_reported_figures_are_never_judged():
    ev = verdicts.evaluate({"replay_gbps": {"ratio_memcpy": 0.01}})
    assert ev["replay_vs_memcpy"]["pass"] is None and ev["replay_vs_memcpy"]["value"] == 0.01


def test_stall_verdict_fails_47_stalls_and_a_123_ms_gap():
    v = verdicts.stall_verdict(ISSUE_RUN, cp_mbps=321.0)
    assert v["pass"] is False
    assert v["failed"] == ["stalls", "gap_ms", "p99_vs_flat"]
    assert v["value"] == 47 and v["ingest_mbps"] == 85.4 and v["absorb_mbps"] == 321.0
    assert v["absorb_from"] == "cp part, same run"
    # without the CP part, the run's own CPs (93 MB/s) still absorb 85 MB/s: FAIL as well
    assert verdicts.stall_verdict(ISSUE_RUN)["failed"] == ["stalls", "gap_ms", "p99_vs_flat"]


def test_stall_verdict_passes_a_run_without_stalls_gaps_or_slow_tail():
    v = verdicts.stall_verdict(GOOD_RUN, cp_mbps=321.0)
    assert v["pass"] is True and v["failed"] == []


@pytest.mark.parametrize("change,failed", [
    ({"cp_stalls": 1}, "stalls"),
    ({"gap_ms": 20.0}, "gap_ms"),  # strictly under 20 ms
    ({"fs_p99_us": 2001.0}, "p99_vs_flat"),  # 2.001x the flat path's 1000 us
])
def test_stall_verdict_each_check_fails_alone(change, failed):
    v = verdicts.stall_verdict({**GOOD_RUN, **change}, cp_mbps=321.0)
    assert v["pass"] is False and v["failed"] == [failed]


def test_a_full_nvlog_excuses_no_stall():
    v = verdicts.stall_verdict({**GOOD_RUN, "cp_stalls": 25, "nvlog_full": True,
                                "cp_reasons": {"log_full": 25}}, cp_mbps=321.0)
    assert v["pass"] is False and v["failed"] == ["stalls"]


def test_stalls_are_excused_only_when_the_disks_cannot_absorb_the_ingest():
    # 20k IOPS x 4 KiB = 81.9 MB/s in, CPs move 50 MB/s: a CP could not have avoided them
    v = verdicts.stall_verdict({**GOOD_RUN, "cp_stalls": 9}, cp_mbps=50.0)
    assert v["pass"] is True and "could not absorb" in v["checks"]["stalls"]["excused"]
    # ...but the gap and the tail are still judged
    v = verdicts.stall_verdict({**GOOD_RUN, "cp_stalls": 9, "gap_ms": 123.0}, cp_mbps=50.0)
    assert v["pass"] is False and v["failed"] == ["gap_ms"]


def test_stall_verdict_without_figures_is_not_judged():
    v = verdicts.stall_verdict({"cp_stalls": None, "gap_ms": 5.0})
    assert v["pass"] is None and "no cp_stalls figure" in v["na"]
    # stalls but no rate to judge them against: not a pass either
    v = verdicts.stall_verdict({**GOOD_RUN, "cp_stalls": 3, "cp_mbps_in_run": None,
                                "fs_iops": None})
    assert v["pass"] is None
    # a measured failure wins over a missing figure
    assert verdicts.stall_verdict({"cp_stalls": None, "gap_ms": 50.0})["pass"] is False


def test_the_report_prints_the_stall_failure_with_its_checks():
    r = {"fs_randwrite_iops": {**ISSUE_RUN, "tool": "fio", "fs": {"cp_stalls": 47}},
         "cp_mbps": {"cp_mbps": 321.0, "baseline_seq_mbps": 1305.0, "ratio": 0.246, "mib": 64}}
    r["targets"] = verdicts.evaluate(r)
    row = next(l for l in report.table(r).splitlines() if l.startswith("no stall a CP"))
    assert "47 stalls, gap 123 ms" in row and "failed: stalls, gap_ms, p99_vs_flat" in row
    assert row.rstrip().endswith("FAIL")
