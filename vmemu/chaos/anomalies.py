"""Naming what is wrong with a block, cheaply when it can be, and shrinking what cannot.

The named kinds are each a small pattern of ops that no linearization can contain, so finding
one proves the block invalid without a search. Each read R is judged by the write W_v of the
value v it returned (the value's only writer; the initial value counts as a write that
completed before time began). Reads of a value with several writers are left to the search.

  phantom      R returned a value that no write which may have taken effect ever wrote (nor
               the initial value); a value written only by failed writes is a phantom too.
  future-read  R returned v although W_v was invoked after R completed.
  stale        R returned v although a newer write W was known to have taken effect before R
               was invoked: W was invoked after W_v completed, and either W completed (ok)
               before R's invoke, or another read R' returned W's value and completed before
               R's invoke.
  lost         the stale pattern where W completed (was acknowledged) and no read, at any time,
               ever returned the value of a write invoked between W_v's completion and R's
               invoke: the writes R should have reflected, W among them, vanished (as when a
               failover drops acknowledged writes). When some read did return one of them the
               data survived somewhere and R is only stale.
  nonlinearizable  none of the above, but the search found no order: `shrink` reduces the
               block's ops to a small set that still cannot be ordered.

Which W is named: the latest-invoked write that qualifies (the one R most plainly missed). A
lost write is reported once, with the first read that showed it lost; each stale read is its
own anomaly.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence

from vmemu.chaos.history import Op
from vmemu.chaos.verdict import KINDS, Anomaly, describe
from vmemu.chaos.wgl import NEVER, OutOfBudget, kept

PER_KIND = 5  # anomalies listed per block and kind; the rest are only counted

_BEFORE_TIME = -1  # the initial value's "write" completed before any real time


def _prefix_best(items: list[tuple[int, int, Op]]) -> tuple[list[int], list[int], list[Op]]:
    """items (end time, key, op) -> sorted ends, running max of key, and the op holding it."""
    items.sort(key=lambda t: t[0])
    ends, best, who = [], [], []
    cur, cur_op = -(1 << 63), None
    for end, key, op in items:
        if key > cur:
            cur, cur_op = key, op
        ends.append(end)
        best.append(cur)
        who.append(cur_op)
    return ends, best, who  # type: ignore[return-value]


def _latest_before(table: tuple[list[int], list[int], list[Op]], t: int) -> tuple[int, Op | None]:
    """The max key (and its op) over items that ended strictly before t."""
    ends, best, who = table
    k = bisect_left(ends, t)
    return (best[k - 1], who[k - 1]) if k else (-(1 << 63), None)


def named_anomalies(block: str, ops: Sequence[Op], initial: str | None) -> tuple[list[Anomaly], int]:
    """The phantom, future-read, stale and lost reads of one block (the first PER_KIND of each
    kind), and how many more were found but not listed."""
    live = kept(ops)
    failed_writes = {op.value: op for op in ops if op.f == "write" and op.type == "fail"}
    writers: dict[str | None, list[Op]] = {}
    for op in live:
        if op.f == "write":
            writers.setdefault(op.value, []).append(op)
    reads = [op for op in live if op.f == "read"]

    def source(v: str | None) -> Op | None | str:
        """The one write of v, None for the initial value, 'phantom', or 'ambiguous'."""
        ws = writers.get(v, [])
        if v == initial:
            return None if not ws else "ambiguous"
        if not ws:
            return "phantom"
        return ws[0] if len(ws) == 1 else "ambiguous"

    def end(w: Op | None) -> int:
        if w is None:
            return _BEFORE_TIME
        return w.complete if w.type == "ok" and w.complete is not None else NEVER

    acked = _prefix_best([(w.complete, w.invoke, w) for w in live
                          if w.f == "write" and w.type == "ok" and w.complete is not None])
    # Reads that saw a write's value: (completion, that write's invoke). The invokes of the
    # writes ever seen decide lost versus stale.
    seen: list[tuple[int, int, Op]] = []
    for r in reads:
        src = source(r.value)
        if isinstance(src, Op):
            assert r.complete is not None
            seen.append((r.complete, src.invoke, r))
    seen_invokes = sorted({t[1] for t in seen})
    observed = _prefix_best(seen)

    def any_seen(after: int, before: int) -> bool:
        """Did any read return the value of a write invoked in (after, before)?"""
        k = bisect_right(seen_invokes, after)
        return k < len(seen_invokes) and seen_invokes[k] < before

    found: dict[str, list[Anomaly]] = {k: [] for k in KINDS}
    lost: set[int] = set()  # indexes of the writes found lost
    for r in reads:
        assert r.complete is not None
        src = source(r.value)
        if src == "ambiguous":
            continue
        if src == "phantom":
            fw = failed_writes.get(r.value)
            extra = f" written only by the failed {describe(fw)}" if fw else " no write wrote"
            found["phantom"].append(Anomaly(block, "phantom", (r,) if fw is None else (r, fw),
                                            f"{describe(r)} returned a value{extra}"))
            continue
        assert not isinstance(src, str)
        if src is not None and src.invoke > r.complete:
            found["future-read"].append(Anomaly(
                block, "future-read", (r, src),
                f"{describe(r)} completed before its value's {describe(src)} was invoked"))
            continue
        v_end = end(src)
        older = "the initial value" if src is None else f"the value of {describe(src)}"
        w_call, w = _latest_before(acked, r.invoke)
        if w is not None and w_call > v_end:
            ops_ = (r, w) if src is None else (r, src, w)
            if any_seen(v_end, r.invoke):
                found["stale"].append(Anomaly(
                    block, "stale", ops_, f"{describe(r)} returned {older} although the newer "
                    f"{describe(w)} had completed before it was invoked"))
            elif w.index not in lost:  # one anomaly a lost write, however many reads show it
                lost.add(w.index)
                found["lost"].append(Anomaly(
                    block, "lost", (w, r) if src is None else (w, src, r),
                    f"{describe(w)} completed, then {describe(r)} returned {older}, and no "
                    "read ever returned anything written in between"))
            continue
        o_call, r2 = _latest_before(observed, r.invoke)
        if r2 is not None and o_call > v_end:
            w2 = source(r2.value)
            assert isinstance(w2, Op)
            ops_ = (r, r2, w2) if src is None else (r, src, r2, w2)
            found["stale"].append(Anomaly(
                block, "stale", ops_,
                f"{describe(r)} returned {older} although the earlier {describe(r2)} had "
                f"already seen the newer {describe(w2)}"))
    listed = [a for k in KINDS for a in found[k][:PER_KIND]]
    return listed, sum(max(0, len(v) - PER_KIND) for v in found.values())


def without(ops: Sequence[Op], drop: set[int], initial: str | None) -> list[Op]:
    """ops minus those whose index is in `drop`, and minus the reads left without a writer:
    taking a write away must not leave its readers behind as phantoms."""
    rest = [op for op in ops if op.index not in drop]
    values = {op.value for op in rest if op.f == "write"}
    return [op for op in rest if op.f == "write" or op.value == initial or op.value in values]


def shrink(ops: Sequence[Op], initial: str | None,
           fails: Callable[[list[Op]], bool]) -> tuple[list[Op], bool]:
    """A small subset of `ops` (which must fail) that still fails, and whether it is minimal.

    `fails(subset)` is True when the subset cannot be linearized; it raises OutOfBudget when it
    cannot tell, which ends the shrinking with what has been shown so far (a subset that
    fails, not shown minimal). Steps: the shortest failing prefix (by invoke), the latest
    failing start, then removing chunks of halving size (delta debugging) down to single ops.
    """
    core = sorted(kept(ops), key=lambda op: (op.invoke, op.index))
    closed = without(core, set(), initial)
    if len(closed) < len(core):  # a read of a value nobody wrote fails on its own
        still = {op.index for op in closed}
        return [next(op for op in core if op.index not in still)], True
    try:
        core = _shortest_prefix(core, initial, fails)
        core = _latest_start(core, initial, fails)
        chunk = max(1, len(core) // 2)
        while True:
            i, removed = 0, False
            while i < len(core):
                trial = without(core, {op.index for op in core[i:i + chunk]}, initial)
                if len(trial) < len(core) and fails(trial):
                    core, removed = trial, True
                else:
                    i += chunk
            if chunk == 1 and not removed:
                return core, True
            if not removed:
                chunk = max(1, chunk // 2)
    except OutOfBudget:
        return core, False


def _shortest_prefix(core: list[Op], initial: str | None,
                     fails: Callable[[list[Op]], bool]) -> list[Op]:
    def prefix(k: int) -> list[Op]:
        return without(core[:k], set(), initial)

    hi = 8
    while hi < len(core) and not fails(prefix(hi)):
        hi *= 2
    if hi >= len(core):
        hi = len(core)
    lo = hi // 2 if hi > 8 else 0  # prefix(lo) passed, or is empty
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(prefix(mid)):
            hi = mid
        else:
            lo = mid
    return prefix(hi)


def _latest_start(core: list[Op], initial: str | None,
                  fails: Callable[[list[Op]], bool]) -> list[Op]:
    def suffix(k: int) -> list[Op]:
        return without(core, {op.index for op in core[:k]}, initial)

    lo, hi = 0, len(core)  # suffix(lo) fails; suffix(hi) is empty, which passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(suffix(mid)):
            lo = mid
        else:
            hi = mid
    return suffix(lo)
