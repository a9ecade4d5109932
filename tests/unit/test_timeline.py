"""The timeline picture (vmemu/timeline.py) from a synthetic run: lanes, markers, throughput."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmemu.errors import BadRequest
from vmemu.timeline import alive_periods, plot_timeline, read_metrics, throughput

PNG_SIG = b"\x89PNG\r\n\x1a\n"
T_WALL = 1_700_000_000.0
T_MONO = 5_000.0


def ev(at: float, kind: str, node: str | None = None, **fields) -> dict:
    e = {"t": round(T_WALL + at, 6), "mono": round(T_MONO + at, 6), "kind": kind}
    if node is not None:
        e["node"] = node
    e.update(fields)
    return e


def synthetic_run() -> tuple[list[dict], list[dict]]:
    """4 nodes in pairs: node1 crashes (kill -9) and comes back; node3 hangs and stays down."""
    evs = [ev(0.0, "cluster_up", "hypervisor", nodes=4, topology="pairs")]
    for i in range(1, 5):
        evs += [ev(0.01 * i, "spawned", f"node{i}"), ev(0.01 * i + 0.001, "domain_started", f"node{i}", pid=100 + i)]
    for owner, grantee in (("node1", "node2"), ("node2", "node1"), ("node3", "node4"), ("node4", "node3")):
        evs += [ev(0.5, "granted", "hypervisor", owner=owner, grantee=grantee, mode="ro"),
                ev(0.52, "mapped", grantee, owner=owner, mode="ro")]
    for i in range(1, 5):
        evs += [ev(0.6, "replay_done", f"node{i}", identity=f"node{i}", records=0, bytes=0, ms=0.01, regions=0),
                ev(0.61, "identity_assumed", f"node{i}", identity=f"node{i}", reason="boot")]
    evs += [ev(1.0 + 0.5 * k, "cp", f"node{1 + k % 4}", blocks=10) for k in range(8)]  # 8 CPs
    # node1: kill -9, takeover by node2.
    evs += [ev(3.0, "crash_requested", "node1", signal="SIGKILL", pid=101),
            ev(3.01, "domain_exited", "node1", detail="exit code -9"),
            ev(3.01, "failure_detected", "node1", reason="exit"),
            ev(3.013, "fenced", "node1", exit_code=-9, disk_epochs={"node1": 2}),
            ev(3.017, "partner_alerted", "node2", identity="node1", reason="takeover", epoch=3),
            ev(3.019, "replay_done", "node2", identity="node1", records=21, bytes=86016, ms=1.05, regions=1),
            ev(3.0191, "identity_assumed", "node2", identity="node1", reason="takeover"),
            ev(3.025, "takeover_complete", "node2", identity="node1", failed="node1",
               stages_ms={"failure_detected": 0.0, "fenced": 3.0, "partner_alerted": 7.0,
                          "replay_done": 9.0, "identity_assumed": 9.1, "first_request_served": 15.0})]
    # node1 back, giveback.
    evs += [ev(4.5, "spawned", "node1"), ev(4.501, "domain_started", "node1", pid=111),
            ev(5.2, "giveback_started", "node1", **{"from": 2}),
            ev(5.21, "released", "node2", identity="node1", cp_ms=2.8),
            ev(5.212, "replay_done", "node1", identity="node1", records=0, bytes=0, ms=0.9, regions=1),
            ev(5.213, "identity_assumed", "node1", identity="node1", reason="giveback")]
    # node3: hang; only the heartbeat tells; node4 takes over.
    evs += [ev(6.0, "crash_requested", "node3", signal="SIGSTOP", pid=103),
            ev(6.5, "heartbeat_missed", "node3", silent_ms=500.0, limit_ms=500.0),
            ev(6.5, "failure_detected", "node3", reason="heartbeat"),
            ev(6.505, "fenced", "node3", exit_code=-9, disk_epochs={"node3": 2}),
            ev(6.51, "partner_alerted", "node4", identity="node3", reason="takeover", epoch=3),
            ev(6.52, "replay_done", "node4", identity="node3", records=7, bytes=28672, ms=0.6, regions=1),
            ev(6.521, "identity_assumed", "node4", identity="node3", reason="takeover"),
            ev(6.53, "takeover_complete", "node4", identity="node3", failed="node3", stages_ms={})]
    evs += [ev(8.0, "shutdown_started", "hypervisor")]
    evs += [ev(8.1 + 0.01 * i, "domain_stopped", f"node{i}", exit_code=0) for i in (1, 2, 4)]
    evs += [ev(8.2, "cluster_down", "hypervisor")]

    # Metrics every 0.5 s: node1 and node3 serve 1000 IOPS each while theirs; partners take over.
    metrics = []
    ops = {"node1": 0, "node2": 0, "node3": 0, "node4": 0}
    for k in range(17):
        at = 0.5 * k
        nodes = {}
        for n in ops:
            down = (n == "node1" and 3.0 <= at < 4.6) or (n == "node3" and at >= 6.0)
            if down:
                continue
            if n == "node1" and at == 5.0:
                ops[n] = 0  # fresh incarnation: the counter starts again
            nodes[n] = {"ops": ops[n], "nvlog_used": 0, "serves": [n]}
        metrics.append({"t": T_WALL + at, "mono": T_MONO + at, "nodes": nodes})
        for n in ops:
            serves_own = not ((n == "node1" and 3.0 <= at < 5.2) or (n == "node3" and at >= 6.0))
            rate = 1000 if n in ("node1", "node3") and serves_own else 0
            if n == "node2" and 3.0 <= at < 5.2:
                rate = 1000
            if n == "node4" and at >= 6.5:
                rate = 1000
            ops[n] += int(rate * 0.5)
    return evs, metrics


def test_plot_of_a_run_with_failures(tmp_path):
    evs, metrics = synthetic_run()
    out = tmp_path / "sub" / "timeline.png"
    s = plot_timeline(evs, metrics, out, title="synthetic")

    data = out.read_bytes()
    assert data[:8] == PNG_SIG
    assert len(data) > 10_000
    # 14 x 8 in at 110 dpi: the IHDR chunk holds width and height.
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (w, h) == (1540, 880)

    assert s["lanes"] == ["hypervisor", "node1", "node2", "node3", "node4"]
    assert s["events"] == len(evs)
    m = s["markers"]
    assert m["crash_requested"] == 2
    assert m["failure_detected"] == 2
    assert m["fenced"] == 2
    assert m["heartbeat_missed"] == 1
    assert m["replay_done"] == 4 + 2 + 1
    assert m["partner_alerted"] == 2
    assert m["identity_assumed_takeover"] == 2
    assert m["takeover_complete"] == 2
    assert m["identity_assumed_boot"] == 4
    assert m["giveback_started"] == 1 and m["released"] == 1 and m["identity_assumed_giveback"] == 1
    assert m["domain_started"] == 5
    assert m["domain_stopped"] == 1 + 3  # domain_exited of node1, then three clean stops
    assert m["grant"] == 8
    assert m["cp"] == 8
    assert sum(m.values()) == len(evs)  # every event is drawn
    assert s["replays_annotated"] == 3  # the two takeovers' replays and the giveback's
    assert s["clock"] == "mono"
    assert s["span_s"] == pytest.approx(8.2)

    assert s["vlines"]["crash"] == [pytest.approx(3.0), pytest.approx(6.0)]
    assert s["vlines"]["takeover_complete"] == [pytest.approx(3.025), pytest.approx(6.53)]
    assert s["vlines"]["giveback"] == [pytest.approx(5.213)]

    alive = s["alive"]
    assert alive["node1"] == [[pytest.approx(0.01), pytest.approx(3.01)],
                              [pytest.approx(4.5), pytest.approx(8.11)]]
    assert alive["node3"] == [[pytest.approx(0.03), pytest.approx(6.5)]]  # hung until detected
    assert alive["node4"] == [[pytest.approx(0.04), pytest.approx(8.14)]]
    assert s["hung"] == {"node3": [[pytest.approx(6.0), pytest.approx(6.5)]]}  # SIGSTOP to detection

    assert s["throughput"]["samples"] == 16
    assert s["throughput"]["domains"] == ["node1", "node2", "node3", "node4"]
    assert s["throughput"]["peak_total_iops"] == pytest.approx(2000.0)


def test_throughput_rates_gaps_and_counter_resets():
    _, metrics = synthetic_run()
    times, rates = throughput(metrics)
    assert len(times) == 16 and times[0] == pytest.approx(T_MONO + 0.5)
    i = {round(t - T_MONO, 3): k for k, t in enumerate(times)}
    assert rates["node1"][i[1.0]] == pytest.approx(1000.0)
    assert math.isnan(rates["node1"][i[3.5]])          # down: no value, not zero
    assert rates["node1"][i[5.0]] == pytest.approx(0.0)  # first sample of the new incarnation
    assert rates["node1"][i[6.0]] == pytest.approx(1000.0)
    assert rates["node2"][i[3.5]] == pytest.approx(1000.0)
    assert math.isnan(rates["node3"][i[7.0]])
    assert rates["node4"][i[7.5]] == pytest.approx(1000.0)
    # A counter that went down was reset by a restart: the new value is the interval's work.
    t, r = throughput([{"mono": 0.0, "nodes": {"node1": {"ops": 900}}},
                       {"mono": 0.5, "nodes": {"node1": {"ops": 100}}}])
    assert r["node1"] == [pytest.approx(200.0)]


def test_alive_periods_open_until_the_end():
    evs = [ev(0.0, "spawned", "node1"), ev(0.01, "domain_started", "node1"),
           ev(1.0, "failure_detected", "node1"), ev(1.01, "fenced", "node1"),
           ev(2.0, "domain_started", "node1"), ev(2.0, "cp", "node2")]
    p = alive_periods(evs, "mono", T_MONO + 5.0)
    assert p == {"node1": [(T_MONO, T_MONO + 1.0), (T_MONO + 2.0, T_MONO + 5.0)]}


def test_more_lanes_and_no_metrics(tmp_path):
    evs = [ev(0.0, "cluster_up", "hypervisor", nodes=6, topology="ring"),
           ev(0.1, "domain_started", "node6"), ev(0.2, "cp", "node6")]
    s = plot_timeline(evs, [], tmp_path / "t.png")
    assert s["lanes"] == ["hypervisor"] + [f"node{i}" for i in range(1, 7)]
    assert s["throughput"]["samples"] == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_SIG


def test_wall_clock_when_mono_is_missing(tmp_path):
    evs = [{"t": T_WALL, "kind": "cluster_up", "node": "hypervisor", "nodes": 2},
           {"t": T_WALL + 1.0, "kind": "crash_requested", "node": "node2"}]
    s = plot_timeline(evs, [], tmp_path / "t.png")
    assert s["clock"] == "t" and s["span_s"] == pytest.approx(1.0)
    assert s["lanes"] == ["hypervisor", "node1", "node2"]


def test_empty_event_log_is_a_clear_error(tmp_path):
    with pytest.raises(BadRequest, match="no events to plot"):
        plot_timeline([], [], tmp_path / "t.png")
    with pytest.raises(BadRequest):
        plot_timeline([{"garbage": 1}], [], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_read_metrics_skips_cut_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"t": 1.0, "mono": 1.0, "nodes": {"node1": {"ops": 5}}}) + "\n\n"
                 + '{"t": 1.5, "mono": 1.5, "nodes": {"nod' + "\n")
    assert read_metrics(p) == [{"t": 1.0, "mono": 1.0, "nodes": {"node1": {"ops": 5}}}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmemu.cli", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "VMEMU_DATA_DIR"})


def test_cli_plots_a_stopped_clusters_files(tmp_path):
    evs, metrics = synthetic_run()
    d = tmp_path / "d"
    d.mkdir()
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    out = tmp_path / "out.png"
    p = cli(d, "events", "--plot", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"vmemu: timeline written to {out} ({len(evs)} events, "
                                "lanes: hypervisor, node1, node2, node3, node4)")
    assert out.read_bytes()[:8] == PNG_SIG
    # --json is unchanged.
    p = cli(d, "events", "--json", "--last", "2")
    assert p.returncode == 0 and [json.loads(l)["kind"] for l in p.stdout.splitlines()] == \
        ["domain_stopped", "cluster_down"]


def test_cli_empty_event_log_is_one_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "events.jsonl").write_text("")
    p = cli(d, "events", "--plot", str(tmp_path / "out.png"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no events to plot" in lines[0], p.stderr
    assert not (tmp_path / "out.png").exists()
