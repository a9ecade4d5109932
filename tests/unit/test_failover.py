"""The failover coordinator as a pure state machine: scripted event sequences in, actions out.

No process, socket or clock: each test feeds `Coordinator.handle(event, now)` the events the
hypervisor's loop would produce and checks the actions (fence, grant, assign, release, free)
and the coordinator's state. A randomized test then drives it with arbitrary sequences and
checks the safety invariants after every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vmemu.errors import InvalidState
from vmemu.hypervisor.failover import (
    BOOTING,
    DOWN,
    SERVING,
    UP,
    Action,
    Assign,
    AssignDone,
    Coordinator,
    CpDone,
    Event,
    Failed,
    Fence,
    FreeRegion,
    GivebackRequested,
    Grant,
    Log,
    Registered,
    Release,
    ReleaseDone,
    Spawned,
    Tick,
)


def of(kind: type, acts: list[Action]) -> list:
    return [a for a in acts if isinstance(a, kind)]


def logs(acts: list[Action], kind: str) -> list[Log]:
    return [a for a in acts if isinstance(a, Log) and a.kind == kind]


class Cluster:
    """Drives a Coordinator; allocates region ids the way guests do (one per incarnation)."""

    def __init__(self, nodes: int = 4, topology: str = "pairs", delay: float = 2.0) -> None:
        self.c = Coordinator(nodes, topology, delay)
        self.now = 0.0
        self._next_region = 0x1000

    def ev(self, event: Event) -> list[Action]:
        return self.c.handle(event, self.now)

    def new_region(self) -> int:
        self._next_region += 0x100
        return self._next_region

    def start(self, node: int) -> tuple[int, list[Action]]:
        """Spawned + Registered with a fresh region: (region, actions of the registration)."""
        assert self.ev(Spawned(node)) == [Log("spawned", node)]
        rid = self.new_region()
        return rid, self.ev(Registered(node, rid))

    def done(self, acts: list[Action], ok: bool = True) -> list[Action]:
        """Answer every Assign in `acts` as the assigned guest would."""
        out: list[Action] = []
        for a in of(Assign, acts):
            out += self.ev(AssignDone(a.node, a.identity, self.c.region[a.node] or 0, ok))
        return out

    def boot(self) -> dict[int, int]:
        """All nodes spawned first (as the hypervisor does), then registered and assigned."""
        nodes = range(1, self.c.nodes + 1)
        for n in nodes:
            self.ev(Spawned(n))
        regions = {}
        for n in nodes:
            regions[n] = self.new_region()
            self.done(self.ev(Registered(n, regions[n])))
        return regions

    def chain(self, identity: int) -> list[int]:
        return list(self.c.identities[identity].chain)

    def served_by(self, identity: int) -> int | None:
        return self.c.identities[identity].served_by


# -- boot --------------------------------------------------------------------------------------
def test_boot_in_pairs_each_node_serves_itself_and_grants_its_region_to_its_partner() -> None:
    cl = Cluster(4, "pairs")
    for n in range(1, 5):
        assert cl.ev(Spawned(n)) == [Log("spawned", n)]
        assert cl.c.state[n] == BOOTING
    partner = {1: 2, 2: 1, 3: 4, 4: 3}
    regions = {}
    for n in range(1, 5):
        regions[n] = cl.new_region()
        acts = cl.ev(Registered(n, regions[n]))
        assert of(Grant, acts) == [Grant(regions[n], partner[n])]
        # Only its own identity: every other owner is still booting and will claim its own.
        assert of(Assign, acts) == [Assign(n, n, (), "boot")]
        assert not logs(acts, "unavailable")
        assert cl.c.state[n] == UP
        assert cl.c.identities[n].transit == ("assign", n)
        assert cl.ev(AssignDone(n, n, regions[n], True)) == []
        assert cl.c.state[n] == SERVING
    for n in range(1, 5):
        assert cl.served_by(n) == n
        assert cl.chain(n) == [regions[n]]
        assert cl.c.served(n) == [n]
        assert cl.c.takeover_possible(n)


def test_identity_of_a_booting_owner_is_not_taken_over_by_its_registered_partner() -> None:
    cl = Cluster(2, "pairs")
    cl.ev(Spawned(1))
    cl.ev(Spawned(2))
    acts = cl.ev(Registered(1, cl.new_region()))
    assert [a.identity for a in of(Assign, acts)] == [1]
    assert cl.c.identities[2].transit is None and cl.served_by(2) is None
    acts = cl.ev(Registered(2, cl.new_region()))
    assert of(Assign, acts) == [Assign(2, 2, (), "boot")]


def test_identity_of_a_down_owner_is_taken_over_when_its_partner_registers() -> None:
    cl = Cluster(2, "pairs")
    rid, acts = cl.start(1)  # node2 was never spawned: nobody will claim identity 2
    assert Assign(1, 2, (), "takeover") in acts
    assert Assign(1, 1, (), "boot") in acts


def test_registration_of_a_node_that_is_not_booting_changes_nothing() -> None:
    cl = Cluster(2, "pairs")
    regions = cl.boot()
    before = copy.deepcopy(cl.c.__dict__)
    acts = cl.ev(Registered(1, cl.new_region()))
    assert acts == [Log("unexpected_register", 1, {"state": SERVING})]
    assert cl.c.__dict__ == before
    assert cl.c.region[1] == regions[1]


def test_spawn_of_a_running_node_is_refused() -> None:
    cl = Cluster(2, "pairs")
    cl.boot()
    with pytest.raises(InvalidState):
        cl.ev(Spawned(1))
    cl2 = Cluster(2, "pairs")
    cl2.ev(Spawned(1))
    with pytest.raises(InvalidState):
        cl2.ev(Spawned(1))


# -- takeover ----------------------------------------------------------------------------------
def test_exit_of_node1_fences_it_then_assigns_identity1_to_its_partner_with_its_chain() -> None:
    cl = Cluster(4, "pairs")
    r = cl.boot()
    acts = cl.ev(Failed(1, "exit"))
    assert logs(acts, "failure_detected")[0].fields == {"reason": "exit"}
    fence = acts.index(Fence(1))
    assign = acts.index(Assign(2, 1, (r[1],), "takeover"))
    grant = acts.index(Grant(r[1], 2))
    assert fence < grant < assign  # fenced before anyone else touches its disks
    assert len(of(Assign, acts)) == 1
    assert not of(FreeRegion, acts)  # the dead region is the chain of identity 1
    assert cl.c.state[1] == DOWN and cl.c.region[1] is None
    assert cl.c.identities[1].transit == ("assign", 2)
    assert not cl.c.takeover_possible(1)

    assert cl.ev(AssignDone(2, 1, r[2], True)) == []
    assert cl.served_by(1) == 2
    assert cl.chain(1) == [r[1], r[2]]  # the taker's writes for identity 1 go to its region
    assert cl.c.served(2) == [1, 2]
    assert cl.c.state[2] == SERVING
    # The other pair never noticed.
    assert cl.served_by(3) == 3 and cl.served_by(4) == 4


def test_failed_for_an_already_down_node_yields_nothing() -> None:
    cl = Cluster(4, "pairs")
    cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    before = copy.deepcopy(cl.c.__dict__)
    assert cl.ev(Failed(1, "heartbeat")) == []
    assert cl.c.__dict__ == before


def test_failed_for_a_never_spawned_node_yields_nothing() -> None:
    cl = Cluster(2, "pairs")
    assert cl.ev(Failed(2, "exit")) == []


def test_stale_assign_done_from_a_node_that_failed_meanwhile_is_ignored() -> None:
    cl = Cluster(3, "ring")
    r = cl.boot()
    assert Assign(2, 1, (r[1],), "takeover") in cl.ev(Failed(1, "exit"))
    acts = cl.ev(Failed(2, "heartbeat"))  # before node2 answered
    assert [(a.node, a.identity) for a in of(Assign, acts)] == [(3, 1), (3, 2)]
    before = copy.deepcopy(cl.c.__dict__)
    stale = cl.ev(AssignDone(2, 1, r[2], True))
    assert stale == [Log("stale_reply", 2, {"identity": 1})]
    assert cl.c.__dict__ == before
    assert cl.c.identities[1].transit == ("assign", 3)
    assert cl.served_by(1) is None


def test_stale_assign_done_for_an_unavailable_identity_does_not_resurrect_it() -> None:
    cl = Cluster(2, "pairs")
    r = cl.boot()
    cl.ev(Failed(1, "exit"))
    cl.ev(Failed(2, "exit"))
    assert cl.ev(AssignDone(2, 1, r[2], True)) == [Log("stale_reply", 2, {"identity": 1})]
    assert cl.served_by(1) is None


def test_failed_assign_is_logged_and_leaves_the_identity_unserved() -> None:
    cl = Cluster(2, "pairs")
    r = cl.boot()
    cl.ev(Failed(1, "exit"))
    acts = cl.ev(AssignDone(2, 1, 0, False, "replay failed"))
    assert acts == [Log("assign_failed", 2, {"identity": 1, "error": "replay failed",
                                             "failures": 1, "retry_in_s": 1.0})]
    assert cl.served_by(1) is None and cl.c.identities[1].transit is None
    assert cl.chain(1) == [r[1]]  # nothing was replayed: the dead region stays needed


# -- giveback ----------------------------------------------------------------------------------
def test_restart_then_delay_then_release_then_assign_gives_the_identity_back() -> None:
    cl = Cluster(4, "pairs", delay=2.0)
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.now = 10.0
    r1b, acts = cl.start(1)
    assert Grant(r1b, 2) in acts
    pending = logs(acts, "giveback_pending")
    assert pending and pending[0].fields["held_by"] == 2
    assert not of(Assign, acts) and not of(Release, acts)
    assert cl.c.state[1] == UP and cl.served_by(1) == 2

    cl.now = 11.9
    assert cl.ev(Tick()) == []
    cl.now = 12.0
    acts = cl.ev(Tick())
    assert of(Release, acts) == [Release(2, 1)]
    assert logs(acts, "giveback_started")[0].fields == {"from": 2}
    assert cl.c.identities[1].transit == ("release", 2)
    assert cl.served_by(1) == 2  # node2 serves until it has released

    acts = cl.ev(ReleaseDone(2, 1, True))
    # The release ended with a CP; node2's region stays only for its carried exactly-once table.
    assert of(Assign, acts) == [Assign(1, 1, (cl.c.region[2],), "giveback")]
    assert of(FreeRegion, acts) == [FreeRegion(r[1])]
    assert cl.ev(AssignDone(1, 1, r1b, True)) == []
    assert cl.served_by(1) == 1 and cl.c.state[1] == SERVING
    assert cl.chain(1) == [cl.c.region[2], r1b]  # until node1's first CP shortens it
    cl.now = 100.0
    assert cl.ev(Tick()) == []


def test_negative_delay_means_manual_giveback_only() -> None:
    cl = Cluster(2, "pairs", delay=-1)
    cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.start(1)
    cl.now = 1e6
    assert cl.ev(Tick()) == []
    acts = cl.ev(GivebackRequested(1))
    assert of(Release, acts) == [Release(2, 1)]


def test_second_giveback_request_while_the_identity_moves_is_refused() -> None:
    cl = Cluster(2, "pairs", delay=-1)
    cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.start(1)
    cl.ev(GivebackRequested(1))
    before = copy.deepcopy(cl.c.__dict__)
    with pytest.raises(InvalidState, match="already moving"):
        cl.ev(GivebackRequested(1))
    assert cl.c.__dict__ == before


@pytest.mark.parametrize("situation", ["serving", "down", "booting", "nobody_holds_it"])
def test_manual_giveback_with_nothing_to_give_back_raises_invalid_state(situation: str) -> None:
    cl = Cluster(2, "pairs")
    cl.boot()
    if situation == "down":
        cl.done(cl.ev(Failed(1, "exit")))
    elif situation == "booting":
        cl.done(cl.ev(Failed(1, "exit")))
        cl.ev(Spawned(1))
    elif situation == "nobody_holds_it":
        cl = Cluster(2, "pairs")
        cl.ev(Spawned(1))
        cl.ev(Registered(1, cl.new_region()))
        cl.ev(AssignDone(1, 1, 0, False, "boom"))  # up, its identity placed nowhere
        assert cl.c.state[1] == UP and cl.served_by(1) is None
        assert cl.c.identities[1].transit is None
    before = copy.deepcopy(cl.c.__dict__)
    with pytest.raises(InvalidState):
        cl.ev(GivebackRequested(1))
    assert cl.c.__dict__ == before


def test_failed_release_keeps_the_identity_with_its_holder_and_can_be_retried() -> None:
    cl = Cluster(2, "pairs", delay=-1)
    cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.start(1)
    cl.ev(GivebackRequested(1))
    acts = cl.ev(ReleaseDone(2, 1, False, "cp failed"))
    assert acts == [Log("giveback_failed", 2, {"identity": 1, "error": "cp failed"})]
    assert cl.served_by(1) == 2 and cl.c.identities[1].transit is None
    assert of(Release, cl.ev(GivebackRequested(1))) == [Release(2, 1)]


def test_holder_failing_during_giveback_hands_the_identity_to_the_owner_with_its_chain() -> None:
    cl = Cluster(2, "pairs", delay=-1)
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    r1b, _ = cl.start(1)
    cl.ev(GivebackRequested(1))
    acts = cl.ev(Failed(2, "exit"))  # node2 dies before it released (no CP happened)
    own = [a for a in of(Assign, acts) if a.identity == 1]
    assert own and own[0].node == 1 and own[0].chain == (r[1], r[2])
    assert Assign(1, 2, (r[2],), "takeover") in acts
    assert not of(FreeRegion, acts)


def test_owner_failing_and_booting_during_the_giveback_leaves_the_identity_with_the_releaser() -> None:
    """Found by `vmemu chaos` (kill_in_giveback): the owner died while its partner released
    its identity and was restarted at once; Domain 0 held the identity for the booting owner,
    dark for a whole boot (2.6-13.6 s), although the releaser was alive."""
    cl = Cluster(2, "pairs", delay=2.0)
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.start(1)
    cl.ev(GivebackRequested(1))  # Release(2, 1) in transit
    cl.ev(Failed(1, "exit"))
    cl.ev(Spawned(1))  # restarted before node2's release reply
    acts = cl.ev(ReleaseDone(2, 1, True))
    assert Assign(2, 1, (r[2],), "takeover") in acts
    assert logs(acts, "giveback_cancelled")
    cl.done(acts)
    assert cl.served_by(1) == 2
    cl.now = 5.0
    cl.done(cl.ev(Registered(1, cl.new_region())))  # the owner is back: a giveback is due
    cl.now = 10.0
    assert of(Release, cl.ev(Tick())) == [Release(2, 1)]


# -- double failures and topologies ------------------------------------------------------------
def test_double_failure_in_a_pair_leaves_both_identities_unavailable() -> None:
    cl = Cluster(4, "pairs")
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    acts = cl.ev(Failed(2, "exit"))
    assert Fence(2) in acts
    assert not of(Assign, acts) and not of(FreeRegion, acts)
    assert sorted(a.node for a in logs(acts, "unavailable")) == [1, 2]
    assert cl.served_by(1) is None and cl.served_by(2) is None
    assert cl.chain(1) == [r[1], r[2]] and cl.chain(2) == [r[2]]  # data waits in NVRAM
    assert cl.served_by(3) == 3 and cl.served_by(4) == 4


@pytest.mark.parametrize("survivor", [1, 2])
def test_restart_of_either_node_after_double_failure_serves_both_identities(survivor: int) -> None:
    other = 3 - survivor
    cl = Cluster(4, "pairs")
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    cl.ev(Failed(2, "exit"))
    rn, acts = cl.start(survivor)
    assigns = {a.identity: a for a in of(Assign, acts)}
    assert set(assigns) == {1, 2}
    assert all(a.node == survivor for a in assigns.values())
    assert assigns[1].chain == (r[1], r[2]) and assigns[2].chain == (r[2],)
    assert assigns[other].reason == "takeover"
    grants = {g.region for g in of(Grant, acts) if g.grantee == survivor}
    assert grants == {r[1], r[2]}  # every chain region it must replay
    cl.done(acts)
    assert cl.c.served(survivor) == [1, 2]
    # Its first CP makes both chains its own region: both dead regions can go.
    acts = cl.ev(CpDone(survivor, (1, 2), rn))
    assert acts == [FreeRegion(min(r[1], r[2])), FreeRegion(max(r[1], r[2]))]
    assert cl.chain(1) == [rn] and cl.chain(2) == [rn]


def test_ring_of_three_node1_heir_is_node2_and_second_failure_hands_both_to_node3() -> None:
    cl = Cluster(3, "ring")
    r = cl.boot()
    acts = cl.ev(Failed(1, "exit"))
    assert of(Assign, acts) == [Assign(2, 1, (r[1],), "takeover")]
    cl.done(acts)
    acts = cl.ev(Failed(2, "exit"))
    assigns = sorted(of(Assign, acts), key=lambda a: a.identity)
    assert assigns == [Assign(3, 1, (r[1], r[2]), "takeover"), Assign(3, 2, (r[2],), "takeover")]
    assert {g for g in of(Grant, acts)} == {Grant(r[1], 3), Grant(r[2], 3)}
    cl.done(acts)
    assert cl.c.served(3) == [1, 2, 3]


# -- consistency points ------------------------------------------------------------------------
def test_cp_done_shortens_chains_and_frees_dead_regions_no_chain_holds() -> None:
    cl = Cluster(2, "pairs")
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    assert cl.chain(1) == [r[1], r[2]]
    # A CP of identity 2 only: identity 1's chain still holds the dead region.
    assert cl.ev(CpDone(2, (2,), r[2])) == []
    assert cl.chain(1) == [r[1], r[2]]
    assert cl.ev(CpDone(2, (1, 2), r[2])) == [FreeRegion(r[1])]
    assert cl.chain(1) == [r[2]] and cl.chain(2) == [r[2]]
    assert cl.ev(CpDone(2, (1, 2), r[2])) == []  # freed once only


def test_cp_done_from_an_old_region_or_for_an_identity_not_served_changes_nothing() -> None:
    cl = Cluster(4, "pairs")
    r = cl.boot()
    cl.done(cl.ev(Failed(1, "exit")))
    before = copy.deepcopy(cl.c.__dict__)
    assert cl.ev(CpDone(2, (1, 2), r[1])) == []  # not node2's current region
    assert cl.ev(CpDone(3, (1,), r[3])) == []  # node3 does not serve identity 1
    assert cl.c.__dict__ == before


# -- regressions (bugs found by these tests, now fixed) ---------------------------------------
ASSIGN_WINDOW = (
    "Regression: failover.py _on_Failed once cleared an ('assign', f) transit without keeping f's region in "
    "the identity's chain, but the guest binds the identity, and so acknowledges writes into "
    "its own region, before its assign reply is processed: those writes are never replayed "
    "(and at boot the region is even freed)")


def test_writes_acknowledged_by_a_node_that_dies_before_assign_done_stay_in_the_chain() -> None:
    cl = Cluster(2, "pairs")
    r = cl.boot()
    cl.ev(Failed(1, "exit"))  # Assign(2, 1) sent; node2 replays, binds identity 1, replies...
    cl.ev(Failed(2, "exit"))  # ...and dies before the hypervisor read the reply
    _, acts = cl.start(1)
    own = [a for a in of(Assign, acts) if a.identity == 1]
    assert own and r[2] in own[0].chain


def test_region_of_a_node_that_dies_right_after_its_boot_assign_is_kept_for_replay() -> None:
    cl = Cluster(2, "pairs")
    cl.ev(Spawned(1))
    cl.ev(Spawned(2))
    r1 = cl.new_region()
    assert Assign(1, 1, (), "boot") in cl.ev(Registered(1, r1))  # node1 binds, acks writes...
    acts = cl.ev(Failed(1, "exit"))  # ...and dies before its reply was read
    assert FreeRegion(r1) not in acts
    acts = cl.ev(Registered(2, cl.new_region()))
    assert Assign(2, 1, (r1,), "takeover") in acts


def test_owner_registering_during_the_takeover_still_gets_its_automatic_giveback() -> None:
    cl = Cluster(2, "pairs", delay=2.0)
    r = cl.boot()
    cl.ev(Failed(1, "exit"))  # Assign(2, 1) in transit (a long replay)
    cl.now = 1.0
    cl.start(1)
    cl.now = 1.5
    cl.ev(AssignDone(2, 1, r[2], True))
    cl.now = 100.0
    assert of(Release, cl.ev(Tick())) == [Release(2, 1)]


def given_back_by_node1() -> tuple[Cluster, dict[int, int], int]:
    """node2 failed, node1 took identity 2 over, node2 came back (region r2) and got it back."""
    cl = Cluster(2, "pairs", delay=-1)
    r = cl.boot()
    cl.ev(Failed(2, "exit"))
    cl.done([Assign(1, 2, (), "takeover")])
    r2, _ = cl.start(2)
    cl.ev(GivebackRequested(2))
    cl.done(cl.ev(ReleaseDone(1, 2, True)))
    return cl, r, r2


def test_a_node_taking_back_an_identity_it_just_released_replays_last() -> None:
    """Found by `vmemu chaos` (seed 7): node1 gave identity 2 back, node2 wrote, died; node1
    took identity 2 over again and acknowledged writes into its own region, which the release
    had left first in the chain; then node1 died too. Replayed in that order, node2's older
    records overwrote node1's newer ones: acknowledged writes lost."""
    cl, r, r2 = given_back_by_node1()
    assert cl.chain(2) == [r[1], r2]  # the owner replayed [r1] and serves
    acts = cl.ev(Failed(2, "exit"))
    assert Assign(1, 2, (r[1], r2), "takeover") in acts
    cl.done(acts)  # node1 writes identity 2 into r1 from now on
    assert cl.chain(2) == [r2, r[1]]
    cl.ev(Failed(1, "exit"))  # and dies before a CP
    _, acts = cl.start(2)
    assert Assign(2, 2, (r2, r[1]), "giveback") in acts


