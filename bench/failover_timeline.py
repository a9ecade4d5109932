"""Failover as a client sees it: throughput over time through a kill -9, a takeover and a giveback.

A 2-node shm cluster (giveback_delay_s=0: the giveback follows the restart). vmemu's load
generator writes 4 KiB blocks at iodepth 16 to node1's identity for 30 s (quick 12 s) and
counts completions per 10 ms; node1 is killed (-9) at 10 s (quick 4 s) and restarted at 20 s
(quick 8 s). From the run:

- failover_timeline.png: client IOPS over time (100 ms bins) with a line for each of crash,
  failure detected, takeover complete (identity assumed, first request served), restart,
  giveback started and giveback done; below, the seconds around the crash and around the
  giveback at the load's own 10 ms resolution;
- failover_events.png: vmemu.timeline.plot_timeline of the same run (every event, one lane
  per domain);
- stages_ms: the takeover's stages (status last_takeover, else the takeover_complete event);
- dip_ms: the longest run of 10 ms buckets with no completion around the crash (from 0.5 s
  before to 5 s after) and around the giveback (from 0.5 s before giveback started to 5 s
  after giveback done).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import fio_nbd
from bench.common import MiB, log, wait_no_processes
from clients.load import LoadSpec, run_load
from vmemu import datadir
from vmemu.cluster import Cluster, Status
from vmemu.timeline import plot_timeline, read_metrics

BUCKET_MS = 10
BIN_MS = 100  # the main panel's bins

# name -> (label, colour, line style)
MARKS: dict[str, tuple[str, str, str]] = {
    "crash": ("crash (kill -9 node1)", "#e7298a", "--"),
    "failure_detected": ("failure detected", "#d62728", ":"),
    "identity_assumed": ("takeover: identity assumed", "#7b3294", "-."),
    "first_request_served": ("takeover complete: first request served", "#b2182b", "-"),
    "restart": ("restart node1", "#2ca02c", "--"),
    "giveback_started": ("giveback started", "#1f78b4", ":"),
    "giveback_done": ("giveback done: node1 serves", "#0f8b8d", "-"),
}


def _healthy(s: Status) -> bool:
    return s.all_serving() and all(n["takeover_possible"] for n in s.nodes)


def _first(events: list[dict[str, Any]], since: float, **match: Any) -> dict[str, Any] | None:
    for e in events:
        if e.get("mono", 0) >= since and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def zero_runs(counts: list[int]) -> list[tuple[int, int]]:
    """[(first bucket, length)] of every run of empty buckets."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, c in enumerate(counts):
        if c == 0 and start is None:
            start = i
        elif c != 0 and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(counts) - start))
    return runs


def longest_dip(counts: list[int], lo_s: float, hi_s: float, ref_s: float,
                bucket_s: float = BUCKET_MS / 1000) -> dict[str, Any]:
    """The longest run of empty buckets overlapping [lo_s, hi_s] (seconds since load start)."""
    best: tuple[int, int] | None = None
    for s, n in zero_runs(counts):
        a, b = s * bucket_s, (s + n) * bucket_s
        if b > lo_s and a < hi_s and (best is None or n > best[1]):
            best = (s, n)
    if best is None:
        return {"ms": 0.0, "start_s": None, "from_ref_ms": None}
    s, n = best
    return {"ms": round(n * bucket_s * 1000, 1), "start_s": round(s * bucket_s, 3),
            "end_s": round((s + n) * bucket_s, 3),
            "from_ref_ms": round((s * bucket_s - ref_s) * 1000, 1)}


def _largest_elsewhere(counts: list[int], windows: list[tuple[float, float]],
                       bucket_s: float = BUCKET_MS / 1000) -> dict[str, Any]:
    """The longest empty run that overlaps none of `windows` (seconds since load start)."""
    best: tuple[int, int] | None = None
    for s, n in zero_runs(counts):
        a, b = s * bucket_s, (s + n) * bucket_s
        if any(b > lo and a < hi for lo, hi in windows):
            continue
        if s + n == len(counts):
            continue  # the tail after the last completion is not a dip
        if best is None or n > best[1]:
            best = (s, n)
    if best is None:
        return {"ms": 0.0, "start_s": None}
    return {"ms": round(best[1] * bucket_s * 1000, 1), "start_s": round(best[0] * bucket_s, 3)}


