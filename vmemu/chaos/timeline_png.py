"""A chaos run on one picture: each identity's client ops as marks, faults as bands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLORS = {("write", "ok"): "tab:green", ("read", "ok"): "tab:blue",
          ("write", "info"): "tab:orange", ("read", "fail"): "tab:red",
          ("write", "fail"): "tab:red"}
MARKED_EVENTS = ("failure_detected", "identity_assumed", "giveback_started", "cp_started")


def plot(ops: list[dict[str, Any]], faults: list[dict[str, Any]], events_path: Path,
         t0: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idents = sorted({op["block"].split("/", 1)[0] for op in ops})
    lane = {ident: i for i, ident in enumerate(idents)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * len(idents)))
    for (f, typ), color in COLORS.items():
        xs = [op["time"] / 1e9 - t0 for op in ops if op["f"] == f and op["type"] == typ]
        ys = [lane[op["block"].split("/", 1)[0]] + (0.15 if f == "write" else -0.15)
              for op in ops if op["f"] == f and op["type"] == typ]
        if xs:
            ax.scatter(xs, ys, s=2, c=color, label=f"{f} {typ}", rasterized=True)
    for fa in faults:
        if "skipped" in fa or "ended" not in fa:
            continue
        a = float(fa.get("mono", fa["started"])) - t0
        ax.axvspan(a, float(fa["ended"]) - t0, color="tab:red", alpha=0.08)
        ax.text(a, len(idents) - 0.45, f"{fa['kind']} {fa['target']}", fontsize=7)
    try:
        events = [json.loads(x) for x in events_path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        events = []
    for ev in events:
        if ev.get("kind") in MARKED_EVENTS and "mono" in ev:
            ax.axvline(float(ev["mono"]) - t0, color="grey", lw=0.4, ls=":")
    ax.set_yticks(range(len(idents)), idents)
    ax.set_ylim(-0.6, len(idents) - 0.3)
    ax.set_xlabel("seconds since the clients started (dotted: failure, takeover, giveback, CP)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=7, markerscale=4,
              ncols=5, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
