"""The bus faults of a chaos run (`bus_*`, `heartbeat_loss`), done through Domain 0's
`bus_fault` control op (vmemu/hypervisor/bus_faults.py), on its side or the guest's.

- `bus_drop`, `bus_delay`, `bus_dup`, `bus_reorder`: a rule on the target's traffic with
  Domain 0, both ways, for `hold_s`. Client I/O does not cross that bus, so while it holds,
  the nemesis makes control traffic that does: explicit consistency points of the target's
  identity through Domain 0 (`manage cp`, short timeouts), some of which the rule loses,
  doubles, holds or shuffles. The rule is then left to end on its own (its
  `bus_fault_expired` event is waited for): a driver that died would leave it the same way.
- `heartbeat_loss`: every heartbeat of the target dropped (to Domain 0), the guest alive
  and serving meanwhile. Domain 0 must declare it failed at the detection time and fence it
  (SIGKILL) before its partner is told to take its identity; vmemu/chaos/fencing.py judges
  that order, and that nobody served the identity in between, from the run's files.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from vmemu.bus.faults import COUNTERS
from vmemu.errors import VmemuError

if TYPE_CHECKING:
    from vmemu.chaos.schedule import Fault

POKE_TIMEOUT_S = 1.5  # an explicit CP through a faulty bus: answered, or counted lost
POKE_EVERY_S = 0.3


class BusNemesis:
    """Mixed into Nemesis (nemesis.py): `c`, `detection_s`, `alive`, `wait_event`, `tail`."""

    c: Any
    detection_s: float
    alive: Callable[[], bool]
    tail: Any
    wait_event: Callable[..., dict]

    def _bus_rule(self, f: "Fault") -> dict[str, Any]:
        p = f.params
        if f.kind == "bus_drop":  # heartbeats spared: losing them is heartbeat_loss
            return {"drop": float(p.get("drop", 0.4)), "skip_ops": ["heartbeat"]}
        if f.kind == "bus_delay":
            ms = self.detection_s * 1000 * float(p.get("delay", 0.2))
            return {"delay_ms": round(ms, 1), "jitter_ms": round(ms / 2, 1)}
        if f.kind == "bus_dup":
            return {"dup": float(p.get("dup", 1.0))}
        # bus_reorder: a window lets go at most 0.2 x detection late
        return {"reorder": int(p.get("window", 4)),
                "reorder_ms": round(self.detection_s * 1000 * 0.2, 1)}

    def _bus(self, f: "Fault", pid: int) -> dict[str, Any]:
        side = str(f.params.get("side", "dom0"))
        hold = float(f.params.get("hold_s", 3.0))
        t = time.monotonic()
        res = self.c.control.call("bus_fault", {
            "node": f.target, "side": side, "direction": "both", "duration_s": hold,
            "seed": int(f.params.get("seed", 0)), **self._bus_rule(f)})
        rule = res["rule"]["rule"]
        pokes = answered = 0
        while time.monotonic() < t + hold and self.alive():
            pokes += 1
            try:
                self.c.control.call("manage", {"what": "cp", "node": f.target,
                                               "timeout": POKE_TIMEOUT_S},
                                    timeout=POKE_TIMEOUT_S + 5)
                answered += 1
            except VmemuError:
                pass  # lost on the bus (a timeout), or refused: either way nothing moved
            time.sleep(POKE_EVERY_S)
        end = self.wait_event(lambda e: e.get("kind") in ("bus_fault_expired",
                                                          "bus_fault_cleared")
                              and e.get("node") == f.target and e.get("rule") == rule
                              and e.get("side") == side, hold + 15,
                              f"the end of the bus fault on {f.target}")
        rec = {"bus": f.target, "side": side, "mono": t, "rule": rule, "pokes": pokes,
               "answered": answered, "counts": {k: end.get(k, 0) for k in COUNTERS}}
        if end["kind"] == "bus_fault_cleared":  # its node was fenced: not by the schedule
            rec["cleared"] = end.get("reason")
            rec["killed"] = [f.target]
        return rec

    _bus_drop = _bus_delay = _bus_dup = _bus_reorder = _bus

    def _heartbeat_loss(self, f: "Fault", pid: int) -> dict[str, Any]:
        side = str(f.params.get("side", "dom0"))
        t = time.monotonic()
        # Longer than it can take: the fence clears it (Domain 0's side), or ends the guest
        # that holds it; if neither comes, it still ends on its own.
        self.c.control.call("bus_fault", {
            "node": f.target, "side": side, "direction": "to_dom0", "ops": ["heartbeat"],
            "drop": 1.0, "duration_s": round(self.detection_s * 4 + 20, 3),
            "seed": int(f.params.get("seed", 0))})
        fence = self.wait_event(lambda e: e.get("kind") == "fenced" and e.get("node") == f.target,
                                self.detection_s * 4 + 10, f"the fencing of {f.target}")
        rec = {"unheard": f.target, "side": side, "pid": pid, "mono": t,
               "fenced_ms": round((float(fence["mono"]) - t) * 1000, 1),
               "fence_exit_code": fence.get("exit_code"), "killed": [f.target]}
        try:
            assumed = self.wait_event(lambda e: e.get("kind") == "identity_assumed"
                                      and e.get("identity") == f.target, 30.0,
                                      f"the takeover of {f.target}")
            rec["assumed_ms"] = round((float(assumed["mono"]) - t) * 1000, 1)
        except TimeoutError as exc:
            rec["takeover_missed"] = str(exc)  # healing says whether the cluster came back
        return rec
