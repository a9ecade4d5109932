"""How long each identity could not serve during a chaos run, judged against a budget per fault.

Seen from the clients, the only view that matters to them: an identity is out of service from
one `ok` completion of an op on it to the next. Each fault starts one or more *clocks* per
identity it touches (`clocks`): the moment it was done, each later kill it did, each giveback
that healing it started, and, after a double failure, the moment the node that next serves
the identity registered again. A clock runs until the identity's next clock (of this fault or
a later one) or the end of the run; its *outage* is the longest stretch without an `ok`
completion inside it, counted from the clock's start for a stretch that began before it. The
first such stretch is the one from the fault to the first op completed after it, so the
outage is at least that, and a stall after a quick first answer counts too.

An outage over its budget (`BUDGETS`, times a slack factor for loaded hosts) is a violation
named with its fault. A stretch longer than `GAP_S` that no clock accounts for is
*unexplained*; over `UNEXPLAINED_S` (times the slack) it is a violation of its own.

Pure: ops, the applied faults (faults.jsonl), the cluster's events (events.jsonl, the same
CLOCK_MONOTONIC) in, figures and violations out.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable

GAP_S = 1.0  # a stretch this long without an ok completion is reported at all
UNEXPLAINED_S = 3.0  # and fails the run when no fault accounts for it
# A stall that begins this soon after its fault's healing ended is still the fault's: the
# heal ends when Domain 0's status says all serving, before clients have noticed.
GRACE_S = 1.0


@dataclass(frozen=True)
class Budget:
    base_s: float
    plus_detection: bool  # the budget includes the cluster's failure detection time
    what: str

    def seconds(self, detection_s: float, slack: float = 1.0) -> float:
        return (self.base_s + (detection_s if self.plus_detection else 0.0)) * slack


# What an identity may be out of service for, per kind of outage. Every fault kind starts
# one of the first two at its moment (FIRST_CLOCK), and any of the others as they happen.
BUDGETS: dict[str, Budget] = {
    "kill": Budget(1.0, False, "kill -9 of a node: the partner answers for its identity"),
    "hang": Budget(1.0, True, "a hung node (SIGSTOP): it wakes, or is fenced and taken over"),
    "giveback": Budget(1.0, False, "the identity given back to its restarted owner"),
    "double": Budget(1.0, False, "both nodes of a pair down: from when the node that then "
                                 "serves it registered again"),
    "disk": Budget(1.0, False, "a disk failing under a node (I/O errors, torn writes, bit "
                               "flips): RAID serves from the others, then rebuilds"),
    "disk_slow": Budget(2.0, False, "a slow disk under a node: every I/O late, none refused"),
    "cut": Budget(0.5, False, "clients hanging up mid-request: the server never stops "
                              "serving, the other clients' ops go on"),
    "unheard": Budget(1.0, True, "a live node whose heartbeats are lost: fenced at the "
                                 "detection time and taken over"),
    "bus": Budget(1.0, False, "messages between Domain 0 and a guest dropped, delayed, "
                              "duplicated or reordered: client I/O does not cross that bus, "
                              "so nothing may stall for long"),
}
FIRST_CLOCK: dict[str, str] = {
    "kill": "kill", "kill_in_cp": "kill", "kill_pair": "kill", "kill_in_replay": "kill",
    "kill_after_assume": "kill", "kill_in_giveback": "kill",
    "pause_short": "hang", "pause_long": "hang",
    "disk_eio": "disk", "disk_torn": "disk", "disk_bitflip": "disk", "disk_slow": "disk_slow",
    "kill_in_rebuild": "kill",
    "client_cut": "cut",
    "heartbeat_loss": "unheard", "bus_drop": "bus", "bus_delay": "bus", "bus_dup": "bus",
    "bus_reorder": "bus",
}
# Faults that touch their target's identity alone (no node stops: the partner's is not moved)
OWN_IDENTITY_ONLY = {"client_cut"}
# Faults whose target is fenced by Domain 0, not killed by the nemesis.
FENCED_NOT_KILLED = ("pause_long", "heartbeat_loss")
DOWN = "down"  # a double failure before a node returns: out of service by design, not judged


@dataclass(frozen=True)
class Clock:
    identity: str
    start: float
    what: str  # a BUDGETS key, or DOWN
    fault: int
    kind: str
    target: str
    fault_end: float
    planned: frozenset[str] = frozenset()  # the nodes the fault killed or stopped


def _kills(f: dict[str, Any], events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Each kill the fault did, (node, mono), in order. The nemesis records them; a record
    without them (an older run) is read from the crash requests in the cluster's events."""
    if "kills" in f:
        return [(str(n), float(t)) for n, t in f["kills"]]
    if not f.get("killed") or f["kind"] in FENCED_NOT_KILLED:  # killed by its fencing
        return []
    lo, hi = float(f.get("started", f["mono"])), float(f["ended"])
    found = [(str(e["node"]), float(e["mono"])) for e in events
             if e.get("kind") == "crash_requested" and lo <= float(e["mono"]) <= hi]
    return found or [(f["target"], float(f["mono"]))]


