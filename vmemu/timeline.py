"""The timeline: every event of a run on one time axis, under the clients' throughput.

`plot_timeline(events, metrics, out)` draws a PNG (matplotlib, Agg canvas, no pyplot state):

- top panel: client IOPS per domain and in total, from the cumulative `ops` counters of
  <data-dir>/metrics.jsonl (deltas over time deltas), with vertical lines at each crash, each
  completed takeover and each giveback;
- below: one lane for the hypervisor and one per domain (node1..nodeN). Each lane has a thin bar
  for the periods its domain was alive (domain_started/spawned until failure_detected, fenced,
  domain_exited or domain_stopped) and a marker per event, shaped and coloured by kind; replays
  carry their record count and duration.

Time is seconds since the first event, on CLOCK_MONOTONIC (`mono`, one clock for every process
of the host) when every event and sample has it, else on the wall clock (`t`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmemu.errors import BadRequest

NODE_RE = re.compile(r"^node(\d+)$")
HYPERVISOR = "hypervisor"


@dataclass(frozen=True)
class Style:
    label: str
    marker: str
    color: str
    dy: float  # offset inside the lane, so events of one moment do not hide each other
    size: float = 70.0
    hollow: bool = False


# Order here is the legend's order.
STYLES: dict[str, Style] = {
    "domain_started": Style("domain started", "o", "#2ca02c", 0.30, 55),
    "domain_stopped": Style("domain stopped / exited", "p", "#8c564b", 0.15, 60),
    "crash_requested": Style("crash requested", "v", "#e7298a", 0.30, 95),
    "heartbeat_missed": Style("heartbeat missed", "x", "#ff7f0e", 0.15, 70),
    "failure_detected": Style("failure detected", "X", "#d62728", 0.0, 95),
    "fenced": Style("fenced", "s", "#222222", -0.15, 55),
    "grant": Style("grant / mapped", "^", "#9467bd", -0.15, 45),
    "cp": Style("consistency point", "|", "#8a8a8a", -0.30, 60),
    "replay_done": Style("replay done (records, ms)", "D", "#1f77b4", 0.15, 45),
    "partner_alerted": Style("takeover: partner alerted", ">", "#b2182b", 0.30, 80),
    "identity_assumed_takeover": Style("takeover: identity assumed", "*", "#b2182b", 0.0, 170),
    "takeover_complete": Style("takeover complete", "P", "#b2182b", -0.15, 95),
    "giveback_started": Style("giveback started", "<", "#0f8b8d", 0.30, 80),
    "released": Style("giveback: released by partner", "d", "#0f8b8d", -0.15, 75),
    "identity_assumed_giveback": Style("giveback: identity assumed", "*", "#0f8b8d", 0.0, 170),
    "identity_assumed_boot": Style("identity assumed (boot)", "*", "#9acd32", 0.0, 80),
    "other": Style("other event", ".", "#b0b0b0", -0.30, 40),
}

KIND_TO_STYLE = {
    "domain_started": "domain_started",
    "domain_stopped": "domain_stopped",
    "domain_exited": "domain_stopped",
    "crash_requested": "crash_requested",
    "heartbeat_missed": "heartbeat_missed",
    "failure_detected": "failure_detected",
    "fenced": "fenced",
    "granted": "grant",
    "mapped": "grant",
    "cp": "cp",
    "replay_done": "replay_done",
    "partner_alerted": "partner_alerted",
    "takeover_complete": "takeover_complete",
    "giveback_started": "giveback_started",
    "released": "released",
}

ALIVE_FROM = ("domain_started", "spawned")
ALIVE_UNTIL = ("failure_detected", "fenced", "domain_exited", "domain_stopped")

FIG_W, FIG_H, DPI = 14.0, 8.0, 110


def style_key(ev: dict[str, Any]) -> str:
    kind = ev.get("kind", "")
    if kind == "identity_assumed":
        reason = ev.get("reason")
        return f"identity_assumed_{reason}" if reason in ("takeover", "giveback") else "identity_assumed_boot"
    return KIND_TO_STYLE.get(kind, "other")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The samples of <data-dir>/metrics.jsonl; none if there is no file. Cut lines are skipped."""
    out: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the hypervisor was killed mid-line
                if isinstance(rec, dict) and isinstance(rec.get("nodes"), dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def lane_of(ev: dict[str, Any]) -> str:
    node = ev.get("node")
    return node if isinstance(node, str) and NODE_RE.match(node) else HYPERVISOR


def _node_num(name: str) -> int:
    return int(NODE_RE.match(name).group(1))  # type: ignore[union-attr]


def throughput(metrics: list[dict[str, Any]], key: str = "mono") -> tuple[list[float], dict[str, list[float]]]:
    """IOPS per domain between consecutive samples: (interval end times, {node: iops}).

    A domain absent from a sample was not alive: no value (NaN). The first sample of an
    incarnation has no rate (its counter may still be the dead incarnation's), and a counter
    that went down was reset by a restart: its new value is what was done since.
    """
    samples = sorted((m for m in metrics if isinstance(m.get(key), (int, float))), key=lambda m: m[key])
    names = sorted({n for m in samples for n in m["nodes"] if NODE_RE.match(n)}, key=_node_num)
    times: list[float] = []
    rates: dict[str, list[float]] = {n: [] for n in names}
    for prev, cur in zip(samples, samples[1:]):
        dt = cur[key] - prev[key]
        if dt <= 0:
            continue
        times.append(float(cur[key]))
        for n in names:
            a, b = prev["nodes"].get(n), cur["nodes"].get(n)
            if b is None:
                rates[n].append(math.nan)
            elif a is None:
                rates[n].append(0.0)
            else:
                ops_a, ops_b = int(a.get("ops", 0)), int(b.get("ops", 0))
                delta = ops_b - ops_a if ops_b >= ops_a else ops_b
                rates[n].append(delta / dt)
    return times, rates


def hung_periods(events: list[dict[str, Any]], key: str, end: float) -> dict[str, list[tuple[float, float]]]:
    """Per domain, [(from, until)] it was stopped with SIGSTOP (`crash --hang`) but not yet
    found out: from the crash request to failure_detected, fenced or the domain's end."""
    out: dict[str, list[tuple[float, float]]] = {}
    start: dict[str, float] = {}
    for ev in events:
        lane = lane_of(ev)
        kind = ev.get("kind")
        if kind == "crash_requested" and ev.get("signal") == "SIGSTOP" and lane != HYPERVISOR:
            start.setdefault(lane, ev[key])
        elif kind in ALIVE_UNTIL and lane in start:
            out.setdefault(lane, []).append((start.pop(lane), ev[key]))
    for lane, s in start.items():
        out.setdefault(lane, []).append((s, end))
    return out


def alive_periods(events: list[dict[str, Any]], key: str, end: float) -> dict[str, list[tuple[float, float]]]:
    """Per domain, [(from, until)] it was alive; a period still open at the end closes there."""
    out: dict[str, list[tuple[float, float]]] = {}
    start: dict[str, float] = {}
    for ev in events:
        lane = lane_of(ev)
        if lane == HYPERVISOR:
            continue
        kind = ev.get("kind")
        if kind in ALIVE_FROM and lane not in start:
            start[lane] = ev[key]
        elif kind in ALIVE_UNTIL and lane in start:
            out.setdefault(lane, []).append((start.pop(lane), ev[key]))
    for lane, s in start.items():
        out.setdefault(lane, []).append((s, end))
    return out


def plot_timeline(events: list[dict[str, Any]], metrics: list[dict[str, Any]], out: Path,
                  title: str = "") -> dict[str, Any]:
    """Draw the run's timeline into `out` (PNG) and say what was drawn."""
    events = [e for e in events if isinstance(e, dict) and "kind" in e
              and isinstance(e.get("t"), (int, float))]
    if not events:
        raise BadRequest("no events to plot: the event log is empty (has a cluster run in this data dir?)")

    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    key = "mono" if all(isinstance(e.get("mono"), (int, float)) for e in events) and \
        all(isinstance(m.get("mono"), (int, float)) for m in metrics) else "t"
    events = sorted(events, key=lambda e: e[key])
    t0, t_end = events[0][key], events[-1][key]
    span = max(t_end - t0, 1e-3)
    wall0 = events[0]["t"]

    # Lanes: the hypervisor on top, then node1..nodeN (N from cluster_up, the events, the metrics).
    n_nodes = 0
    for e in events:
        if e.get("kind") == "cluster_up" and isinstance(e.get("nodes"), int):
            n_nodes = max(n_nodes, e["nodes"])
        if lane_of(e) != HYPERVISOR:
            n_nodes = max(n_nodes, _node_num(lane_of(e)))
    for m in metrics:
        for n in m["nodes"]:
            if NODE_RE.match(n):
                n_nodes = max(n_nodes, _node_num(n))
    lanes = [HYPERVISOR] + [f"node{i}" for i in range(1, n_nodes + 1)]
    lane_y = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}  # hypervisor at the top

    height = FIG_H + max(0, len(lanes) - 5) * 0.45
    fig = Figure(figsize=(FIG_W, height), dpi=DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=[1, 2.1], hspace=0.06,
                          left=0.075, right=0.79, top=0.93 if title else 0.96, bottom=0.08)
    ax_tp = fig.add_subplot(gs[0])
    ax = fig.add_subplot(gs[1], sharex=ax_tp)
    if title:
        fig.suptitle(title, fontsize=13, x=0.075, ha="left")

    def x(v: float) -> float:
        return v - t0

    # -- throughput -----------------------------------------------------------------------------
    win = [m for m in metrics if t0 - 0.5 <= m.get(key, -math.inf) <= t_end + 0.5]
    tp_times, rates = throughput(win, key)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f", "#d62728"]
    peak_total = 0.0
    if tp_times:
        xs = [x(v) for v in tp_times]
        total = [sum(r[i] for r in rates.values() if not math.isnan(r[i])) for i in range(len(xs))]
        peak_total = max(total) if total else 0.0
        # The total underneath, wide and pale, so a domain carrying all the load still shows.
        ax_tp.step(xs, total, where="pre", lw=4.0, color="#444444", alpha=0.3, label="total IOPS",
                   zorder=2)
        for n, r in rates.items():
            ax_tp.step(xs, r, where="pre", lw=1.5, color=palette[(_node_num(n) - 1) % len(palette)],
                       label=f"{n} IOPS", zorder=3)
        ax_tp.set_ylim(0, max(peak_total * 1.25, 1.0))
    else:
        ax_tp.text(0.5, 0.5, "no throughput samples (metrics.jsonl) in this time span",
                   transform=ax_tp.transAxes, ha="center", va="center", color="#777777")
        ax_tp.set_yticks([])
    ax_tp.set_ylabel("client IOPS")
    ax_tp.grid(axis="y", alpha=0.3)
    ax_tp.tick_params(labelbottom=False)

    vlines: dict[str, list[float]] = {"crash": [], "takeover_complete": [], "giveback": []}
    marks = []
    for e in events:
        k = e.get("kind")
        if k == "crash_requested":
            sig = e.get("signal", "SIGKILL")
            marks.append((x(e[key]), "crash", "#e7298a", "--",
                          f"crash {e.get('node', '?')}" + (" (hang)" if sig == "SIGSTOP" else "")))
        elif k == "takeover_complete":
            stages = e.get("stages_ms") or {}
            total_ms = stages.get("first_request_served")
            txt = f"takeover of {e.get('identity', '?')} by {e.get('node', '?')}"
            if isinstance(total_ms, (int, float)):
                txt += f": {total_ms:.0f} ms"
            marks.append((x(e[key]), "takeover_complete", "#b2182b", "-", txt))
        elif k == "identity_assumed" and e.get("reason") == "giveback":
            marks.append((x(e[key]), "giveback", "#0f8b8d", ":", f"giveback to {e.get('node', '?')}"))
    for i, (xv, what, color, ls, txt) in enumerate(marks):
        vlines[what].append(round(xv, 6))
        ax_tp.axvline(xv, color=color, ls=ls, lw=1.5, alpha=0.9)
        ax.axvline(xv, color=color, ls=ls, lw=0.8, alpha=0.35, zorder=0)
        # Labels alternate sides and heights so a crash and its takeover (ms apart) both read.
        right = what != "crash"
        ax_tp.annotate(txt, xy=(xv, 1.0), xycoords=("data", "axes fraction"),
                       xytext=(4 if right else -4, -12 - 12 * (i % 2)), textcoords="offset points",
                       ha="left" if right else "right", va="center", fontsize=8.5, color=color,
                       bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    handles_tp, labels_tp = ax_tp.get_legend_handles_labels()
    handles_tp += [Line2D([], [], color="#e7298a", ls="--", lw=1.5),
                   Line2D([], [], color="#b2182b", ls="-", lw=1.5),
                   Line2D([], [], color="#0f8b8d", ls=":", lw=1.5)]
    labels_tp += ["crash requested", "takeover complete", "giveback done"]
    ax_tp.legend(handles_tp, labels_tp, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5,
                 frameon=False, borderaxespad=0.0)

    # -- lanes ----------------------------------------------------------------------------------
    for name, y in lane_y.items():
        if y % 2 == 0:
            ax.axhspan(y - 0.5, y + 0.5, color="#f4f4f4", zorder=0)
    periods = alive_periods(events, key, t_end)
    for lane, spans in periods.items():
        y = lane_y[lane]
        ax.broken_barh([(x(a), max(b - a, span * 0.002)) for a, b in spans], (y - 0.44, 0.07),
                       facecolors="#5cb85c", alpha=0.75, zorder=1)
    hung = hung_periods(events, key, t_end)
    for lane, spans in hung.items():
        y = lane_y[lane]
        ax.broken_barh([(x(a), max(b - a, span * 0.002)) for a, b in spans], (y - 0.44, 0.07),
                       facecolors="#ff7f0e", alpha=0.9, zorder=2)

    counts: Counter[str] = Counter()
    pts: dict[str, tuple[list[float], list[float]]] = {}
    annotated = 0
    for e in events:
        sk = style_key(e)
        st = STYLES[sk]
        y = lane_y[lane_of(e)] + st.dy
        xs_, ys_ = pts.setdefault(sk, ([], []))
        xs_.append(x(e[key]))
        ys_.append(y)
        counts[sk] += 1
        if e.get("kind") == "replay_done" and (e.get("records") or e.get("regions")):
            ms = e.get("ms")
            txt = f"{e.get('records', 0)} rec" + (f", {ms:.1f} ms" if isinstance(ms, (int, float)) else "")
            ax.annotate(txt, xy=(x(e[key]), y), xytext=(6, 4), textcoords="offset points",
                        fontsize=7.5, color=st.color, va="bottom", zorder=5,
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))
            annotated += 1
    for sk, st in STYLES.items():
        if sk not in pts:
            continue
        xs_, ys_ = pts[sk]
        line_marker = st.marker in ("x", "|", "+", "1", "2", "3", "4", "_", ".")
        ax.scatter(xs_, ys_, marker=st.marker, s=st.size, c=st.color,
                   linewidths=1.6 if line_marker else 0.6,
                   edgecolors=None if line_marker else "white", zorder=4 if sk != "cp" else 3)

    ax.set_yticks([lane_y[n] for n in lanes], lanes)
    ax.set_ylim(-0.5, len(lanes) - 0.5)
    ax.set_xlim(-span * 0.015, span * 1.015)
    for y in range(len(lanes) - 1):
        ax.axhline(y + 0.5, color="#cccccc", lw=0.8, zorder=0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"seconds since the first event ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(wall0))})")

    handles = [Patch(facecolor="#5cb85c", alpha=0.75, label="domain alive"),
               Patch(facecolor="#ff7f0e", alpha=0.9, label="hung (SIGSTOP), not yet detected")]
    for sk, st in STYLES.items():
        line_marker = st.marker in ("x", "|", "+", ".")
        handles.append(Line2D([], [], ls="none", marker=st.marker, color=st.color,
                              markersize=max(5.0, math.sqrt(st.size) * 0.85),
                              markeredgewidth=1.6 if line_marker else 0.5,
                              markeredgecolor=st.color if line_marker else "white",
                              label=f"{st.label} ({counts.get(sk, 0)})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5,
              frameon=False, borderaxespad=0.0, labelspacing=0.55)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")

    return {
        "out": str(out),
        "events": len(events),
        "lanes": lanes,
        "markers": dict(counts),
        "kinds": dict(Counter(e["kind"] for e in events)),
        "clock": key,
        "t0": wall0,
        "span_s": round(t_end - t0, 6),
        "alive": {lane: [[round(x(a), 6), round(x(b), 6)] for a, b in spans]
                  for lane, spans in sorted(periods.items(), key=lambda kv: _node_num(kv[0]))},
        "hung": {lane: [[round(x(a), 6), round(x(b), 6)] for a, b in spans]
                 for lane, spans in sorted(hung.items(), key=lambda kv: _node_num(kv[0]))},
        "vlines": vlines,
        "replays_annotated": annotated,
        "throughput": {"samples": len(tp_times), "domains": list(rates),
                       "peak_total_iops": round(peak_total, 1)},
    }