def test_a_region_bound_before_its_assign_done_goes_last_when_its_node_dies() -> None:
    cl, r, r2 = given_back_by_node1()
    cl.ev(Failed(2, "exit"))  # node1 is assigned identity 2, binds, writes, dies before done
    cl.ev(Failed(1, "exit"))
    assert cl.chain(2) == [r2, r[1]]


def newest_last(regions: list[int], region: int) -> None:
    if region in regions:
        regions.remove(region)
    regions.append(region)


# -- randomized: safety invariants after every step -------------------------------------------
@dataclass
class World:
    """What the guests and the hypervisor's loop would do with the coordinator's actions."""

    cl: Cluster
    # Conservative: a taker acknowledges writes as soon as it has bound the identity, which
    # the guest does before its assign reply reaches the hypervisor.
    conservative: bool = False
    serves: dict[int, set[int]] = field(default_factory=dict)  # node -> identities it binds
    # identity -> regions that may hold its records not yet on its disks, in the order they
    # last began to write it (replay must apply them in this order: the last one wins)
    may_hold: dict[int, list[int]] = field(default_factory=dict)
    sent_assigns: set[tuple[int, int]] = field(default_factory=set)
    freed: set[int] = field(default_factory=set)
    dead_regions: set[int] = field(default_factory=set)

    @property
    def c(self) -> Coordinator:
        return self.cl.c

    def candidates(self) -> list[Event]:
        """Events that could happen now; the ones that make progress are listed more often."""
        c = self.c
        evs: list[Event] = [Tick(), Tick()]
        for n in range(1, c.nodes + 1):
            st_ = c.state[n]
            if st_ == DOWN:
                evs += [Spawned(n)] * 2
            if st_ == BOOTING:
                evs += [Registered(n, 0)] * 3  # region filled in when applied
            evs.append(Failed(n, "exit" if st_ != DOWN else "heartbeat"))
            evs.append(GivebackRequested(n))
            own = c.identities[n]
            if st_ == UP and own.served_by not in (None, n) and own.transit is None:
                evs += [GivebackRequested(n)] * 3
            if c.alive(n):
                rid = c.region[n]
                assert rid is not None
                evs.append(CpDone(n, tuple(sorted(self.serves[n])), rid))
        for i, ident in c.identities.items():
            if ident.transit and ident.transit[0] == "assign":
                n = ident.transit[1]
                evs += [AssignDone(n, i, c.region[n], True)] * 3  # type: ignore[arg-type]
                evs.append(AssignDone(n, i, 0, False, "boom"))
            if ident.transit and ident.transit[0] == "release":
                evs += [ReleaseDone(ident.transit[1], i, True)] * 3
                evs.append(ReleaseDone(ident.transit[1], i, False, "boom"))
        for n, i in sorted(self.sent_assigns):
            if self.c.identities[i].transit != ("assign", n):
                evs.append(AssignDone(n, i, c.region[n] or 0x99, True))  # stale
        return evs

    def step(self, ev: Event) -> None:
        c = self.c
        if isinstance(ev, Registered):
            ev = Registered(ev.node, self.cl.new_region())
        if isinstance(ev, Tick):
            self.cl.now += 1.0
        fresh = (isinstance(ev, (AssignDone, ReleaseDone)) and c.identities[ev.identity].transit
                 == ("assign" if isinstance(ev, AssignDone) else "release", ev.node))
        was_down = c.state.get(getattr(ev, "node", 0)) == DOWN
        snapshot = copy.deepcopy(c.__dict__)
        try:
            acts = c.handle(ev, self.cl.now)
        except InvalidState:
            assert isinstance(ev, (GivebackRequested, Spawned))
            assert c.__dict__ == snapshot, "a refused event changed the coordinator"
            return
        if isinstance(ev, Failed) and was_down:
            assert acts == []
        # What the processes do.
        if isinstance(ev, Failed) and not was_down:
            self.serves[ev.node] = set()  # fenced: killed, serves nothing any more
            if snapshot["region"][ev.node] is not None:
                self.dead_regions.add(snapshot["region"][ev.node])
        if isinstance(ev, AssignDone) and fresh:
            if ev.ok:
                newest_last(self.may_hold[ev.identity], ev.region)  # clients write from now on
            else:
                # The guest failed before it bound: nobody wrote through it.
                self.serves[ev.node].discard(ev.identity)
                if self.conservative and snapshot["region"][ev.node] in self.may_hold[ev.identity]:
                    self.may_hold[ev.identity].remove(snapshot["region"][ev.node])
        if isinstance(ev, ReleaseDone) and fresh and ev.ok:
            self.serves[ev.node].discard(ev.identity)
            self.may_hold[ev.identity] = []  # the release ended with a CP
        if isinstance(ev, CpDone):
            for i in ev.identities:
                # Everything so far is on disk; a node that writes keeps logging to its region.
                writing = self.conservative or snapshot["identities"][i].served_by == ev.node
                self.may_hold[i] = [ev.region] if writing else []
        for a in acts:
            self.check_action(a)
        self.check_state()

    def check_action(self, a: Action) -> None:
        c = self.c
        if isinstance(a, Assign):
            assert c.alive(a.node), f"{a} assigns to a node that is {c.state[a.node]}"
            assert c.identities[a.identity].transit == ("assign", a.node)
            assert a.identity not in self.serves[a.node], f"{a}: node already serves it"
            assert not set(a.chain) & self.freed, f"{a} names a freed region"
            missing = set(self.may_hold[a.identity]) - set(a.chain)
            assert not missing, f"{a} misses regions holding its records: {missing}"
            self.serves[a.node].add(a.identity)  # the guest replays and binds
            if self.conservative:
                newest_last(self.may_hold[a.identity], c.region[a.node])  # type: ignore[arg-type]
            self.sent_assigns.add((a.node, a.identity))
        elif isinstance(a, Grant):
            assert a.region not in self.freed, f"{a} grants a freed region"
        elif isinstance(a, FreeRegion):
            assert a.region in self.dead_regions, f"{a}: not the region of a failed node"
            assert a.region not in self.freed, f"{a}: freed twice"
            assert not any(a.region in i.chain for i in c.identities.values())
            assert not any(a.region in held for held in self.may_hold.values())
            self.freed.add(a.region)
        elif isinstance(a, Release):
            assert c.identities[a.identity].served_by == a.node

    def check_state(self) -> None:
        c = self.c
        for i, ident in c.identities.items():
            if ident.served_by is not None:
                assert c.alive(ident.served_by), f"identity {i} served by a dead node"
            if ident.transit is not None:
                assert c.alive(ident.transit[1]), f"identity {i} moving to/from a dead node"
            binders = [n for n, s in self.serves.items() if i in s and c.state[n] != DOWN]
            assert len(binders) <= 1, f"identity {i} bound by {binders}: split brain"
            if ident.served_by is not None:
                assert binders == [ident.served_by]
            assert not set(ident.chain) & self.freed
            # A live binder's own region is not in the chain until its assign reply is read.
            exempt = {c.region[n] for n in binders} if self.conservative else set()
            lost = set(self.may_hold[i]) - exempt - set(ident.chain)
            assert not lost, f"identity {i}: records in {lost} are in no chain"
            order = [r for r in ident.chain if r in self.may_hold[i] and r not in exempt]
            want = [r for r in self.may_hold[i] if r not in exempt]
            assert order == want, (f"identity {i}: chain {ident.chain} would replay {order}, "
                                   f"older writers over newer ({want})")
        for n in range(1, c.nodes + 1):
            if c.state[n] == SERVING:
                assert c.identities[n].served_by == n


