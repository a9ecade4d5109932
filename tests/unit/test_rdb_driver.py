"""RdbDriver (the hypervisor's elector/distributor) wired to real RdbHost replicas.

The bus is faked deterministically (`Net`): real SQLite replicas under tmp_path, every request
and reply passed through the bus codec (so only msgpack-able data and typed errors cross), a
queue the test pumps by hand; no threads, no sleeps. A "domain" is an RdbHost; killing one
closes it (its file stays, as a crashed domain's does), starting one reopens the file. Calls to
a dead domain answer Timeout, as the hypervisor's expire() would.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domains.rdb_host import RdbHost
from vmemu.bus import codec
from vmemu.errors import (
    BadRequest, InvalidState, Timeout, Unavailable, UnknownNode, VmemuError, from_wire,
)
from vmemu.hypervisor.rdb_driver import RdbDriver
from vmemu.rdb import (
    AlreadyExists, LogDiverged, NotEmpty, OutcomeUnknown, Replica, SequenceGap, UnknownVolume,
)
from vmemu.rdb.replica import MAX_SIZE


class Net:
    def __init__(self, root: Path, nodes: int, synchronous: bool = False) -> None:
        self.root = root
        self.names = [f"node{i}" for i in range(1, nodes + 1)]
        self.hosts: dict[str, RdbHost] = {}
        self.queue: deque[tuple[str, str, dict, Callable]] = deque()
        self.sent: list[tuple[str, str]] = []   # (node, op) of every request, for asserting
        self.synchronous = synchronous           # answer inside call(), like a missing guest
        self._tick = 0.0
        self.driver = RdbDriver(self.call, self.names, timeout=1.0)
        self.replies: list[tuple[Any, Exception | None]] = []

    # -- processes ----------------------------------------------------------------------------
    def clock(self) -> float:
        self._tick += 1.0
        return self._tick

    def path(self, node: str) -> Path:
        return self.root / node / "rdb.sqlite"

    def start(self, node: str, register: bool = True) -> None:
        self.hosts[node] = RdbHost(self.path(node), node, self.names, clock=self.clock)
        if register:
            self.driver.node_up(node)

    def kill(self, node: str, report: bool = True) -> None:
        self.hosts.pop(node).close()
        if report:
            self.driver.node_down(node)

    def start_all(self) -> None:
        for n in self.names:
            self.start(n)
        self.pump()

    def close(self) -> None:
        for h in self.hosts.values():
            h.close()
        self.hosts.clear()

    # -- the bus ------------------------------------------------------------------------------
    def call(self, node: str, op: str, args: dict, timeout: float, done: Callable) -> None:
        self.sent.append((node, op))
        if self.synchronous:
            self._deliver(node, op, args, done)
        else:
            self.queue.append((node, op, args, done))

    def _deliver(self, node: str, op: str, args: dict, done: Callable) -> None:
        host = self.hosts.get(node)
        if host is None:
            done(None, Timeout(f"no answer to {op!r} from {node}"))
            return
        req = codec.decode(codec.encode_request(7, op, args))
        assert isinstance(req, codec.Request)
        try:
            frame = codec.encode_result(7, host.handle(req.op, req.args))
        except VmemuError as exc:
            frame = codec.encode_error(7, exc)
        rep = codec.decode(frame)
        assert isinstance(rep, codec.Reply)
        if rep.ok:
            done(rep.result, None)
        else:
            done(None, from_wire(rep.error or {}))

    def step(self) -> bool:
        if not self.queue:
            return False
        self._deliver(*self.queue.popleft())
        return True

    def pump(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("the driver never went quiet")

    def handle_then_crash(self, node: str) -> None:
        """Deliver the next request queued for `node` (its replica acts on it), then kill the
        domain before it can answer: the change exists only on that replica."""
        for i, (n, op, args, _done) in enumerate(self.queue):
            if n == node:
                del self.queue[i]
                try:
                    self.hosts[node].handle(op, codec.decode(
                        codec.encode_request(7, op, args)).args)  # type: ignore[union-attr]
                except VmemuError:
                    pass
                self.kill(node)
                return
        raise AssertionError(f"nothing queued for {node}")

    # -- driving ------------------------------------------------------------------------------
    def reply_to(self, out: list) -> Callable[[Any, Exception | None], None]:
        return lambda res, err: out.append((res, err))

    def propose(self, op: str, args: dict, pump: bool = True) -> tuple[Any, Exception | None]:
        out: list = []
        self.driver.propose(op, args, self.reply_to(out))
        if pump:
            self.pump()
            assert len(out) == 1, f"{op} got {len(out)} replies"
            return out[0]
        return (None, None)

    def ok(self, op: str, args: dict) -> dict:
        res, err = self.propose(op, args)
        assert err is None, f"{op} {args}: {err!r}"
        return res

    def query(self, what: str, **args: Any) -> tuple[Any, Exception | None]:
        out: list = []
        self.driver.query(what, args, self.reply_to(out))
        self.pump()
        assert len(out) == 1
        return out[0]

    def add_nodes(self) -> None:
        for i, n in enumerate(self.names, 1):
            self.ok("node_add", {"name": n, "index": i})

    # -- checking -----------------------------------------------------------------------------
    def state(self, node: str) -> tuple[dict, list]:
        r = self.hosts[node].replica
        return r.snapshot(), r.log()

    def everything(self) -> dict[str, tuple[dict, list]]:
        return {n: self.state(n) for n in sorted(self.hosts)}

    def assert_all_same(self) -> None:
        """Every live domain is caught up, and all hold the same state and log."""
        assert not self.queue and self.driver.available
        assert self.driver.synced == set(self.hosts), self.driver.status()
        states = [self.state(n) for n in sorted(self.hosts)]
        assert all(s == states[0] for s in states)
        assert self.driver.committed_seq == states[0][0]["last_seq"]


@pytest.fixture
def net3(tmp_path: Path):
    n = Net(tmp_path, 3)
    n.start_all()
    n.add_nodes()
    yield n
    n.close()


def make(tmp_path: Path, nodes: int, synchronous: bool = False) -> Net:
    n = Net(tmp_path, nodes, synchronous)
    n.start_all()
    n.add_nodes()
    return n


# -- ordering and distribution -------------------------------------------------------------------
@pytest.mark.parametrize("synchronous", [False, True], ids=["queued", "answered-inside-call"])
def test_proposals_are_applied_on_every_replica_in_the_same_order(tmp_path, synchronous):
    net = make(tmp_path, 3, synchronous)
    r1 = net.ok("volume_create", {"name": "vol1", "node": "node2", "size": 1000})
    r2 = net.ok("lun_create", {"volume": "vol1", "name": "lun0", "size": 400})
    r3 = net.ok("identity_set", {"name": "id2", "served_by": "node2"})
    assert [r1["seq"], r2["seq"], r3["seq"]] == [4, 5, 6]
    assert r2["entry"] == {"seq": 5, "op": "lun_create", "t": r2["entry"]["t"],
                           "args": {"volume": "vol1", "name": "lun0", "size": 400}}
    net.assert_all_same()
    ops = [row[1] for row in net.hosts["node3"].replica.log()]
    assert ops == ["node_add"] * 3 + ["volume_create", "lun_create", "identity_set"]
    st_ = net.driver.status()
    assert st_["sequencer"] == "node1" and st_["committed_seq"] == 6 and st_["busy"] is None
    assert all(v == {"up": True, "caught_up": True, "stalled": False, "last_seq": 6}
               for v in st_["nodes"].values())
    net.close()


def test_queued_proposals_keep_their_order_and_one_is_in_flight_at_a_time(net3):
    out: list = []
    for i in range(5):
        net3.driver.propose("volume_create", {"name": f"v{i}", "node": "node1", "size": 10},
                            net3.reply_to(out))
    assert [op for _, op in net3.sent[-1:]] == ["rdb_propose"]
    assert sum(1 for _, _, a, _ in net3.queue if "op" in a) == 1  # one proposal in flight
    net3.pump()
    assert [res["seq"] for res, err in out] == [4, 5, 6, 7, 8]
    assert list(net3.hosts["node2"].replica.vldb()) == [f"v{i}" for i in range(5)]
    net3.assert_all_same()


# -- catch-up ------------------------------------------------------------------------------------
def test_node_down_during_proposals_catches_up_by_appending(net3):
    net3.kill("node3")
    for i in range(3):
        net3.ok("volume_create", {"name": f"v{i}", "node": "node1", "size": 10})
    assert net3.driver.committed_seq == 6  # all live (node1, node2) have it
    before = len(net3.sent)
    net3.start("node3")
    net3.pump()
    assert ("node3", "rdb_apply") in net3.sent[before:]
    assert ("node3", "rdb_rebuild") not in net3.sent[before:]
    net3.assert_all_same()


def test_node_with_a_divergent_tail_is_rebuilt(net3):
    # node1 (sequencer) orders a change and dies before anyone else sees it: an un-acked tail
    # only a dead replica holds, so it is discarded (rule 4) ...
    out: list = []
    net3.driver.propose("volume_create", {"name": "lost", "node": "node1", "size": 10},
                        net3.reply_to(out))
    net3.handle_then_crash("node1")
    net3.pump()
    assert len(out) == 1 and isinstance(out[0][1], OutcomeUnknown)
    # ... and node2 takes over, ordering a different change at the same seq.
    assert net3.ok("volume_create", {"name": "kept", "node": "node2", "size": 10})["seq"] == 4
    assert net3.driver.sequencer == "node2"
    before = len(net3.sent)
    net3.start("node1")
    net3.pump()
    assert ("node1", "rdb_rebuild") in net3.sent[before:]
    net3.assert_all_same()
    assert net3.hosts["node1"].replica.vldb() == {"kept": "node2"}


def test_a_failed_apply_means_catch_up_not_a_failed_proposal(net3):
    net3.driver.propose("volume_create", {"name": "v", "node": "node1", "size": 10},
                        net3.reply_to(out := []))
    net3.step()  # rdb_propose at node1; the applies to node2 and node3 are now queued
    # node3's apply times out, but the process is alive and reachable again afterwards
    i = next(i for i, q in enumerate(net3.queue) if q[0] == "node3")
    node, op, args, done = net3.queue[i]
    del net3.queue[i]
    done(None, Timeout("no answer to 'rdb_apply' from node3"))
    net3.pump()
    assert out == [({"seq": 4, "entry": out[0][0]["entry"]}, None)]
    net3.assert_all_same()  # node3 was caught up again


def test_apply_with_a_gap_or_divergence_raises_the_typed_error(tmp_path):
    h = RdbHost(tmp_path / "r.sqlite", "node1", ["node1"])
    with pytest.raises(SequenceGap):
        h.handle("rdb_apply", {"entries": [{"seq": 2, "op": "node_add", "t": 1.0,
                                            "args": {"name": "node1", "index": 1}}]})
    h.handle("rdb_apply", {"entries": [{"seq": 1, "op": "node_add", "t": 1.0,
                                        "args": {"name": "node1", "index": 1}}]})
    with pytest.raises(LogDiverged):
        h.handle("rdb_apply", {"entries": [{"seq": 1, "op": "node_add", "t": 2.0,
                                            "args": {"name": "node1", "index": 1}}]})
    h.close()


# -- failover ------------------------------------------------------------------------------------
def test_sequencer_down_next_lowest_takes_over_without_losing_a_committed_change(net3):
    net3.ok("volume_create", {"name": "v1", "node": "node1", "size": 10})
    net3.kill("node1")
    net3.pump()
    assert net3.driver.sequencer == "node2"
    assert net3.ok("volume_create", {"name": "v2", "node": "node3", "size": 10})["seq"] == 5
    assert net3.hosts["node3"].replica.vldb() == {"v1": "node1", "v2": "node3"}
    net3.kill("node2")
    net3.pump()
    assert net3.driver.sequencer == "node3"
    assert net3.ok("volume_delete", {"name": "v1"})["seq"] == 6
    net3.start("node1")
    net3.start("node2")
    net3.pump()
    net3.assert_all_same()
    assert net3.hosts["node1"].replica.vldb() == {"v2": "node3"}


def test_sequencer_dies_mid_broadcast_the_change_commits_on_the_survivors(net3):
    out: list = []
    net3.driver.propose("volume_create", {"name": "v", "node": "node2", "size": 10},
                        net3.reply_to(out))
    net3.step()            # node1 ordered and applied it; applies to node2 and node3 queued
    net3.kill("node1")     # before either is delivered
    net3.pump()
    # node2 and node3 both applied it: all live replicas hold it, so it is committed.
    assert out[0][1] is None and out[0][0]["seq"] == 4
    assert net3.driver.sequencer == "node2" and net3.driver.committed_seq == 4
    net3.ok("volume_set_state", {"name": "v", "state": "offline"})
    net3.start("node1")
    net3.pump()
    net3.assert_all_same()


def test_unacked_tail_on_a_live_replica_is_adopted(net3):
    out: list = []
    net3.driver.propose("volume_create", {"name": "v", "node": "node2", "size": 10},
                        net3.reply_to(out))
    net3.step()                      # node1 ordered it
    net3.step()                      # node2 applied it (its reply is delivered too)
    net3.handle_then_crash("node3")  # node3 applied it, then died before answering
    net3.kill("node1")               # and the sequencer dies
    net3.pump()
    assert out[0][1] is None         # node2 (the only live caught-up replica) has it
    net3.start("node1")
    net3.start("node3")
    net3.pump()
    net3.assert_all_same()
    assert net3.hosts["node1"].replica.vldb() == {"v": "node2"}


@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_management_keeps_working_with_any_one_node_down(tmp_path, nodes):
    net = make(tmp_path / "c", nodes)
    for k, down in enumerate(net.names):
        net.kill(down)
        net.pump()
        assert net.driver.available
        net.ok("volume_create", {"name": f"v{k}", "node": net.names[-1 - (k == nodes - 1)],
                                 "size": 100})
        net.ok("lun_create", {"volume": f"v{k}", "name": "l", "size": 10})
        res, err = net.query("vldb", volume=f"v{k}")
        assert err is None and res in net.names
        net.start(down)
        net.pump()
        net.assert_all_same()
    assert len(net.hosts["node1"].replica.vldb()) == nodes
    net.close()


def test_writes_wait_for_a_node_holding_the_committed_changes(tmp_path):
    net = make(tmp_path, 2)
    net.kill("node2")
    net.ok("volume_create", {"name": "v", "node": "node1", "size": 10})  # only on node1
    net.kill("node1")
    res, err = net.propose("volume_delete", {"name": "v"})
    assert isinstance(err, Unavailable) and "no RDB replica is up" in err.message
    net.start("node2")
    net.pump()
    res, err = net.propose("volume_delete", {"name": "v"})
    assert isinstance(err, Unavailable) and not net.driver.available
    assert "committed change 3" in net.driver.status()["blocked"]
    assert net.hosts["node2"].replica.vldb() == {}  # not rebuilt from its stale self
    net.start("node1")
    net.pump()
    net.assert_all_same()
    assert net.hosts["node2"].replica.vldb() == {"v": "node1"}
    net.close()


def test_same_length_divergent_replica_does_not_count_as_holding_a_commit(tmp_path):
    net = make(tmp_path, 3)
    out: list = []
    net.driver.propose("volume_create", {"name": "lost", "node": "node1", "size": 1},
                       net.reply_to(out))
    net.handle_then_crash("node1")  # node1 has seq 4 = "lost"
    net.pump()
    net.ok("volume_create", {"name": "kept", "node": "node2", "size": 1})  # seq 4 elsewhere
    net.kill("node2")
    net.kill("node3")
    net.start("node1")  # same last_seq as the committed watermark, different change
    net.pump()
    assert not net.driver.available
    assert net.hosts["node1"].replica.vldb() == {"lost": "node1"}
    net.start("node3")
    net.pump()
    net.assert_all_same()
    assert net.hosts["node1"].replica.vldb() == {"kept": "node2"}
    net.close()


def test_a_returning_node_that_extends_the_log_is_adopted_after_an_elector_restart(tmp_path):
    net = make(tmp_path, 3)
    net.kill("node1")
    net.ok("volume_create", {"name": "v", "node": "node2", "size": 1})  # committed w/o node1
    net.close()
    # The hypervisor restarts: the watermark is gone, and node1 registers first.
    net2 = Net(tmp_path, 3)
    net2.start("node1")
    net2.pump()
    assert net2.driver.sequencer == "node1" and net2.driver.committed_seq == 3
    net2.start("node3")
    net2.start("node2")
    net2.pump()
    net2.assert_all_same()
    assert net2.hosts["node1"].replica.vldb() == {"v": "node2"}
    net2.close()


def test_no_replica_up_is_unavailable(tmp_path):
    net = Net(tmp_path, 2)
    res, err = net.propose("node_add", {"name": "node1", "index": 1})
    assert isinstance(err, Unavailable) and res is None
    res, err = net.query("nodes")
    assert isinstance(err, Unavailable)
    assert net.driver.status()["sequencer"] is None


def test_unknown_member_is_refused(tmp_path):
    net = Net(tmp_path, 2)
    with pytest.raises(UnknownNode):
        net.driver.node_up("node9")


def test_a_guest_that_keeps_failing_is_left_alone_until_it_registers_again(net3):
    host = net3.hosts.pop("node3")  # alive for the driver, but every call times out
    net3.driver.node_up("node3")
    net3.pump()
    assert "node3" in net3.driver.stalled
    net3.ok("volume_create", {"name": "v", "node": "node1", "size": 1})  # still works
    net3.hosts["node3"] = host
    net3.driver.node_up("node3")
    net3.pump()
    net3.assert_all_same()


# -- invalid proposals ---------------------------------------------------------------------------
BAD = [
    ("volume_create", {"name": "vol1", "node": "node1", "size": 5}, AlreadyExists),
    ("volume_create", {"name": "9bad/name", "node": "node1", "size": 5}, BadRequest),
    ("volume_create", {"name": "big", "node": "node1", "size": MAX_SIZE + 1}, BadRequest),
    ("volume_create", {"name": "v2", "node": "node9", "size": 5}, UnknownNode),
    ("lun_create", {"volume": "nosuch", "name": "l", "size": 1}, UnknownVolume),
    ("lun_create", {"volume": "vol1", "name": "l2", "size": 2000}, BadRequest),
    ("volume_delete", {"name": "vol1"}, NotEmpty),
    ("no_such_op", {}, BadRequest),
]


@pytest.mark.parametrize("op,args,cls", BAD, ids=[f"{b[0]}-{b[2].__name__}" for b in BAD])
def test_bad_proposals_give_the_typed_error_and_change_nothing_anywhere(net3, op, args, cls):
    net3.ok("volume_create", {"name": "vol1", "node": "node1", "size": 1000})
    net3.ok("lun_create", {"volume": "vol1", "name": "l", "size": 10})
    before = net3.everything()
    res, err = net3.propose(op, args)
    assert res is None and type(err) is cls, repr(err)
    assert net3.everything() == before
    net3.assert_all_same()
    assert net3.ok("volume_create", {"name": "next", "node": "node2", "size": 1})["seq"] == 6


# -- reads ---------------------------------------------------------------------------------------
def test_queries_read_a_caught_up_replica_preferring_the_sequencer(net3):
    net3.ok("volume_create", {"name": "vol1", "node": "node2", "size": 1000})
    net3.ok("lun_create", {"volume": "vol1", "name": "l0", "size": 10})
    net3.ok("ha_pair", {"node": "node1", "partner": "node2"})
    net3.ok("identity_set", {"name": "id1", "served_by": "node1"})
    before = len(net3.sent)
    assert net3.query("vldb", volume="vol1") == ("node2", None)
    assert net3.sent[before:] == [("node1", "rdb_query")]
    assert net3.query("vldb") == ({"vol1": "node2"}, None)
    assert net3.query("volumes")[0] == [{"name": "vol1", "node": "node2", "size": 1000,
                                         "state": "online"}]
    assert net3.query("luns", volume="vol1")[0] == [{"name": "l0", "size": 10}]
    assert net3.query("nodes")[0][2] == {"name": "node3", "index": 3}
    assert net3.query("identities")[0] == {"id1": "node1"}
    assert net3.query("ha_pairs")[0] == [["node1", "node2"]]
    assert net3.query("ha_pairs", node="node2")[0] == "node1"
    snap, _ = net3.query("snapshot")
    assert snap["last_seq"] == 7 and snap["vldb"] == {"vol1": "node2"}
    res, err = net3.query("vldb", volume="nosuch")
    assert res is None and isinstance(err, UnknownVolume)
    assert net3.hosts["node3"].vldb_lookup("vol1") == "node2"
    with pytest.raises(UnknownVolume):
        net3.hosts["node3"].vldb_lookup("nosuch")
    net3.kill("node1")
    before = len(net3.sent)
    assert net3.query("vldb", volume="vol1") == ("node2", None)
    assert net3.sent[before:] == [("node2", "rdb_query")]


def test_a_query_skips_a_replica_that_does_not_answer(net3):
    net3.kill("node1", report=False)  # dead, not yet reported
    assert net3.query("nodes")[0][0] == {"name": "node1", "index": 1}


# -- errors on the wire --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [UnknownVolume, AlreadyExists, NotEmpty, SequenceGap,
                                 LogDiverged, OutcomeUnknown])
def test_rdb_errors_cross_the_bus_codec_as_their_own_class(cls):
    reply = codec.decode(codec.encode_error(3, cls("it went wrong")))
    assert isinstance(reply, codec.Reply) and not reply.ok
    err = from_wire(reply.error or {})
    assert type(err) is cls and err.code == cls.code and err.message == "it went wrong"


def test_rdb_error_parents_still_match_after_the_wire():
    assert isinstance(from_wire({"code": "already_exists", "message": ""}), BadRequest)
    assert isinstance(from_wire({"code": "not_empty", "message": ""}), InvalidState)
    assert isinstance(from_wire({"code": "outcome_unknown", "message": ""}), Unavailable)
    assert type(from_wire({"code": "unknown_node", "message": ""})) is UnknownNode


# -- the hypothesis model ------------------------------------------------------------------------
N = 3
NAMES = [f"node{i}" for i in range(1, N + 1)]
VOLS = ["va", "vb", "vc"]
SIZES = st.sampled_from([0, 1, 50, 100, MAX_SIZE + 1])
changes = st.one_of(
    st.builds(lambda v, n, s: ("volume_create", {"name": v, "node": n, "size": s}),
              st.sampled_from(VOLS + ["bad/name"]), st.sampled_from(NAMES + ["node9"]), SIZES),
    st.builds(lambda v: ("volume_delete", {"name": v}), st.sampled_from(VOLS)),
    st.builds(lambda v, n: ("volume_move", {"name": v, "node": n}),
              st.sampled_from(VOLS), st.sampled_from(NAMES)),
    st.builds(lambda v, l, s: ("lun_create", {"volume": v, "name": l, "size": s}),
              st.sampled_from(VOLS + ["nosuch"]), st.sampled_from(["l0", "l1"]), SIZES),
    st.builds(lambda v, l: ("lun_delete", {"volume": v, "name": l}),
              st.sampled_from(VOLS), st.sampled_from(["l0", "l1"])),
    st.builds(lambda i, n: ("identity_set", {"name": i, "served_by": n}),
              st.sampled_from(["id1", "id2"]), st.sampled_from(NAMES)),
)


class DriverCluster(RuleBasedStateMachine):
    """Random domains up/down (also mid-proposal) and proposals through the driver. The model
    is a separate replica fed only the changes the cluster committed; every live caught-up
    replica must equal it, committed changes are never rewritten, and a proposal made while
    nothing else happens succeeds or fails exactly as the model predicts, changing nothing
    when it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vmemu-rdbdrv-"))
        self.net = make(self.dir, N)
        self.model = Replica(self.dir / "model.sqlite")
        self.committed: list[dict] = []  # entries replied as committed
        self.sync_model()

    def teardown(self) -> None:
        self.net.close()
        self.model.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def sync_model(self) -> None:
        """Feed the model what the cluster committed: when idle and available, all of the
        sequencer's log (the driver's watermark covers it). Never rewrites: a committed
        change replaced would raise LogDiverged here."""
        d = self.net.driver
        if self.net.queue or not d.available:
            return
        for e in self.net.hosts[d.sequencer].replica.entries_since(0):
            self.model.apply_entry(e)
        assert self.model.last_seq == d.committed_seq

    def idle_available(self) -> bool:
        return not self.net.queue and self.net.driver.available

    @rule(change=changes)
    def propose_quietly(self, change):
        op, args = change
        predicted: type[VmemuError] | None = None
        if self.idle_available():
            try:
                self.model.check(op, args)
            except VmemuError as exc:
                predicted = type(exc)
        before = self.net.everything()
        res, err = self.net.propose(op, args)
        if not before:
            assert isinstance(err, Unavailable)
        elif err is None:
            assert predicted is None and self.net.driver.available
            self.committed.append(res["entry"])
            event("propose: ok")
        elif isinstance(err, Unavailable):
            assert not self.net.driver.available
            assert self.net.everything() == before
            event("propose: unavailable")
        else:
            # by code: UnknownRdbNode shares UnknownNode's code, so it arrives as UnknownNode
            assert predicted is not None and err.code == predicted.code, (err, predicted)
            assert self.net.everything() == before
            event("propose: refused")
        self.sync_model()

    @precondition(lambda self: self.net.driver.available)
    @rule(change=changes, steps=st.integers(0, 4), data=st.data())
    def propose_and_crash(self, change, steps, data):
        """A domain dies part-way through a proposal (after `steps` messages)."""
        out: list = []
        self.net.driver.propose(*change, self.net.reply_to(out))
        for _ in range(steps):
            self.net.step()
        victim = data.draw(st.sampled_from(sorted(self.net.hosts)))
        if data.draw(st.booleans()) and any(q[0] == victim for q in self.net.queue):
            self.net.handle_then_crash(victim)
        else:
            self.net.kill(victim)
        self.net.pump()
        assert len(out) == 1
        res, err = out[0]
        if err is None:
            self.committed.append(res["entry"])
        event(f"crash mid-proposal: {type(err).__name__ if err else 'ok'}")
        self.sync_model()

    @precondition(lambda self: len(self.net.hosts) > 0)
    @rule(data=st.data())
    def down(self, data):
        self.net.kill(data.draw(st.sampled_from(sorted(self.net.hosts))))
        self.net.pump()
        self.sync_model()

    @precondition(lambda self: len(self.net.hosts) < N)
    @rule(data=st.data())
    def up(self, data):
        self.net.start(data.draw(st.sampled_from(sorted(set(NAMES) - set(self.net.hosts)))))
        self.net.pump()
        event(f"up: available={self.net.driver.available}")
        self.sync_model()

    @invariant()
    def live_caught_up_replicas_equal_the_model(self):
        if not self.idle_available():
            return
        self.net.assert_all_same()
        for n in self.net.hosts:
            r = self.net.hosts[n].replica
            assert r.snapshot() == self.model.snapshot() and r.log() == self.model.log()

    @invariant()
    def committed_changes_are_never_lost(self):
        if not self.idle_available():
            return
        log = self.model.entries_since(0)
        for e in self.committed:
            got = log[e["seq"] - 1]
            assert (got.seq, got.op, got.args, got.t) == (e["seq"], e["op"], e["args"], e["t"])


TestDriverCluster = DriverCluster.TestCase
TestDriverCluster.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
