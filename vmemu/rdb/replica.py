"""One node's replica of the management database, stored in SQLite (WAL, synchronous=FULL).

State tables: nodes, volumes (the VLDB is the `vldb` view: volume -> owning node), luns,
identities (identity -> node serving it), ha (node -> partner, both directions stored).
`log` holds every applied change (seq, op, args JSON, t, h) where h chains a SHA-256 over the
previous h and the canonical change, so two replicas agree on a prefix iff their hashes at
its last seq agree. `meta` holds last_seq and last_hash.

Rules:
- apply(seq, ...) only takes seq == last_seq + 1 (SequenceGap otherwise); a seq already
  applied is a no-op if it is the same change, LogDiverged if it is a different one.
- every change is validated; one transaction per change, so an invalid change (typed error,
  a subclass of VmemuError) leaves the replica exactly as it was and does not consume a seq.
- changes are deterministic functions of (state, op, args): `t` is chosen by the sequencer
  and stored, never read from the local clock, so every replica ends in identical state.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmemu.errors import BadRequest
from vmemu.rdb.errors import (
    AlreadyExists, LogDiverged, NotEmpty, SequenceGap, UnknownRdbNode, UnknownVolume,
)

GENESIS_HASH = "0" * 64
MAX_SIZE = 1 << 50  # 1 PiB
VOLUME_STATES = ("online", "offline", "restricted")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, idx INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY, owner_node TEXT NOT NULL REFERENCES nodes(name),
    size INTEGER NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS luns (
    volume TEXT NOT NULL REFERENCES volumes(name), name TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (volume, name));
CREATE TABLE IF NOT EXISTS identities (
    name TEXT PRIMARY KEY, served_by TEXT NOT NULL REFERENCES nodes(name));
CREATE TABLE IF NOT EXISTS ha (node TEXT PRIMARY KEY REFERENCES nodes(name),
    partner TEXT NOT NULL REFERENCES nodes(name));
CREATE VIEW IF NOT EXISTS vldb AS SELECT name AS volume, owner_node AS node FROM volumes;
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY, op TEXT NOT NULL, args TEXT NOT NULL, t REAL NOT NULL,
    h TEXT NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('last_seq', '0'), ('last_hash', '""" + GENESIS_HASH + """');
"""
_STATE_TABLES = ("ha", "identities", "luns", "volumes", "nodes")


@dataclass(frozen=True)
class Entry:
    seq: int
    op: str
    args: dict
    t: float = 0.0

    def canonical(self) -> str:
        return canonical(self.op, self.args)


def canonical(op: str, args: dict) -> str:
    return json.dumps([op, args], sort_keys=True, separators=(",", ":"))


def chain(prev_hash: str, seq: int, op: str, args: dict, t: float) -> str:
    body = f"{prev_hash}|{seq}|{canonical(op, args)}|{float(t)!r}"
    return hashlib.sha256(body.encode()).hexdigest()


# ---- validation helpers -------------------------------------------------------------------