SHAPES = st.sampled_from([(2, "pairs"), (4, "pairs"), (3, "ring"), (4, "ring")])
DELAYS = st.sampled_from([-1.0, 0.0, 2.0])


def run_world(data: st.DataObject, shape: tuple[int, str], delay: float,
              conservative: bool) -> None:
    nodes, topology = shape
    w = World(Cluster(nodes, topology, delay), conservative,
              serves={n: set() for n in range(1, nodes + 1)},
              may_hold={i: [] for i in range(1, nodes + 1)})
    for _ in range(data.draw(st.integers(10, 60), label="steps")):
        w.step(data.draw(st.sampled_from(w.candidates()), label="event"))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shape=SHAPES, delay=DELAYS)
def test_random_event_sequences_keep_the_failover_invariants(
        data: st.DataObject, shape: tuple[int, str], delay: float) -> None:
    """Writes start once the assign reply is processed; every safety invariant holds."""
    run_world(data, shape, delay, conservative=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # hypothesis' failure report
@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          phases=[Phase.generate], report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shape=SHAPES, delay=DELAYS)
def test_random_event_sequences_never_lose_writes_acknowledged_before_assign_done(
        data: st.DataObject, shape: tuple[int, str], delay: float) -> None:
    """As above, but a taker acknowledges writes from the moment it binds (as guests do)."""
    run_world(data, shape, delay, conservative=True)


