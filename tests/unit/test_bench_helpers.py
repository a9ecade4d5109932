"""Pure helpers of the bench parts: dips in a completion timeline, fio JSON, NBD URIs, the plot."""

from __future__ import annotations

import json

from bench import failover_timeline as ft
from bench import fio_nbd, report


def test_zero_runs_and_longest_dip():
    counts = [5, 0, 0, 3, 0, 0, 0, 0, 2, 0]
    assert ft.zero_runs(counts) == [(1, 2), (4, 4), (9, 1)]
    # window 0.03..0.05 s overlaps the run of 4 empty buckets that starts at 0.04 s
    d = ft.longest_dip(counts, 0.03, 0.05, ref_s=0.03)
    assert d["ms"] == 40.0 and d["start_s"] == 0.04 and d["end_s"] == 0.08
    assert d["from_ref_ms"] == 10.0
    assert ft.longest_dip([1, 2, 3], 0.0, 1.0, 0.0)["ms"] == 0.0


def test_largest_elsewhere_skips_windows_and_the_tail():
    counts = [1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    # the run at 0.01..0.04 is inside a window, the tail run is the end of the load
    assert ft._largest_elsewhere(counts, [(0.01, 0.02)])["ms"] == 10.0


def test_parse_fio_after_banner():
    doc = {"fio version": "fio-3.33", "jobs": [{"jobname": "j", "error": 0, "write": {
        "iops": 1234.5, "runtime": 3000, "total_ios": 3703,
        "clat_ns": {"percentile": {"50.000000": 232448, "99.000000": 798720}}}}]}
    out = fio_nbd.parse_fio("fio: connected to NBD server\n" + json.dumps(doc))
    assert out["iops"] == 1234.5
    assert out["clat_us"] == {"p50": 232.4, "p99": 798.7}


def test_nbd_uri_from_status():
    if not fio_nbd.nbd_config():
        uri, why = fio_nbd.nbd_uri({"nodes": [{"name": "node1"}]})
        assert uri is None and why
        return
    raw = {"nodes": [{"name": "node1", "nbd": {"uris": ["nbd://127.0.10.1:5/lun1",
                                                         "nbd://127.0.10.1:5/lun0"]}}]}
    assert fio_nbd.nbd_uri(raw) == ("nbd://127.0.10.1:5/lun0", "")
    uri, why = fio_nbd.nbd_uri({"nodes": [{"name": "node1"}]})
    assert uri is None and "nbd" in why


def test_plot_draws_a_png(tmp_path):
    counts = [10] * 400 + [0] * 4 + [10] * 400 + [0] * 3 + [10] * 200
    marks = {"crash": 4.0, "failure_detected": 4.01, "identity_assumed": 4.03,
             "first_request_served": 4.04, "restart": 6.0, "giveback_started": 8.04,
             "giveback_done": 8.07}
    dip = ft.longest_dip(counts, 4.0, 4.14, 4.0)
    gb = ft.longest_dip(counts, 8.04, 8.17, 8.04)
    out = tmp_path / "f.png"
    res = ft.plot(counts, marks, out, dip, gb, {"first_request_served": 30.0},
                  {"write": {"iops": 1000, "clat_us": {"p50": 1, "p99": 2, "max": 3}}},
                  [(2.0, "node1", 50.0, "log_half_full")], "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["zooms"] == ["kill -9 and takeover", "giveback"]
    assert dip["ms"] == 40.0 and gb["ms"] == 30.0


def test_report_rows_for_new_parts():
    results = {"bus_overhead": {"n": 10, "vmemu_rpc_us": {"p50": 100.0, "p99": 200.0},
                                "bare_zmq_us": {"p50": 50.0, "p99": 100.0}, "ratio_p50": 2.0,
                                "ratio_p99": 2.0},
               "ha_modes": {"modes": {"shm": {"iops": 9000.0, "fio": "skipped: x"}},
                            "ratio_shm_mirror": 2.5, "ratio_shm_none": 2.0},
               "nbd_randwrite": {"skipped": "no fio"},
               "failover_timeline": {"dip_ms": {"crash": 30.0, "giveback": 50.0}}}
    results["targets"] = report.evaluate(results)
    # Reported, no target: a faster mirror lowers it, as it should.
    assert results["targets"]["ha_shm_vs_mirror"]["pass"] is None
    assert results["targets"]["ha_shm_vs_mirror"]["value"] == 2.5
    assert results["targets"]["ha_shm_vs_none"]["pass"] is False
    assert results["targets"]["nbd_vs_nbdkit"]["pass"] is None
    text = report.table(results)
    assert "vmemu / bare" in text and "skipped: no fio" in text and "30 / 50" in text


def _storage_results(**fr_over):
    fr = {"fs_iops": 9000.0, "flat_iops": 6000.0, "ratio": 1.5, "tool": "fio",
          "cp_stalls": 0, "nvlog_full": False, "cp_count": 4, "gap_ms": 9.0,
          "fs_p99_us": 1500.0, "flat_p99_us": 1000.0,
          "fs": {"cp_count": 4, "cp_reasons": {"log_half_full": 4}, "cp_stalls": 0},
          "flat": {"cp_count": 3, "cp_stalls": 0, "nvlog_full": False}}
    fr.update(fr_over)
    return {"cp_mbps": {"cp_mbps": 120.0, "baseline_seq_mbps": 200.0, "ratio": 0.6, "mib": 16},
            "raid_rebuild_mbps": {"raid_rebuild_mbps": 300.0, "baseline_seq_mbps": 600.0,
                                  "ratio": 0.5, "mib": 16},
            "nvlog_lz4": {"ratio": 2.3, "mbps": 300.0, "raw_mbps": 600.0},
            "fs_randwrite_iops": fr}


def test_evaluate_storage_targets():
    r = _storage_results()
    ev = report.evaluate(r)
    assert ev["cp_vs_seq"]["pass"] is True and ev["cp_vs_seq"]["target"] == ">= 0.5 x"
    assert ev["nvlog_lz4_ratio"]["pass"] is True and ev["nvlog_lz4_ratio"]["target"] == "> 1 x"
    # reported, never judged
    assert ev["raid_rebuild_vs_seq"] == {"label": ev["raid_rebuild_vs_seq"]["label"], "value": 0.5,
                                         "target": "reported", "unit": "x", "pass": None}
    assert ev["fs_vs_flat"]["value"] == 1.5 and ev["fs_vs_flat"]["pass"] is None
    assert ev["nvlog_lz4_vs_raw"]["value"] == 0.5  # derived when the part did not store it
    assert ev["cp_no_stall"]["pass"] is True and ev["cp_no_stall"]["value"] == 0

    r["cp_mbps"]["ratio"] = 0.49
    r["nvlog_lz4"]["ratio"] = 1.0  # strictly more than 1
    ev = report.evaluate(r)
    assert ev["cp_vs_seq"]["pass"] is False and ev["nvlog_lz4_ratio"]["pass"] is False


def test_evaluate_storage_targets_missing_parts():
    ev = report.evaluate({"cp_mbps": {"cp_mbps": 1.0}})  # no ratio: no verdict, no crash
    assert ev["cp_vs_seq"]["pass"] is None and ev["nvlog_lz4_ratio"]["pass"] is None
    assert ev["fs_vs_flat"]["value"] is None
    assert "cp_no_stall" not in ev  # the fs_randwrite part did not run


def test_cp_no_stall_verdicts():
    # stalls while the disks could absorb the ingest (36.9 MB/s in, a CP does 120): FAIL
    ev = report.evaluate(_storage_results(cp_stalls=3))
    assert ev["cp_no_stall"]["pass"] is False and ev["cp_no_stall"]["value"] == 3
    # a full NVLog (a log_full CP) excuses nothing any more: it is what a stall is
    ev = report.evaluate(_storage_results(cp_stalls=5, nvlog_full=True))
    assert ev["cp_no_stall"]["pass"] is False and ev["cp_no_stall"]["failed"] == ["stalls"]
    # the flat path's stalls are reported, not judged: the target is the storage OS's
    ev = report.evaluate(_storage_results(flat={"cp_stalls": 2, "nvlog_full": False}))
    assert ev["cp_no_stall"]["pass"] is True
    # no stall figure (status without cp_stalls): n/a, not a failure and not a pass
    r = _storage_results(cp_stalls=None, flat={"cp_stalls": None})
    r["targets"] = report.evaluate(r)
    assert r["targets"]["cp_no_stall"]["pass"] is None and r["targets"]["cp_no_stall"]["na"]
    text = report.table(r)
    row = next(l for l in text.splitlines() if l.startswith("no stall a CP"))
    assert "n/a" in row and "FAIL" not in row
    md = report.markdown(r)
    assert "| reported |" in md and "n/a" in md


def test_fs_randwrite_helpers():
    from bench import fs_randwrite_bench as fr

    assert fr.lun_size({"kind": "wafl", "luns": [[1, "lun1", 7], [0, "lun0", 180355072]]}) \
        == 180355072
    assert fr.lun_size(None) is None and fr.lun_size({"luns": []}) is None
    done = [0.0, 0.01, 0.02, 0.30, 0.31, 1.0]
    assert fr.longest_gap_ms(done, 0.0, 1.0) == 690.0
    # only gaps that overlap a CP window count
    assert fr.longest_gap_ms(done, 0.0, 1.0, [(0.05, 0.1)]) == 280.0
    assert fr.longest_gap_ms(done, 0.0, 1.0, []) == 0.0
    ev = [{"kind": "cp", "node": "node1", "mono": 10.0, "ms": 100.0, "blocks": 50,
           "reason": "log_half_full", "background": True},
          {"kind": "cp", "node": "node1", "mono": 11.0, "ms": 300.0, "blocks": 70,
           "reason": "log_full"},
          {"kind": "cp", "node": "node2", "mono": 11.0, "ms": 900.0, "blocks": 90,
           "reason": "timer"},
          {"kind": "cp", "node": "node1", "mono": 30.0, "ms": 900.0, "blocks": 90,
           "reason": "timer"},
          {"kind": "assign", "node": "node1", "mono": 10.5}]
    s = fr.cp_summary(ev, 9.0, 12.0)
    assert s["cp_count"] == 2 and s["cp_ms_max"] == 300.0 and s["cp_blocks_max"] == 70
    assert s["cp_reasons"] == {"log_half_full": 1, "log_full": 1} and s["nvlog_full"] is True
    assert s["windows"] == [(10.0, 10.1), (11.0, 11.3)] and s["cp_background"] == 1
    assert fr.cp_summary([], 0.0, 1.0)["cp_ms_max"] is None
