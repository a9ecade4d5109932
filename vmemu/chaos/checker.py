"""Per-block register linearizability of a history: the verdict of a chaos run.

Each block is an independent register (linearizability is compositional), so the history is
partitioned by block and each block checked alone, first for the cheap named anomalies
(anomalies.py), then, if none, by the search (wgl.py) within a time budget. A block that runs
out of budget is "unknown": reported as such and never counted as a pass. A block the search
proves invalid is shrunk to a small set of ops that cannot be ordered (with a budget of its
own: the proof is already made, the shrinking only makes it readable).

Pure: no I/O; the clock is a parameter so tests can run out of time deterministically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from vmemu.chaos.anomalies import named_anomalies, shrink
from vmemu.chaos.history import Op
from vmemu.chaos.verdict import Anomaly, BlockResult, Verdict, describe
from vmemu.chaos.wgl import DEFAULT_MAX_STATES, OutOfBudget, kept, linearizable, prepare

DEFAULT_BUDGET = 10.0  # seconds of search per block
Clock = Callable[[], float]
Initial = Mapping[str, "str | None"] | Callable[[str], "str | None"] | None


def initial_of(initial: Initial, block: str) -> str | None:
    if initial is None:
        return None
    if callable(initial):
        return initial(block)
    return initial.get(block)


def search(ops: Sequence[Op], initial: str | None = None, *, budget: float = DEFAULT_BUDGET,
           clock: Clock = time.monotonic, max_states: int = DEFAULT_MAX_STATES) -> bool | None:
    """The bare search over one block's ops (no named anomalies): True linearizable, False
    not, None out of budget."""
    try:
        return linearizable(prepare(ops, initial), initial, deadline=clock() + budget,
                            clock=clock, max_states=max_states)
    except OutOfBudget:
        return None


def check_block(block: str, ops: Sequence[Op], initial: str | None = None, *,
                budget: float = DEFAULT_BUDGET, clock: Clock = time.monotonic,
                max_states: int = DEFAULT_MAX_STATES, named: bool = True,
                shrink_budget: float | None = None) -> BlockResult:
    """One block's ops (all on `block`) -> BlockResult: valid True, False or "unknown".

    `named=False` skips the cheap named anomalies (the search alone decides; tests compare
    both ways). `shrink_budget` (default: `budget`) bounds the shrinking of a
    nonlinearizable block.
    """
    start = clock()
    n = len(kept(ops))
    if named:
        found, omitted = named_anomalies(block, ops, initial)
        if found:
            return BlockResult(block, False, n, found, omitted, clock() - start)
    result = search(ops, initial, budget=budget, clock=clock, max_states=max_states)
    if result is not False:
        return BlockResult(block, "unknown" if result is None else True, n,
                           seconds=clock() - start)
    deadline = clock() + (budget if shrink_budget is None else shrink_budget)

    def fails(subset: list[Op]) -> bool:
        return not linearizable(prepare(subset, initial), initial, deadline=deadline,
                                clock=clock, max_states=max_states)

    core, minimal = shrink(ops, initial, fails)
    return BlockResult(block, False, n, [_unordered(block, core, minimal)],
                       seconds=clock() - start)


def _unordered(block: str, core: list[Op], minimal: bool) -> Anomaly:
    shown = "; ".join(describe(op) for op in core[:6])
    more = f"; and {len(core) - 6} more" if len(core) > 6 else ""
    what = "no" if minimal else "no (not shown minimal)"
    return Anomaly(block, "nonlinearizable", tuple(core),
                   f"{what} order of these {len(core)} ops is a legal register history: "
                   f"{shown}{more}", minimal)


def by_block(ops: Iterable[Op]) -> dict[str, list[Op]]:
    blocks: dict[str, list[Op]] = {}
    for op in ops:
        blocks.setdefault(op.block, []).append(op)
    return blocks


def check(ops: Iterable[Op], *, initial: Initial = None, budget: float = DEFAULT_BUDGET,
          clock: Clock = time.monotonic, max_states: int = DEFAULT_MAX_STATES,
          named: bool = True, shrink_budget: float | None = None) -> Verdict:
    """A whole history's Ops -> Verdict. `initial` gives a block's value before the history
    (a mapping, or a function of the block); absent, every block starts never written
    (null). `budget` is seconds of search per block."""
    blocks = by_block(ops)
    results = [check_block(b, bops, initial_of(initial, b), budget=budget, clock=clock,
                           max_states=max_states, named=named, shrink_budget=shrink_budget)
               for b, bops in sorted(blocks.items())]
    return Verdict.of(results, sum(len(v) for v in blocks.values()))
