"""Domain 0: the hypervisor process.

It spawns and supervises the guest domains, keeps the grant table and the NVRAM descriptors
(fd broker), runs the heartbeat monitor, coordinates takeover and giveback, writes the event log
and answers the CLI. Its logic lives in pure modules (grants, heartbeat, failover); this file is
the loop that turns sockets, pidfds and time into their events, and their actions into I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import zmq

from storage.disk import Disk, disk_path, stamp_epoch
from storage import loopdev
from storage.names import check_name
from vmemu import datadir
from vmemu.bus import codec
from vmemu.bus.rpc import AsyncRpcClient, RpcServer
from vmemu import tls
from vmemu.config import ClusterConfig, nbd_address, node_index, partner_of
from vmemu.errors import (BadRequest, CorruptDisk, InvalidState, NoSpace, NotGranted,
                          Unavailable, UnknownLun, UnknownNode, VmemuError)
from vmemu.hypervisor import bus_faults, failover as fo
from vmemu.hypervisor.destage import Destage, Keeper
from vmemu.hypervisor.events import EventLog, LineFile
from vmemu.hypervisor.rdb_driver import RdbDriver
from vmemu.hypervisor.fdbroker import FdBroker
from vmemu.hypervisor.grants import GrantTable
from vmemu.hypervisor.heartbeat import HeartbeatMonitor
from vmemu.hypervisor import nbd_view
from vmemu.hypervisor.nvram_reports import NvramReports
from vmemu.hypervisor.supervisor import MediatorLink, Supervisor
from vmemu.privfs import lossy_stdio, set_umask
from vmemu.throttle import Throttle

CONTROL_PER_TURN = 256  # control requests answered per loop turn
REPORTS_REMEMBERED = 4096  # guest reports' (token, seq) kept to refuse a repeat
RELEASE_ATTEMPTS = 3  # a release that got no answer is asked again, this many times in all
# Reports only a guest sends; each must carry its incarnation's token (fdbroker).
GUEST_OPS = ("heartbeat", "event", "grants", "mirror_state")


class Hypervisor:
    def __init__(self, data_dir: Path, cfg: ClusterConfig, parent_pid: int | None) -> None:
        self.dir = data_dir
        self.lock = datadir.DirLock(data_dir)
        self.lock.acquire()
        self.cfg = cfg = resolve_nbd_port(cfg)  # before cluster.json: guests read the real port
        if cfg.nbd_tls != "off":  # before any guest: each loads the server certificate
            tls.ensure(data_dir, [nbd_address(cfg, n)[0] for n in range(1, cfg.nodes + 1)],
                       cfg.cluster_id)
        self.rundir = datadir.RunDir.choose(data_dir, cfg.cluster_id)
        self.rundir.create()
        self.ctx = zmq.Context()
        self.events = EventLog(datadir.events_file(data_dir))
        self.grants = GrantTable()
        self.coord = fo.Coordinator(cfg.nodes, cfg.topology, cfg.giveback_delay_s)
        self.monitor = HeartbeatMonitor(cfg.heartbeat_ms / 1000.0, cfg.heartbeat_misses)
        self.sup = Supervisor(data_dir, datadir.logs_dir(data_dir))
        # dedup: a guest's call duplicated on the bus is answered once (vmemu/bus/rpc.py)
        self.control = RpcServer(self.ctx, self.rundir.control(), dedup=True)
        # --nvram-placement mediator: a third domain allocates every region (domains/mediator.py).
        self.mediator = (MediatorLink(self.sup, self.events.emit, lambda: self.coord.shutting_down)
                         if cfg.nvram_placement == "mediator" else None)
        self.broker = FdBroker(self.rundir.broker(), self.grants, self._pid_of,
                               self._on_register, placement=cfg.nvram_placement,
                               mediator=self.mediator, emit=self.events.emit,
                               region_size=guest_region_size(cfg),
                               require_sealed=cfg.grant_mode == "ro")
        self.nvram_reports = NvramReports(
            data_dir, lambda r: self.broker.held[r].fd if r in self.broker.held else None,
            self.events.emit)
        self.guests: dict[int, AsyncRpcClient] = {}
        # Bus faults for the chaos campaign (none unless asked for: `bus_fault`).
        self.bus = bus_faults.BusFaults(cfg.nodes, self.control, self.guests, GUEST_OPS,
                                        self.events.emit)
        self.lun_lists: dict[int, list] = {}  # identity -> [[index, name, size]] from its assign
        self.loop_fds: list[int] = []
        # The replicated management database: replicas in the guests, ordered by the driver.
        self.rdb = RdbDriver(self._rdb_call, [f"node{i}" for i in range(1, cfg.nodes + 1)])
        self.rdb_seeded = False
        self.rdb_retry_at = 0.0
        self.vldb: dict[str, str] = {}  # volume -> owner node, as committed in the RDB
        self.stats: dict[int, dict[str, Any]] = {}
        self.takeovers: dict[int, dict[str, Any]] = {}
        self._served_at_fail: dict[int, list[int]] = {}
        self.mirror_ok: dict[int, bool] = {}  # region -> its partner holds a complete copy
        self.stopping: tuple[bytes, int] | None = None
        self.stop_requested = False
        self.parent_fd = os.pidfd_open(parent_pid) if parent_pid else None
        self.started = time.time()
        self.metrics = LineFile(datadir.metrics_file(data_dir))
        # NVRAM destaged across a stop (not in --ha-mode none: nothing is kept in NVRAM there).
        self.keeper = (Keeper(Destage(data_dir, guest_region_size(cfg), cfg.nodes), self.broker,
                              self.coord, self.events.emit) if cfg.ha_mode != "none" else None)
        self.throttle = Throttle()
        self.forged = 0  # guest reports without the sender's token (dropped)
        # (token, seq) of the guests' recent reports: a report the bus delivered twice is
        # logged and acted on once (a notification has no request id to refuse it by)
        self.reports_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.repeated_reports = 0
        self.next_metrics = 0.0

    # -- boot --------------------------------------------------------------------------------
    def boot(self) -> None:
        if self.cfg.disk_backend == "loop":
            loopdev.detach_all(self.dir)  # leftovers of a cluster that died here
        for n in range(1, self.cfg.nodes + 1):
            for d in range(self.cfg.disks):
                p = disk_path(self.dir, n, d)
                if not p.exists():
                    Disk.create(p, n, d, self.cfg.disk_mb << 20)
                if self.cfg.disk_backend == "loop":
                    # Attached by Domain 0, which owns the storage adapter; held open with
                    # autoclear, so the kernel frees the device if every vmemu process dies.
                    dev = loopdev.attach(p, data_dir=self.dir)
                    self.loop_fds.append(loopdev.hold(dev, p))
                    self.events.emit("disk_attached", "hypervisor", image=str(p), device=dev)
        datadir.write_cluster(self.dir, {
            "cluster_id": self.cfg.cluster_id, "hypervisor_pid": os.getpid(),
            "control": self.control.endpoint, "run_dir": str(self.rundir.path),
            "started": self.started,
            "config": self.cfg.to_dict(),
        })
        self.events.emit("cluster_up", "hypervisor", nodes=self.cfg.nodes,
                         topology=self.cfg.topology, pid=os.getpid(), nbd_port=self.cfg.nbd_port,
                         nvram_placement=self.cfg.nvram_placement)
        if self.keeper is not None:
            self.keeper.restore()  # NVRAM kept at the last stop: replayed by the first assigns
        if self.mediator is not None:
            self.mediator.start()
        for n in range(1, self.cfg.nodes + 1):
            self._spawn(n)

    def _spawn(self, node: int) -> None:
        self._apply(self.coord.handle(fo.Spawned(node), time.monotonic()))
        self.broker.forget(node)
        child = self.sup.spawn(node)
        if self.mediator is not None:
            self.mediator.allocate_for(node)  # every incarnation gets a fresh region
        old = self.guests.pop(node, None)
        if old:
            old.close()
        self.guests[node] = AsyncRpcClient(self.ctx, self.rundir.guest(node))
        self.bus.attach(node, self.guests[node])
        self.stats[node] = {}
        self.events.emit("domain_started", node, pid=child.pid)

    def _pid_of(self, node: int) -> int | None:
        child = self.sup.children.get(node)
        return child.pid if child else None

    def _on_register(self, node: int, region: int) -> None:
        self.monitor.watch(node, time.monotonic())
        self._apply(self.coord.handle(fo.Registered(node, region), time.monotonic()))
        self.rdb.node_up(f"node{node}")
        self._seed_rdb()

    # -- the replicated management database ----------------------------------------------------
    def _rdb_call(self, node: str, op: str, args: dict, timeout: float,
                  done: Callable[[Any, Exception | None], None]) -> None:
        idx = int(node[4:])
        g = self.guests.get(idx)
        if g is None or not self.coord.alive(idx):
            done(None, Unavailable(f"{node} is down"))
            return
        g.call(op, args, timeout, done)

    def rdb_propose(self, op: str, args: dict, then: Callable[[Any, Exception | None], None] | None = None) -> None:
        def done(res: Any, err: Exception | None) -> None:
            if err is None:
                self._rdb_committed(op, args)
            elif then is None:
                self.events.emit("rdb_error", "hypervisor", op=op, error=str(err))
            if then is not None:
                then(res, err)
        self.rdb.propose(op, args, done)

    def _rdb_committed(self, op: str, args: dict) -> None:
        if op in ("volume_create", "volume_move"):
            self.vldb[args["name"]] = args["node"]
        elif op == "volume_delete":
            self.vldb.pop(args["name"], None)

    def _rdb_retry(self, now: float) -> None:
        """Once a second: a live domain whose replica the driver parked (its calls kept
        failing, e.g. while it was busy compiling at a cold boot) gets caught up again."""
        if now < self.rdb_retry_at:
            return
        self.rdb_retry_at = now + 1.0
        for name, st in self.rdb.status().get("nodes", {}).items():
            idx = int(name[4:])
            if st.get("stalled") and self.coord.alive(idx) \
                    and idx in self.guests and self.coord.region.get(idx):
                self.rdb.node_up(name)

    def _seed_rdb(self) -> None:
        """First time the RDB can take changes: make sure it knows the nodes and HA pairs, and
        read the VLDB it already holds (a data dir used before keeps its volumes).

        Proposed at once and unconditionally (a change that is already there is refused and
        changes nothing), so they are ordered before any management command that follows.
        """
        if self.rdb_seeded or not self.rdb.available:
            return
        self.rdb_seeded = True

        def quiet(_res: Any, _err: Exception | None) -> None:
            pass  # AlreadyExists on a data dir used before: nothing to do

        for i in range(1, self.cfg.nodes + 1):
            self.rdb.propose("node_add", {"name": f"node{i}", "index": i}, quiet)
        if self.cfg.topology == "pairs":  # the RDB's HA table holds symmetric pairs
            for i in range(1, self.cfg.nodes + 1, 2):
                self.rdb.propose("ha_pair", {"node": f"node{i}", "partner": f"node{i + 1}"}, quiet)

        def have(res: Any, err: Exception | None) -> None:
            if err is None:
                for vol, node in (res or {}).items():
                    self.vldb.setdefault(vol, node)

        self.rdb.query("vldb", {}, have)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGINT, self._signalled)
        tick = min(0.02, self.cfg.heartbeat_ms / 2000.0)
        last_turn = time.monotonic()
        while True:
            poller = zmq.Poller()
            poller.register(self.control.sock, zmq.POLLIN)
            poller.register(self.broker.fileno(), zmq.POLLIN)
            for g in self.guests.values():
                poller.register(g.sock, zmq.POLLIN)
            pidfds = {c.pidfd: c for c in self.sup.children.values()}
            for fd in pidfds:
                poller.register(fd, zmq.POLLIN)
            if self.parent_fd is not None:
                poller.register(self.parent_fd, zmq.POLLIN)
            ready = dict(poller.poll(int(tick * 1000)))
            for fd in pidfds:
                if fd in ready:
                    self._child_exited(pidfds[fd].node)
            if self.control.sock in ready or self.control.pending():
                self._drain_control()
            if self.broker.fileno() in ready:
                self.broker.on_readable()
            self.broker.tick(time.monotonic())
            for g in list(self.guests.values()):
                if g.sock in ready:
                    g.on_readable()
            now = time.monotonic()
            for g in list(self.guests.values()):
                g.expire(now)
            if self.parent_fd is not None and self.parent_fd in ready:
                self.events.emit("parent_exited", "hypervisor")
                self.parent_fd = None
                self.stop_requested = True
            self.monitor.own_turn(now - last_turn, tick)
            last_turn = now
            self.bus.tick(now)
            self._check_heartbeats(now)
            self._apply(self.coord.handle(fo.Tick(), now))
            self.nvram_reports.poll()
            self._sample_metrics(now)
            self._rdb_retry(now)
            if not self.rdb_seeded:
                self._seed_rdb()
            if self.stop_requested and not self.coord.shutting_down:
                self._begin_shutdown()
            if self.coord.shutting_down and self._shutdown_progress(now):
                return

    def _sample_metrics(self, now: float) -> None:
        """Once per METRICS_S: each live domain's counters, for IOPS in `top` and the timeline."""
        if now < self.next_metrics:
            return
        self.next_metrics = now + METRICS_S
        sample = {n: {"ops": st.get("ops", 0), "nvlog_used": st.get("nvlog_used", 0),
                      "serves": st.get("serves", [])}
                  for n, st in self.stats.items() if st and self.coord.alive(n)}
        self.metrics.write_line(json.dumps({"t": round(time.time(), 4), "mono": round(now, 4),
                                            "nodes": {f"node{n}": v for n, v in sample.items()}}))

    def _signalled(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _child_exited(self, node: int) -> None:
        child = self.sup.children.get(node)
        if child is None:
            return
        code = child.proc.poll()
        if self.coord.shutting_down:
            self.sup.kill(node)
            self.events.emit("domain_stopped", node, exit_code=code)
            return
        self._fail(node, "exit", detail=f"exit code {code}")

    def _check_heartbeats(self, now: float) -> None:
        if self.coord.shutting_down:
            return
        for node in self.monitor.overdue(now):
            age = self.monitor.age(node, now)
            self.events.emit("heartbeat_missed", node, silent_ms=round((age or 0) * 1000, 1),
                             limit_ms=round(self.monitor.limit * 1000, 1))
            self._fail(node, "heartbeat")

    def _fail(self, node: int, reason: str, detail: str = "") -> None:
        now = time.monotonic()
        self.monitor.forget(node)
        self.rdb.node_down(f"node{node}")
        served = self.coord.served(node)
        own = self.coord.identities[node]
        fence_idents = set(served)
        if own.served_by in (None, node) and own.transit in (None, ("assign", node)):
            fence_idents.add(node)
        self._served_at_fail[node] = sorted(fence_idents)
        acts = self.coord.handle(fo.Failed(node, reason), now)
        if not acts:
            self.sup.kill(node)
            return
        for ident in served:
            self.takeovers[ident] = {"failed": f"node{node}", "reason": reason,
                                     "detected": now, "stages": {"failure_detected": 0.0}}
        if detail:
            self.events.emit("domain_exited", node, detail=detail)
        self._apply(acts)

    # -- actions -----------------------------------------------------------------------------
    def _apply(self, actions: list[fo.Action]) -> None:
        for act in actions:
            if isinstance(act, fo.Log):
                self.events.emit(act.kind, act.node, **act.fields)
            elif isinstance(act, fo.Fence):
                self._fence(act.node)
            elif isinstance(act, fo.Grant):
                self._grant(act.region, act.grantee)
            elif isinstance(act, fo.Assign):
                self._assign(act)
            elif isinstance(act, fo.Release):
                self._release(act)
            elif isinstance(act, fo.FreeRegion):
                self.broker.free(act.region)
                if self.keeper is not None:
                    self.keeper.freed(act.region)
                self.events.emit("region_freed", "hypervisor", region=f"{act.region:#x}")

    def _fence(self, node: int) -> None:
        code = self.sup.kill(node)
        self.broker.forget(node)
        self.grants.owner_died(node)
        g = self.guests.pop(node, None)
        if g is not None:
            g.fail_all(InvalidState(f"node{node} was fenced"))
            g.close()
        self.bus.fenced(node)
        # Only what this node served: stamping a live server's identity would fence *it*.
        epochs: dict[str, int | str] = {}
        for i in self._served_at_fail.pop(node, []):
            try:
                epochs[f"node{i}"] = self._stamp(i)
            except (CorruptDisk, OSError) as exc:
                # The holder is killed and reaped already; the epoch is the second fence. A
                # disk we cannot stamp is one no domain can open either (its assign says so).
                epochs[f"node{i}"] = f"not stamped: {exc}"
        now = time.monotonic()
        for t in self.takeovers.values():
            if t.get("failed") == f"node{node}" and "fenced" not in t["stages"]:
                t["stages"]["fenced"] = round((now - t["detected"]) * 1000, 3)
        self.events.emit("fenced", node, exit_code=code, disk_epochs=epochs)

    def _stamp(self, identity: int) -> int:
        """Fence `identity`'s disks to a new epoch. CorruptDisk (or OSError) for a disk whose
        header does not check out: nothing is written into it, and an event says which."""
        epoch = 0
        for d in range(self.cfg.disks):
            try:
                epoch = stamp_epoch(disk_path(self.dir, identity, d), node=identity, index=d)
            except (CorruptDisk, OSError) as exc:
                self.events.emit("disk_corrupt", "hypervisor", identity=f"node{identity}",
                                 disk=d, error=str(exc))
                raise
        return epoch

    def _grant(self, region: int, grantee: int) -> None:
        if self.grants.grants.get((region, grantee)) == self.cfg.grant_mode:
            return  # already granted (and mapped, at the grantee's boot)
        try:
            self.grants.grant(region, grantee, self.cfg.grant_mode)
        except VmemuError as exc:
            self.events.emit("grant_refused", grantee, region=f"{region:#x}", error=exc.message)
            return
        r = self.grants.regions[region]
        self.events.emit("granted", "hypervisor", region=f"{region:#x}", owner=f"node{r.owner}",
                         grantee=f"node{grantee}", mode=self.cfg.grant_mode)
        g = self.guests.get(grantee)
        if g is not None and self.coord.alive(grantee):
            g.call("map", {"region": region, "owner": r.owner}, 10.0, lambda res, err: None)

    def _assign(self, act: fo.Assign) -> None:
        try:
            epoch = self._stamp(act.identity)
        except (CorruptDisk, OSError) as exc:  # refused before any domain is involved
            self._apply(self.coord.handle(
                fo.AssignDone(act.node, act.identity, 0, False, str(exc)), time.monotonic()))
            return
        now = time.monotonic()
        t = self.takeovers.get(act.identity)
        if act.reason == "takeover" and t is not None and "partner_alerted" not in t["stages"]:
            t["stages"]["partner_alerted"] = round((now - t["detected"]) * 1000, 3)
            t["server"] = f"node{act.node}"
        self.events.emit("partner_alerted" if act.reason == "takeover" else "assign", act.node,
                         identity=f"node{act.identity}", reason=act.reason, epoch=epoch,
                         chain=[f"{r:#x}" for r in act.chain])
        # Per region: owner, whether the taker's mirror copy is complete, and whether its owner
        # still writes it (a giveback replays the releaser's live region, for its table).
        chain = [[r, self.grants.regions[r].owner, self.mirror_ok.get(r, False),
                  self.coord.region.get(self.grants.regions[r].owner) == r]
                 for r in act.chain if r in self.grants.regions]

        def done(res: Any, err: VmemuError | None) -> None:
            if err is not None:
                if err.code == "timeout" and self.coord.alive(act.node) \
                        and self.coord.identities[act.identity].transit == ("assign", act.node):
                    # No answer (lost on the bus, or the node is stuck): it may serve the
                    # identity already -- it binds before it replies -- and acknowledge
                    # writes into its own region. Nobody can know, so it is fenced: that
                    # puts its region in the identity's chain (failover.py, _on_Failed)
                    # before anyone else is assigned it. Never two servers, never a lost ack.
                    self.events.emit("assign_unanswered", act.node,
                                     identity=f"node{act.identity}", error=err.message)
                    self._fail(act.node, "assign_unanswered")
                self._apply(self.coord.handle(
                    fo.AssignDone(act.node, act.identity, 0, False, err.message), time.monotonic()))
                return
            self._record_assign(act, res)
            self._apply(self.coord.handle(
                fo.AssignDone(act.node, act.identity, int(res["region"]), True, epoch=epoch),
                time.monotonic()))

        g = self.guests.get(act.node)
        if g is None:
            done(None, InvalidState(f"node{act.node} is not running"))
            return
        g.call("assign", {"identity": act.identity, "chain": chain, "epoch": epoch,
                          "reason": act.reason}, self.cfg.move_timeout_s, done)

    def _record_assign(self, act: fo.Assign, res: dict) -> None:
        if res.get("luns") is not None:
            self.lun_lists[act.identity] = res["luns"]
        if self.rdb_seeded:  # who serves each identity is management state too
            self.rdb.propose("identity_set", {"name": f"node{act.identity}",
                                              "served_by": f"node{act.node}"}, lambda *_: None)
        rep = res.get("replay", {})
        self.events.emit("replay_done", act.node, mono=res.get("replay_done"),
                         identity=f"node{act.identity}", records=rep.get("records", 0),
                         bytes=rep.get("bytes", 0), ms=rep.get("ms", 0.0),
                         regions=rep.get("regions", 0),
                         from_mirror_copy=rep.get("from_mirror_copy", 0),
                         scanned=rep.get("scanned", 0), written=rep.get("written", 0),
                         **{k: rep[k] for k in ("quarantined", "corrupt_records", "lost_records")
                            if rep.get(k)})
        self.events.emit("identity_assumed", act.node, mono=res.get("assumed"),
                         identity=f"node{act.identity}", reason=act.reason,
                         endpoint=self.rundir.identity(act.identity))
        t = self.takeovers.get(act.identity)
        if act.reason == "takeover" and t is not None and t.get("server") == f"node{act.node}":
            st = t["stages"]
            st["replay_done"] = round((res["replay_done"] - t["detected"]) * 1000, 3)
            st["identity_assumed"] = round((res["assumed"] - t["detected"]) * 1000, 3)
            t["replay"] = rep
            self._takeover_complete(act.identity)

    def _takeover_complete(self, identity: int) -> None:
        """Log takeover_complete once both reports of the server are in: its assign reply and
        its first request served. The server binds before it replies, and the two travel on
        different sockets, so either may reach this loop first."""
        t = self.takeovers.get(identity)
        if t is None or "identity_assumed" not in t["stages"] or "first_request" not in t \
                or "first_request_served" in t["stages"]:
            return
        t["stages"]["first_request_served"] = round((t["first_request"] - t["detected"]) * 1000, 3)
        self.events.emit("takeover_complete", t["server"], identity=f"node{identity}",
                         failed=t["failed"], stages_ms=t["stages"])

    def _release(self, act: fo.Release, attempt: int = 1) -> None:
        def done(res: Any, err: VmemuError | None) -> None:
            if err is not None and err.code == "timeout" and attempt < RELEASE_ATTEMPTS \
                    and self.coord.alive(act.node) \
                    and self.coord.identities[act.identity].transit == ("release", act.node):
                # No answer: released or not, nobody knows. Asking again settles it, since a
                # node asked to release what it no longer serves says it is done
                # (domains/guest.py); giving up here would leave Domain 0 believing a
                # holder that may have let the identity go.
                self.events.emit("release_unanswered", act.node,
                                 identity=f"node{act.identity}", attempt=attempt)
                self._release(act, attempt + 1)
                return
            if err is None:
                self.events.emit("released", act.node, identity=f"node{act.identity}",
                                 cp_ms=(res or {}).get("cp_ms"))
            self._apply(self.coord.handle(
                fo.ReleaseDone(act.node, act.identity, err is None, err.message if err else ""),
                time.monotonic()))

        g = self.guests.get(act.node)
        if g is None:
            done(None, InvalidState(f"node{act.node} is not running"))
            return
        g.call("release", {"identity": act.identity}, self.cfg.move_timeout_s, done)

    # -- control requests --------------------------------------------------------------------
    def _drain_control(self, budget: int = CONTROL_PER_TURN) -> None:
        """Answer queued control requests, at most `budget` a turn: heartbeats, pidfds and
        takeovers are looked at between turns however fast someone sends."""
        for _ in range(budget):
            if not self.control.pending() and not self.control.sock.poll(0):
                return
            inc = self.control.recv()
            if inc is None:
                continue
            try:
                result = self._control(inc.peer, inc.request)
            except VmemuError as exc:
                self.control.reply_error(inc.peer, inc.request.id, exc)
                continue
            except Exception as exc:  # a bug must not take Domain 0 down with it
                held = self.throttle.allow(f"control:{inc.request.op[:32]}", time.monotonic())
                if held is not None:
                    self.events.emit("internal_error", "hypervisor", op=inc.request.op[:64],
                                     error=repr(exc)[:300], held_back=held)
                self.control.reply_error(inc.peer, inc.request.id, VmemuError(f"internal error: {exc!r}"))
                continue
            if result is not _DEFERRED:
                self.control.reply(inc.peer, inc.request.id, result)

    def _from_guest(self, req: codec.Request) -> bool:
        """Does this report come from the live incarnation of the node it names? It must
        carry the token the fd broker gave that incarnation at registration."""
        node = req.args.get("node")
        if isinstance(node, int) and self.broker.token_ok(node, req.args.get("token")):
            return True
        if req.op == "heartbeat" and isinstance(node, int) and node not in self.broker.tokens:
            return False  # a guest beats before it registers: nothing to prove yet, or count
        self.forged += 1
        held = self.throttle.allow("forged", time.monotonic())
        if held is not None:
            self.events.emit("forged_report", "hypervisor", op=req.op[:32],
                             claimed=str(node)[:32], held_back=held)
        return False

    def _node_arg(self, req: codec.Request) -> int:
        name = codec.arg(req, "node", (str, int))
        if isinstance(name, int):
            if not 1 <= name <= self.cfg.nodes:
                raise UnknownNode(f"unknown node {name}: this cluster has node1..node{self.cfg.nodes}")
            return name
        return node_index(name, self.cfg.nodes)

    def _control(self, peer: bytes, req: codec.Request) -> Any:
        op = req.op
        now = time.monotonic()
        if op in GUEST_OPS and not self._from_guest(req):
            # Forged, or from an incarnation that is gone: counted, and refused (a heartbeat
            # is a notification: no answer goes back to its sender at all).
            raise NotGranted(f"{op}: not from the live incarnation of the node it names")
        if op == "heartbeat":
            node = self._node_arg(req)
            if self.sup.children.get(node) and self.sup.children[node].pid == req.args.get("pid"):
                self.monitor.beat(node, now)
                self.stats[node] = dict(req.args.get("stats") or {}, at=now)
                loop_age = float(self.stats[node].get("loop_age_ms") or 0) / 1000.0
                if (self.monitor.stalled(loop_age, self.cfg.stall_limit_s)
                        and self.coord.alive(node) and not self.coord.shutting_down):
                    self.events.emit("main_loop_stalled", node, loop_age_ms=round(loop_age * 1000, 1),
                                     limit_ms=round(self.cfg.stall_limit_s * 1000, 1))
                    self._fail(node, "stalled")
            return None
        if op == "event":
            return self._guest_event(req)
        if op == "grants":
            node = self._node_arg(req)
            return [{"region": r, "owner": self.grants.regions[r].owner}
                    for (r, n) in self.grants.grants if n == node]
        if op == "mirror_state":
            node = self._node_arg(req)
            region = codec.arg(req, "region", int)
            in_sync = bool(req.args.get("in_sync"))
            if self.coord.region.get(node) == region:
                self.mirror_ok[region] = in_sync
                self.events.emit("mirror_state", node, region=f"{region:#x}", in_sync=in_sync)
            return {}
        if op == "ping":
            return {"pid": os.getpid(), "cluster_id": self.cfg.cluster_id}
        if op == "status":
            return self.status()
        if op == "crash":
            node = self._node_arg(req)
            hang = bool(req.args.get("hang"))
            child = self.sup.children.get(node)
            if child is None or not self.coord.alive(node):
                raise InvalidState(f"node{node} is not running (state {self.coord.state[node]})")
            self.events.emit("crash_requested", node, signal="SIGSTOP" if hang else "SIGKILL",
                             pid=child.pid)
            self.sup.signal(node, signal.SIGSTOP if hang else signal.SIGKILL)
            return {"pid": child.pid, "mono": time.monotonic()}
        if op == "restart":
            node = self._node_arg(req)
            if self.coord.state[node] not in (fo.DOWN, fo.STOPPED) or node in self.sup.children:
                raise InvalidState(f"node{node} is {self.coord.state[node]}; only a down node "
                                   "can be restarted")
            self._spawn(node)
            return {"node": f"node{node}"}
        if op == "giveback":
            node = self._node_arg(req)
            self._apply(self.coord.handle(fo.GivebackRequested(node), now))
            return {"node": f"node{node}"}
        if op == "bus_fault":
            return self._bus_fault(peer, req)
        if op == "probe":
            return self._probe(peer, req)
        if op == "manage":
            return self._manage(peer, req)
        if op == "shutdown":
            self.stopping = (peer, req.id)
            self.stop_requested = True
            return _DEFERRED
        raise BadRequest(f"unknown control op {op!r}")

    def _bus_fault(self, peer: bytes, req: codec.Request) -> Any:
        """Set or clear a bus fault (vmemu/hypervisor/bus_faults.py)."""
        node = self._node_arg(req) if "node" in req.args else None

        def reply(res: Any, err: VmemuError | None) -> None:
            if err is not None:
                self.control.reply_error(peer, req.id, err)
            else:
                self.control.reply(peer, req.id, res)

        res = self.bus.request(req.args, node, self.coord.alive, reply)
        return _DEFERRED if res is bus_faults.DEFERRED else res

    def _probe(self, peer: bytes, req: codec.Request) -> Any:
        """Ask a guest to try something a domain should not be able to do, and report.

        what = "write_partner": write the region of the node it maps (must fail in the OS);
        what = "map": map `region` (must fail unless granted).
        """
        node = self._node_arg(req)
        what = codec.arg(req, "what", str)
        g = self.guests.get(node)
        if g is None or not self.coord.alive(node):
            raise InvalidState(f"node{node} is not running")
        if what == "write_partner":
            region = next((r for (r, n) in self.grants.grants if n == node), None)
            if region is None:
                raise NotGranted(f"node{node} holds no grant to probe")
            op, args = "probe_write", {"region": region}
        elif what == "map":
            op, args = "map", {"region": codec.arg(req, "region", int), "owner": 0}
        elif what == "stall":
            op, args = "stall", {"seconds": float(codec.arg(req, "seconds", (int, float)))}
        else:
            raise BadRequest(f"unknown probe {what!r}; choose write_partner, map or stall")

        def done(res: Any, err: VmemuError | None) -> None:
            if err is not None:
                self.control.reply_error(peer, req.id, err)
            else:
                self.control.reply(peer, req.id, res)
                self.events.emit("probe", node, what=what, result=res)

        g.call(op, args, 10.0, done)
        return _DEFERRED

    def volume_owner(self, volume: str) -> int:
        """Which identity holds `volume`: the VLDB (in the RDB), else -- for a node's root
        volume vol0, which every node has and the VLDB does not list -- what domains report."""
        owner = self.vldb.get(volume)
        if owner is not None:
            return node_index(owner, self.cfg.nodes)
        if volume == "vol0":
            raise BadRequest("every node has a root volume vol0: say which with --node")
        for ident in range(1, self.cfg.nodes + 1):
            srv = self.coord.identities[ident].served_by
            st = (self.stats.get(srv, {}).get("storage") or {}).get(str(ident)) if srv else None
            if st and volume in (st.get("volumes") or []):
                return ident
        raise UnknownLun(f"no volume {volume!r} in this cluster (or its node is down with no "
                         "partner serving it)")

    def _manage(self, peer: bytes, req: codec.Request) -> Any:
        """Route a management request to the domain serving the identity it concerns."""
        what = codec.arg(req, "what", str)
        args = dict(req.args)
        if "node" in args:
            ident = self._node_arg(req)
        else:
            ident = self.volume_owner(codec.arg(req, "volume", str))
        srv = self.coord.identities[ident].served_by
        g = self.guests.get(srv) if srv else None
        if g is None or not self.coord.alive(srv):
            where = f"volume {args['volume']} is on node{ident}, which" if "volume" in args \
                and "node" not in args else f"node{ident}"
            raise Unavailable(f"{where} is down and no partner serves its identity; "
                              f"{what.replace('_', ' ')} is not possible until it returns")
        args.pop("node", None)
        args["identity"] = ident
        timeout = min(max(float(codec.arg(req, "timeout", (int, float), 60.0)), 1.0), 3600.0)

        def done(res: Any, err: VmemuError | None) -> None:
            if err is not None:
                self.control.reply_error(peer, req.id, err)
            else:
                self.control.reply(peer, req.id, res)

        record = self._rdb_record(what, req, ident)
        if record is None:
            g.call("manage", args, timeout, done)
            return _DEFERRED
        op, rargs, undo = record

        # The RDB first (cluster-wide names, one order of changes), then the aggregate; if the
        # aggregate refuses (no room, a name it does not take), the RDB change is undone.
        def recorded(_res: Any, err: Exception | None) -> None:
            if err is not None:
                done(None, err if isinstance(err, VmemuError) else VmemuError(str(err)))
                return

            def made(res: Any, err2: VmemuError | None) -> None:
                # Undo the RDB change only when the aggregate surely refused; after a timeout
                # or a lost domain the outcome is unknown, and the RDB keeps the name (a
                # retry then says it exists, rather than the two disagreeing for good).
                if err2 is not None and err2.code not in ("timeout", "unavailable", "error"):
                    self.rdb_propose(*undo)
                done(res, err2)

            g.call("manage", args, timeout, made)

        self.rdb_propose(op, rargs, recorded)
        return _DEFERRED

    def _rdb_record(self, what: str, req: codec.Request, ident: int) -> tuple[str, dict, tuple[str, dict]] | None:
        """The RDB change a management request makes (and its undo), if any."""
        if what == "volume_create":
            name = codec.arg(req, "name", str)
            check_name(name, "volume")  # the aggregate's rule, before the RDB records it
            if name == "vol0":
                raise BadRequest("vol0 is every node's root volume; choose another name")
            return ("volume_create", {"name": name, "node": f"node{ident}",
                                      "size": codec.arg(req, "size", int)},
                    ("volume_delete", {"name": name}))
        if what == "lun_create" and req.args.get("volume") != "vol0":
            vol, name = codec.arg(req, "volume", str), codec.arg(req, "name", str)
            check_name(name, "LUN")
            return ("lun_create", {"volume": vol, "name": name,
                                   "size": codec.arg(req, "size", int)},
                    ("lun_delete", {"volume": vol, "name": name}))
        return None

    def _repeated_report(self, req: codec.Request) -> bool:
        seq = req.args.get("seq")
        if type(seq) is not int:
            return False  # numbered or not, a report is taken (the token proved its sender)
        key = (str(req.args.get("token")), seq)
        if key in self.reports_seen:
            self.repeated_reports += 1
            return True
        self.reports_seen[key] = None
        if len(self.reports_seen) > REPORTS_REMEMBERED:
            self.reports_seen.popitem(last=False)
        return False

    def _guest_event(self, req: codec.Request) -> None:
        if self._repeated_report(req):
            return None
        node = self._node_arg(req)
        kind = codec.arg(req, "kind", str)
        fields = codec.arg(req, "fields", dict, {})
        mono = codec.arg(req, "mono", (int, float), None)
        if not kind.isidentifier() or len(kind) > 64:
            raise BadRequest("event: kind must be a short identifier")
        if mono is not None and not 0 <= mono <= time.monotonic() + 1:
            mono = None  # not a time of this host's clock: stamp it on arrival instead
        # The event's own keys are ours to set, whatever a sender puts in its fields.
        fields = {k: v for k, v in fields.items()
                  if isinstance(k, str) and k not in ("t", "mono", "kind", "node")}
        if kind == "cp_done":
            idents = fields.get("identities", [])
            region = fields.get("region", 0)
            if not (isinstance(idents, list) and all(isinstance(i, int) for i in idents)
                    and isinstance(region, int)):
                raise BadRequest("cp_done: identities must be integers, region an integer")
            epochs = fields.get("epochs")
            if epochs is not None and not (isinstance(epochs, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
                    for p in epochs)):
                raise BadRequest("cp_done: epochs must be [identity, epoch] pairs")
            self.events.emit("cp", node, mono=mono, **fields)
            self._apply(self.coord.handle(fo.CpDone(
                node, tuple(idents), region,
                None if epochs is None else tuple((a, b) for a, b in epochs)), time.monotonic()))
        elif kind == "final_cp":
            idents = fields.get("identities", [])
            if not (isinstance(idents, list) and all(isinstance(i, int) for i in idents)):
                raise BadRequest("final_cp: identities must be integers")
            mine = [i for i in idents if self.coord.identities.get(i) is not None
                    and self.coord.identities[i].served_by == node]
            if fields.get("ok") is True and self.keeper is not None:
                self.keeper.final_durable.update(mine)
            self.events.emit("final_cp" if fields.get("ok") is True else "final_cp_failed",
                             node, mono=mono, identities=[f"node{i}" for i in mine],
                             error=str(fields.get("error", ""))[:300] or None)
        elif kind == "first_request":
            ident = fields.get("identity", 0)
            t = self.takeovers.get(ident) if isinstance(ident, int) else None
            if mono is None:
                mono = time.monotonic()
            if t is not None and t.get("server") == f"node{node}" and "first_request" not in t:
                t["first_request"] = float(mono)
                self._takeover_complete(ident)
            self.events.emit("first_request_served", node, mono=mono, identity=f"node{ident}")
        else:
            self.events.emit(kind, node, mono=mono, **fields)
            self.nvram_reports.note(kind, node, fields)
        return None

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes = []
        for n in range(1, self.cfg.nodes + 1):
            child = self.sup.children.get(n)
            # A down node's figures are its dead incarnation's: show none rather than stale ones.
            st = self.stats.get(n, {}) if self.coord.alive(n) else {}
            age = self.monitor.age(n, now)
            ident = self.coord.identities[n]
            srv = ident.served_by
            storage = (self.stats.get(srv, {}).get("storage") or {}).get(str(n)) \
                if srv and self.coord.alive(srv) else None
            luns = storage["luns"] if storage else self.lun_lists.get(n, [])
            lun_ids = [l[0] for l in luns]
            nodes.append({
                "name": f"node{n}",
                "pid": child.pid if child else None,
                "state": self.coord.state[n],
                "partner": f"node{p}" if (p := partner_of(n, self.cfg.nodes, self.cfg.topology)) else None,
                "takeover_possible": self.coord.takeover_possible(n) and (
                    self.cfg.ha_mode != "mirror" or self.mirror_ok.get(self.coord.region[n] or 0, False)),
                "heartbeat_age_ms": None if age is None else round(age * 1000, 1),
                "nvlog_used": st.get("nvlog_used"),
                "nvlog_capacity": st.get("nvlog_capacity"),
                "last_cp_age_s": None if not st.get("cp_count") else round(now - st["last_cp"], 2),
                "cp_count": st.get("cp_count"),
                "ops": st.get("ops"),
                "identity_served_by": f"node{ident.served_by}" if ident.served_by else None,
                "serves": [f"node{i}" for i in self.coord.served(n)],
                "region": f"{r:#x}" if (r := self.coord.region[n]) else None,
                "endpoint": self.rundir.identity(n),
                "nbd": nbd_view.node_view(self.cfg, self.rundir, n, lun_ids,
                                          self.stats.get(srv) if srv and self.coord.alive(srv)
                                          else None, st),
                "storage": storage,
                "mirror": st.get("mirror"),  # --ha-mode mirror: the sender's state and figures
                "cp": st.get("cp"),
                "cp_stalls": st.get("cp_stalls"),
                "cp_stall_ms": st.get("cp_stall_ms"),
                "disk_faults": st.get("disk_faults"),  # this domain's (storage.fault_io)
                "last_takeover": self._takeover_view(n),
                "assign_backoff": self.coord.assign_backoff(n, now),
            })
        return {"version": 1, "cluster_id": self.cfg.cluster_id, "hypervisor_pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1), "config": self.cfg.to_dict(),
                "nodes": nodes, "grants": self.grants.rows(),
                "rdb": dict(self.rdb.status(), ready=self.rdb_seeded and self.rdb.available),
                "regions_held": len(self.broker.held),
                # turns after which Domain 0 held its heartbeat verdict (it had not been running)
                "own_stalls": self.monitor.own_stalls,
                "nbd_tls": nbd_view.tls_view(self.cfg, self.dir),
                "nvram": dict(self.broker.view(), **self.nvram_reports.view()),
                "bus_faults": dict(self.bus.view(now), guests={
                    f"node{n}": st["bus"] for n, st in self.stats.items()
                    if st and self.coord.alive(n) and ((st.get("bus") or {}).get("faults")
                                                       or (st.get("bus") or {}).get("repeats_refused"))}),
                "refused": dict(self.broker.refused, forged_reports=self.forged,
                                bad_frames=self.control.bad_frames,
                                repeated_requests=self.control.duplicates,
                                repeated_reports=self.repeated_reports)}

    def _takeover_view(self, identity: int) -> dict | None:
        t = self.takeovers.get(identity)
        if t is None:
            return None
        return {k: v for k, v in t.items() if k not in ("detected", "first_request")}

    # -- shutdown ----------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        self.coord.shutting_down = True
        self.shutdown_deadline = time.monotonic() + 30.0
        self.events.emit("shutdown_started", "hypervisor")
        self.bus.shutting_down()
        for n, g in self.guests.items():
            if n in self.sup.children:
                g.call("shutdown", {}, 30.0, lambda res, err: None)

    def _shutdown_progress(self, now: float) -> bool:
        for n in list(self.sup.children):
            if self.sup.exited(n):
                self.sup.kill(n)
        if self.sup.children and now < self.shutdown_deadline:
            return False
        self.sup.stop_all(grace=2.0)
        if self.keeper is None:
            return True
        if not self.stop_requested:
            return False  # halted, holding NVRAM it could not keep: waits for another `down`
        self.stop_requested = False
        try:
            self.keeper.keep_unsaved()
        except OSError as exc:
            msg = (f"cannot stop: NVRAM holds acknowledged writes that are not on disk, and "
                   f"there is no room to keep them in {self.keeper.destage.dir} "
                   f"({exc.strerror or exc}); free space there and run `vmemu down` again")
            self.events.emit("destage_failed", "hypervisor", error=str(exc), message=msg)
            if self.stopping is not None:
                self.control.reply_error(self.stopping[0], self.stopping[1], NoSpace(msg))
                self.stopping = None
            return False
        return True

    def close(self) -> None:
        for fd in self.loop_fds:
            os.close(fd)
        if self.cfg.disk_backend == "loop":
            left = loopdev.detach_all(self.dir)
            self.events.emit("disks_detached", "hypervisor", devices=left)
        self.events.emit("cluster_down", "hypervisor")
        for g in self.guests.values():
            g.close()
        self.nvram_reports.join()
        self.broker.close()
        if self.stopping is not None:
            self.control.reply(self.stopping[0], self.stopping[1], {
                "stopped": True, "kept": self.keeper.kept if self.keeper is not None else []})
        self.control.close()
        self.ctx.term()
        try:
            datadir.cluster_file(self.dir).unlink()
        except FileNotFoundError:
            pass
        self.events.close()
        self.metrics.close()
        self.rundir.remove()
        self.lock.release()


_DEFERRED = object()


def guest_region_size(cfg: ClusterConfig) -> int:
    """The size of every guest's NVRAM region (the fd broker refuses any other)."""
    return (1 << 20) if cfg.ha_mode == "none" else cfg.nvram_mb << 20


def _nbd_port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def resolve_nbd_port(cfg: ClusterConfig, attempts: int = 20) -> ClusterConfig:
    """The config with a real NBD port: port 0 becomes a free one (bind 127.0.0.1:0 with
    SO_REUSEADDR, read it, close), checked free on every node's address; a fixed port is
    checked the same way, so a taken one is one clear line instead of guests failing to serve."""
    hosts = [nbd_address(cfg, n)[0] for n in range(1, cfg.nodes + 1)]
    if not cfg.nbd_tcp:
        return cfg  # no NBD on TCP: no port to find
    if cfg.nbd_port:
        busy = [h for h in hosts if not _nbd_port_free(h, cfg.nbd_port)]
        if busy:
            raise BadRequest(f"NBD port {cfg.nbd_port} is in use on {', '.join(busy)} (another "
                             "vmemu cluster or NBD server?); choose another --nbd-port, or 0 for "
                             "any free port")
        return cfg
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if all(_nbd_port_free(h, port) for h in hosts):
            return dataclasses.replace(cfg, nbd_port=port)
    raise VmemuError(f"found no TCP port free on every NBD address ({hosts[0]}...)")
METRICS_S = 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmemu-hypervisor")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", required=True, help="cluster config as JSON")
    ap.add_argument("--parent-pid", type=int, default=0)
    args = ap.parse_args(argv)
    set_umask()
    lossy_stdio()  # a full disk must not turn a printed report into a crash
    cfg = ClusterConfig.from_dict(json.loads(args.config))
    data_dir = Path(args.data_dir)
    try:
        hv = Hypervisor(data_dir, cfg, args.parent_pid or None)
    except VmemuError as exc:
        print(f"vmemu: {exc.message}", file=sys.stderr)
        return 2
    try:
        hv.boot()
        hv.run()
    finally:
        hv.sup.stop_all(grace=1.0)
        hv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
