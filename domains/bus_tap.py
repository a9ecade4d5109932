"""A guest's side of the bus faults (vmemu/bus/faults.py), set by Domain 0's `bus_fault`.

Domain 0 checks a rule and forwards it here (side `guest`); it is checked again, since a
guest trusts no request, and applied to what this guest sends Domain 0 (its uplink: reports
and calls; its heartbeat thread; its replies) and what it reads from it (Domain 0's requests;
the replies to its calls). The taps are put on at the first rule: until then every socket
pays one attribute check. Rules end at their deadline, each with a `bus_fault_expired`
event, and die with the incarnation.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

from domains.failover_monitor import FailoverMonitor
from vmemu.bus import codec, faults
from vmemu.bus.faults import TO_GUEST, Rules, Tap
from vmemu.bus.rpc import RpcClient, RpcServer
from vmemu.errors import BadRequest

# Requests on a guest's control endpoint that are not Domain 0's (a partner asking for a
# mirror): not its traffic with Domain 0, never faulted.
NOT_DOM0 = frozenset({"mirror_request"})


class GuestFaults:
    def __init__(self, node: int, uplink: RpcClient, control: RpcServer,
                 monitor: FailoverMonitor, event: Callable[[str, dict[str, Any]], None]) -> None:
        self.node = node
        self.uplink = uplink
        self.control = control
        self.monitor = monitor
        self.event = event
        self.rules: Rules | None = None
        self._ids = itertools.count(1)

    def _ensure(self) -> Rules:
        if self.rules is None:
            self.rules = Rules()
            self.uplink.tap, self.uplink.tap_node = Tap(self.rules), self.node
            self.control.set_tap(Tap(self.rules),
                                 lambda req: None if req.op in NOT_DOM0 else self.node, TO_GUEST)
            self.monitor.bus_rules = self.rules  # its thread taps its own socket
        return self.rules

    def request(self, req: codec.Request) -> Any:
        """Domain 0's `bus_fault`: install one rule (its view), or clear them all."""
        if "clear" in req.args and req.args["clear"] is not True:
            raise BadRequest("bus_fault: clear must be true")
        if req.args.get("clear") is True:
            gone = self.rules.clear() if self.rules is not None else []
            for v in gone:
                self.event("bus_fault_cleared", _fields(v, reason="asked"))
            return gone
        if "node" in req.args or "side" in req.args:
            raise BadRequest("bus_fault: a guest takes the rule's fields only")
        rule = faults.parse(req.args, self.node, faults.BUS_OPS, time.monotonic(),
                            next(self._ids))
        rules = self._ensure()
        rules.install(rule)
        return next(v for v in rules.view(time.monotonic()) if v["rule"] == rule.id)

    def tick(self, now: float) -> None:
        """Every loop turn: rules past their deadline go (told), held messages that are due
        leave (the control endpoint's are let go by its `pending`, at each drain)."""
        if self.rules is None:
            return
        for v in self.rules.expire(now):
            self.event("bus_fault_expired", _fields(v))
        self.uplink.flush(now)

    def next_due(self) -> float | None:
        """When the loop must turn next for a held message (None: nothing held)."""
        if self.rules is None:
            return None
        times = [t for t in (self.uplink.next_due(),
                             self.control.tap.next_due() if self.control.tap else None)
                 if t is not None]
        return min(times) if times else None

    def view(self) -> dict[str, Any]:
        return {"faults": self.rules.view(time.monotonic()) if self.rules is not None else [],
                "repeats_refused": self.control.duplicates}


def _fields(view: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**{k: v for k, v in view.items() if k != "node"}, "side": "guest", **extra}
