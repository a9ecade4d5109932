"""Replica rules: ordered idempotent apply, validation with typed errors, one transaction per
change, queries, VLDB, catch-up, rebuild, durability across reopen."""

from __future__ import annotations

import sqlite3

import pytest

from vmemu.errors import BadRequest, InvalidState, UnknownNode, VmemuError
from vmemu.rdb import (
    AlreadyExists, Entry, LogDiverged, NotEmpty, Replica, SequenceGap, UnknownVolume,
)


@pytest.fixture
def rep(tmp_path):
    r = Replica(tmp_path / "rdb.sqlite")
    yield r
    r.close()


def seed(r: Replica) -> None:
    ch = [("node_add", {"name": "node1", "index": 1}),
          ("node_add", {"name": "node2", "index": 2}),
          ("volume_create", {"name": "vol1", "node": "node1", "size": 1000}),
          ("lun_create", {"volume": "vol1", "name": "lun0", "size": 400})]
    for op, a in ch:
        r.apply(r.last_seq + 1, op, a, 1.0)


def test_pragmas_wal_full(rep):
    assert rep._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert rep._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_apply_and_queries(rep):
    seed(rep)
    assert rep.last_seq == 4
    assert rep.nodes() == [("node1", 1), ("node2", 2)]
    assert rep.volumes() == [("vol1", "node1", 1000, "online")]
    assert rep.luns("vol1") == [("lun0", 400)]
    assert rep.vldb_lookup("vol1") == "node1"
    rep.apply(5, "volume_move", {"name": "vol1", "node": "node2"})
    assert rep.vldb_lookup("vol1") == "node2" and rep.vldb() == {"vol1": "node2"}
    rep.apply(6, "identity_set", {"name": "nmod1", "served_by": "node1"})
    rep.apply(7, "identity_set", {"name": "nmod1", "served_by": "node2"})
    assert rep.served_by("nmod1") == "node2" and rep.identities() == {"nmod1": "node2"}
    rep.apply(8, "ha_pair", {"node": "node1", "partner": "node2"})
    assert rep.ha_partner("node2") == "node1" and rep.ha_pairs() == [("node1", "node2")]
    rep.apply(9, "ha_unpair", {"node": "node2"})
    assert rep.ha_partner("node1") is None
    rep.apply(10, "volume_set_state", {"name": "vol1", "state": "offline"})
    rep.apply(11, "lun_resize", {"volume": "vol1", "name": "lun0", "size": 1000})
    rep.apply(12, "lun_delete", {"volume": "vol1", "name": "lun0"})
    rep.apply(13, "volume_delete", {"name": "vol1"})
    assert rep.volumes() == [] and rep.vldb() == {}


def test_seq_must_be_next(rep):
    seed(rep)
    with pytest.raises(SequenceGap) as ei:
        rep.apply(6, "node_add", {"name": "node3", "index": 3})
    assert isinstance(ei.value, InvalidState) and "up to 4" in ei.value.message
    assert rep.last_seq == 4 and len(rep.nodes()) == 2


def test_already_applied_seq_is_noop(rep):
    seed(rep)
    before = rep.snapshot()
    assert rep.apply(3, "volume_create", {"name": "vol1", "node": "node1", "size": 1000}, 1.0) \
        is False
    assert rep.snapshot() == before


def test_already_applied_seq_with_other_change_diverges(rep):
    seed(rep)
    with pytest.raises(LogDiverged):
        rep.apply(3, "volume_create", {"name": "volX", "node": "node1", "size": 1000}, 1.0)


