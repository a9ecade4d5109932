"""In-process harness: N replicas (one SQLite file each) plus the sequencer/election rules,
standing in for the domains and the hypervisor until the RDB is wired onto the bus.

The model plays the hypervisor: it knows which nodes are up (perfect failure detector),
remembers the committed watermark, elects the sequencer, and relays entries and acks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vmemu.errors import UnknownNode, Unavailable
from vmemu.rdb.replica import Entry, Replica
from vmemu.rdb.sequencer import Candidate, Sequencer, elect, sync


class ClusterModel:
    def __init__(self, root: str | Path, nodes: int,
                 clock: Callable[[], float] | None = None) -> None:
        self.root = Path(root)
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.index = {n: i for i, n in enumerate(self.names, 1)}
        self.replicas = {n: Replica(self.root / n / "rdb.sqlite") for n in self.names}
        self.up: set[str] = set(self.names)
        self.committed = 0           # the hypervisor's watermark (rule 3)
        self._tick = 0.0
        self._clock = clock or self._fake_clock
        self.seq: Sequencer | None = None
        self._elect()

    def live_synced(self) -> list[str]:
        """Up nodes that are caught up with the sequencer (all of them when available)."""
        if not self.available:
            return []
        return [n for n in self.names if n in self.up
                and self.replicas[n].last_hash == self.seq.replica.last_hash]

    def _fake_clock(self) -> float:
        self._tick += 1.0
        return self._tick

    def _node(self, name: str) -> str:
        if name not in self.index:
            raise UnknownNode(f"unknown node {name!r}")
        return name

    def _elect(self) -> Sequencer:
        leader, source = elect([Candidate(n, self.index[n], self.replicas[n].last_seq)
                                for n in self.up], self.committed)
        if source != leader:
            sync(self.replicas[leader], self.replicas[source])
        self.seq = Sequencer(leader, self.replicas[leader], self.names, clock=self._clock)
        for n in sorted(self.up, key=self.index.get):
            if n != leader:
                sync(self.replicas[n], self.replicas[leader])
            self.seq.ack(n, self.replicas[n].last_seq)
        self.committed = max(self.committed, self.seq.committed_seq(self.up))
        return self.seq

    def sequencer(self) -> Sequencer:
        if self.seq is None or self.seq.node not in self.up:
            return self._elect()
        return self.seq

    # -- membership
    def down(self, name: str) -> None:
        self.up.discard(self._node(name))
        if self.seq is not None and self.seq.node == name:
            self.seq = None

    def up_node(self, name: str) -> bool:
        """Node returns: catch it up from the sequencer (electing one if there is none).
        Returns True if its replica had to be rebuilt (it held a discarded tail). If no
        live replica holds every committed change, the node stays up but stale and
        propose() raises Unavailable until a node that has them returns."""
        self.up.add(self._node(name))
        if self.seq is None:
            try:
                self._elect()
            except Unavailable:
                self.seq = None
            return False
        return self._deliver(name)

    def _deliver(self, name: str) -> bool:
        s, r = self.seq, self.replicas[name]
        cu = s.catch_up(r.last_seq, r.last_hash)
        if cu.rebuild:
            r.rebuild(cu.entries)
        else:
            for e in cu.entries:
                r.apply_entry(e)
        s.ack(name, r.last_seq)
        return cu.rebuild

    def catch_up_all(self) -> None:
        """Re-send to every live replica what it misses (the sequencer's retransmit)."""
        s = self.sequencer()
        for n in sorted(self.up, key=self.index.get):
            if n != s.node:
                self._deliver(n)
        self.committed = max(self.committed, s.committed_seq(self.up))

    @property
    def available(self) -> bool:
        return self.seq is not None and self.seq.node in self.up

    # -- management commands
    def propose(self, op: str, args: dict, reach: set[str] | None = None) -> Entry:
        """Order a change and deliver it to every live replica (or only `reach`, to model the
        sequencer dying mid-broadcast). Returns the entry once committed."""
        s = self.sequencer()
        e = s.propose(op, args)
        for n in sorted(self.up, key=self.index.get):
            if n == s.node or (reach is not None and n not in reach):
                continue
            self._deliver(n)
        self.committed = max(self.committed, s.committed_seq(self.up))
        return e

    def close(self) -> None:
        for r in self.replicas.values():
            r.close()