def test_a_failed_assign_is_retried_after_a_pause() -> None:
    from vmemu.hypervisor.failover import RETRY_PLACE_S, Coordinator

    c = Coordinator(2, "pairs", giveback_delay=-1)
    for n in (1, 2):
        c.handle(Spawned(n), 0.0)
    c.handle(Registered(1, 0x11), 0.0)
    c.handle(Registered(2, 0x22), 0.0)
    assert c.handle(AssignDone(1, 1, 0, False, "disk busy"), 0.1)[0].kind == "assign_failed"
    assert c.identities[1].served_by is None and c.identities[1].transit is None
    assert not [a for a in c.handle(Tick(), 0.1 + RETRY_PLACE_S / 2) if isinstance(a, Assign)]
    again = [a for a in c.handle(Tick(), 0.2 + RETRY_PLACE_S) if isinstance(a, Assign)]
    assert again == [Assign(1, 1, (), "boot")]


def test_an_assign_that_keeps_failing_is_retried_later_and_later_then_resets() -> None:
    """A corrupt disk does not mend itself: the retries back off to RETRY_MAX_S and status
    says why; one success forgets the failures."""
    from vmemu.hypervisor.failover import RETRY_MAX_S, Coordinator

    c = Coordinator(2, "pairs", giveback_delay=-1)
    for n in (1, 2):
        c.handle(Spawned(n), 0.0)
    c.handle(Registered(1, 0x11), 0.0)
    c.handle(Registered(2, 0x22), 0.0)
    now, gaps = 0.0, []
    for _ in range(12):
        log = c.handle(AssignDone(1, 1, 0, False, "disk node1/disk0.img: bad magic"), now)[0]
        gaps.append(log.fields["retry_in_s"])
        assert c.assign_backoff(1, now) == {"failures": len(gaps),
                                            "error": "disk node1/disk0.img: bad magic",
                                            "retry_in_s": gaps[-1]}
        # Nothing before the delay is up; the assign comes back once it is.
        assert not [a for a in c.handle(Tick(), now + gaps[-1] - 0.01) if isinstance(a, Assign)]
        now += gaps[-1]
        assert [a for a in c.handle(Tick(), now) if isinstance(a, Assign)]
    assert gaps[:3] == [1.0, 1.0, 1.0] and gaps[3:6] == [2.0, 4.0, 8.0]
    assert max(gaps) == RETRY_MAX_S and gaps[-1] == RETRY_MAX_S
    assert sum(1 for g in gaps if g < RETRY_MAX_S) < 10  # not once a second forever
    c.handle(AssignDone(1, 1, 0x11, True), now)
    assert c.assign_backoff(1, now) is None and c.identities[1].served_by == 1


