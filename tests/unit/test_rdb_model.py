"""Hypothesis: random proposals (valid and not), nodes down/up, partial broadcasts and
catch-ups. Invariants: caught-up live replicas are identical (state and log); a returning
replica reaches the same state; invalid proposals change nothing anywhere; committed changes
are never lost; every replica's state is the replay of its log."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmemu.errors import Unavailable, VmemuError
from vmemu.rdb import Replica
from vmemu.rdb.cluster_model import ClusterModel

N = 3
NODES = [f"node{i}" for i in range(1, N + 2)]  # index range 1..N+1: duplicates and gaps
VOLS = ["va", "vb", "vc"]
LUNS = ["l0", "l1"]
SIZES = st.sampled_from([0, 1, 50, 100, -3])

changes = st.one_of(
    st.builds(lambda n, i: ("node_add", {"name": n, "index": i}),
              st.sampled_from(NODES), st.integers(1, N + 1)),
    st.builds(lambda n: ("node_remove", {"name": n}), st.sampled_from(NODES)),
    st.builds(lambda v, n, s: ("volume_create", {"name": v, "node": n, "size": s}),
              st.sampled_from(VOLS + ["bad/name"]), st.sampled_from(NODES), SIZES),
    st.builds(lambda v: ("volume_delete", {"name": v}), st.sampled_from(VOLS)),
    st.builds(lambda v, n: ("volume_move", {"name": v, "node": n}),
              st.sampled_from(VOLS), st.sampled_from(NODES)),
    st.builds(lambda v, s: ("volume_set_state", {"name": v, "state": s}),
              st.sampled_from(VOLS), st.sampled_from(["online", "offline", "gone"])),
    st.builds(lambda v, l, s: ("lun_create", {"volume": v, "name": l, "size": s}),
              st.sampled_from(VOLS), st.sampled_from(LUNS), SIZES),
    st.builds(lambda v, l, s: ("lun_resize", {"volume": v, "name": l, "size": s}),
              st.sampled_from(VOLS), st.sampled_from(LUNS), SIZES),
    st.builds(lambda v, l: ("lun_delete", {"volume": v, "name": l}),
              st.sampled_from(VOLS), st.sampled_from(LUNS)),
    st.builds(lambda i, n: ("identity_set", {"name": i, "served_by": n}),
              st.sampled_from(["id1", "id2"]), st.sampled_from(NODES)),
    st.builds(lambda a, b: ("ha_pair", {"node": a, "partner": b}),
              st.sampled_from(NODES), st.sampled_from(NODES)),
    st.builds(lambda a: ("ha_unpair", {"node": a}), st.sampled_from(NODES)),
    st.just(("no_such_op", {})),
)


class RdbCluster(RuleBasedStateMachine):
    nodes = N

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vmemu-rdb-")
        self.m = ClusterModel(self.dir, self.nodes)
        self.committed_log: list = []   # log rows up to the committed watermark
        for i, n in enumerate(self.m.names, 1):  # most runs start with the nodes known
            self.m.propose("node_add", {"name": n, "index": i})

    def teardown(self) -> None:
        self.m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def everything(self):
        return {n: (r.snapshot(), r.log()) for n, r in self.m.replicas.items()}

    def record_commit(self) -> None:
        if self.m.available:
            log = self.m.seq.replica.log()
            self.committed_log = log[: self.m.committed]

    @rule(change=changes, partial=st.none() | st.sets(st.sampled_from(NODES[:N])))
    def propose(self, change, partial):
        op, args = change
        if self.m.up and not self.m.available:
            try:  # an election (and its catch-up) is a change of its own, not the proposal's
                self.m.sequencer()
                self.record_commit()
            except Unavailable:
                pass
        before = self.everything()
        try:
            self.m.propose(op, args, reach=partial)
        except Unavailable:
            event("propose: unavailable")
            assert self.everything() == before
            return
        except VmemuError:
            event("propose: invalid")
            assert self.everything() == before  # invalid: nothing changed anywhere
            return
        event("propose: ok")
        self.record_commit()

    @precondition(lambda self: self.m.available)
    @rule(change=changes, data=st.data())
    def sequencer_dies_mid_broadcast(self, change, data):
        """The sequencer applies a change, reaches only some replicas (maybe none), dies."""
        others = sorted(self.m.up - {self.m.seq.node})
        reach = data.draw(st.sets(st.sampled_from(others)) if others else st.just(set()))
        dead = self.m.seq.node
        try:
            self.m.propose(*change, reach=reach)
            event(f"crash: tail reached {len(reach)}")
        except VmemuError:
            pass
        self.record_commit()
        self.m.down(dead)

    @precondition(lambda self: len(self.m.up) > 0)
    @rule(data=st.data())
    def down(self, data):
        self.m.down(data.draw(st.sampled_from(sorted(self.m.up))))

    @precondition(lambda self: len(self.m.up) < self.nodes)
    @rule(data=st.data())
    def up(self, data):
        name = data.draw(st.sampled_from(sorted(set(self.m.names) - self.m.up)))
        rebuilt = self.m.up_node(name)
        event(f"up: rebuilt={rebuilt} available={self.m.available}")
        if self.m.available:
            r = self.m.replicas[name]
            assert (r.snapshot(), r.log()) == (self.m.seq.replica.snapshot(),
                                               self.m.seq.replica.log())
        self.record_commit()

    @precondition(lambda self: self.m.available)
    @rule()
    def catch_up_all(self):
        self.m.catch_up_all()
        assert sorted(self.m.live_synced()) == sorted(self.m.up)
        self.record_commit()

    @invariant()
    def synced_live_replicas_identical(self):
        live = self.m.live_synced()
        if not live:
            return
        ref = self.m.replicas[live[0]]
        for n in live[1:]:
            assert self.m.replicas[n].snapshot() == ref.snapshot()
            assert self.m.replicas[n].log() == ref.log()

    @invariant()
    def live_logs_are_prefixes_of_the_sequencer_log(self):
        if not self.m.available:
            return
        lead = self.m.seq.replica.log()
        for n in self.m.up:
            log = self.m.replicas[n].log()
            assert log == lead[: len(log)], f"{n} diverged from the sequencer"

    @invariant()
    def committed_never_lost(self):
        if self.m.available:
            log = self.m.seq.replica.log()
            assert log[: len(self.committed_log)] == self.committed_log

    @invariant()
    def state_is_replay_of_log(self):
        if not self.m.available:
            return
        leader = self.m.seq.replica
        fresh = Replica(f"{self.dir}/replay-{leader.last_seq}.sqlite")
        fresh.rebuild(leader.entries_since(0))
        assert fresh.snapshot() == leader.snapshot()
        fresh.close()


class RdbPair(RdbCluster):
    nodes = 2


_settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestRdbCluster = RdbCluster.TestCase
TestRdbCluster.settings = _settings
TestRdbPair = RdbPair.TestCase
TestRdbPair.settings = _settings
