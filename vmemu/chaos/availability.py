"""How long each identity could not serve during a chaos run, and what the faults explain.

Seen from the clients, the only view that matters to them: an identity is unavailable over
any stretch longer than `GAP_S` in which no operation on it completed `ok` while clients
were asking. A stretch that overlaps a fault (from its start to the end of its healing) is
explained by it; the rest is not, and is reported as such (a stall nobody caused).
"""

from __future__ import annotations

from typing import Any

GAP_S = 1.0


def summarize(ops: list[dict[str, Any]], faults: list[dict[str, Any]], t0: float,
              t_end: float, gap_s: float = GAP_S) -> dict[str, Any]:
    oks: dict[str, list[float]] = {}
    for op in ops:
        ident = op["block"].split("/", 1)[0]
        oks.setdefault(ident, [])
        if op["type"] == "ok":
            oks[ident].append(op["time"] / 1e9)
    spans = [(float(f.get("mono", f["started"])), float(f["ended"])) for f in faults
             if "skipped" not in f and "started" in f and "ended" in f]
    out: dict[str, Any] = {}
    for ident, times in sorted(oks.items()):
        times = sorted(t for t in times if t0 <= t <= t_end)
        edges = [t0] + times + [t_end]
        windows = [(a, b) for a, b in zip(edges, edges[1:]) if b - a > gap_s]
        down = sum(b - a for a, b in windows)
        explained = sum(b - a for a, b in windows
                        if any(a < fe + gap_s and b > fs for fs, fe in spans))
        out[ident] = {"unavailable_s": round(down, 3), "explained_s": round(explained, 3),
                      "unexplained_s": round(down - explained, 3),
                      "longest_s": round(max((b - a for a, b in windows), default=0.0), 3)}
    return out