def _rate(counts: list[int], lo_s: float, hi_s: float, bucket_s: float = BUCKET_MS / 1000) -> float | None:
    a, b = max(0, int(lo_s / bucket_s)), min(len(counts), int(hi_s / bucket_s))
    if b <= a:
        return None
    return round(sum(counts[a:b]) / ((b - a) * bucket_s), 1)


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    duration, t_crash, t_restart = (12.0, 4.0, 8.0) if quick else (30.0, 10.0, 20.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "failover_timeline.png"
    events_png = out_dir / "failover_events.png"
    with tempfile.TemporaryDirectory(prefix="vmemu-bench-failover-") as tmp:
        data_dir = Path(tmp) / "data"
        tl_path = Path(tmp) / "timeline.json"
        box: dict[str, Any] = {}
        stages: dict[str, Any] | None = None
        stages_src = None
        replay = None
        calls: dict[str, float] = {}
        try:
            # nbd_port=0 (when the tree has an NBD export): a free port, never a clash with
            # another cluster on this host.
            with Cluster(nodes=2, data_dir=data_dir, ha_mode="shm", giveback_delay_s=0.0,
                         **fio_nbd.nbd_config()) as c:
                c.wait_for(_healthy, 30.0, "both nodes serving, each able to take over")
                spec = LoadSpec(workload="randwrite", bs=4096, iodepth=16, duration=duration,
                                size=64 * MiB, lun=0, seed=4242)
                ep = c.endpoint("node1")

                def load() -> None:
                    try:
                        box["summary"] = run_load(ep, spec, target="node1", timeline=tl_path)
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                        box["error"] = exc

                log(f"failover_timeline: load {duration:g} s on node1; kill -9 at {t_crash:g} s, "
                    f"restart at {t_restart:g} s")
                th = threading.Thread(target=load, name="failover-load", daemon=True)
                t0 = time.monotonic()
                th.start()
                try:
                    _sleep_until(t0 + t_crash, box)
                    calls["crash"] = time.monotonic()
                    c.crash("node1")
                    try:
                        st = c.wait_for(lambda s: "first_request_served" in
                                        ((s.node("node1")["last_takeover"] or {}).get("stages")
                                         or {}), 15.0, "the takeover's stages")
                        lt = st.node("node1")["last_takeover"]
                        stages, replay, stages_src = lt.get("stages"), lt.get("replay"), \
                            "status last_takeover"
                    except Exception as exc:  # noqa: BLE001 - the event log may still have them
                        log(f"failover_timeline: no stages in status: {exc}")
                    c.wait_for(lambda s: s.node("node1")["state"] == "down"
                               and s.node("node1")["pid"] is None, 10.0, "node1 to be reaped")
                    _sleep_until(t0 + t_restart, box)
                    calls["restart"] = time.monotonic()
                    c.restart("node1")
                    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1"
                               and s.node("node1")["state"] == "serving", 60.0,
                               "node1 to serve its identity again")
                finally:
                    th.join(duration + 90.0)
                if "error" in box:
                    raise box["error"]
                if th.is_alive() or "summary" not in box:
                    raise RuntimeError("the load did not finish")
        finally:
            leftover = wait_no_processes(str(data_dir))
        events = _events(data_dir)
        metrics = read_metrics(datadir.metrics_file(data_dir))
        tl = json.loads(tl_path.read_text())
        ev_plot = plot_timeline(events, metrics, events_png,
                                title="failover_timeline bench: kill -9 node1 under load, restart, "
                                      "giveback (vmemu.timeline)")
    summary = box["summary"]
    start = float(tl["start_mono"])
    counts = [r + w for r, w in zip(_pad(tl["read"], tl["write"]), _pad(tl["write"], tl["read"]))]
    marks = _marks(events, start, calls)
    if stages is None:
        tc = _first(events, calls["crash"], kind="takeover_complete", identity="node1")
        if tc:
            stages, stages_src = tc.get("stages_ms"), "takeover_complete event"
    crash_s = marks.get("crash", t_crash)
    crash_hi = marks.get("first_request_served", crash_s + 1.0) + 0.1
    dip_crash = longest_dip(counts, crash_s, crash_hi, crash_s)
    gb0 = marks.get("giveback_started", marks.get("restart", t_restart))
    gb1 = marks.get("giveback_done", gb0 + 1.0) + 0.1
    dip_gb = longest_dip(counts, gb0, gb1, gb0)
    elsewhere = _largest_elsewhere(counts, [(crash_s, crash_hi), (gb0, gb1)])
    cps = [(e["mono"] - start, e.get("node"), e.get("ms"), e.get("reason")) for e in events
           if e.get("kind") == "cp" and 0 <= e["mono"] - start <= len(counts) * BUCKET_MS / 1000]
    figure = plot(counts, marks, png, dip_crash, dip_gb, stages or {}, summary, cps,
                  title=f"vmemu failover seen by a client: 4 KiB randwrite, iodepth 16, "
                        f"2-node shm cluster ({'quick' if quick else 'full'} run)")
    gb_ms = None
    if "giveback_started" in marks and "giveback_done" in marks:
        gb_ms = round((marks["giveback_done"] - marks["giveback_started"]) * 1000, 1)
    res = {
        "stages_ms": stages,
        "stages_source": stages_src,
        "replay": replay,
        "dip_ms": {"crash": dip_crash["ms"], "giveback": dip_gb["ms"],
                   "largest_elsewhere": elsewhere["ms"]},
        "dips": {"crash": dip_crash, "giveback": dip_gb, "largest_elsewhere": elsewhere,
                 "note": ("longest run of 10 ms buckets with no completion (resolution 10 ms) "
                          "overlapping: crash, from the kill to 100 ms after the first request "
                          "served on node2; giveback, from giveback started to 100 ms after "
                          "node1 assumed its identity; largest_elsewhere, anywhere else in the "
                          "run (consistency points stall the serving node too); from_ref_ms: "
                          "where the dip starts after the kill / giveback start")},
        "cp_count": len(cps),
        "cp_ms_median": (round(statistics.median([c[2] for c in cps if isinstance(c[2], (int, float))]), 1)
                         if any(isinstance(c[2], (int, float)) for c in cps) else None),
        "giveback_ms": gb_ms,
        "marks_s": {k: round(v, 4) for k, v in marks.items()},
        "iops": {"before_crash": _rate(counts, 1.0, crash_s),
                 "served_by_partner": _rate(counts, crash_s + 1.0, marks.get("giveback_started",
                                                                             t_restart)),
                 "after_giveback": _rate(counts, gb1 + 1.0, len(counts) * BUCKET_MS / 1000 - 0.1)},
        "load": {"iops": summary["write"]["iops"], "ops": summary["write"]["ops"],
                 "clat_us": summary["write"]["clat_us"], "retries": summary["retries"],
                 "reconnects": summary["reconnects"], "errors": summary["errors"],
                 "runtime_s": summary["runtime_s"]},
        "png": str(png),
        "events_png": str(events_png),
        "figure": figure,
        "events_plot": {k: ev_plot.get(k) for k in ("events", "lanes", "vlines", "throughput")},
        "leftover_processes": leftover,
        "config": {"nodes": 2, "ha_mode": "shm", "giveback_delay_s": 0.0, "duration_s": duration,
                   "crash_at_s": t_crash, "restart_at_s": t_restart, "workload": "randwrite",
                   "bs": 4096, "iodepth": 16, "size": 64 * MiB},
    }
    log(f"failover_timeline: dips {dip_crash['ms']} ms at the crash, {dip_gb['ms']} ms at the "
        f"giveback; takeover {((stages or {}).get('first_request_served'))} ms after detection; "
        f"wrote {png} and {events_png}")
    return res