def _name(args: dict, key: str, what: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not _NAME.match(v):
        raise BadRequest(f"invalid {what} name {v!r}: use a letter then up to 63 of "
                         "letters, digits, '_', '.', '-'")
    return v


def _size(args: dict, key: str = "size") -> int:
    v = args.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIZE:
        raise BadRequest(f"invalid {key} {v!r}: a whole number of bytes in 1..{MAX_SIZE}")
    return v


def _only(args: dict, keys: set[str], op: str) -> None:
    extra = set(args) - keys
    if extra:
        raise BadRequest(f"{op}: unexpected argument(s) {sorted(extra)}; takes {sorted(keys)}")


# ---- the changes ---------------------------------------------------------------------------

def _need_node(db: sqlite3.Connection, name: str) -> None:
    if db.execute("SELECT 1 FROM nodes WHERE name=?", (name,)).fetchone() is None:
        raise UnknownRdbNode(f"unknown node {name!r}: add it with node_add first")


def _need_volume(db: sqlite3.Connection, name: str) -> tuple:
    row = db.execute("SELECT name, owner_node, size, state FROM volumes WHERE name=?",
                     (name,)).fetchone()
    if row is None:
        raise UnknownVolume(f"unknown volume {name!r}")
    return row


def _node_add(db, a):
    _only(a, {"name", "index"}, "node_add")
    name = _name(a, "name", "node")
    idx = a.get("index")
    if isinstance(idx, bool) or not isinstance(idx, int) or not 1 <= idx <= 64:
        raise BadRequest(f"invalid node index {idx!r}: 1..64")
    if db.execute("SELECT 1 FROM nodes WHERE name=? OR idx=?", (name, idx)).fetchone():
        raise AlreadyExists(f"node {name!r} or index {idx} already exists")
    db.execute("INSERT INTO nodes (name, idx) VALUES (?, ?)", (name, idx))


def _node_remove(db, a):
    _only(a, {"name"}, "node_remove")
    name = _name(a, "name", "node")
    _need_node(db, name)
    for table, col in (("volumes", "owner_node"), ("identities", "served_by"), ("ha", "node")):
        if db.execute(f"SELECT 1 FROM {table} WHERE {col}=?", (name,)).fetchone():
            raise NotEmpty(f"node {name!r} still has {table}; move or remove them first")
    db.execute("DELETE FROM nodes WHERE name=?", (name,))


def _volume_create(db, a):
    _only(a, {"name", "node", "size"}, "volume_create")
    name, node, size = _name(a, "name", "volume"), _name(a, "node", "node"), _size(a)
    _need_node(db, node)
    if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
        raise AlreadyExists(f"volume {name!r} already exists")
    db.execute("INSERT INTO volumes VALUES (?, ?, ?, 'online')", (name, node, size))


def _volume_delete(db, a):
    _only(a, {"name"}, "volume_delete")
    name = _name(a, "name", "volume")
    _need_volume(db, name)
    if db.execute("SELECT 1 FROM luns WHERE volume=?", (name,)).fetchone():
        raise NotEmpty(f"volume {name!r} still has LUNs; delete them first")
    db.execute("DELETE FROM volumes WHERE name=?", (name,))


def _volume_move(db, a):
    """The VLDB change: another D-module now owns the volume."""
    _only(a, {"name", "node"}, "volume_move")
    name, node = _name(a, "name", "volume"), _name(a, "node", "node")
    _need_volume(db, name)
    _need_node(db, node)
    db.execute("UPDATE volumes SET owner_node=? WHERE name=?", (node, name))


def _volume_set_state(db, a):
    _only(a, {"name", "state"}, "volume_set_state")
    name = _name(a, "name", "volume")
    if a.get("state") not in VOLUME_STATES:
        raise BadRequest(f"invalid volume state {a.get('state')!r}: one of {VOLUME_STATES}")
    _need_volume(db, name)
    db.execute("UPDATE volumes SET state=? WHERE name=?", (a["state"], name))


def _lun_room(db, volume: str, vsize: int, size: int, except_lun: str | None = None) -> None:
    used = db.execute("SELECT COALESCE(SUM(size), 0) FROM luns WHERE volume=? AND name IS NOT ?",
                      (volume, except_lun)).fetchone()[0]
    if used + size > vsize:
        raise BadRequest(f"volume {volume!r} has {vsize - used} bytes free, not {size}")


def _lun_create(db, a):
    _only(a, {"volume", "name", "size"}, "lun_create")
    vol, name, size = _name(a, "volume", "volume"), _name(a, "name", "LUN"), _size(a)
    v = _need_volume(db, vol)
    if db.execute("SELECT 1 FROM luns WHERE volume=? AND name=?", (vol, name)).fetchone():
        raise AlreadyExists(f"LUN {vol}/{name} already exists")
    _lun_room(db, vol, v[2], size)
    db.execute("INSERT INTO luns VALUES (?, ?, ?)", (vol, name, size))


def _need_lun(db, vol: str, name: str) -> None:
    if db.execute("SELECT 1 FROM luns WHERE volume=? AND name=?", (vol, name)).fetchone() is None:
        raise BadRequest(f"unknown LUN {vol}/{name}")


def _lun_delete(db, a):
    _only(a, {"volume", "name"}, "lun_delete")
    vol, name = _name(a, "volume", "volume"), _name(a, "name", "LUN")
    _need_volume(db, vol)
    _need_lun(db, vol, name)
    db.execute("DELETE FROM luns WHERE volume=? AND name=?", (vol, name))


def _lun_resize(db, a):
    _only(a, {"volume", "name", "size"}, "lun_resize")
    vol, name, size = _name(a, "volume", "volume"), _name(a, "name", "LUN"), _size(a)
    v = _need_volume(db, vol)
    _need_lun(db, vol, name)
    _lun_room(db, vol, v[2], size, except_lun=name)
    db.execute("UPDATE luns SET size=? WHERE volume=? AND name=?", (size, vol, name))


def _identity_set(db, a):
    """Which node serves an identity (a guest's N-module address); set on takeover/giveback."""
    _only(a, {"name", "served_by"}, "identity_set")
    name, node = _name(a, "name", "identity"), _name(a, "served_by", "node")
    _need_node(db, node)
    db.execute("INSERT INTO identities VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
               "SET served_by=excluded.served_by", (name, node))


def _ha_pair(db, a):
    _only(a, {"node", "partner"}, "ha_pair")
    n, p = _name(a, "node", "node"), _name(a, "partner", "node")
    if n == p:
        raise BadRequest(f"node {n!r} cannot be its own HA partner")
    _need_node(db, n)
    _need_node(db, p)
    for x in (n, p):
        if db.execute("SELECT 1 FROM ha WHERE node=?", (x,)).fetchone():
            raise AlreadyExists(f"node {x!r} already has an HA partner; unpair it first")
    db.execute("INSERT INTO ha VALUES (?, ?), (?, ?)", (n, p, p, n))


def _ha_unpair(db, a):
    _only(a, {"node"}, "ha_unpair")
    n = _name(a, "node", "node")
    row = db.execute("SELECT partner FROM ha WHERE node=?", (n,)).fetchone()
    if row is None:
        raise BadRequest(f"node {n!r} has no HA partner")
    db.execute("DELETE FROM ha WHERE node IN (?, ?)", (n, row[0]))


OPS: dict[str, Callable[[sqlite3.Connection, dict], None]] = {
    "node_add": _node_add, "node_remove": _node_remove,
    "volume_create": _volume_create, "volume_delete": _volume_delete,
    "volume_move": _volume_move, "volume_set_state": _volume_set_state,
    "lun_create": _lun_create, "lun_delete": _lun_delete, "lun_resize": _lun_resize,
    "identity_set": _identity_set, "ha_pair": _ha_pair, "ha_unpair": _ha_unpair,
}


def _check_shape(op: Any, args: Any) -> None:
    if op not in OPS:
        raise BadRequest(f"unknown RDB change {op!r}: one of {sorted(OPS)}")
    if not isinstance(args, dict):
        raise BadRequest(f"{op}: arguments must be an object, not {type(args).__name__}")
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{op}: arguments are not plain JSON: {e}") from None


class Replica:
    """One replica. Not thread-safe: one owner (the domain's RDB service) at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    # -- lifecycle
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Replica":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- log position
    def _meta(self, k: str) -> str:
        return self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()[0]

    @property
    def last_seq(self) -> int:
        return int(self._meta("last_seq"))

    @property
    def last_hash(self) -> str:
        return self._meta("last_hash")

    def hash_at(self, seq: int) -> str | None:
        """The chained hash after `seq` (GENESIS_HASH at 0); None if not applied here."""
        if seq == 0:
            return GENESIS_HASH
        row = self._db.execute("SELECT h FROM log WHERE seq=?", (seq,)).fetchone()
        return row[0] if row else None

    # -- changes
    def check(self, op: str, args: dict) -> None:
        """Raise the error apply() would raise for this change next; change nothing."""
        _check_shape(op, args)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            OPS[op](self._db, args)
        finally:
            self._db.execute("ROLLBACK")

    def apply(self, seq: int, op: str, args: dict, t: float = 0.0) -> bool:
        """Apply change `seq`. True if applied now, False if it was already applied."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise BadRequest(f"invalid seq {seq!r}")
        _check_shape(op, args)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            last = int(self._meta("last_seq"))
            if seq <= last:
                row = self._db.execute("SELECT op, args, t FROM log WHERE seq=?",
                                       (seq,)).fetchone()
                if row is None or (row[0], json.loads(row[1]), row[2]) != (op, args, float(t)):
                    raise LogDiverged(f"seq {seq} here is {row and row[0]!r}, not {op!r}: "
                                      "this replica must be rebuilt from the sequencer")
                self._db.execute("ROLLBACK")
                return False
            if seq != last + 1:
                raise SequenceGap(f"seq {seq} out of order: this replica has applied up to "
                                  f"{last}; catch up with entries_since({last}) first")
            OPS[op](self._db, args)
            h = chain(self._meta("last_hash"), seq, op, args, t)
            self._db.execute("INSERT INTO log (seq, op, args, t, h) VALUES (?, ?, ?, ?, ?)",
                             (seq, op, json.dumps(args, sort_keys=True), float(t), h))
            self._db.execute("UPDATE meta SET v=? WHERE k='last_seq'", (str(seq),))
            self._db.execute("UPDATE meta SET v=? WHERE k='last_hash'", (h,))
            self._db.execute("COMMIT")
            return True
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def apply_entry(self, e: Entry) -> bool:
        return self.apply(e.seq, e.op, e.args, e.t)

    def rebuild(self, entries: list[Entry]) -> None:
        """Drop all state and log, then replay `entries` (which must start at seq 1), all in
        one transaction: used when this replica's log diverged (an un-committed tail)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for t in _STATE_TABLES + ("log",):
                self._db.execute(f"DELETE FROM {t}")
            self._db.execute("UPDATE meta SET v='0' WHERE k='last_seq'")
            self._db.execute("UPDATE meta SET v=? WHERE k='last_hash'", (GENESIS_HASH,))
            h = GENESIS_HASH
            for i, e in enumerate(entries, 1):
                if e.seq != i:
                    raise SequenceGap(f"rebuild needs entries 1.. in order; got seq {e.seq} at {i}")
                _check_shape(e.op, e.args)
                OPS[e.op](self._db, e.args)
                h = chain(h, e.seq, e.op, e.args, e.t)
                self._db.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?)",
                                 (e.seq, e.op, json.dumps(e.args, sort_keys=True), float(e.t), h))
            self._db.execute("UPDATE meta SET v=? WHERE k='last_seq'", (str(len(entries)),))
            self._db.execute("UPDATE meta SET v=? WHERE k='last_hash'", (h,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- catch-up
    def entries_since(self, seq: int) -> list[Entry]:
        rows = self._db.execute("SELECT seq, op, args, t FROM log WHERE seq>? ORDER BY seq",
                                (seq,)).fetchall()
        return [Entry(s, op, json.loads(a), t) for s, op, a, t in rows]

    def log(self) -> list[tuple]:
        return self._db.execute("SELECT seq, op, args, t, h FROM log ORDER BY seq").fetchall()

    # -- queries
    def nodes(self) -> list[tuple[str, int]]:
        return self._db.execute("SELECT name, idx FROM nodes ORDER BY idx").fetchall()

    def volumes(self) -> list[tuple[str, str, int, str]]:
        return self._db.execute(
            "SELECT name, owner_node, size, state FROM volumes ORDER BY name").fetchall()

    def luns(self, volume: str) -> list[tuple[str, int]]:
        _need_volume(self._db, volume)
        return self._db.execute("SELECT name, size FROM luns WHERE volume=? ORDER BY name",
                                (volume,)).fetchall()

    def vldb(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT volume, node FROM vldb ORDER BY volume"))

    def vldb_lookup(self, volume: str) -> str:
        row = self._db.execute("SELECT node FROM vldb WHERE volume=?", (volume,)).fetchone()
        if row is None:
            raise UnknownVolume(f"unknown volume {volume!r}: not in the VLDB")
        return row[0]

    def identities(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, served_by FROM identities ORDER BY name"))

    def served_by(self, identity: str) -> str | None:
        row = self._db.execute("SELECT served_by FROM identities WHERE name=?",
                               (identity,)).fetchone()
        return row[0] if row else None

    def ha_partner(self, node: str) -> str | None:
        row = self._db.execute("SELECT partner FROM ha WHERE node=?", (node,)).fetchone()
        return row[0] if row else None

    def ha_pairs(self) -> list[tuple[str, str]]:
        return self._db.execute(
            "SELECT node, partner FROM ha WHERE node < partner ORDER BY node").fetchall()

    def snapshot(self) -> dict:
        """Every table's content, for comparing replicas."""
        return {
            "nodes": self.nodes(), "volumes": self.volumes(), "vldb": self.vldb(),
            "luns": self._db.execute("SELECT volume, name, size FROM luns "
                                     "ORDER BY volume, name").fetchall(),
            "identities": self.identities(), "ha": self.ha_pairs(),
            "last_seq": self.last_seq, "last_hash": self.last_hash,
        }
