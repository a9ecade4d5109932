"""Register linearizability of one block's ops: Wing and Gong's search with Lowe's memoisation.

The search walks a time-ordered list of call and return entries. At a call it tries to
linearize that op now (the register model must accept it: a write always, a read only if it
returns the current value); at a return whose op is not yet linearized it backtracks. Linearized
ops are lifted out of the list (with their return entries), so the scan from the head only ever
sees ops that are pending, and a cache of (set of linearized ops, state) pairs, the set a Python
int used as a bitset, keeps the search from exploring the same configuration twice. This is the
algorithm Porcupine implements; the entries live here in two int arrays (next, prev) instead of
node objects because that is what CPython walks fastest.

Two prunings, both exact for a register, make it usable in Python on blocks with thousands of
ops and tens of concurrent processes (without them a 20k-op block of 10 processes is out of reach
within 10 s; with them it takes well under one):
  * a pending read that returns the current state is linearized at once, with no alternative
    tried: every op that must precede it already is, and it leaves the state as it was, so
    if any linearization exists one exists with the read here;
  * a write may not overwrite a value that still has reads to linearize and no writer left
    to bring it back: those reads could never be linearized.

Semantics of the ops given (see `prepare`):
  * a failed write is dropped (definitely not applied), as are failed and info reads (they
    constrain nothing);
  * an info write may take effect at any time after its invoke: its interval never ends;
  * two ops are ordered in real time only if one completes strictly before the other is
    invoked (at equal times a call is sorted before a return, so they count as concurrent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from vmemu.chaos.history import Op

NEVER = 1 << 62  # the end of an interval that has none: after every real time
CHECK_EVERY = 4096  # search steps between two looks at the clock: the budget costs ~nothing
DEFAULT_MAX_STATES = 1_000_000  # memoised configurations before giving up (memory, not time)


class OutOfBudget(Exception):
    """The search ran out of time or of room for its cache: no verdict."""


class Interval(NamedTuple):
    """An op as the search sees it: when it may take effect, and what it does."""

    call: int
    ret: int
    write: bool
    value: str | None


def kept(ops: Sequence[Op]) -> list[Op]:
    """The ops that constrain the register: ok or info writes, ok reads."""
    return [op for op in ops
            if (op.type == "ok" if op.f == "read" else op.type != "fail")]


def prepare(ops: Sequence[Op], initial: str | None) -> list[Interval]:
    """Kept ops -> intervals, with info writes made cheap to search without changing the answer.

    An info write stays open to the end, and every open write is a branch the search may try at
    every later step. Two equivalences keep that cheap. An info write whose value nobody read
    is dropped: linearize it last and no read sees it, so it can neither make nor break a
    linearization. An info write whose value was read, being that value's only writer, must
    take effect before every read of it, so its interval may end at the earliest such read's
    completion: any linearization of one form is one of the other.
    """
    ops = kept(ops)
    writers: dict[str | None, int] = {}
    first_read: dict[str | None, int] = {}
    for op in ops:
        if op.f == "write":
            writers[op.value] = writers.get(op.value, 0) + 1
        elif op.complete is not None:
            end = first_read.get(op.value)
            first_read[op.value] = op.complete if end is None else min(end, op.complete)
    out: list[Interval] = []
    for op in ops:
        if op.f == "read":
            assert op.complete is not None  # an ok op has completed
            out.append(Interval(op.invoke, op.complete, False, op.value))
        elif op.type == "ok":
            assert op.complete is not None
            out.append(Interval(op.invoke, op.complete, True, op.value))
        elif op.value in first_read:
            ret = NEVER
            if writers[op.value] == 1 and op.value != initial:
                ret = max(op.invoke, first_read[op.value])
            out.append(Interval(op.invoke, ret, True, op.value))
        # else: an info write nobody read, dropped
    return out


def linearizable(ivs: Sequence[Interval], initial: str | None, *,
                 deadline: float | None = None, clock: Callable[[], float] | None = None,
                 max_states: int = DEFAULT_MAX_STATES) -> bool:
    """True if some order of `ivs` respecting real time is a legal register history starting
    from `initial`; False if none is. Raises OutOfBudget past `deadline` (by `clock`) or
    `max_states` memoised configurations: never a guess."""
    n = len(ivs)
    if n == 0:
        return True
    # Entry 2i is op i's call, 2i+1 its return; entry 2n is the head; -1 ends the list.
    order = sorted(range(2 * n), key=lambda e: (ivs[e >> 1].ret if e & 1 else ivs[e >> 1].call,
                                                e & 1))
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for e in order:
        nxt[last] = e
        prv[e] = last
        last = e
    write = [iv.write for iv in ivs]
    ids: dict[str | None, int] = {initial: 0}  # values as small ints: cheap to hash, compare
    value = [ids.setdefault(iv.value, len(ids)) for iv in ivs]
    # Per value: reads and writes not yet linearized. A value with reads left but no writer
    # left must not be overwritten: nothing could bring it back for those reads.
    reads_left = [0] * len(ids)
    writers_left = [0] * len(ids)
    for i in range(n):
        (writers_left if write[i] else reads_left)[value[i]] += 1

    state = 0  # the id of `initial`
    lin = 0  # bit i set: op i is linearized
    cache: set[tuple[int, int]] = set()
    # (call entry, state before it, forced): a forced step had no alternative worth trying
    stack: list[tuple[int, int, bool]] = []
    steps = 0
    e = nxt[head]
    while True:
        steps += 1
        if steps % CHECK_EVERY == 0:
            if deadline is not None and clock is not None and clock() > deadline:
                raise OutOfBudget("time")
            if len(cache) > max_states:
                raise OutOfBudget("states")
        forced = False
        if e == nxt[head]:
            # Before branching, look for a pending read that returns the current state:
            # linearizing it now can never hurt (every op that must precede it already has,
            # and it leaves the state as it is), so it is taken with no alternative, and if
            # what follows fails, so does this configuration.
            f = e
            while f != -1 and f & 1 == 0:
                if not write[f >> 1] and value[f >> 1] == state:
                    e, forced = f, True
                    break
                f = nxt[f]
        if e & 1 == 0:  # a call: try to linearize op i here
            i = e >> 1
            if write[i]:
                new = value[i]
                if reads_left[state] and not writers_left[state] and new != state:
                    e = nxt[e]
                    continue
            elif value[i] == state:
                new = state
            else:
                e = nxt[e]
                continue
            key = (lin | (1 << i), new)
            if key in cache:
                if not forced:
                    e = nxt[e]
                    continue
                # explored before and failed: so does this configuration; fall to backtrack
            else:
                cache.add(key)
                stack.append((e, state, forced))
                state = new
                lin = key[0]
                (writers_left if write[i] else reads_left)[new] -= 1
                # lift the call and its return out of the list
                r = e + 1
                nxt[prv[e]] = nxt[e]
                prv[nxt[e]] = prv[e]
                nxt[prv[r]] = nxt[r]
                if nxt[r] != -1:
                    prv[nxt[r]] = prv[r]
                e = nxt[head]
                if e == -1:
                    return True
                continue
        # A return whose op is not linearized (or a configuration known to fail): undo the
        # latest choice that had an alternative, and try the next entry after it.
        while True:
            if not stack:
                return False
            e, state, was_forced = stack.pop()
            lin ^= 1 << (e >> 1)
            (writers_left if write[e >> 1] else reads_left)[value[e >> 1]] += 1
            r = e + 1
            nxt[prv[r]] = r
            if nxt[r] != -1:
                prv[nxt[r]] = r
            nxt[prv[e]] = e
            prv[nxt[e]] = e
            if not was_forced:
                break
        e = nxt[e]