def _return_of(ident: str, after: float, dead: set[str],
               events: list[dict[str, Any]]) -> float | None:
    """When the node that next served `ident` after the double failure at `after` registered
    again: the moment the failure's clock starts. Domain 0 holds an identity for an owner that
    is booting rather than hand it to a partner for a few seconds, so the first node back is
    not always the one that serves it."""
    for e in events:
        m = float(e.get("mono", 0.0))
        if m <= after or e.get("kind") not in ("assign", "partner_alerted") \
                or e.get("identity") != ident:
            continue
        if e.get("node") not in dead:
            return m  # a node that never went down took it (a ring's further heir)
        regs = [float(r["mono"]) for r in events
                if r.get("kind") == "registered" and r.get("node") == e.get("node")
                and after < float(r["mono"]) <= m]
        if regs:
            return regs[-1]
        # else: a takeover begun before the death reached Domain 0, logged just after it
    return None


def clocks(faults: list[dict[str, Any]], events: list[dict[str, Any]],
           partner: Callable[[str], str | None]) -> list[Clock]:
    out: list[Clock] = []
    for f in faults:
        if "skipped" in f or "mono" not in f or "ended" not in f or f["kind"] not in FIRST_CLOCK:
            continue
        start, end = float(f["mono"]), float(f["ended"])
        pair = {f["target"], partner(f["target"]) or f["target"]}
        touched = [f["target"], partner(f["target"])] + list(f.get("killed", []))
        touched += [partner(n) for n in f.get("killed", [])]
        idents = list(dict.fromkeys(t for t in touched if t))
        if f["kind"] in OWN_IDENTITY_ONLY:
            idents = [f["target"]]

        planned = frozenset(list(f.get("killed", [])) + [f.get("paused") or f["target"]])

        def clock(ident: str, at: float, what: str) -> Clock:
            return Clock(ident, at, what, int(f["index"]), f["kind"], f["target"], end, planned)

        out += [clock(i, start, FIRST_CLOCK[f["kind"]]) for i in idents]
        kills = _kills(f, events)
        regs = [(float(e["mono"]), str(e["node"])) for e in events
                if e.get("kind") == "registered" and start <= float(e["mono"]) <= end]
        dead: set[str] = set()
        last = start
        for j, (n, k) in enumerate(kills):
            dead -= {node for m, node in regs if last < m <= k}
            dead.add(n)
            last = k
            if j == 0:
                continue  # the fault's own moment: its first clock
            if pair <= dead:
                for i in idents:
                    out.append(clock(i, k, DOWN))
                    back = _return_of(i, k, dead, events)
                    if back is not None:
                        out.append(clock(i, back, "double"))
            else:
                out += [clock(i, k, "kill") for i in idents]
        for e in events:
            if e.get("kind") == "giveback_started" and start <= float(e["mono"]) <= end:
                # the releaser's own identity too: it ends with a CP of the one it gives back
                held = e.get("from")
                releaser = f"node{held}" if isinstance(held, int) else held
                for i in dict.fromkeys(x for x in (e.get("node"), releaser) if x):
                    out.append(clock(str(i), float(e["mono"]), "giveback"))
    return sorted(out, key=lambda c: (c.identity, c.start))


def _stretches(times: list[float], t0: float, t_end: float) -> list[tuple[float, float]]:
    """From each ok completion to the next, the run's start and end included."""
    edges = [t0] + [t for t in times if t0 < t < t_end] + [t_end]
    return list(zip(edges, edges[1:]))


def _outage(c: Clock, spans: list[tuple[float, float]], ends: list[float],
            w_end: float) -> tuple[float, float, float]:
    """The clock's longest stretch without an ok completion, clipped to its window
    [c.start, w_end): (length, from, to). Only stretches that began before its fault's
    healing was over (and a grace) count: a later stall is not this fault's."""
    best = (0.0, c.start, c.start)
    for a, b in spans[bisect_right(ends, c.start):]:
        if a >= w_end or a >= c.fault_end + GRACE_S:
            break
        lo, hi = max(a, c.start), min(b, w_end)
        if hi - lo > best[0]:
            best = (hi - lo, lo, hi)
    return best


def _unplanned(c: Clock, lo: float, hi: float, events: list[dict[str, Any]],
               t0: float) -> list[str]:
    """Nodes Domain 0 declared failed within [lo, hi] that the fault did not kill or stop:
    on a starved host, a partner that missed its heartbeats while it served two identities."""
    return [f"{e['node']} declared failed ({e.get('reason', '?')}) at t+{e['mono'] - t0:.1f}s"
            for e in events if e.get("kind") == "failure_detected"
            and lo <= float(e["mono"]) <= hi and e.get("node") not in c.planned]


