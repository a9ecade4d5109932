"""RdbHost, a domain's RDB service: each op on a real replica, results that survive msgpack,
typed errors that leave the replica unchanged."""

from __future__ import annotations

import msgpack
import pytest

from domains.rdb_host import RdbHost, entry_from_wire
from vmemu.errors import BadRequest
from vmemu.rdb import AlreadyExists, LogDiverged, SequenceGap, UnknownVolume
from vmemu.rdb.replica import GENESIS_HASH

MEMBERS = ["node1", "node2"]


@pytest.fixture
def pair(tmp_path):
    a = RdbHost(tmp_path / "node1" / "rdb.sqlite", "node1", MEMBERS, clock=lambda: 1.5)
    b = RdbHost(tmp_path / "node2" / "rdb.sqlite", "node2", MEMBERS, clock=lambda: 2.5)
    yield a, b
    a.close()
    b.close()


def wire(x):
    """What the other end of the bus sees."""
    return msgpack.unpackb(msgpack.packb(x, use_bin_type=True), raw=False)


def test_state_of_an_empty_replica(pair):
    a, _ = pair
    assert a.handle("rdb_state", {}) == {"last_seq": 0, "last_hash": GENESIS_HASH}
    assert a.handle("rdb_state", {"at": 0})["hash_at"] == GENESIS_HASH
    assert a.handle("rdb_state", {"at": 5})["hash_at"] is None


def test_propose_then_apply_elsewhere_gives_identical_replicas(pair):
    a, b = pair
    for i, n in enumerate(MEMBERS, 1):
        res = wire(a.handle("rdb_propose", {"op": "node_add", "args": {"name": n, "index": i}}))
        assert res["entry"] == {"seq": i, "op": "node_add", "t": 1.5,
                                "args": {"name": n, "index": i}}
        assert res["last_seq"] == i
        assert b.handle("rdb_apply", {"entries": [res["entry"]]})["last_hash"] == res["last_hash"]
    assert b.handle("rdb_apply", {"entries": [res["entry"]]})["last_seq"] == 2  # idempotent
    assert a.replica.log() == b.replica.log()


def test_a_refused_proposal_changes_nothing(pair):
    a, _ = pair
    a.handle("rdb_propose", {"op": "node_add", "args": {"name": "node1", "index": 1}})
    before = (a.replica.snapshot(), a.replica.log())
    with pytest.raises(AlreadyExists):
        a.handle("rdb_propose", {"op": "node_add", "args": {"name": "node1", "index": 2}})
    with pytest.raises(BadRequest):
        a.handle("rdb_propose", {"args": {}})
    assert (a.replica.snapshot(), a.replica.log()) == before


def test_catch_up_appends_or_rebuilds(pair):
    a, b = pair
    e = [a.handle("rdb_propose", {"op": "node_add", "args": {"name": n, "index": i}})["entry"]
         for i, n in enumerate(MEMBERS, 1)]
    res = a.handle("rdb_catch_up", {"last_seq": 0, "last_hash": GENESIS_HASH})
    assert res["mode"] == "append" and res["entries"] == e
    b.handle("rdb_propose", {"op": "node_add", "args": {"name": "other", "index": 7}})
    st = b.handle("rdb_state", {})
    res = a.handle("rdb_catch_up", st)
    assert res["mode"] == "rebuild" and res["entries"] == e
    with pytest.raises(LogDiverged):  # b's seq 1 is a different change
        b.handle("rdb_apply", {"entries": e[:1]})
    with pytest.raises(SequenceGap):
        b.handle("rdb_apply", {"entries": [dict(e[1], seq=3)]})
    assert b.handle("rdb_rebuild", {"entries": res["entries"]}) == a.handle("rdb_state", {})
    assert a.handle("rdb_catch_up", {"full": True})["mode"] == "rebuild"


def test_queries_and_vldb_lookup(pair):
    a, _ = pair
    a.handle("rdb_propose", {"op": "node_add", "args": {"name": "node1", "index": 1}})
    a.handle("rdb_propose", {"op": "volume_create",
                             "args": {"name": "v", "node": "node1", "size": 9}})
    q = lambda what, **kw: wire(a.handle("rdb_query", dict(kw, what=what)))["data"]  # noqa: E731
    assert q("vldb") == {"v": "node1"} and q("vldb", volume="v") == "node1"
    assert q("volumes") == [{"name": "v", "node": "node1", "size": 9, "state": "online"}]
    assert q("luns", volume="v") == [] and q("nodes") == [{"name": "node1", "index": 1}]
    assert q("identities") == {} and q("identities", identity="x") is None
    assert q("ha_pairs") == [] and q("ha_pairs", node="node1") is None
    assert q("log", since=1)[0]["op"] == "volume_create"
    assert wire(q("snapshot")) == q("snapshot")
    assert a.vldb_lookup("v") == "node1"
    with pytest.raises(UnknownVolume):
        a.handle("rdb_query", {"what": "vldb", "volume": "nope"})
    with pytest.raises(BadRequest):
        a.handle("rdb_query", {"what": "everything"})
    with pytest.raises(BadRequest):
        a.handle("rdb_frobnicate", {})


@pytest.mark.parametrize("bad", [None, [], {"seq": 0, "op": "x", "args": {}},
                                 {"seq": 1, "op": 3, "args": {}}, {"seq": 1, "op": "x"},
                                 {"seq": True, "op": "x", "args": {}},
                                 {"seq": 1, "op": "x", "args": {}, "t": "now"}])
def test_malformed_entries_are_bad_requests(bad):
    with pytest.raises(BadRequest):
        entry_from_wire(bad)


def test_a_node_outside_the_members_is_refused_at_startup(tmp_path):
    with pytest.raises(BadRequest):
        RdbHost(tmp_path / "x.sqlite", "node3", MEMBERS)