@pytest.mark.parametrize("op,args,err", [
    ("nope", {}, BadRequest),
    ("node_add", [], BadRequest),
    ("node_add", {"name": "node1", "index": 5}, AlreadyExists),
    ("node_add", {"name": "node9", "index": 1}, AlreadyExists),
    ("node_add", {"name": "9bad", "index": 9}, BadRequest),
    ("node_add", {"name": "n", "index": 0}, BadRequest),
    ("node_add", {"name": "n", "index": True}, BadRequest),
    ("node_add", {"name": "n", "index": 3, "x": 1}, BadRequest),
    ("node_remove", {"name": "node1"}, NotEmpty),
    ("node_remove", {"name": "node7"}, UnknownNode),
    ("volume_create", {"name": "vol1", "node": "node1", "size": 5}, AlreadyExists),
    ("volume_create", {"name": "vol2", "node": "node7", "size": 5}, UnknownNode),
    ("volume_create", {"name": "vol2", "node": "node1", "size": 0}, BadRequest),
    ("volume_create", {"name": "vol2", "node": "node1", "size": -1}, BadRequest),
    ("volume_create", {"name": "vol2", "node": "node1", "size": 1.5}, BadRequest),
    ("volume_create", {"name": "vol/2", "node": "node1", "size": 5}, BadRequest),
    ("volume_create", {"name": "", "node": "node1", "size": 5}, BadRequest),
    ("volume_create", {"name": "a" * 65, "node": "node1", "size": 5}, BadRequest),
    ("volume_delete", {"name": "vol1"}, NotEmpty),
    ("volume_delete", {"name": "ghost"}, UnknownVolume),
    ("volume_move", {"name": "ghost", "node": "node1"}, UnknownVolume),
    ("volume_move", {"name": "vol1", "node": "node7"}, UnknownNode),
    ("volume_set_state", {"name": "vol1", "state": "melted"}, BadRequest),
    ("lun_create", {"volume": "ghost", "name": "l", "size": 1}, UnknownVolume),
    ("lun_create", {"volume": "vol1", "name": "lun0", "size": 1}, AlreadyExists),
    ("lun_create", {"volume": "vol1", "name": "lun1", "size": 601}, BadRequest),
    ("lun_resize", {"volume": "vol1", "name": "lun0", "size": 1001}, BadRequest),
    ("lun_resize", {"volume": "vol1", "name": "lunX", "size": 1}, BadRequest),
    ("lun_delete", {"volume": "vol1", "name": "lunX"}, BadRequest),
    ("identity_set", {"name": "i", "served_by": "node7"}, UnknownNode),
    ("ha_pair", {"node": "node1", "partner": "node1"}, BadRequest),
    ("ha_pair", {"node": "node1", "partner": "node7"}, UnknownNode),
    ("ha_unpair", {"node": "node1"}, BadRequest),
])
def test_invalid_change_raises_typed_error_and_changes_nothing(rep, op, args, err):
    seed(rep)
    before, log_before = rep.snapshot(), rep.log()
    with pytest.raises(err) as ei:
        rep.check(op, args)
    assert isinstance(ei.value, VmemuError)
    with pytest.raises(err):
        rep.apply(5, op, args)
    assert rep.snapshot() == before and rep.log() == log_before
    # the seq was not consumed: the next valid change takes it
    rep.apply(5, "node_add", {"name": "node3", "index": 3})
    assert rep.last_seq == 5


def test_ha_pair_twice_rejected(rep):
    seed(rep)
    rep.apply(5, "ha_pair", {"node": "node1", "partner": "node2"})
    rep.apply(6, "node_add", {"name": "node3", "index": 3})
    with pytest.raises(AlreadyExists):
        rep.apply(7, "ha_pair", {"node": "node3", "partner": "node2"})


def test_luns_and_vldb_of_unknown_volume(rep):
    with pytest.raises(UnknownVolume):
        rep.luns("ghost")
    with pytest.raises(UnknownVolume):
        rep.vldb_lookup("ghost")


def test_entries_since_and_catch_up(rep, tmp_path):
    seed(rep)
    assert [e.seq for e in rep.entries_since(2)] == [3, 4]
    other = Replica(tmp_path / "b.sqlite")
    for e in rep.entries_since(0)[:2]:
        other.apply_entry(e)
    for e in rep.entries_since(other.last_seq):
        other.apply_entry(e)
    assert other.snapshot() == rep.snapshot() and other.log() == rep.log()
    other.close()


def test_rebuild_replaces_divergent_tail(rep, tmp_path):
    seed(rep)
    other = Replica(tmp_path / "b.sqlite")
    for e in rep.entries_since(0)[:2]:
        other.apply_entry(e)
    other.apply(3, "volume_create", {"name": "orphan", "node": "node2", "size": 5}, 9.0)
    assert other.hash_at(2) == rep.hash_at(2) and other.hash_at(3) != rep.hash_at(3)
    other.rebuild(rep.entries_since(0))
    assert other.snapshot() == rep.snapshot() and other.log() == rep.log()
    other.close()


def test_rebuild_is_atomic(rep, tmp_path):
    seed(rep)
    before = rep.snapshot()
    bad = [Entry(1, "node_add", {"name": "x", "index": 1}),
           Entry(2, "volume_create", {"name": "v", "node": "ghost", "size": 1})]
    with pytest.raises(UnknownNode):
        rep.rebuild(bad)
    assert rep.snapshot() == before


def test_durable_across_reopen(tmp_path):
    p = tmp_path / "rdb.sqlite"
    r = Replica(p)
    seed(r)
    snap = r.snapshot()
    r.close()
    r2 = Replica(p)
    assert r2.snapshot() == snap and r2.last_seq == 4
    r2.close()


def test_log_rows_are_json(rep):
    seed(rep)
    row = sqlite3.connect(rep.path).execute("SELECT args FROM log WHERE seq=3").fetchone()
    assert row[0] == '{"name": "vol1", "node": "node1", "size": 1000}'
