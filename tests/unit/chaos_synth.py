"""Synthetic block histories made by simulating a correct register per block.

Processes issue reads and writes that take effect at a random moment inside their interval,
so every history made here is linearizable unless it is corrupted afterwards. Some writes fail
(not applied) or end as info (applied or not, at random; the process is then retired and a
fresh process id takes its place, as Jepsen does after a crash).

    python -m tests.unit.chaos_synth OUT.jsonl [OPS]   # a history file for `vmemu chaos check`
"""

from __future__ import annotations

import heapq
import random
import sys

from vmemu.chaos.history import Op, to_events, write_events


def simulate(n_ops: int, *, processes: int = 10, hot: int = 8, cold: int = 1000,
             hot_share: float = 0.5, seed: int = 0, fail_p: float = 0.01,
             info_p: float = 0.005) -> list[Op]:
    rnd = random.Random(seed)
    state: dict[str, str | None] = {}
    ops: list[Op] = []
    # heap of (time, seq, what, slot): "effect" applies the op, "done" completes it
    heap: list[tuple[int, int, str, int]] = []
    pending: dict[int, dict] = {}
    seq = 0
    next_pid = processes

    def start(pid: int, t: int) -> None:
        nonlocal seq
        if len(ops) + len(pending) >= n_ops:
            return
        block = (f"hot{rnd.randrange(hot)}" if rnd.random() < hot_share
                 else f"cold{rnd.randrange(cold)}")
        f = "write" if rnd.random() < 0.5 else "read"
        outcome = rnd.random()
        kind = "fail" if outcome < fail_p else "info" if outcome < fail_p + info_p else "ok"
        d1, d2 = rnd.randrange(0, 500_000), rnd.randrange(0, 500_000)
        seq += 1
        slot = seq
        pending[slot] = dict(pid=pid, f=f, block=block, value=f"p{pid}-{slot}" if f == "write"
                             else None, type=kind, invoke=t, complete=None)
        applies = kind == "ok" or (kind == "info" and rnd.random() < 0.5)
        heapq.heappush(heap, (t + d1, slot, "effect" if applies else "skip", slot))
        heapq.heappush(heap, (t + d1 + d2, slot, "done", slot))

    for pid in range(processes):
        start(pid, rnd.randrange(0, 100_000))
    while heap:
        t, _, what, slot = heapq.heappop(heap)
        p = pending[slot]
        if what == "effect":
            if p["f"] == "write":
                state[p["block"]] = p["value"]
            else:
                p["value"] = state.get(p["block"])
        elif what == "done":
            del pending[slot]
            if p["f"] == "read" and p["type"] != "ok":
                p["value"] = None
            complete = None if p["type"] == "info" and rnd.random() < 0.5 else t
            ops.append(Op(0, p["pid"], p["f"], p["block"], p["value"], p["type"], p["invoke"],
                          complete))
            pid = p["pid"]
            if p["type"] == "info":
                pid, next_pid = next_pid, next_pid + 1
            start(pid, t + rnd.randrange(1, 50_000))
    ops.sort(key=lambda op: op.invoke)
    return [Op(i, op.process, op.f, op.block, op.value, op.type, op.invoke, op.complete)
            for i, op in enumerate(ops)]


if __name__ == "__main__":
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with open(out, "w") as fp:
        write_events(to_events(simulate(n)), fp)