def test_a_late_cp_report_of_an_earlier_time_serving_the_identity_keeps_the_chain() -> None:
    """Regression (bus faults: a report delayed on the bus): node2 took identity 1 over and
    made a CP of it, whose report was held up; it gave identity 1 back, node1 wrote it into
    its new region and died, and node2 took it over again. The late report named node2's
    current region and an identity node2 serves again, so it once cut the chain to node2's
    region and freed node1's: writes node1 acknowledged, never replayed. The epoch the CP
    wrote the identity at tells an old report from a current one."""
    cl = Cluster(2, "pairs", delay=-1)
    r = cl.boot()
    cl.ev(Failed(1, "exit"))
    cl.ev(AssignDone(2, 1, r[2], True, epoch=5))
    late = CpDone(2, (1,), r[2], ((1, 5),))  # made now, read much later
    r1, _ = cl.start(1)
    cl.ev(GivebackRequested(1))
    assert Assign(1, 1, (r[2],), "giveback") in cl.ev(ReleaseDone(2, 1, True))
    cl.ev(AssignDone(1, 1, r1, True, epoch=6))
    assert Assign(2, 1, (r[2], r1), "takeover") in cl.ev(Failed(1, "exit"))
    cl.ev(AssignDone(2, 1, r[2], True, epoch=7))
    assert cl.chain(1) == [r1, r[2]]
    acts = cl.ev(late)
    assert cl.chain(1) == [r1, r[2]] and not of(FreeRegion, acts)
    assert logs(acts, "stale_report") == [Log("stale_report", 2, {"what": "cp_done",
                                                                  "identities": [1]})]
    # a report of the current time serving it shortens the chain as before
    assert cl.ev(CpDone(2, (1,), r[2], ((1, 7),))) == [FreeRegion(r1)]
    assert cl.chain(1) == [r[2]]