def judge(ops: list[dict[str, Any]], faults: list[dict[str, Any]],
          events: list[dict[str, Any]], t0: float, t_end: float, detection_s: float,
          partner: Callable[[str], str | None], slack: float = 1.0) -> dict[str, Any]:
    """The run's availability: per identity figures, every clock's outage, and violations."""
    oks: dict[str, list[float]] = {}
    for op in ops:
        ident = op["block"].split("/", 1)[0]
        oks.setdefault(ident, [])
        if op["type"] == "ok":
            oks[ident].append(op["time"] / 1e9)
    by_ident: dict[str, list[Clock]] = {}
    for c in clocks(faults, events, partner):
        if c.identity in oks:
            by_ident.setdefault(c.identity, []).append(c)
    identities: dict[str, Any] = {}
    outages: list[dict[str, Any]] = []
    violations: list[dict[str, Any]] = []
    for ident, times in sorted(oks.items()):
        spans = _stretches(sorted(times), t0, t_end)
        ends = [b for _, b in spans]
        cs = [c for c in by_ident.get(ident, []) if c.start < t_end]
        for j, c in enumerate(cs):
            w_end = cs[j + 1].start if j + 1 < len(cs) else t_end
            gap, lo, hi = _outage(c, spans, ends, w_end)
            rec: dict[str, Any] = {"identity": ident, "fault": _fault(c), "what": c.what,
                                   "at_s": round(c.start - t0, 3), "gap_s": round(gap, 3),
                                   "from_s": round(lo - t0, 3), "to_s": round(hi - t0, 3)}
            if c.what in BUDGETS:
                rec["budget_s"] = round(BUDGETS[c.what].seconds(detection_s, slack), 3)
                if gap > rec["budget_s"]:
                    violations.append(dict(rec, unplanned=_unplanned(c, lo, hi, events, t0)))
            outages.append(rec)
        identities[ident] = _figures(ident, spans, cs, t0, slack, violations)
    violations.sort(key=lambda v: v["at_s"])
    return {"ok": not violations, "violations": violations, "identities": identities,
            "outages": outages}


def _figures(ident: str, spans: list[tuple[float, float]], cs: list[Clock], t0: float,
             slack: float, violations: list[dict[str, Any]]) -> dict[str, float]:
    """Per identity: seconds in stretches over GAP_S, how much of them a fault's clock
    accounts for; an unexplained stretch over its limit is added to `violations`."""
    down = explained = 0.0
    for a, b in spans:
        if b - a <= GAP_S:
            continue
        down += b - a
        hit = [c.start for c in cs if c.start < b and a < c.fault_end + GRACE_S]
        lone = b - a if not hit else max(0.0, min(hit) - a)  # before the first clock in it
        explained += (b - a) - lone
        if lone > UNEXPLAINED_S * slack and lone > GAP_S:
            violations.append({"identity": ident, "fault": None, "what": "unexplained",
                               "at_s": round(a - t0, 3), "gap_s": round(lone, 3),
                               "from_s": round(a - t0, 3), "to_s": round(a + lone - t0, 3),
                               "budget_s": round(UNEXPLAINED_S * slack, 3)})
    return {"unavailable_s": round(down, 3), "explained_s": round(explained, 3),
            "unexplained_s": round(down - explained, 3),
            "longest_s": round(max((b - a for a, b in spans if b - a > GAP_S), default=0.0), 3)}


def _fault(c: Clock) -> dict[str, Any]:
    return {"index": c.fault, "kind": c.kind, "target": c.target}


def describe(v: dict[str, Any]) -> str:
    """One violation in a line: which identity, how long, against what, and which fault."""
    f = v.get("fault")
    cause = (f"fault {f['index']}, {f['kind']} {f['target']}: "
             f"{_STAGE.get(v['what'], v['what'])}" if f else "unexplained: no fault near it")
    also = "".join(f"; {u}, not by the schedule" for u in v.get("unplanned", []))
    return (f"{v['identity']}: no op answered for {v['gap_s']:.2f}s from "
            f"t+{v.get('from_s', v['at_s']):.1f}s ({cause}), budget {v['budget_s']:.3g}s{also}")


_STAGE = {"kill": "after a kill", "hang": "after the hang", "giveback": "after a giveback",
          "double": "after a node came back from the double failure",
          "disk": "during the disk fault and its rebuild",
          "disk_slow": "during the slow disk",
          "cut": "while its clients hung up mid-request",
          "unheard": "after its heartbeats were lost", "bus": "during the bus fault"}
