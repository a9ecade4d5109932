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
    assert results["targets"]["ha_shm_vs_mirror"]["pass"] is True
    assert results["targets"]["ha_shm_vs_none"]["pass"] is False
    assert results["targets"]["nbd_vs_nbdkit"]["pass"] is None
    text = report.table(results)
    assert "vmemu / bare" in text and "skipped: no fio" in text and "30 / 50" in text
