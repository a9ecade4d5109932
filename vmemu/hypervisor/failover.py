"""The failover coordinator: who serves which identity, as a pure state machine.

`Coordinator.handle(event, now)` returns a list of actions; it never touches a process, a
socket or a clock. The hypervisor's loop turns process exits, missed heartbeats and RPC replies
into events, and carries out the actions (fence, grant, assign, release, free).

Vocabulary:
- a *node* is a guest domain (1-based index); it has a life: booting -> up -> serving -> down.
- an *identity* is what clients address: node N's endpoint, LUNs and disks. Normally node N
  serves identity N; after a takeover its partner does, until giveback.
- a *chain* is, per identity, the ordered list of NVRAM regions that may still hold records
  not yet on that identity's disks. Whoever is assigned the identity replays the chain in order
  (older incarnations first), which is what keeps acknowledged writes across any sequence of
  failures. A consistency point by the current server shortens the chain to its own region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from vmemu.config import partner_of
from vmemu.errors import InvalidState

BOOTING, UP, SERVING, DOWN, STOPPED = "booting", "up", "serving", "down", "stopped"
ALIVE = (UP, SERVING)
RETRY_PLACE_S = 1.0
# A failed assign is retried after RETRY_PLACE_S the first RETRY_QUICK times (a node dying
# mid-assign, a busy disk), then after twice as long each time, up to RETRY_MAX_S: a corrupt
# disk header or an aggregate that cannot mount does not mend itself, and retrying it every
# second forever only fills the event log. Any other event (a node registers, another fails)
# places the identity again at once.
RETRY_QUICK = 3
RETRY_MAX_S = 60.0


def retry_delay(failures: int) -> float:
    """Seconds before the next try of an identity whose assign failed `failures` times."""
    return min(RETRY_MAX_S, RETRY_PLACE_S * 2.0 ** max(0, failures - RETRY_QUICK))


def _newest_last(chain: list[int], region: int) -> None:
    """Put `region` at the end of `chain`: its node writes the identity's newest records now.

    The chain is replayed oldest first, so a later region's records win where two write the
    same block. A region can already be in the chain when its node takes an identity back
    that it released a moment ago (the release left it there for the exactly-once table):
    left in front, the older records of the regions after it would be replayed over the
    writes it acknowledges from now on. Its records from before the release are on disk (the
    release ended with a CP), and replay skips them, so moving it loses nothing.
    """
    if region in chain:
        chain.remove(region)
    chain.append(region)


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawned:
    node: int


@dataclass(frozen=True)
class Registered:
    node: int
    region: int


@dataclass(frozen=True)
class Failed:
    node: int
    reason: str  # "exit" | "heartbeat" | "crash-request"


@dataclass(frozen=True)
class AssignDone:
    node: int
    identity: int
    region: int
    ok: bool
    error: str = ""
    epoch: int = 0  # the disks' epoch the node serves the identity at (Domain 0 stamped it)


@dataclass(frozen=True)
class ReleaseDone:
    node: int
    identity: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class CpDone:
    node: int
    identities: tuple[int, ...]
    region: int
    # (identity, epoch) the CP wrote each identity at. A report that comes late (a delayed
    # bus) may be of an earlier time the node served the identity: its epoch tells.
    epochs: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class GivebackRequested:
    node: int


@dataclass(frozen=True)
class Tick:
    pass


Event = Union[Spawned, Registered, Failed, AssignDone, ReleaseDone, CpDone, GivebackRequested,
              Tick]


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fence:
    node: int


@dataclass(frozen=True)
class Grant:
    region: int
    grantee: int


@dataclass(frozen=True)
class Assign:
    """Tell `node` to serve `identity`: fence the disks to a new epoch, replay `chain`, bind."""

    node: int
    identity: int
    chain: tuple[int, ...]
    reason: str  # "boot" | "takeover" | "giveback" | "recovery"


@dataclass(frozen=True)
class Release:
    node: int
    identity: int


@dataclass(frozen=True)
class FreeRegion:
    region: int


@dataclass(frozen=True)
class Log:
    kind: str
    node: int | None = None
    fields: dict = field(default_factory=dict)


Action = Union[Fence, Grant, Assign, Release, FreeRegion, Log]


@dataclass
class Identity:
    index: int
    served_by: int | None = None
    transit: tuple[str, int] | None = None  # ("assign" | "release", node)
    chain: list[int] = field(default_factory=list)
    last_server: int | None = None
    epoch: int = 0  # of the assign that made served_by serve it


class Coordinator:
    def __init__(self, nodes: int, topology: str, giveback_delay: float) -> None:
        self.nodes = nodes
        self.topology = topology
        self.giveback_delay = giveback_delay
        self.state: dict[int, str] = {n: DOWN for n in range(1, nodes + 1)}
        self.region: dict[int, int | None] = {n: None for n in range(1, nodes + 1)}
        self.identities = {n: Identity(n) for n in range(1, nodes + 1)}
        self.dead_regions: set[int] = set()
        self.giveback_due: dict[int, float] = {}
        self.retry_at: dict[int, float] = {}
        self.assign_failures: dict[int, tuple[int, str]] = {}  # identity -> (count, last error)
        self.shutting_down = False

    # -- queries -----------------------------------------------------------------------------
    def partner(self, node: int) -> int | None:
        return partner_of(node, self.nodes, self.topology)

    def alive(self, node: int | None) -> bool:
        return node is not None and self.state.get(node) in ALIVE

    def served(self, node: int) -> list[int]:
        return [i.index for i in self.identities.values() if i.served_by == node]

    def assign_backoff(self, identity: int, now: float) -> dict | None:
        """For status: an identity whose assigns keep failing (None once one succeeded)."""
        f = self.assign_failures.get(identity)
        if f is None:
            return None
        due = self.retry_at.get(identity)
        return {"failures": f[0], "error": f[1],
                "retry_in_s": None if due is None else round(max(0.0, due - now), 1)}

    def takeover_possible(self, node: int) -> bool:
        return self.alive(self.partner(node)) and self.region[node] is not None

    # -- the machine -------------------------------------------------------------------------
    def handle(self, ev: Event, now: float) -> list[Action]:
        handler = getattr(self, "_on_" + type(ev).__name__)
        return handler(ev, now)

    def _on_Spawned(self, ev: Spawned, now: float) -> list[Action]:
        if self.alive(ev.node) or self.state[ev.node] == BOOTING:
            raise InvalidState(f"node{ev.node} is already running")
        self.state[ev.node] = BOOTING
        return [Log("spawned", ev.node)]

    def _on_Registered(self, ev: Registered, now: float) -> list[Action]:
        n = ev.node
        if self.state[n] != BOOTING:
            return [Log("unexpected_register", n, {"state": self.state[n]})]
        self.state[n] = UP
        self.region[n] = ev.region
        acts: list[Action] = [Log("registered", n, {"region": f"{ev.region:#x}"})]
        p = self.partner(n)
        if p is not None:
            acts.append(Grant(ev.region, p))
        own = self.identities[n]
        if own.served_by is not None and own.served_by != n:
            if self.giveback_delay >= 0:
                self.giveback_due[n] = now + self.giveback_delay
            acts.append(Log("giveback_pending", n, {"held_by": own.served_by,
                                                    "auto_after_s": self.giveback_delay}))
        for ident in self.identities.values():
            if ident.served_by is None and ident.transit is None:
                acts += self._place(ident)
        return acts

    def _on_Failed(self, ev: Failed, now: float) -> list[Action]:
        f = ev.node
        if self.state[f] in (DOWN, STOPPED) or self.shutting_down:
            return []
        self.state[f] = DOWN
        acts: list[Action] = [Log("failure_detected", f, {"reason": ev.reason}), Fence(f)]
        dead = self.region[f]
        if dead is not None:
            self.dead_regions.add(dead)
            self.region[f] = None
            # A node binds an identity (and acknowledges writes into its own region) before its
            # AssignDone reaches us: if it dies in between, its region must join the chain.
            for ident in self.identities.values():
                if ident.transit == ("assign", f):
                    _newest_last(ident.chain, dead)
        self.giveback_due.pop(f, None)
        for ident in self.identities.values():
            if ident.served_by == f or ident.transit in (("assign", f), ("release", f)):
                ident.served_by = None
                ident.transit = None
                ident.last_server = f
        for ident in self.identities.values():
            if ident.served_by is None and ident.transit is None:
                acts += self._place(ident)
        return acts + self._free()

    def _on_AssignDone(self, ev: AssignDone, now: float) -> list[Action]:
        ident = self.identities[ev.identity]
        if ident.transit != ("assign", ev.node):
            return [Log("stale_reply", ev.node, {"identity": ev.identity})]
        ident.transit = None
        if not ev.ok:
            # Try again shortly (the node may have died, or a disk may have been busy), and
            # later and later if it keeps failing (retry_delay).
            failures = self.assign_failures.get(ev.identity, (0, ""))[0] + 1
            self.assign_failures[ev.identity] = (failures, ev.error)
            delay = retry_delay(failures)
            self.retry_at[ev.identity] = now + delay
            return [Log("assign_failed", ev.node, {"identity": ev.identity, "error": ev.error,
                                                   "failures": failures, "retry_in_s": delay})]
        self.assign_failures.pop(ev.identity, None)
        ident.served_by = ev.node
        ident.last_server = ev.node
        ident.epoch = ev.epoch
        _newest_last(ident.chain, ev.region)
        if ev.identity == ev.node:
            self.state[ev.node] = SERVING
        elif self.state[ev.identity] == UP and self.giveback_delay >= 0:
            # The owner registered while this takeover was still replaying.
            self.giveback_due.setdefault(ev.identity, now + self.giveback_delay)
        return []

    def _on_ReleaseDone(self, ev: ReleaseDone, now: float) -> list[Action]:
        ident = self.identities[ev.identity]
        if ident.transit != ("release", ev.node):
            return [Log("stale_reply", ev.node, {"identity": ev.identity})]
        ident.transit = None
        if not ev.ok:
            return [Log("giveback_failed", ev.node, {"identity": ev.identity, "error": ev.error})]
        # The releasing node ended with a CP of this identity: its disks hold everything. Its
        # region stays in the chain only for the exactly-once table that starts its new log
        # generation, so the owner does not apply a retried write twice across the giveback.
        ident.served_by = None
        releaser = self.region.get(ev.node)
        ident.chain[:] = [releaser] if releaser is not None else []
        if self.state[ev.identity] == BOOTING and self.alive(ev.node):
            # The owner died during the giveback and is already booting again: the releaser,
            # alive and serving a moment ago, takes the identity back at once rather than
            # leave it dark for a whole boot; the owner gets it back when it registers.
            return ([Log("giveback_cancelled", ev.identity,
                         {"reason": "the owner failed during the giveback", "to": ev.node})]
                    + self._assign(ev.node, ident, "takeover") + self._free())
        return self._place(ident) + self._free()

    def _on_CpDone(self, ev: CpDone, now: float) -> list[Action]:
        if self.region.get(ev.node) != ev.region:
            return []
        epochs = dict(ev.epochs) if ev.epochs is not None else None
        stale = []
        for i in ev.identities:
            ident = self.identities.get(i)
            if ident is None or ident.served_by != ev.node:
                continue
            if epochs is not None and epochs.get(i) != ident.epoch:
                # A CP of an earlier time this node served the identity, reported late: the
                # chain has gained regions since (another server's, dead before its own CP)
                # whose records that CP never saw. Shortening the chain would drop them.
                stale.append(i)
                continue
            ident.chain[:] = [ev.region]
        acts: list[Action] = [Log("stale_report", ev.node, {"what": "cp_done", "identities": stale})] \
            if stale else []
        return acts + self._free()

    def _on_GivebackRequested(self, ev: GivebackRequested, now: float) -> list[Action]:
        ident = self.identities[ev.node]
        holder = ident.served_by
        if self.state[ev.node] != UP or holder is None or holder == ev.node:
            if self.state[ev.node] == SERVING:
                raise InvalidState(f"node{ev.node} already serves its own identity")
            raise InvalidState(f"node{ev.node} cannot take its identity back now "
                               f"(state {self.state[ev.node]}, served by "
                               f"{'node%d' % holder if holder else 'nobody'})")
        if ident.transit is not None:
            raise InvalidState(f"node{ev.node}'s identity is already moving")
        self.giveback_due.pop(ev.node, None)
        ident.transit = ("release", holder)
        return [Log("giveback_started", ev.node, {"from": holder}), Release(holder, ev.node)]

    def _on_Tick(self, ev: Tick, now: float) -> list[Action]:
        acts: list[Action] = []
        for i, due in list(self.retry_at.items()):
            if now >= due:
                del self.retry_at[i]
                ident = self.identities[i]
                if ident.served_by is None and ident.transit is None and not self.shutting_down:
                    acts += self._place(ident)
        for n, due in list(self.giveback_due.items()):
            if now >= due:
                del self.giveback_due[n]
                try:
                    acts += self._on_GivebackRequested(GivebackRequested(n), now)
                except InvalidState:
                    pass  # already served by itself, or moving: nothing to give back
        return acts

    # -- helpers -----------------------------------------------------------------------------
    def _place(self, ident: Identity) -> list[Action]:
        """Pick a server for an unserved identity: its owner if alive, else an heir."""
        i = ident.index
        if self.state[i] == BOOTING:
            return []  # its owner is on its way: it will claim the identity when it registers
        if self.alive(i):
            reason = "recovery" if ident.chain else "boot"
            if ident.last_server not in (None, i):
                reason = "giveback"
            return self._assign(i, ident, reason)
        for cand in (self.partner(i), self.partner(ident.last_server or i)):
            if self.alive(cand) and cand != i:
                return self._assign(cand, ident, "takeover")  # type: ignore[arg-type]
        if self.shutting_down:
            return []
        return [Log("unavailable", i, {"reason": "no live node can serve this identity; "
                                                 "data waits in NVRAM and on disk"})]

    def _assign(self, node: int, ident: Identity, reason: str) -> list[Action]:
        ident.transit = ("assign", node)
        acts: list[Action] = [Grant(r, node) for r in ident.chain if r != self.region[node]]
        acts.append(Assign(node, ident.index, tuple(ident.chain), reason))
        return acts

    def _free(self) -> list[Action]:
        held = {r for i in self.identities.values() for r in i.chain}
        freed = sorted(self.dead_regions - held)
        self.dead_regions -= set(freed)
        return [FreeRegion(r) for r in freed]
