"""Bus faults: messages between Domain 0 and one guest dropped, delayed, duplicated, reordered.

For the chaos campaign (vmemu/chaos: `bus_*` and `heartbeat_loss`). Two pure parts, no socket
and no clock of their own (`now` is always passed in):

- `Rules`: the rules one process (Domain 0, or a guest) holds. A rule names one guest's
  traffic, a direction (`to_guest`: Domain 0's requests and its replies to the guest;
  `to_dom0`: heartbeats, reports, the guest's calls and its replies), optionally some ops
  only (`ops`) or all but some (`skip_ops`), and what to do to a matching message: drop it
  (`drop` probability), send it twice (`dup`), hold it (`delay_ms` +- `jitter_ms`) or shuffle
  it with the next few (`reorder` window, at most `reorder_ms`). Every rule has a deadline
  (`duration_s`, at most MAX_DURATION_S) after which it is gone on its own: a chaos driver
  that dies must not leave a cluster deaf for good.
- `Tap`: one per socket. It asks the rules what to do with each message and keeps what it
  must hold in a small bounded queue that the socket's owning loop empties (`due`): no thread
  sleeps per message, and a full queue lets messages through at once (counted) rather than
  grow.

Reproducible: each (rule, direction, op) stream draws from its own generator seeded from
the rule's seed, and draws the same count per message, so the n-th heartbeat of a rule meets
the same fate every run whatever other traffic interleaves with it.

Off by default: a socket's `tap` is None and its hot path pays one attribute check.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from vmemu.errors import BadRequest

TO_GUEST, TO_DOM0 = "to_guest", "to_dom0"
DIRECTIONS = (TO_GUEST, TO_DOM0, "both")
SIDES = ("dom0", "guest")
MAX_DURATION_S = 600.0
MAX_DELAY_MS = 10_000.0
MAX_REORDER = 64
MAX_RULES = 32  # per process
MAX_OPS = 32  # names in a rule's ops or skip_ops
HOLD_MAX = 4096  # messages one tap holds at most
# Every op that travels between Domain 0 and a guest, the names a rule may scope itself to:
# the guest's reports and calls (Domain 0's GUEST_OPS), Domain 0's requests to a guest
# (domains/guest.py `_control`, domains/rdb_host.py `RdbHost.OPS`). tests/unit/test_bus_faults.py
# keeps this list in step with those.
BUS_OPS = frozenset({
    "heartbeat", "event", "grants", "mirror_state",
    "assign", "release", "map", "probe_write", "stall", "shutdown", "status", "manage",
    "rdb_state", "rdb_propose", "rdb_apply", "rdb_catch_up", "rdb_rebuild", "rdb_query",
})
# The request that sets and clears faults is never faulted: clearing must always get through.
EXEMPT = frozenset({"bus_fault"})
# What a request may carry: the rule's fields, and the envelope Domain 0 reads.
FIELDS = frozenset({"direction", "ops", "skip_ops", "drop", "dup", "delay_ms", "jitter_ms",
                    "reorder", "reorder_ms", "duration_s", "seed"})
ENVELOPE = frozenset({"node", "side", "clear"})
COUNTERS = ("matched", "dropped", "duplicated", "delayed", "reordered", "overflow")


@dataclass(frozen=True)
class Rule:
    id: int
    node: int
    direction: str  # TO_GUEST, TO_DOM0 or "both"
    ops: frozenset[str]  # empty: every op
    skip_ops: frozenset[str]
    drop: float
    dup: float
    delay_ms: float
    jitter_ms: float
    reorder: int  # window in messages, 0: off
    reorder_ms: float  # a window is let go after this long even if not full
    duration_s: float
    seed: int
    until: float  # CLOCK_MONOTONIC deadline

    def matches(self, direction: str, node: int, op: str) -> bool:
        return (node == self.node and self.direction in (direction, "both")
                and (not self.ops or op in self.ops) and op not in self.skip_ops)

    def spec(self) -> dict[str, Any]:
        """The fields a rule was made from (what Domain 0 forwards to a guest)."""
        return {"direction": self.direction, "ops": sorted(self.ops),
                "skip_ops": sorted(self.skip_ops), "drop": self.drop, "dup": self.dup,
                "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms,
                "reorder": self.reorder, "reorder_ms": self.reorder_ms,
                "duration_s": self.duration_s, "seed": self.seed}


def _number(args: Mapping[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    v = args.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise BadRequest(f"bus_fault: {name} must be a number in {lo:g}..{hi:g}, not {v!r}")
    return float(v)


def _names(args: Mapping[str, Any], name: str, known: Collection[str]) -> frozenset[str]:
    v = args.get(name, [])
    if not isinstance(v, list) or len(v) > MAX_OPS or not all(isinstance(x, str) for x in v):
        raise BadRequest(f"bus_fault: {name} must be a list of at most {MAX_OPS} op names")
    bad = sorted(x for x in v if x not in known)
    if bad:
        raise BadRequest(f"bus_fault: unknown op {bad[0][:40]!r} in {name} "
                         f"(known: {', '.join(sorted(known))})")
    return frozenset(v)


def parse(args: Mapping[str, Any], node: int, known_ops: Collection[str], now: float,
          rule_id: int) -> Rule:
    """A rule from a request's arguments (untrusted), or BadRequest naming the first field
    that is wrong. `node` is resolved and range-checked by the caller."""
    extra = sorted(k for k in args if k not in FIELDS and k not in ENVELOPE)
    if extra:
        raise BadRequest(f"bus_fault: unknown field {str(extra[0])[:40]!r} "
                         f"(fields: {', '.join(sorted(FIELDS))})")
    direction = args.get("direction", "both")
    if direction not in DIRECTIONS:
        raise BadRequest(f"bus_fault: direction must be one of {', '.join(DIRECTIONS)}")
    ops = _names(args, "ops", known_ops)
    skip = _names(args, "skip_ops", known_ops)
    reorder = args.get("reorder", 0)
    if isinstance(reorder, bool) or not isinstance(reorder, int) \
            or not (reorder == 0 or 2 <= reorder <= MAX_REORDER):
        raise BadRequest(f"bus_fault: reorder must be 0 (off) or a window of 2..{MAX_REORDER}"
                         f" messages, not {reorder!r}")
    if "duration_s" not in args:
        raise BadRequest("bus_fault: duration_s is required (a rule always ends on its own)")
    seed = args.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest("bus_fault: seed must be an integer in 0..2**63-1")
    rule = Rule(
        id=rule_id, node=node, direction=direction, ops=ops, skip_ops=skip,
        drop=_number(args, "drop", 0.0, 1.0, 0.0), dup=_number(args, "dup", 0.0, 1.0, 0.0),
        delay_ms=_number(args, "delay_ms", 0.0, MAX_DELAY_MS, 0.0),
        jitter_ms=_number(args, "jitter_ms", 0.0, MAX_DELAY_MS, 0.0),
        reorder=reorder, reorder_ms=_number(args, "reorder_ms", 1.0, MAX_DELAY_MS, 100.0),
        duration_s=_number(args, "duration_s", 0.001, MAX_DURATION_S, math.nan),
        seed=seed, until=0.0)
    if not (rule.drop or rule.dup or rule.delay_ms or rule.jitter_ms or rule.reorder):
        raise BadRequest("bus_fault: the rule does nothing (give drop, dup, delay_ms, "
                         "jitter_ms or reorder)")
    return dataclasses.replace(rule, until=now + rule.duration_s)


@dataclass
class Decision:
    """What becomes of one message: `delays` has one entry per copy to deliver (none:
    dropped; two: duplicated), each in seconds (0: at once)."""

    rule: int
    delays: tuple[float, ...]
    reorder: int
    reorder_s: float
    rng: random.Random


@dataclass
class _Installed:
    rule: Rule
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    streams: dict[tuple[str, str], random.Random] = field(default_factory=dict)


class Rules:
    """The fault rules of one process. Installed rules are kept in a tuple replaced whole,
    so a heartbeat thread reading it never sees one half-changed."""

    def __init__(self) -> None:
        self._rules: tuple[_Installed, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._rules)

    def install(self, rule: Rule) -> Rule:
        if len(self._rules) >= MAX_RULES:
            raise BadRequest(f"bus_fault: {MAX_RULES} rules are in force already; clear some")
        self._rules = self._rules + (_Installed(rule),)
        return rule

    def clear(self, node: int | None = None) -> list[dict[str, Any]]:
        """Remove the rules of `node` (all when None); their final views."""
        gone = [r for r in self._rules if node is None or r.rule.node == node]
        self._rules = tuple(r for r in self._rules if r not in gone)
        return [_view(r, None) for r in gone]

    def expire(self, now: float) -> list[dict[str, Any]]:
        """Remove the rules past their deadline; their final views."""
        if not self._rules:
            return []
        gone = [r for r in self._rules if now >= r.rule.until]
        if gone:
            self._rules = tuple(r for r in self._rules if r not in gone)
        return [_view(r, None) for r in gone]

    def view(self, now: float | None = None) -> list[dict[str, Any]]:
        return [_view(r, now) for r in self._rules]

    def count(self, rule: int, what: str, n: int = 1) -> None:
        for r in self._rules:
            if r.rule.id == rule:
                r.counts[what] += n

    def decide(self, direction: str, node: int, op: str, now: float) -> Decision | None:
        """The first rule in force that matches, applied to one message; None: untouched."""
        if op in EXEMPT:
            return None
        for inst in self._rules:
            rule = inst.rule
            if now >= rule.until or not rule.matches(direction, node, op):
                continue
            rng = inst.streams.get((direction, op))
            if rng is None:
                rng = inst.streams[(direction, op)] = random.Random(
                    f"{rule.seed}/{rule.id}/{direction}/{op}")
            # Always four draws a message: the n-th message's fate depends on n alone.
            u_drop, u_dup, j1, j2 = rng.random(), rng.random(), rng.random(), rng.random()
            c = inst.counts
            c["matched"] += 1
            if u_drop < rule.drop:
                c["dropped"] += 1
                return Decision(rule.id, (), 0, 0.0, rng)
            copies = (j1, j2) if u_dup < rule.dup else (j1,)
            if len(copies) == 2:
                c["duplicated"] += 1
            delays = tuple(max(0.0, rule.delay_ms + (2 * j - 1) * rule.jitter_ms) / 1000.0
                           for j in copies)
            if rule.reorder:
                c["reordered"] += len(copies)
            elif any(delays):
                c["delayed"] += len(copies)
            return Decision(rule.id, delays, rule.reorder, rule.reorder_ms / 1000.0, rng)
        return None


def _view(inst: _Installed, now: float | None) -> dict[str, Any]:
    r = inst.rule
    out: dict[str, Any] = {"rule": r.id, "node": f"node{r.node}", **r.spec(), **inst.counts}
    if now is not None:
        out["left_s"] = round(max(0.0, r.until - now), 3)
    return out


class Tap:
    """One socket's share of the faults: what to pass now, what to hold, what is due.

    Items are opaque (a frame, a decoded message, a tagged pair): the socket wrapper knows
    what to do with what comes back.
    """

    def __init__(self, rules: Rules, limit: int = HOLD_MAX) -> None:
        self.rules = rules
        self.limit = limit
        self._held: list[tuple[float, int, Any]] = []  # heap of (due, seq, item)
        self._windows: dict[int, tuple[float, list[Any], random.Random]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._held) + sum(len(w[1]) for w in self._windows.values())

    def admit(self, direction: str, node: int, op: str, item: Any, now: float) -> list[Any]:
        """What to deliver now, in order (empty: dropped or held)."""
        if not self.rules:
            return [item]
        d = self.rules.decide(direction, node, op, now)
        if d is None:
            return [item]
        out: list[Any] = []
        for delay in d.delays:
            if len(self) >= self.limit:
                self.rules.count(d.rule, "overflow")
                out.append(item)  # bounded: a full queue lets it through, never grows
            elif d.reorder:
                due, items, rng = self._windows.get(d.rule, (now + d.reorder_s, [], d.rng))
                items.append(item)
                self._windows[d.rule] = (due, items, rng)
                if len(items) >= d.reorder:
                    out += self._let_go(d.rule)
            elif delay > 0:
                heapq.heappush(self._held, (now + delay, next(self._seq), item))
            else:
                out.append(item)
        return out

    def _let_go(self, rule: int) -> list[Any]:
        _, items, rng = self._windows.pop(rule)
        rng.shuffle(items)
        return items

    def due(self, now: float) -> list[Any]:
        """Held items whose time has come, in the order to deliver them."""
        out: list[Any] = []
        while self._held and self._held[0][0] <= now:
            out.append(heapq.heappop(self._held)[2])
        for rule in [r for r, w in self._windows.items() if w[0] <= now]:
            out += self._let_go(rule)
        return out

    def next_due(self) -> float | None:
        times = [w[0] for w in self._windows.values()]
        if self._held:
            times.append(self._held[0][0])
        return min(times) if times else None