def _sleep_until(t: float, box: dict[str, Any]) -> None:
    while time.monotonic() < t:
        if "error" in box:
            raise RuntimeError(f"the load failed: {box['error']}")
        time.sleep(min(0.05, max(0.0, t - time.monotonic())))


def _events(data_dir: Path) -> list[dict[str, Any]]:
    from vmemu.hypervisor.events import read_events

    return read_events(datadir.events_file(data_dir))


def _pad(a: list[int], b: list[int]) -> list[int]:
    return a + [0] * max(0, len(b) - len(a))


def _marks(events: list[dict[str, Any]], start: float, calls: dict[str, float]) -> dict[str, float]:
    """Seconds since the load started for each line of the figure (missing ones left out)."""
    crash_t = calls.get("crash", start)
    out: dict[str, float] = {}
    e = _first(events, crash_t - 1.0, kind="crash_requested", node="node1")
    out["crash"] = (e["mono"] if e else crash_t) - start
    for name, match in (("failure_detected", dict(kind="failure_detected", node="node1")),
                        ("identity_assumed", dict(kind="identity_assumed", identity="node1",
                                                  reason="takeover")),
                        ("first_request_served", dict(kind="first_request_served", identity="node1"))):
        e = _first(events, crash_t - 0.001, **match)
        if e:
            out[name] = e["mono"] - start
    if "restart" in calls:
        e = _first(events, calls["restart"] - 0.001, kind="spawned", node="node1")
        out["restart"] = (e["mono"] if e else calls["restart"]) - start
        e = _first(events, calls["restart"] - 0.001, kind="giveback_started", node="node1")
        if e:
            out["giveback_started"] = e["mono"] - start
        e = _first(events, calls["restart"] - 0.001, kind="identity_assumed", node="node1",
                   reason="giveback")
        if e:
            out["giveback_done"] = e["mono"] - start
    return out


