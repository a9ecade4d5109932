"""The hypervisor's side of the RDB: elector and distributor for the guests' replicas.

Each guest domain serves its replica with domains/rdb_host.RdbHost (ops "rdb_*"). This driver
decides which guest is the sequencer and moves entries between them, following the rules in
vmemu/rdb/sequencer.py (read those first). It does no I/O itself: it is given `call`, the
hypervisor's async RPC to a guest, and its callbacks arrive later from the hypervisor loop
(or at once, inside `call`: both are handled). That keeps it a pure state machine the tests
drive with a fake `call` and real replicas.

Work is one job at a time, in this order of priority: elect a sequencer (when there is none),
catch up one lagging node, order one proposal. Serialising catch-ups with proposals is what
makes the order total and the commit rule simple: when a proposal starts, every caught-up
node is at the sequencer's last seq, so broadcasting that one entry is all they need.

What the hypervisor must do:
    driver = RdbDriver(lambda node, op, args, timeout, done:
                           guests[node].call(op, args, timeout, done), members)
    driver.node_up(node)     when a guest registers (again)
    driver.node_down(node)   when the failure detector declares it down
    driver.propose(op, args, reply) / driver.query(what, args, reply) for management commands
    driver.status()          for `vmemu status`

Beyond sequencer.py, two choices made here (both only ever keep validated changes):
- the committed watermark is (seq, hash), not just seq: a replica that returns with a
  different change at the committed seq does not count as holding it (sequencer rule 3 only
  compares seqs, which a divergent replica of the same length would pass);
- a returning node whose log EXTENDS the sequencer's (same hash at the sequencer's last seq)
  has its extra entries adopted instead of being rebuilt (rule 4 extended to returning
  nodes): after a hypervisor restart the watermark is gone, and this keeps changes committed
  while the first node to register was down.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable

from vmemu.errors import BadRequest, Unavailable, UnknownNode
from vmemu.rdb.errors import LogDiverged, NotEmpty, OutcomeUnknown, SequenceGap
from vmemu.rdb.replica import GENESIS_HASH
from vmemu.rdb.sequencer import Candidate, elect

Done = Callable[[Any, "Exception | None"], None]
Call = Callable[[str, str, dict, float, Done], None]
Reply = Callable[[Any, "Exception | None"], None]

# A node whose rdb_* calls fail this many times in a row (not counting "went down", which the
# hypervisor reports itself) is left alone until it registers again, so a broken guest cannot
# make the driver loop.
MAX_FAILURES = 3


def is_rejection(err: Exception) -> bool:
    """A typed validation error from Replica.check: the change was refused and NOTHING changed
    (as opposed to a transport failure, after which the outcome is unknown)."""
    return isinstance(err, (BadRequest, UnknownNode, NotEmpty))


def _state(res: Any) -> tuple[int, str]:
    return int(res["last_seq"]), str(res["last_hash"])


class RdbDriver:
    def __init__(self, call: Call, members: list[str], timeout: float = 10.0) -> None:
        if not members or len(set(members)) != len(members):
            raise BadRequest(f"RDB members must be distinct names, not {members!r}")
        self._call = call
        self.members = list(members)
        self.index = {n: i for i, n in enumerate(self.members, 1)}  # rule 3: lowest index wins
        self.timeout = timeout
        self.up: set[str] = set()
        self.synced: set[str] = set()        # caught up with the sequencer: live for commit
        self.need_sync: set[str] = set()     # up, waiting for a catch-up job
        self.stalled: set[str] = set()       # up but failing: ignored until it registers again
        self.failures: dict[str, int] = {n: 0 for n in self.members}
        self.known: dict[str, tuple[int, str]] = {}  # last (seq, hash) each node reported
        self.sequencer: str | None = None
        self.committed: tuple[int, str] = (0, GENESIS_HASH)  # rule 2 watermark (seq, hash)
        self._blocked: Unavailable | None = None  # last election refused (rule 3); until node_up
        self._queue: deque[tuple[str, dict, Reply]] = deque()
        self._job: str | None = None
        self._calls: dict[int, tuple[str, Done]] = {}
        self._ids = itertools.count(1)
        self._pumping = False
        self._again = False

    # -- public API ---------------------------------------------------------------------------
    @property
    def committed_seq(self) -> int:
        return self.committed[0]

    @property
    def available(self) -> bool:
        return self.sequencer is not None

    def node_up(self, node: str) -> None:
        """`node` registered (or re-registered): catch it up before it counts for commit."""
        self._member(node)

        def change() -> None:
            if node in self.up:  # registered again without a down: its replica may differ
                self._drop(node)
            self.up.add(node)
            self.failures[node] = 0
            self.need_sync.add(node)
            self._blocked = None  # a returning node may hold the committed changes: retry

        self._batch(change)

    def node_down(self, node: str) -> None:
        self._member(node)
        self._batch(lambda: self._drop(node) if node in self.up else None)

    def propose(self, op: str, args: dict, reply: Reply) -> None:
        """Queue a change. reply({"seq", "entry"}, None) once every live caught-up replica has
        applied it; reply(None, typed error) if it was refused (nothing changed anywhere),
        Unavailable if no replica can take changes, OutcomeUnknown if its sequencer went away
        before the outcome was known (re-read, do not blindly retry)."""
        self._queue.append((op, args, reply))
        self._kick()

    def query(self, what: str, args: dict, reply: Reply) -> None:
        """Read from one live caught-up replica, the sequencer first (it is never behind).
        reply(data, None) with rdb_query's "data"; a node that fails is skipped."""
        order = sorted(self.synced, key=lambda n: (n != self.sequencer, self.index[n]))
        self._query(order, dict(args, what=what), reply, None)

    def status(self) -> dict[str, Any]:
        return {
            "sequencer": self.sequencer,
            "available": self.available,
            "committed_seq": self.committed[0],
            "committed_hash": self.committed[1],
            "busy": self._job,
            "queued": len(self._queue),
            "blocked": self._blocked.message if self._blocked else None,
            "nodes": {n: {"up": n in self.up, "caught_up": n in self.synced,
                          "stalled": n in self.stalled,
                          "last_seq": self.known[n][0] if n in self.known else None}
                      for n in self.members},
        }

    # -- plumbing -----------------------------------------------------------------------------
    def _member(self, node: str) -> None:
        if node not in self.index:
            raise UnknownNode(f"{node!r} is not an RDB member {self.members}")

    def _drop(self, node: str) -> None:
        self.up.discard(node)
        self.synced.discard(node)
        self.need_sync.discard(node)
        self.stalled.discard(node)
        if self.sequencer == node:
            self.sequencer = None
        # Fail its calls now rather than waiting out their timeouts; the job they belong to
        # carries on with the other nodes. Their late real answers are ignored (popped here).
        for cid, (n, cb) in list(self._calls.items()):
            if n == node and self._calls.pop(cid, None) is not None:
                cb(None, Unavailable(f"{node} went down"))

    def _send(self, node: str, op: str, args: dict, on_done: Done) -> None:
        cid = next(self._ids)
        self._calls[cid] = (node, on_done)

        def done(res: Any, err: Exception | None) -> None:
            if self._calls.pop(cid, None) is not None:  # else aborted by node_down already
                on_done(res, err)

        self._call(node, op, args, self.timeout, done)

    def _failed(self, node: str) -> None:
        """A call to `node` failed (not because it went down): retry a few times, then stall."""
        self.synced.discard(node)
        if node not in self.up:
            return
        self.failures[node] += 1
        if self.failures[node] >= MAX_FAILURES:
            self.need_sync.discard(node)
            self.stalled.add(node)
        else:
            self.need_sync.add(node)
        if self.sequencer == node:
            self.sequencer = None  # re-elect: the election re-reads everyone's state

    def _finish(self) -> None:
        self._job = None
        self._kick()

    def _batch(self, change: Callable[[], None]) -> None:
        # Dropping a node fails its calls, whose callbacks may finish the running job; hold
        # the pump until the whole membership change is made so no job starts half-way.
        if self._pumping:
            change()
            self._again = True
            return
        self._pumping = True
        try:
            change()
        finally:
            self._pumping = False
        self._kick()

    def _kick(self) -> None:
        # Callbacks may run inside `call` (synchronously) and finish a job while _step is on
        # the stack; loop instead of recursing so jobs never nest.
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._step()
        finally:
            self._pumping = False

    def _step(self) -> None:
        if self._job is not None:
            return
        if self.sequencer is None:
            eligible = self.up - self.stalled
            if not eligible or self._blocked is not None:
                err = self._blocked or Unavailable(
                    "no RDB replica is up: management changes are unavailable")
                while self._queue:
                    self._queue.popleft()[2](None, err)
                return
            self._elect(sorted(eligible, key=self.index.__getitem__))
        elif self.need_sync:
            self._catch_up(min(self.need_sync, key=self.index.__getitem__))
        elif self._queue:
            self._propose(*self._queue.popleft())
        else:
            # Idle with every live node caught up: all of them hold the sequencer's whole log,
            # so it is committed (rule 2), including any tail adopted at election.
            self.committed = self.known[self.sequencer]

    # -- election (rule 3, with the un-acked tail of rule 4) ----------------------------------
    def _elect(self, nodes: list[str]) -> None:
        self._job = "elect"
        answers: dict[str, dict] = {}
        waiting = set(nodes)
        at = self.committed[0]

        def got(node: str, res: Any, err: Exception | None) -> None:
            waiting.discard(node)
            if err is None:
                answers[node] = res
                self.known[node] = _state(res)
            else:
                self._failed(node)
            if not waiting:
                decide()

        def decide() -> None:
            live = [n for n in nodes if n in answers and n in self.up]
            # A replica counts as holding the committed prefix only if its hash there matches:
            # one that does not is given last_seq -1, so it can lead but never be the source.
            cands = [Candidate(n, self.index[n], answers[n]["last_seq"]
                               if answers[n].get("hash_at") == self.committed[1] else -1)
                     for n in live]
            try:
                leader, source = elect(cands, at)
            except Unavailable as exc:
                if live:  # nobody live has the committed changes: wait for one (node_up)
                    self._blocked = exc
                return self._finish()
            if source == leader:
                return self._elected(leader, set(answers))
            seq, h = self.known[leader]
            self._send(source, "rdb_catch_up", {"last_seq": seq, "last_hash": h},
                       lambda res, err: fetched(leader, source, res, err))

        def fetched(leader: str, source: str, res: Any, err: Exception | None) -> None:
            if err is not None:
                self._failed(source)
                return self._finish()
            op = "rdb_rebuild" if res["mode"] == "rebuild" else "rdb_apply"
            self._send(leader, op, {"entries": res["entries"]},
                       lambda r, e: adopted(leader, source, r, e))

        def adopted(leader: str, source: str, res: Any, err: Exception | None) -> None:
            if err is not None:
                self._failed(leader)
                return self._finish()
            self.known[leader] = _state(res)
            if self.known[leader] != self.known.get(source):
                self._failed(leader)  # source changed under us? re-elect from fresh states
                return self._finish()
            self._elected(leader, set(answers))

        for n in nodes:
            self._send(n, "rdb_state", {"at": at}, lambda res, err, n=n: got(n, res, err))

    def _elected(self, leader: str, fresh: set[str]) -> None:
        if leader not in self.up:  # went down while we caught it up
            return self._finish()
        self.sequencer = leader
        self.failures[leader] = 0
        tip = self.known[leader]
        # Nodes that reported the leader's exact (seq, hash) in this election need no catch-up.
        self.synced = {n for n in (self.up - self.stalled) & fresh if self.known.get(n) == tip}
        self.synced.add(leader)
        self.need_sync = self.up - self.stalled - self.synced
        self._finish()

    # -- catch-up (rule 5) --------------------------------------------------------------------
    def _catch_up(self, node: str) -> None:
        self._job = f"catch_up {node}"
        self.need_sync.discard(node)
        seqr = self.sequencer
        assert seqr is not None

        def seq_failed() -> None:
            self._failed(seqr)
            if node in self.up and node not in self.stalled:
                self.need_sync.add(node)  # its catch-up did not happen; not its fault
            self._finish()

        def node_failed() -> None:
            self._failed(node)
            self._finish()

        def got_state(res: Any, err: Exception | None) -> None:
            if err is not None:
                return node_failed()
            self.known[node] = mine = _state(res)
            tip = self.known[seqr]
            if mine == tip:
                return caught_up()
            if mine[0] > tip[0]:
                # Ahead of the sequencer: if its log extends the sequencer's, adopt the extra
                # entries (validated changes; adopting never conflicts) rather than lose them.
                self._send(node, "rdb_catch_up", {"last_seq": tip[0], "last_hash": tip[1]},
                           got_extension)
            else:
                self._send(seqr, "rdb_catch_up", {"last_seq": mine[0], "last_hash": mine[1]},
                           got_entries)

        def got_extension(res: Any, err: Exception | None) -> None:
            if err is not None:
                return node_failed()
            if res["mode"] != "append":  # diverged: the sequencer's log wins
                return self._send(seqr, "rdb_catch_up", {"full": True}, got_entries)
            self._send(seqr, "rdb_apply", {"entries": res["entries"]}, extended)

        def extended(res: Any, err: Exception | None) -> None:
            if err is not None:
                return seq_failed()
            self.known[seqr] = _state(res)
            # Everyone else caught up is now behind by the adopted entries: catch them up too.
            for n in self.synced - {seqr}:
                self.need_sync.add(n)
            self.synced = {seqr}
            if self.known[node] == self.known[seqr]:
                return caught_up()
            node_failed()

        def got_entries(res: Any, err: Exception | None, full: bool = False) -> None:
            if err is not None:
                return seq_failed()
            if res["mode"] == "append" and not res["entries"]:
                return caught_up() if self.known[node] == self.known[seqr] else node_failed()
            op = "rdb_rebuild" if res["mode"] == "rebuild" else "rdb_apply"
            self._send(node, op, {"entries": res["entries"]},
                       lambda r, e: applied(r, e, full))

        def applied(res: Any, err: Exception | None, full: bool) -> None:
            if isinstance(err, (SequenceGap, LogDiverged)) and not full:
                # Its log moved since it reported its state: rebuild it from the whole log.
                return self._send(seqr, "rdb_catch_up", {"full": True},
                                  lambda r, e: got_entries(r, e, True))
            if err is not None:
                return node_failed()
            self.known[node] = _state(res)
            if self.known[node] != self.known[seqr]:
                return node_failed()
            caught_up()

        def caught_up() -> None:
            if node in self.up and self.sequencer == seqr:
                self.synced.add(node)
                self.failures[node] = 0
            self._finish()

        self._send(node, "rdb_state", {}, got_state)

    # -- proposals (rules 1, 2, 4) ------------------------------------------------------------
    def _propose(self, op: str, args: dict, reply: Reply) -> None:
        self._job = "propose"
        seqr = self.sequencer
        assert seqr is not None
        waiting: set[str] = set()
        result: dict[str, Any] = {}

        def proposed(res: Any, err: Exception | None) -> None:
            if err is not None:
                if is_rejection(err):
                    reply(None, err)
                else:
                    self._failed(seqr)
                    reply(None, OutcomeUnknown(
                        f"sequencer {seqr} failed during {op} ({err}): the change may or may "
                        "not have been made; re-read before retrying"))
                return self._finish()
            self.known[seqr] = tip = _state(res)
            result.update(seq=tip[0], entry=res["entry"], hash=tip[1])
            others = sorted(self.synced - {seqr}, key=self.index.__getitem__)
            waiting.update(others)
            if not waiting:
                return committed()
            for n in others:
                self._send(n, "rdb_apply", {"entries": [res["entry"]]},
                           lambda r, e, n=n: acked(n, r, e))

        def acked(node: str, res: Any, err: Exception | None) -> None:
            waiting.discard(node)
            if err is None:
                self.known[node] = _state(res)
            if err is not None or self.known[node] != (result["seq"], result["hash"]):
                # Not a failed proposal: that node just needs catching up (the hypervisor
                # reports it down separately if it is dead).
                self.synced.discard(node)
                if node in self.up and node not in self.stalled:
                    self.need_sync.add(node)
            if not waiting:
                committed()

        def committed() -> None:
            # Every node still in `synced` has applied the entry (the sequencer too, unless it
            # went down meanwhile): all live caught-up replicas hold it, so it is committed.
            if self.synced:
                self.committed = (result["seq"], result["hash"])
                reply({"seq": result["seq"], "entry": result["entry"]}, None)
            else:
                reply(None, OutcomeUnknown(
                    f"{op}: every replica that applied change {result['seq']} went down "
                    "before confirming it; re-read before retrying"))
            self._finish()

        self._send(seqr, "rdb_propose", {"op": op, "args": args}, proposed)

    # -- reads --------------------------------------------------------------------------------
    def _query(self, order: list[str], args: dict, reply: Reply,
               last: Exception | None) -> None:
        order = [n for n in order if n in self.synced]
        if not order:
            reply(None, last if last is not None else Unavailable(
                "no caught-up RDB replica is up: cannot read the management database"))
            return
        node, rest = order[0], order[1:]

        def done(res: Any, err: Exception | None) -> None:
            if err is None:
                reply(res["data"], None)
            elif is_rejection(err):
                reply(None, err)  # e.g. UnknownVolume: the answer, not a failure
            else:
                self._query(rest, args, reply, err)

        self._send(node, "rdb_query", args, done)
