"""Domain 0's side of the bus faults (vmemu/bus/faults.py): the `bus_fault` control op.

    {"node": "node2", "side": "dom0", "direction": "to_dom0", "ops": ["heartbeat"],
     "drop": 1.0, "duration_s": 5, "seed": 7}          -> {"side": "dom0", "rule": {...}}
    {"node": "node2", "side": "guest", ...}            -> {"side": "guest", "rule": {...}}
    {"node": "node2", "clear": true}                   -> {"side": "dom0", "cleared": [...]}
    {"clear": true}                                    -> every node's, on Domain 0's side

Side `dom0` (the default): Domain 0 applies the rule to what it sends the guest and what it
reads from it: its control endpoint (the guest's heartbeats, reports and calls) and its
client of the guest (its requests, and the guest's replies). Side `guest`: the rule is
checked here, then forwarded to the guest, which applies it to what it sends (uplink,
heartbeat thread, replies) and what it reads (Domain 0's requests): the same faults, seen
from the other end, and a check that a guest cannot be talked into anything unchecked.

A rule belongs to the incarnation it was set for: fencing a node clears its rules here (a
guest's own die with it), so the next incarnation boots on a clean bus; and every rule ends
at its deadline anyway. A bad request changes nothing and gets an error naming the field.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Collection

from vmemu.bus import codec, faults
from vmemu.bus.faults import SIDES, TO_DOM0, Rules, Tap
from vmemu.bus.rpc import AsyncRpcClient, RpcServer
from vmemu.errors import BadRequest, InvalidState, VmemuError

Reply = Callable[[Any, VmemuError | None], None]
FORWARD_TIMEOUT_S = 5.0
DEFERRED = object()  # `request` answers later, through its `reply`


class BusFaults:
    def __init__(self, nodes: int, control: RpcServer, guests: dict[int, AsyncRpcClient],
                 guest_ops: Collection[str], emit: Callable[..., Any]) -> None:
        self.nodes = nodes
        self.control = control
        self.guests = guests
        self.guest_ops = frozenset(guest_ops)
        self.emit = emit
        self.rules: Rules | None = None  # made at the first rule: until then no socket is tapped
        self.guest_side: set[int] = set()  # nodes told to hold rules of their own
        self._ids = itertools.count(1)

    # -- taps ------------------------------------------------------------------------------
    def _node_of(self, req: codec.Request) -> int | None:
        """The guest whose traffic a control request is (None: the CLI's, never faulted)."""
        if req.op not in self.guest_ops:
            return None
        node = req.args.get("node")
        return node if type(node) is int and 1 <= node <= self.nodes else None

    def _ensure(self) -> Rules:
        if self.rules is None:
            self.rules = Rules()
            self.control.set_tap(Tap(self.rules), self._node_of, TO_DOM0)
            for n, g in self.guests.items():
                self.attach(n, g)
        return self.rules

    def attach(self, node: int, client: AsyncRpcClient) -> None:
        """A new client of a guest (a new incarnation) is tapped like the others."""
        if self.rules is not None:
            client.tap, client.tap_node = Tap(self.rules), node

    # -- the control op --------------------------------------------------------------------
    def request(self, args: dict[str, Any], node: int | None, alive: Callable[[int], bool],
                reply: Reply) -> Any:
        """Answer now (the result), or later through `reply` (returns DEFERRED)."""
        side = args.get("side", "dom0")
        if side not in SIDES:
            raise BadRequest(f"bus_fault: side must be one of {', '.join(SIDES)}")
        clear = args.get("clear", False)
        if not isinstance(clear, bool):
            raise BadRequest("bus_fault: clear must be true or false")
        if clear:
            extra = sorted(k for k in args if k not in faults.ENVELOPE)
            if extra:
                raise BadRequest(f"bus_fault: clear takes node and side only, not {extra[0]!r}")
            if side == "dom0":
                gone = self.rules.clear(node) if self.rules is not None else []
                self._told("bus_fault_cleared", gone, "dom0", reason="asked")
                return {"side": "dom0", "cleared": gone}
        if node is None:
            raise BadRequest("bus_fault: node is required" + (" for side guest" if clear else ""))
        if not alive(node):
            raise InvalidState(f"bus_fault: node{node} is not running")
        if clear:
            return self._forward(node, {"clear": True}, reply)
        rule = faults.parse(args, node, faults.BUS_OPS, time.monotonic(), next(self._ids))
        if side == "guest":
            return self._forward(node, rule.spec(), reply)
        rules = self._ensure()
        rules.install(rule)
        [view] = [v for v in rules.view(time.monotonic()) if v["rule"] == rule.id]
        self._told("bus_fault_set", [view], "dom0")
        return {"side": "dom0", "rule": view}

    def _forward(self, node: int, spec: dict[str, Any], reply: Reply) -> object:
        g = self.guests.get(node)
        if g is None:
            raise InvalidState(f"bus_fault: node{node} is not running")

        def done(res: Any, err: VmemuError | None) -> None:
            if err is not None:
                reply(None, err)
                return
            self.guest_side.add(node)
            if spec.get("clear"):
                reply({"side": "guest", "cleared": res}, None)
            else:
                self._told("bus_fault_set", [res], "guest")
                reply({"side": "guest", "rule": res}, None)

        g.call("bus_fault", spec, FORWARD_TIMEOUT_S, done)
        return DEFERRED

    def _told(self, kind: str, views: list[dict[str, Any]], side: str, **extra: Any) -> None:
        for v in views:
            fields = {k: x for k, x in v.items() if k != "node"}
            self.emit(kind, int(str(v["node"])[4:]), side=side, **extra, **fields)

    # -- the loop's hooks ------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Rules past their deadline go, each with an event (its counts): the chaos driver
        waits for it, and a driver that died is not needed for it."""
        if self.rules:
            self._told("bus_fault_expired", self.rules.expire(now), "dom0")  # type: ignore[union-attr]

    def fenced(self, node: int) -> None:
        self.guest_side.discard(node)  # its rules died with it
        if self.rules:
            self._told("bus_fault_cleared", self.rules.clear(node), "dom0",  # type: ignore[union-attr]
                       reason="fenced")

    def shutting_down(self) -> None:
        """A clean stop is not a fault scenario: every rule goes before the guests are told."""
        if self.rules:
            self._told("bus_fault_cleared", self.rules.clear(), "dom0", reason="shutdown")  # type: ignore[union-attr]
        for n in sorted(self.guest_side):
            g = self.guests.get(n)
            if g is not None:
                g.call("bus_fault", {"clear": True}, FORWARD_TIMEOUT_S, lambda res, err: None)
        self.guest_side.clear()

    def view(self, now: float) -> dict[str, Any]:
        return {"dom0": self.rules.view(now) if self.rules is not None else [],
                "repeats_refused": self.control.duplicates}
