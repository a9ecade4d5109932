"""No split brain: a node that is alive when it is declared failed is fenced before its
identity moves, and nobody serves that identity between the fence and the takeover.

Judged for each fault that leaves its target running while Domain 0 gives up on it:
`heartbeat_loss` (alive and serving, unheard) and `pause_long` (stopped, then woken after
the takeover). From the cluster's events and the clients' ops, both CLOCK_MONOTONIC:

- `moved_before_fence`: another node was told to take the identity (`partner_alerted` or
  `assign`) or assumed it before Domain 0's `fenced` of the target, or with no fence at all
  in the fault;
- `served_while_fenced`: an op on the identity invoked after the fence completed `ok`
  before another node assumed it. Nobody may serve it then: the old owner is dead (SIGKILL,
  reaped, disks stamped to a new epoch) and the new one has not bound it.

Linearizability would often catch a split brain too, but only if the two servers' writes
happened to be read in a way no order explains; this is the direct check, and it names
the fault. Pure: ops, applied faults and events in, violations out.
"""

from __future__ import annotations

from typing import Any

JUDGED = ("heartbeat_loss", "pause_long")
MOVES = ("partner_alerted", "assign", "identity_assumed")
SHOWN = 5  # ops listed per violation


def _completed(ops: list[dict[str, Any]]) -> list[tuple[str, float, float, dict[str, Any]]]:
    """(identity, invoke s, ok completion s, the op) of every op completed ok."""
    open_: dict[Any, dict[str, Any]] = {}
    out = []
    for op in ops:
        if op.get("type") == "invoke":
            open_[op.get("process")] = op
        elif op.get("type") == "ok":
            inv = open_.pop(op.get("process"), None)
            if inv is not None:
                out.append((str(op["block"]).split("/", 1)[0], inv["time"] / 1e9,
                            op["time"] / 1e9, op))
        else:
            open_.pop(op.get("process"), None)
    return out


def judge(ops: list[dict[str, Any]], faults: list[dict[str, Any]],
          events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = None
    out: list[dict[str, Any]] = []
    for f in faults:
        if f.get("kind") not in JUDGED or "skipped" in f or "mono" not in f:
            continue
        if f["kind"] == "pause_long" and not f.get("fenced_while_stopped"):
            continue  # woke before any fence: nothing moved, nothing to judge
        target, lo = f["target"], float(f["mono"])
        hi = float(f.get("ended", float("inf")))
        evs = [e for e in events if lo <= float(e.get("mono", -1)) <= hi]
        fence = next((e for e in evs if e.get("kind") == "fenced"
                      and e.get("node") == target), None)
        moves = [e for e in evs if e.get("kind") in MOVES and e.get("identity") == target
                 and e.get("node") != target]
        fault = {"index": f.get("index"), "kind": f["kind"], "target": target}
        early = [e for e in moves if fence is None or float(e["mono"]) < float(fence["mono"])]
        if early:
            e = early[0]
            out.append({"fault": fault, "what": "moved_before_fence",
                        "detail": f"{e['kind']} of {target} by {e.get('node')} at "
                                  f"{float(e['mono']):.6f}, " + (
                                      f"fenced only at {float(fence['mono']):.6f}" if fence
                                      else "never fenced in the fault")})
        assumed = next((e for e in moves if e.get("kind") == "identity_assumed"
                        and (fence is None or float(e["mono"]) > float(fence["mono"]))), None)
        if fence is None or assumed is None:
            continue
        t_fence, t_assumed = float(fence["mono"]), float(assumed["mono"])
        done = _completed(ops) if done is None else done
        served = [op for ident, inv, comp, op in done
                  if ident == target and inv > t_fence and comp < t_assumed]
        if served:
            out.append({"fault": fault, "what": "served_while_fenced",
                        "detail": f"{len(served)} op(s) on {target} invoked after its fence "
                                  f"({t_fence:.6f}) answered ok before {assumed.get('node')} "
                                  f"assumed it ({t_assumed:.6f})",
                        "ops": served[:SHOWN]})
    return out


def describe(v: dict[str, Any]) -> str:
    f = v["fault"]
    return f"fault {f['index']}, {f['kind']} {f['target']}: {v['what']}: {v['detail']}"
