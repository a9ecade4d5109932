"""Ordering changes to the replicated management database.

Design rules (the ones the tests check):

1. One sequencer. Only the sequencer assigns seqs. propose(op, args) validates the change
   against the sequencer's own replica (which is always the most advanced live one), gives it
   seq = last_seq + 1, applies it locally and returns the Entry to send to every live replica.
   An invalid proposal raises the typed error and consumes no seq: nothing changes anywhere.

2. Commit = applied by ALL LIVE replicas (not a majority). Chosen because liveness comes from
   the hypervisor's heartbeat monitor, a perfect failure detector on one host (no partitions),
   and vmemu clusters may have 2 nodes: majority of 2 is 2, so a majority rule could not keep
   management working while one node is down. With "all live", any one (indeed any n-1) node
   can be down. The sequencer tracks acks per node; committed_seq(live) is the min ack
   over live nodes. The elector (the hypervisor) remembers the highest committed seq it saw.

3. Failover (elect): when the sequencer's node is down, the new sequencer is the live node with
   the lowest index. It first catches up from the live replica with the highest last_seq
   (ties: lowest index) and continues from there. If no live replica reaches the committed
   watermark (every holder of a committed change is down), writes are refused (Unavailable)
   until one returns: committed changes are never lost or overwritten.

4. Un-acknowledged tail: entries the old sequencer applied but that were not yet on all live
   replicas. If ANY live replica has them, the new sequencer adopts them (they were validated,
   and adopting never conflicts); they become committed once all live replicas apply them.
   A proposer that did not get its answer must treat the outcome as unknown and re-read.
   If only down replicas have them, they are discarded; when such a replica returns its
   hash chain disagrees with the sequencer's at its last seq, and sync() rebuilds it from the
   sequencer's full log (replica.rebuild) instead of appending.

5. Catch-up (sync): a returning or lagging replica sends (last_seq, last_hash). If the
   sequencer's hash at that seq matches, it receives entries_since(last_seq) and applies them
   in order (idempotent: re-applying is a no-op). Otherwise it is rebuilt from seq 1.
   A replica counts as live for commit only after catching up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from vmemu.errors import BadRequest, Unavailable
from vmemu.rdb.replica import Entry, Replica


@dataclass(frozen=True)
class CatchUp:
    """What a replica must do to reach the sequencer: append `entries`, or rebuild from them."""
    rebuild: bool
    entries: list[Entry]


@dataclass(frozen=True)
class Candidate:
    node: str
    index: int
    last_seq: int


class Sequencer:
    def __init__(self, node: str, replica: Replica, members: Iterable[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.replica = replica
        self.members = list(members)
        if node not in self.members:
            raise BadRequest(f"sequencer node {node!r} is not a member {self.members}")
        self._clock = clock
        self.acks: dict[str, int] = {m: 0 for m in self.members}
        self.acks[node] = replica.last_seq

    @property
    def last_seq(self) -> int:
        return self.replica.last_seq

    def propose(self, op: str, args: dict) -> Entry:
        """Validate, order and apply locally; return the entry to broadcast."""
        self.replica.check(op, args)
        e = Entry(self.replica.last_seq + 1, op, args, float(self._clock()))
        self.replica.apply_entry(e)
        self.acks[self.node] = e.seq
        return e

    def ack(self, node: str, seq: int) -> None:
        """`node`'s replica has applied everything up to `seq`."""
        if node not in self.acks:
            raise BadRequest(f"unknown RDB member {node!r}")
        self.acks[node] = max(self.acks[node], min(seq, self.last_seq))

    def committed_seq(self, live: Iterable[str]) -> int:
        """Highest seq applied by every live replica (rule 2)."""
        live = [n for n in live if n in self.acks] or [self.node]
        return min(self.acks[n] for n in live)

    def catch_up(self, replica_last_seq: int, replica_last_hash: str | None = None) -> CatchUp:
        """Entries a replica at `replica_last_seq` needs (rule 5)."""
        if replica_last_seq > self.last_seq:
            return CatchUp(True, self.replica.entries_since(0))
        if replica_last_hash is not None and \
                self.replica.hash_at(replica_last_seq) != replica_last_hash:
            return CatchUp(True, self.replica.entries_since(0))
        return CatchUp(False, self.replica.entries_since(replica_last_seq))


def sync(target: Replica, source: Replica) -> bool:
    """Bring `target` to `source`'s log (rules 4-5). True if target had to be rebuilt."""
    last = target.last_seq
    if last > source.last_seq or source.hash_at(last) != target.last_hash:
        target.rebuild(source.entries_since(0))
        return True
    for e in source.entries_since(last):
        target.apply_entry(e)
    return False


def elect(candidates: Iterable[Candidate], committed_seq: int = 0) -> tuple[str, str]:
    """(new sequencer node, node to catch up from) among live candidates (rule 3)."""
    live = sorted(candidates, key=lambda c: c.index)
    if not live:
        raise Unavailable("no RDB replica is up: management changes are unavailable")
    source = max(live, key=lambda c: (c.last_seq, -c.index))
    if source.last_seq < committed_seq:
        raise Unavailable(f"no live RDB replica has committed change {committed_seq} "
                          f"(best is {source.node} at {source.last_seq}): wait for a node "
                          "that has it to come back")
    return live[0].node, source.node
