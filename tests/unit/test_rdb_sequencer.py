"""Sequencer rules: ordering, acks and the all-live commit rule, catch-up, election and
failover, the un-acknowledged tail, and management commands while one node is down."""

from __future__ import annotations

import pytest

from vmemu.errors import BadRequest, Unavailable
from vmemu.rdb import Replica, Sequencer, elect, sync
from vmemu.rdb.cluster_model import ClusterModel
from vmemu.rdb.sequencer import Candidate


@pytest.fixture
def model(tmp_path):
    m = ClusterModel(tmp_path, 3)
    yield m
    m.close()


def setup_nodes(m: ClusterModel) -> None:
    for i, n in enumerate(m.names, 1):
        m.propose("node_add", {"name": n, "index": i})


def assert_same(m: ClusterModel) -> None:
    live = m.live_synced()
    assert sorted(live) == sorted(m.up)
    snaps = [m.replicas[n].snapshot() for n in live]
    logs = [m.replicas[n].log() for n in live]
    assert all(s == snaps[0] for s in snaps) and all(lg == logs[0] for lg in logs)


def test_propose_orders_and_applies_locally(tmp_path):
    r = Replica(tmp_path / "a.sqlite")
    s = Sequencer("node1", r, ["node1", "node2"], clock=lambda: 5.0)
    e1 = s.propose("node_add", {"name": "node1", "index": 1})
    e2 = s.propose("node_add", {"name": "node2", "index": 2})
    assert (e1.seq, e2.seq, e2.t) == (1, 2, 5.0) and r.last_seq == 2
    with pytest.raises(BadRequest):
        s.propose("node_add", {"name": "node2", "index": 3})
    assert r.last_seq == 2
    r.close()


def test_commit_is_min_ack_over_live(tmp_path):
    r = Replica(tmp_path / "a.sqlite")
    s = Sequencer("node1", r, ["node1", "node2", "node3"])
    for i in (1, 2, 3):
        s.propose("node_add", {"name": f"node{i}", "index": i})
    s.ack("node2", 3)
    s.ack("node3", 1)
    assert s.committed_seq(["node1", "node2", "node3"]) == 1
    assert s.committed_seq(["node1", "node2"]) == 3  # node3 down: all live have 3
    s.ack("node3", 2)
    s.ack("node3", 1)  # acks never go back
    assert s.committed_seq(["node1", "node3"]) == 2
    with pytest.raises(BadRequest):
        s.ack("node9", 1)
    r.close()


def test_catch_up_append_or_rebuild(tmp_path):
    r = Replica(tmp_path / "a.sqlite")
    s = Sequencer("node1", r, ["node1"])
    for i in (1, 2, 3):
        s.propose("node_add", {"name": f"node{i}", "index": i})
    cu = s.catch_up(1, r.hash_at(1))
    assert not cu.rebuild and [e.seq for e in cu.entries] == [2, 3]
    assert s.catch_up(1, "f" * 64).rebuild
    assert s.catch_up(7).rebuild
    assert s.catch_up(3, r.last_hash).entries == []
    r.close()


def test_elect_lowest_live_index_from_highest_seq():
    c = [Candidate("node3", 3, 9), Candidate("node2", 2, 7), Candidate("node4", 4, 9)]
    assert elect(c, committed_seq=7) == ("node2", "node3")
    with pytest.raises(Unavailable):
        elect([Candidate("node2", 2, 4)], committed_seq=5)
    with pytest.raises(Unavailable):
        elect([])


def test_sync_appends_or_rebuilds(tmp_path):
    a, b = Replica(tmp_path / "a.sqlite"), Replica(tmp_path / "b.sqlite")
    a.apply(1, "node_add", {"name": "n1", "index": 1})
    a.apply(2, "node_add", {"name": "n2", "index": 2})
    assert sync(b, a) is False and b.log() == a.log()
    b.apply(3, "node_add", {"name": "n3", "index": 3})
    a.apply(3, "node_add", {"name": "n4", "index": 4})
    assert sync(b, a) is True and b.snapshot() == a.snapshot()
    a.close()
    b.close()


def test_commands_work_with_any_one_node_down(model):
    setup_nodes(model)
    for down in model.names:
        model.down(down)
        vol = f"vol_{down}"
        model.propose("volume_create", {"name": vol, "node": "node2", "size": 100})
        model.propose("volume_move", {"name": vol, "node": "node3"})
        assert_same(model)
        model.up_node(down)
        assert_same(model)
        assert model.replicas[down].vldb_lookup(vol) == "node3"


def test_sequencer_failover_continues_seq(model):
    setup_nodes(model)
    assert model.sequencer().node == "node1"
    model.down("node1")
    e = model.propose("volume_create", {"name": "v", "node": "node2", "size": 1})
    assert model.seq.node == "node2" and e.seq == 4
    model.up_node("node1")
    assert model.sequencer().node == "node2"  # no fail-back: it stays until it goes down
    assert_same(model)


def test_unacked_tail_on_a_live_replica_is_adopted(model):
    setup_nodes(model)
    e = model.propose("volume_create", {"name": "v", "node": "node1", "size": 1},
                      reach={"node3"})  # node2 never got it
    model.down("node1")
    model.propose("lun_create", {"volume": "v", "name": "l", "size": 1})
    assert model.seq.node == "node2"
    assert model.replicas["node2"].log()[e.seq - 1] == model.replicas["node3"].log()[e.seq - 1]
    model.up_node("node1")
    assert_same(model)


def test_tail_only_on_dead_sequencer_is_discarded_and_rebuilt(model):
    setup_nodes(model)
    model.propose("volume_create", {"name": "lost", "node": "node1", "size": 1}, reach=set())
    model.down("node1")
    e = model.propose("volume_create", {"name": "kept", "node": "node2", "size": 1})
    assert e.seq == 4  # the same seq the lost change had
    assert model.up_node("node1") is True  # divergent: rebuilt
    assert_same(model)
    assert [v[0] for v in model.replicas["node1"].volumes()] == ["kept"]


def test_unavailable_until_a_replica_with_committed_data_returns(tmp_path):
    m = ClusterModel(tmp_path, 2)
    m.down("node2")
    m.propose("node_add", {"name": "node1", "index": 1})  # committed: node1 is all live
    m.down("node1")
    m.up_node("node2")
    with pytest.raises(Unavailable):
        m.propose("node_add", {"name": "node2", "index": 2})
    m.up_node("node1")
    m.propose("node_add", {"name": "node2", "index": 2})
    assert_same(m)
    assert m.replicas["node2"].nodes() == [("node1", 1), ("node2", 2)]
    m.close()


def test_invalid_proposal_changes_nothing_anywhere(model):
    setup_nodes(model)
    before = {n: (r.snapshot(), r.log()) for n, r in model.replicas.items()}
    with pytest.raises(BadRequest):
        model.propose("volume_create", {"name": "v", "node": "node1", "size": 0})
    assert {n: (r.snapshot(), r.log()) for n, r in model.replicas.items()} == before
