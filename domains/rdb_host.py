"""A guest domain's RDB service: its replica of the management database, served on the bus.

The hypervisor's RdbDriver (vmemu/hypervisor/rdb_driver.py) is the elector and distributor;
this side only answers. Every op is a short SQLite transaction on the domain's own replica,
so the guest can run it inline on its main loop. Which domain is the sequencer is the
driver's decision, not stored here: "rdb_propose" simply makes this domain order one change
(sequencer rule 1, vmemu/rdb/sequencer.py).

Wiring in a guest (the whole of it):

    self.rdb = RdbHost(data_dir / f"node{n}" / "rdb.sqlite", f"node{n}", members)
    ...
    if req.op in RdbHost.OPS:
        return self.rdb.handle(req.op, req.args)

Entries cross the bus as plain maps {"seq", "op", "args", "t"} (msgpack has no dataclasses).
Errors are the typed ones of vmemu.rdb.errors / vmemu.errors, raised as-is for the bus to
encode; a validation error always means nothing changed here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from vmemu.errors import BadRequest
from vmemu.rdb.replica import Entry, Replica
from vmemu.rdb.sequencer import Sequencer

QUERIES = ("volumes", "luns", "vldb", "nodes", "identities", "ha_pairs", "snapshot", "log")


def entry_to_wire(e: Entry) -> dict[str, Any]:
    return {"seq": e.seq, "op": e.op, "args": e.args, "t": float(e.t)}


def entry_from_wire(d: Any) -> Entry:
    """An Entry from its wire map; BadRequest (never KeyError/TypeError) if it is not one."""
    if not isinstance(d, dict):
        raise BadRequest(f"RDB entry must be a map, not {type(d).__name__}")
    seq, op, args, t = d.get("seq"), d.get("op"), d.get("args"), d.get("t", 0.0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise BadRequest(f"RDB entry has an invalid seq {seq!r}")
    if not isinstance(op, str) or not isinstance(args, dict):
        raise BadRequest(f"RDB entry {seq} needs a string op and a map of args")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise BadRequest(f"RDB entry {seq} has an invalid time {t!r}")
    return Entry(seq, op, args, float(t))


def _entries(args: dict) -> list[Entry]:
    raw = args.get("entries")
    if not isinstance(raw, list):
        raise BadRequest("RDB: 'entries' must be a list of entries")
    return [entry_from_wire(d) for d in raw]


def _int(args: dict, key: str, default: int | None = None) -> int:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequest(f"RDB: {key!r} must be a whole number >= 0, not {v!r}")
    return v


def _str(args: dict, key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str):
        raise BadRequest(f"RDB query: {key!r} must be a string, not {v!r}")
    return v


def _lists(rows: list[tuple]) -> list[list]:
    # Same shape in-process as after a msgpack round trip (which turns tuples into lists),
    # so replicas read directly and through the bus compare equal.
    return [list(r) for r in rows]


class RdbHost:
    """One domain's replica plus the ops the hypervisor drives it with. Not thread-safe:
    call it from the guest's main loop only (the replica has one owner)."""

    OPS = frozenset({"rdb_state", "rdb_propose", "rdb_apply", "rdb_catch_up", "rdb_rebuild",
                     "rdb_query"})

    def __init__(self, path: Path, node: str, members: list[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.members = list(members)
        self.replica = Replica(path)
        # Sequencer is stateless apart from its ack table, which the driver keeps for real;
        # built once so a bad `node`/`members` pair fails at startup, not on the first change.
        self._seq = Sequencer(node, self.replica, self.members, clock=clock)

    def close(self) -> None:
        self.replica.close()

    # -- the bus entry point ------------------------------------------------------------------
    def handle(self, op: str, args: dict) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise BadRequest(f"{op}: arguments must be a map")
        if op == "rdb_state":
            return self._state(args.get("at"))
        if op == "rdb_propose":
            return self._propose(args)
        if op == "rdb_apply":
            for e in _entries(args):
                self.replica.apply_entry(e)  # SequenceGap / LogDiverged: the driver rebuilds
            return self._state()
        if op == "rdb_catch_up":
            return self._catch_up(args)
        if op == "rdb_rebuild":
            self.replica.rebuild(_entries(args))
            return self._state()
        if op == "rdb_query":
            return {"data": self.query(_str(args, "what"), args), **self._state()}
        raise BadRequest(f"unknown RDB op {op!r}: one of {sorted(self.OPS)}")

    def _state(self, at: Any = None) -> dict[str, Any]:
        r = self.replica
        out: dict[str, Any] = {"last_seq": r.last_seq, "last_hash": r.last_hash}
        if at is not None:
            # The driver asks whether this replica holds the committed prefix (election).
            out["hash_at"] = r.hash_at(_int({"at": at}, "at"))
        return out

    def _propose(self, args: dict) -> dict[str, Any]:
        op, change = args.get("op"), args.get("args", {})
        if not isinstance(op, str):
            raise BadRequest("rdb_propose: 'op' must be the change's name")
        acks = args.get("acks") or {}
        if not isinstance(acks, dict):
            raise BadRequest("rdb_propose: 'acks' must map node -> seq")
        for node, seq in acks.items():
            if node in self._seq.acks and isinstance(seq, int) and not isinstance(seq, bool):
                self._seq.ack(node, seq)
        e = self._seq.propose(op, change)  # typed error and nothing changed if invalid
        return {"entry": entry_to_wire(e), **self._state()}

    def _catch_up(self, args: dict) -> dict[str, Any]:
        if args.get("full"):
            # The driver's fallback when an append failed after all: the whole log.
            entries, rebuild = self.replica.entries_since(0), True
        else:
            last_hash = args.get("last_hash")
            if last_hash is not None and not isinstance(last_hash, str):
                raise BadRequest("rdb_catch_up: 'last_hash' must be a string")
            cu = self._seq.catch_up(_int(args, "last_seq"), last_hash)
            entries, rebuild = cu.entries, cu.rebuild
        return {"mode": "rebuild" if rebuild else "append",
                "entries": [entry_to_wire(e) for e in entries], **self._state()}

    # -- reads (local replica; the N-module's VLDB lookups) -----------------------------------
    def vldb_lookup(self, volume: str) -> str:
        """The node owning `volume` (UnknownVolume if none): one indexed SQLite read."""
        return self.replica.vldb_lookup(volume)

    def query(self, what: str, args: dict | None = None) -> Any:
        args = args or {}
        r = self.replica
        if what == "volumes":
            return [{"name": n, "node": o, "size": s, "state": st}
                    for n, o, s, st in r.volumes()]
        if what == "luns":
            return [{"name": n, "size": s} for n, s in r.luns(_str(args, "volume"))]
        if what == "vldb":
            return r.vldb_lookup(_str(args, "volume")) if "volume" in args else r.vldb()
        if what == "nodes":
            return [{"name": n, "index": i} for n, i in r.nodes()]
        if what == "identities":
            return r.served_by(_str(args, "identity")) if "identity" in args \
                else r.identities()
        if what == "ha_pairs":
            return r.ha_partner(_str(args, "node")) if "node" in args \
                else _lists(r.ha_pairs())
        if what == "snapshot":
            snap = r.snapshot()
            return {k: _lists(v) if isinstance(v, list) else v for k, v in snap.items()}
        if what == "log":
            return [entry_to_wire(e) for e in r.entries_since(_int(args, "since", 0))]
        raise BadRequest(f"unknown RDB query {what!r}: one of {list(QUERIES)}")