# -- the figure ---------------------------------------------------------------------------------
def plot(counts: list[int], marks: dict[str, float], out: Path, dip_crash: dict[str, Any],
         dip_gb: dict[str, Any], stages: dict[str, Any], summary: dict[str, Any],
         cps: list[tuple[float, Any, Any, Any]], title: str) -> dict[str, Any]:
    """Overview (100 ms bins) above, the crash and the giveback at 10 ms resolution below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bucket_s = BUCKET_MS / 1000
    per_bin = BIN_MS // BUCKET_MS
    nbins = -(-len(counts) // per_bin)
    bx = [i * BIN_MS / 1000 for i in range(nbins + 1)]
    by = [sum(counts[i * per_bin:(i + 1) * per_bin]) / (BIN_MS / 1000) for i in range(nbins)]
    end_s = len(counts) * bucket_s
    cp_color = "#969696"

    fig = Figure(figsize=(14, 9), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.1, 1], hspace=0.38, wspace=0.14,
                          left=0.075, right=0.985, top=0.885, bottom=0.17)
    ax = fig.add_subplot(gs[0, :])
    w = summary.get("write") or {}
    lat = w.get("clat_us") or {}
    fig.text(0.075, 0.965, title, fontsize=13, ha="left", va="top")
    fig.text(0.075, 0.928, f"whole run: {w.get('iops', 0):.0f} IOPS, latency p50 {lat.get('p50')} us, "
             f"p99 {lat.get('p99')} us, max {lat.get('max')} us; {summary.get('retries', 0)} "
             f"retries, {summary.get('errors', 0)} errors. Grey ticks: consistency points "
             f"(the serving node stalls while it writes its dirty blocks).",
             fontsize=9, ha="left", va="top", color="#444444")

    ax.stairs(by, bx, fill=True, color="#c6dbef", zorder=2)
    ax.stairs(by, bx, color="#2171b5", lw=1.1, zorder=3)
    peak = max(by) if by else 1.0
    ax.set_xlim(0, end_s)
    ax.set_ylim(0, peak * 1.25)
    ax.set_ylabel(f"client write IOPS\n({BIN_MS} ms bins)")
    ax.set_xlabel("seconds since the load started")
    ax.grid(alpha=0.3)
    for t, *_ in cps:
        ax.plot([t, t], [0, peak * 0.06], color=cp_color, lw=1.2, zorder=4)
    for name, xv in marks.items():
        _, color, ls = MARKS[name]
        ax.axvline(xv, color=color, ls=ls, lw=1.3, zorder=5)
    t_to = stages.get("first_request_served")
    if "crash" in marks:
        txt = "kill -9 node1: node2 takes over"
        if isinstance(t_to, (int, float)):
            txt += f" in {t_to:.0f} ms"
        ax.annotate(txt, xy=(marks["crash"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(5, -4), textcoords="offset points", ha="left", va="top", fontsize=9,
                    color="#b2182b", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none",
                                               alpha=0.9), zorder=6)
    if "restart" in marks:
        ax.annotate("restart node1", xy=(marks["restart"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-5, -4), textcoords="offset points", ha="right", va="top", fontsize=9,
                    color="#2ca02c", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none",
                                               alpha=0.9), zorder=6)
    if "giveback_done" in marks:
        ax.annotate("giveback: node1 serves again", xy=(marks["giveback_done"], 1.0),
                    xycoords=("data", "axes fraction"), xytext=(5, -20),
                    textcoords="offset points", ha="left", va="top", fontsize=9, color="#0f8b8d",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9), zorder=6)
    ax.text(0.006, 0.97, "node1 serves its identity", transform=ax.transAxes, fontsize=8.5,
            color="#555555", ha="left", va="top")
    if "first_request_served" in marks:
        ax.annotate("node2 serves node1's identity", xy=(marks["first_request_served"], 1.0),
                    xycoords=("data", "axes fraction"), xytext=(5, -20),
                    textcoords="offset points", ha="left", va="top", fontsize=8.5,
                    color="#555555")

    zooms = []
    if "crash" in marks:
        lo = marks["crash"] - 0.3
        hi = max(marks.get("first_request_served", marks["crash"]), dip_crash.get("end_s") or 0.0)
        zooms.append(("kill -9 and takeover", lo, max(hi + 0.5, lo + 0.9),
                      ["crash", "failure_detected", "identity_assumed", "first_request_served"],
                      dip_crash))
    if "giveback_started" in marks or "giveback_done" in marks:
        ref = marks.get("giveback_started", marks.get("giveback_done", 0.0))
        lo = ref - 0.3
        hi = max(marks.get("giveback_done", ref), dip_gb.get("end_s") or 0.0)
        zooms.append(("giveback", lo, max(hi + 0.5, lo + 0.9), ["giveback_started", "giveback_done"],
                      dip_gb))
    drawn = []
    for k, (what, lo, hi, names, dip) in enumerate(zooms):
        az = fig.add_subplot(gs[1, k])
        a, b = max(0, int(lo / bucket_s)), min(len(counts), int(hi / bucket_s) + 1)
        xs = [i * bucket_s for i in range(a, b + 1)]
        ys = [counts[i] / bucket_s for i in range(a, b)]
        if ys:
            az.stairs(ys, xs, fill=True, color="#c6dbef")
            az.stairs(ys, xs, color="#2171b5", lw=0.9)
        zpeak = max(ys) if ys else 1.0
        az.set_ylim(0, zpeak * 1.6)
        if dip.get("ms") and dip.get("start_s") is not None:
            az.axvspan(dip["start_s"], dip["end_s"], color="#fdae6b", alpha=0.45, zorder=0)
            # Left of the dip: the marks' labels take the top right of the panel.
            az.annotate(f"no completion\nfor {dip['ms']:.0f} ms", xy=(dip["start_s"], zpeak * 1.02),
                        xytext=(-4, 0), textcoords="offset points", ha="right", va="bottom",
                        fontsize=8.5, color="#a63603")
        for t, node, ms, reason in cps:
            if lo <= t <= hi:
                az.plot([t, t], [0, zpeak * 0.08], color=cp_color, lw=1.5)
                if t > lo + 0.8 * (hi - lo):
                    continue  # no room for a label
                az.annotate(f"CP {node}" + (f" ({reason})" if reason else ""), xy=(t, zpeak * 0.08),
                            xytext=(2, 2), textcoords="offset points", fontsize=7.5,
                            color="#636363")
        ref = marks.get(names[0], lo)
        present = [n for n in names if n in marks]
        for j, name in enumerate(present):
            label, color, ls = MARKS[name]
            xv = marks[name]
            az.axvline(xv, color=color, ls=ls, lw=1.5)
            az.annotate(f"{label}  +{(xv - ref) * 1000:.0f} ms", xy=(hi, zpeak * 1.6),
                        xytext=(-6, -4 - 12.5 * j), textcoords="offset points", ha="right", va="top",
                        fontsize=8.5, color=color,
                        bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.8))
            az.plot([], [], color=color, ls=ls)
        az.set_xlim(lo, hi)
        az.set_title(f"{what} ({BUCKET_MS} ms buckets)", fontsize=10.5, loc="left")
        az.set_xlabel("seconds since the load started")
        az.set_ylabel(f"client write IOPS\n({BUCKET_MS} ms buckets)" if k == 0 else "")
        az.grid(alpha=0.3)
        drawn.append(what)

    handles = [Line2D([], [], color=MARKS[n][1], ls=MARKS[n][2], lw=1.6) for n in MARKS if n in marks]
    labels = [f"{MARKS[n][0]} (at {marks[n]:.3f} s)" for n in MARKS if n in marks]
    handles += [Line2D([], [], color=cp_color, lw=1.5), Patch(color="#fdae6b", alpha=0.45)]
    labels += ["consistency point (CP)", "longest run of empty 10 ms buckets"]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return {"bins_ms": BIN_MS, "bins": nbins, "peak_bin_iops": round(peak, 1), "zooms": drawn,
            "lines": sorted(marks), "cp_ticks": len(cps)}
