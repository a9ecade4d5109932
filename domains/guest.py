"""A guest domain: one OS process running a storage operating system.

Boot, in order: die with the hypervisor; warm the replay kernels (so a takeover never pays for
compilation); allocate this incarnation's NVRAM region, map it, seal it (read-only grant mode)
and hand it to the hypervisor; map the partner regions granted to us; then loop, serving the
hypervisor's requests (assign, release, map, shutdown), the clients of every identity we serve,
heartbeats and consistency points.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from domains import exactly_once, mediator
from domains.bus_tap import GuestFaults
from domains.dmodule import DModule
from domains.failover_monitor import FailoverMonitor
from domains.mirror import MirrorReceiver, MirrorSender
from domains import nbd_tls
from domains.nbd_server import NbdServer
from domains.nmodule import NModule
from domains.rdb_host import RdbHost
from storage import aggregate, fault_io, nvlog, nvlog_check, nvlog_format, replay, replay_gather
from storage import region as shm
from vmemu import datadir, tls
from vmemu.privfs import lossy_stdio, set_umask
from vmemu.bus import codec
from vmemu.bus.rpc import RpcClient, RpcServer
from vmemu.config import ClusterConfig, nbd_address, node_index, partner_of
from vmemu.errors import BadRequest, Fenced, InvalidState, NotGranted, VmemuError
from vmemu.hypervisor import fdbroker
from vmemu.throttle import Throttle

PR_SET_PDEATHSIG = 1
# A CP starts when the active NVLog half is this full, so the switch to the other half comes
# before a write has to wait for room.
HALF_FULL = 0.75
CONTROL_PER_TURN = 64  # control requests answered per loop turn
DEFERRED = object()  # a control request answered later, from the loop (a giveback's release)


def die_with_parent(parent_pid: int) -> None:
    """A guest must never outlive Domain 0 (it would hold an identity nobody supervises)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class Guest:
    def __init__(self, data_dir: Path, node: int) -> None:
        info = datadir.read_cluster(data_dir)
        self.cfg = ClusterConfig.from_dict(info["config"])
        self.dir = data_dir
        self.node = node
        self.ctx = zmq.Context()
        self.rundir = datadir.run_dir(info)
        self.uplink = RpcClient(self.ctx, info["control"], timeout=10.0)
        # dedup: a request of Domain 0's duplicated on the bus is done once (vmemu/bus/rpc.py)
        self.control = RpcServer(self.ctx, self.rundir.guest(node), dedup=True)
        self.fd_name = self.rundir.broker()
        self.stop = False
        self.token = ""  # given by the fd broker when our region is registered
        self.report_seq = 0
        self.region_fd, self.region, self.region_id = self._allocate_region()
        self.peers: dict[int, RpcClient] = {}
        self.mirror_rx: MirrorReceiver | None = None
        self.mirror_tx: MirrorSender | None = None
        if self.cfg.ha_mode == "mirror":
            owners = {o for o in range(1, self.cfg.nodes + 1)
                      if partner_of(o, self.cfg.nodes, self.cfg.topology) == node}
            self.mirror_rx = MirrorReceiver(self.ctx, self.rundir.mirror(node),
                                            len(self.region), owners)
            self.mirror_rx.start()
            self.mirror_tx = MirrorSender(
                self.ctx, self.rundir, node, partner_of(node, self.cfg.nodes, self.cfg.topology),
                self.region_id, self.region, info["control"], lambda: self.token,
                self._log_used, rate=self.cfg.mirror_resync_mb_s * (1 << 20), emit=self._event)
        self.dmodule = DModule(node, data_dir, self.cfg.disks, self.region, self.region_id,
                               self._emit_cp, self.cfg.ha_mode, self.mirror_tx,
                               raid=self.cfg.raid, default_luns=self.cfg.luns,
                               lun_bytes=self.cfg.lun_mb << 20,
                               compress=self.cfg.nvlog_compress or None)
        # This domain's replica of the management database, on its own disk.
        self.rdb = RdbHost(data_dir / f"node{node}" / "rdb.sqlite", f"node{node}",
                           self.cfg.node_names)
        self.nmodule = NModule(self.ctx, self.rundir, self.dmodule, node,
                               self._first_request, self._vldb_lookup)
        self.throttle = Throttle()
        self.nmodule.on_error = lambda ident, op, exc: self._internal_error(
            "block", op, exc, identity=ident)
        self.nbd = self._nbd_server()
        self.monitor = FailoverMonitor(node, self.cfg.heartbeat_ms / 1000.0, self.ctx,
                                       info["control"], self._stats)
        self.bus = GuestFaults(node, self.uplink, self.control, self.monitor, self._event)
        self.next_cp = time.monotonic() + self.cfg.cp_interval_s
        self.stalled_until = 0.0
        # A giveback's release waiting for its pre-giveback CP: (identity, peer, request id).
        self.releasing: tuple[int, bytes, int] | None = None

    def _nbd_server(self) -> NbdServer:
        """NBD on each identity's TCP address and/or Unix socket, with TLS if configured:
        every guest loads the same server certificate (made by Domain 0 at `up`), so a
        client that reconnects after a takeover meets the same one."""
        cfg = self.cfg
        ctx = None
        if cfg.nbd_tls != "off":
            ctx = nbd_tls.server_context(tls.tls_dir(self.dir), cfg.nbd_tls_verify_peer)
        return NbdServer(
            self.dmodule, self.node,
            (lambda ident: nbd_address(cfg, ident)) if cfg.nbd_tcp else None,
            self.nmodule.note_served,
            lambda msg: print(f"node{self.node}: {msg}", file=sys.stderr, flush=True),
            socket_of=self.rundir.nbd_socket if cfg.nbd_socket else None,
            tls=ctx, tls_mode=cfg.nbd_tls, emit=self._event)

    # -- NVRAM -------------------------------------------------------------------------------
    def _allocate_region(self) -> tuple[int, mmap.mmap, int]:
        if self.cfg.nvram_placement == "mediator":
            # The mediator allocated and formatted it; Domain 0 hands it to this incarnation
            # only. Map it read-write first, then seal: the owner's mapping precedes the seal.
            fd, region_id, size = mediator.claim_region(self.fd_name, self.node)
            buf = shm.map_read_write(fd, size)
            shm.seal(fd, read_only=self.cfg.grant_mode == "ro")
            return fd, buf, region_id
        region_id = secrets.randbits(62) | 1
        # --ha-mode none has no NVRAM to speak of: a token region keeps registration uniform.
        size = (1 << 20) if self.cfg.ha_mode == "none" else self.cfg.nvram_mb << 20
        fd = shm.allocate(f"vmemu-nvram-node{self.node}", size)
        buf = shm.map_read_write(fd, size)
        nvlog.format_region(buf, self.node, region_id, halves=True)
        shm.seal(fd, read_only=self.cfg.grant_mode == "ro")
        return fd, buf, region_id

    def register(self) -> None:
        reply, _ = fdbroker.request(self.fd_name, {"op": "register", "node": self.node,
                                                   "region": self.region_id,
                                                   "sealed": self.cfg.grant_mode == "ro"},
                                    fd=self.region_fd)
        if not reply.get("ok"):
            raise NotGranted(reply.get("error", {}).get("message", "registration refused"))
        # What proves our reports (heartbeats, events) come from this incarnation.
        self.token = self.monitor.token = str(reply.get("token", ""))
        if os.environ.get("VMEMU_BREAK"):  # never silently: see domains/dmodule.py
            self._event("broken_build", {"break": os.environ["VMEMU_BREAK"][:64]})
        # The hypervisor now holds the region; our descriptor is no longer needed (the mapping
        # stays), and dropping it means nothing in this process can reopen the memory.
        os.close(self.region_fd)
        for g in self.uplink.call("grants", {"node": self.node, "token": self.token}):
            self._on_grant(int(g["region"]), int(g["owner"]))

    def _on_grant(self, region: int, owner: int) -> None:
        """A partner's region was granted to us: map it (shm), or ask for a mirror (mirror)."""
        if self.cfg.ha_mode != "mirror":
            self._map_region(region, owner)
            return
        # Before the patent there was no shared memory: the owner copies its log to us.
        peer = self.peers.get(owner)
        if peer is None:  # kept open: a socket closed at once (LINGER 0) would drop the message
            peer = self.peers[owner] = RpcClient(self.ctx, self.rundir.guest(owner))
        peer.notify("mirror_request", {"region": region})

    def _log_used(self) -> list[tuple[int, int]]:
        """What of our region a resync copies: the header, and each log half up to its tail
        (a replay reads no further). Not the whole prefix up to the later half's tail: after
        the first CP that would be all of half 0, mostly stale bytes past its tail."""
        return [(0, nvlog_format.REGION_HEADER)] + [
            (h.log_off, h.log_off + h.used) for h in self.dmodule.log.halves]

    def _map_region(self, region: int, owner: int) -> mmap.mmap:
        if region in self.monitor.mapped:
            return self.monitor.mapped[region][1]
        reply, fd = fdbroker.request(self.fd_name, {"op": "map", "node": self.node, "region": region})
        if not reply.get("ok") or fd is None:
            raise NotGranted(reply.get("error", {}).get("message", f"no grant for region {region:#x}"))
        try:
            buf = shm.map_read_write(fd) if reply["mode"] == "rw" else shm.map_read_only(fd)
        finally:
            os.close(fd)
        self.monitor.mapped[region] = (owner, buf)
        self._event("mapped", {"region": f"{region:#x}", "owner": f"node{owner}",
                               "mode": reply["mode"]})
        return buf

    def _probe_write(self, region: int) -> dict[str, str]:
        """Try every way of writing a granted region; report what the kernel said to each.

        For teaching and tests: with a read-only grant each attempt must fail with an OS
        error (EACCES, EBADF or EPERM), not a Python-level check.
        """
        reply, fd = fdbroker.request(self.fd_name, {"op": "map", "node": self.node, "region": region})
        if not reply.get("ok") or fd is None:
            raise NotGranted(reply.get("error", {}).get("message", f"no grant for region {region:#x}"))
        out = {"grant_mode": reply["mode"]}

        def attempt(name: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
                out[name] = "allowed"
            except OSError as exc:
                out[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))

        def reopen_and_write() -> None:
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                os.pwrite(fd2, b"\0", 0)
            finally:
                os.close(fd2)

        try:
            attempt("mmap_read_write", lambda: shm.map_read_write(fd).close())
            attempt("pwrite", lambda: os.pwrite(fd, b"\0", 0))
            attempt("reopen_read_write_and_pwrite", reopen_and_write)
        finally:
            os.close(fd)
        return out

    # -- reporting ---------------------------------------------------------------------------
    def _event(self, kind: str, fields: dict[str, Any], mono: float | None = None) -> None:
        # seq: a report the bus delivers twice is taken once by Domain 0
        self.report_seq += 1
        self.uplink.notify("event", {"node": self.node, "token": self.token, "kind": kind,
                                     "fields": fields, "seq": self.report_seq,
                                     "mono": time.monotonic() if mono is None else mono})

    def _emit_cp(self, kind: str, info: dict[str, Any], t0: float) -> None:
        if "region" in info:
            info = dict(info, region_hex=f"{info['region']:#x}")
        self._event(kind, info, t0)

    def _internal_error(self, where: str, op: str, exc: BaseException, **fields: Any) -> None:
        """A request met a bug: it got an error reply; tell Domain 0 (throttled), and keep on."""
        print(f"node{self.node}: internal error in {where} {op!r}: {exc!r}", file=sys.stderr,
              flush=True)
        held = self.throttle.allow(f"{where}:{op}", time.monotonic())
        if held is not None:
            self._event("internal_error", dict(fields, where=where, op=op[:64],
                                               error=repr(exc)[:300], held_back=held))

    def _first_request(self, identity: int, mono: float) -> None:
        self._event("first_request", {"identity": identity}, mono)

    def _stats(self) -> dict[str, Any]:
        d = self.dmodule
        return {"nvlog_used": d.log.used, "nvlog_capacity": d.log.capacity, "ops": d.ops,
                "cp_count": d.cp_count, "last_cp": d.last_cp, "serves": sorted(d.served),
                "mapped": [f"{r:#x}" for r in self.monitor.mapped], "region": f"{d.region_id:#x}",
                "storage": {str(i): d.storage_summary(i) for i in d.served},
                "cp": d.last_cp_info or None, "cp_stalls": d.cp_stalls,
                "cp_stall_ms": round(d.cp_stall_ms, 3),
                "cp_failing": d.cp_failing, "cp_failures": d.cp_failures,
                "nbd": self.nbd.summary(), "bus": self.bus.view(),
                "disk_faults": fault_io.TABLE.summary(time.monotonic()),
                "mirror": self.mirror_tx.stats() if self.mirror_tx is not None else None}

    # -- hypervisor requests -----------------------------------------------------------------
    def _control(self, req: codec.Request) -> Any:
        if req.op == "assign":
            return self._assign(req)
        if req.op == "release":
            ident = codec.int_arg(req, "identity", 1, self.cfg.nodes)
            if ident not in self.dmodule.served:
                # Released already: Domain 0 asks again when the answer to its first request
                # was lost (or never came), and only a holder it believes in is asked. Its
                # disks got everything at that release's CP.
                return {"cp_ms": None, "already_released": True}
            if self.releasing is not None:
                if self.releasing[0] != ident:
                    raise InvalidState(f"node{self.node} is already giving node{self.releasing[0]} back")
                return DEFERRED  # asked again (the first answer was lost): answer this one
            # Two CPs, as a filer's giveback does: the first while still serving (it carries
            # almost all the dirty data, however long it takes), the second after the unbind
            # (only what came in during the first), so clients wait for the short one only.
            d = self.dmodule
            if not d.cp_running() and d.cp_needed() and time.monotonic() >= d.cp_retry_at:
                d.start_cp("pre_giveback")
            return DEFERRED
        if req.op == "bus_fault":
            return self.bus.request(req)
        if req.op == "map":
            self._on_grant(codec.arg(req, "region", int), codec.arg(req, "owner", int))
            return {}
        if req.op == "mirror_request":
            region = codec.int_arg(req, "region", 1, codec.U63)
            if self.mirror_tx is not None and region == self.region_id:
                # In the background, over the next loop turns (domains/mirror_link.py).
                self.mirror_tx.request_resync(time.monotonic())
            return {}
        if req.op == "probe_write":
            return self._probe_write(codec.arg(req, "region", int))
        if req.op == "stall":
            # For tests and teaching: a main loop that stops turning while the heartbeat thread
            # keeps beating (a deadlock, a livelock). Bounded, so a typo cannot wedge a domain.
            seconds = float(codec.arg(req, "seconds", (int, float)))
            if not 0.0 <= seconds <= 60.0:
                raise BadRequest("stall: seconds must be between 0 and 60")
            self.stalled_until = time.monotonic() + seconds
            return {"stalling_s": seconds}
        if req.op == "shutdown":
            self.stop = True
            return {}
        if req.op == "status":
            return self._stats()
        if req.op == "manage":
            return self._manage(req)
        if req.op in RdbHost.OPS:
            res = self.rdb.handle(req.op, req.args)
            if req.op in ("rdb_apply", "rdb_rebuild", "rdb_propose"):
                self.nmodule.invalidate_vldb()  # a volume may have been made or moved
            return res
        raise BadRequest(f"unknown guest op {req.op!r}")

    def _vldb_lookup(self, volume: str) -> int:
        """Which identity owns `volume`: this domain's own RDB replica (the VLDB)."""
        return node_index(self.rdb.vldb_lookup(volume), self.cfg.nodes)

    def _manage(self, req: codec.Request) -> Any:
        """Management of the identities this domain serves (the hypervisor routes here)."""
        d = self.dmodule
        what = codec.arg(req, "what", str)
        ident = codec.arg(req, "identity", int)
        if what == "disk_fault":  # beside a CP too: a fault is meant to hit one
            return d.disk_fault(ident, req.args)
        d.poll_cp(wait=True)  # metadata changes and disk work never run beside a CP
        a = req.args
        if what == "cp":
            d.served_or_raise(ident)
            info = d.consistency_point("explicit")
            self.next_cp = time.monotonic() + self.cfg.cp_interval_s
            return info
        if what == "volume_create":
            return d.volume_create(ident, codec.arg(req, "name", str), codec.arg(req, "size", int))
        if what == "volume_list":
            return d.volumes(ident)
        if what == "lun_create":
            # New NBD connections see the LUN at once (exports are listed per connection).
            return d.lun_create(ident, codec.arg(req, "volume", str), codec.arg(req, "name", str),
                                codec.arg(req, "size", int))
        if what == "snapshot_create":
            return d.snapshot_create(ident, codec.arg(req, "volume", str), codec.arg(req, "name", str))
        if what == "snapshot_delete":
            d.snapshot_delete(ident, codec.arg(req, "volume", str), codec.arg(req, "name", str))
            return {}
        if what == "snapshot_list":
            return d.snapshot_list(ident, codec.arg(req, "volume", str))
        if what == "snapshot_read":
            return d.read_snapshot(ident, codec.arg(req, "volume", str), codec.arg(req, "name", str),
                                   codec.arg(req, "lun", str), codec.arg(req, "offset", int),
                                   codec.arg(req, "length", int))
        if what == "fsck":
            return d.fsck(ident)
        if what == "scrub":
            return d.scrub(ident)
        if what == "scrub_status":
            return d.scrub_status(ident)
        if what == "disk_fail":
            return d.disk_fail(ident, codec.arg(req, "disk", int))
        if what == "disk_replace":
            return d.disk_replace(ident, codec.arg(req, "disk", int))
        raise BadRequest(f"unknown management request {what!r}")

    def _assign(self, req: codec.Request) -> dict[str, Any]:
        ident = codec.arg(req, "identity", int)
        epoch = codec.arg(req, "epoch", int)
        reason = codec.arg(req, "reason", str)
        chain_raw = codec.arg(req, "chain", list)
        if ident in self.dmodule.served:
            raise InvalidState(f"node{self.node} already serves node{ident}")
        if self.mirror_tx is not None and reason == "takeover" and ident == self.mirror_tx.partner:
            # Our partner is dead (fenced): stop waiting for its answers now, not at the
            # mirror's deadline; Domain 0 hears in_sync=false before the replay below ends.
            self.mirror_tx.partner_gone(time.monotonic())
        chain = []
        for item in chain_raw:
            region, owner = int(item[0]), int(item[1])
            mirrored = bool(item[2]) if len(item) > 2 else False
            live = bool(item[3]) if len(item) > 3 else False
            copy = self.mirror_rx.take_copy(region) if self.mirror_rx is not None and mirrored \
                else None
            if region == self.region_id:
                chain.append((region, None, owner, live))
            elif copy is not None:
                chain.append((region, copy, owner, live))  # our own complete copy
            else:
                chain.append((region, self._map_region(region, owner), owner, live))
        served = self.dmodule.open_identity(ident, epoch, reason)
        try:
            rep = self.dmodule.replay_chain(served, chain)
            rep["from_mirror_copy"] = sum(1 for item in chain if isinstance(item[1], bytearray))
            replay_done = time.monotonic()
            self.nmodule.bind(ident)
            # A taken NBD address must not fail the takeover: the identity is served on the
            # block protocol (and its other NBD listener) while the bind is retried.
            self.nbd.bind(ident, deadline_s=0.5, retry=True)
        except Exception:
            self.nmodule.unbind(ident)
            self.nbd.unbind(ident)
            self.dmodule.served.pop(ident, None)
            served.store.close()
            raise
        assumed = time.monotonic()
        if rep["regions"]:
            # Make the replayed data durable soon, so the old regions can be let go.
            self.next_cp = min(self.next_cp, assumed + 0.5)
        return {"region": self.region_id, "replay": rep, "replay_done": replay_done,
                "luns": [[h.index, h.name, h.size] for h in served.handles],
                "assumed": assumed}

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        # The CP thread is Python too: hand the GIL back to the serving loop more often than
        # the default 5 ms, so a write arriving during a CP is not held up behind it.
        sys.setswitchinterval(0.001)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; Dom0 decides
        self.bg_busy = False
        mirror = self.mirror_tx
        while not self.stop:
            now = time.monotonic()
            if now < self.stalled_until:
                time.sleep(min(0.05, self.stalled_until - now))
                continue
            self.monitor.loop_alive()
            poller = zmq.Poller()
            poller.register(self.control.sock, zmq.POLLIN)
            ident_socks = self.nmodule.sockets()
            for s in ident_socks:
                poller.register(s, zmq.POLLIN)
            fwd_socks = self.nmodule.forward_sockets()
            for s in fwd_socks:
                poller.register(s, zmq.POLLIN)
            for fd, events in self.nbd.poll_fds().items():
                poller.register(fd, events)
            wake = min(now + 0.1, self.next_cp, self.bus.next_due() or now + 0.1)
            busy = self.nbd.busy() or self.bg_busy
            if mirror is not None:
                for s in mirror.sockets():
                    poller.register(s, zmq.POLLIN)
                due = mirror.next_wakeup()
                wake = wake if due is None else min(wake, due)
                busy = busy or mirror.busy()
            timeout = max(0.0, wake - now)
            ready = dict(poller.poll(0 if busy else int(timeout * 1000) + 1))
            self.bus.tick(time.monotonic())
            if mirror is not None:  # the partner's answers first: they release held replies
                mirror.on_ready(time.monotonic())
                self._release_gated()
            if self.control.sock in ready or self.control.pending():
                self._drain_control()
            for s, ident in ident_socks.items():
                if s in ready:
                    self.nmodule.serve_ready(ident)
            for s, owner in fwd_socks.items():
                if s in ready:
                    self.nmodule.forward_replies(owner)
            self.nmodule.expire(time.monotonic())
            self.nbd.service(ready)
            try:
                self.dmodule.poll_cp()
            except Fenced:
                raise  # a stale incarnation: the hypervisor has handed our disks on
            except Exception as exc:  # the CP failed (reported as cp_failed)
                print(f"node{self.node}: consistency point failed: {exc}", file=sys.stderr,
                      flush=True)
                lost = self.dmodule.storage_lost()
                if lost is not None:  # end this incarnation: the partner replays our log
                    raise SystemExit(f"node{self.node}: {lost}; stopping for a takeover")
            if self.releasing is not None and not self.dmodule.cp_running():
                self._finish_release()
            if mirror is not None:
                # This turn's spans in one batch (group commit), a resync chunk, deadlines.
                mirror.end_turn(time.monotonic())
                self._release_gated()
            # A slice of reconstruction, never beside a running CP (both write the stripes).
            self.bg_busy = not self.dmodule.cp_running() and self.dmodule.background_work()
            now = time.monotonic()
            if now >= self.next_cp or self.dmodule.log_fill() >= HALF_FULL:
                self._cp("timer" if now >= self.next_cp else "log_half_full")

    def _release_gated(self) -> None:
        """Replies the mirror now allows out (acknowledged by the partner, or degraded)."""
        self.nmodule.release()
        self.nbd.release(time.monotonic())

    def _cp(self, reason: str) -> None:
        """Start a CP in the background (writes go on into the other log half meanwhile)."""
        d = self.dmodule
        if d.cp_running() or time.monotonic() < d.cp_retry_at:
            return  # the timer (or the half-full trigger) fires again once it has finished
        if d.cp_needed():
            d.start_cp(reason)
        self.next_cp = time.monotonic() + self.cfg.cp_interval_s

    def _drain_control(self, budget: int = CONTROL_PER_TURN) -> None:
        """Answer queued control requests, at most `budget` a turn (the rest wait a turn:
        a flood slows its sender down, never the loop that serves clients)."""
        for _ in range(budget):
            if not self.control.pending() and not self.control.sock.poll(0):
                return
            inc = self.control.recv()
            if inc is None:
                continue
            try:
                result = self._control(inc.request)
            except VmemuError as exc:
                self.control.reply_error(inc.peer, inc.request.id, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one request's bug, not the domain's end
                self.control.reply_error(inc.peer, inc.request.id,
                                         VmemuError(f"node{self.node}: internal error: {exc!r}"))
                self._internal_error("control", inc.request.op, exc)
                continue
            if result is DEFERRED:
                self.releasing = (codec.arg(inc.request, "identity", int), inc.peer,
                                  inc.request.id)
                continue
            self.control.reply(inc.peer, inc.request.id, result)

    def _finish_release(self) -> None:
        """The pre-giveback CP is over: unbind, the final (short) CP, and the reply."""
        assert self.releasing is not None
        (ident, peer, req_id), self.releasing = self.releasing, None
        try:
            if ident not in self.dmodule.served:
                raise InvalidState(f"node{self.node} no longer serves node{ident}")
            self.nmodule.unbind(ident)
            self.nbd.unbind(ident)
            result = {"cp_ms": self.dmodule.release_identity(ident)["ms"]}
        except VmemuError as exc:
            self.control.reply_error(peer, req_id, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the CP failed: the giveback fails, we go on
            self.control.reply_error(peer, req_id, VmemuError(
                f"node{self.node}: the giveback's CP failed: {exc!r}"))
            return
        self.control.reply(peer, req_id, result)

    def shutdown(self) -> None:
        """Clean stop: a final CP so the disks hold everything, then let go of all of it.

        Domain 0 is told, and waited for, which identities that CP made durable: it keeps
        (destages) the NVRAM of every other one rather than let it go with the cluster.
        """
        report: dict[str, Any] = {"identities": sorted(self.dmodule.served), "ok": False}
        try:
            info = self.dmodule.consistency_point("shutdown")
            report = {"identities": info["identities"], "ok": True}
        except Exception as exc:  # noqa: BLE001 - reported to Domain 0, which keeps the NVRAM
            report["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"node{self.node}: the final consistency point failed: {exc}", file=sys.stderr)
        try:
            if self.token:
                self.uplink.call("event", {"node": self.node, "token": self.token,
                                           "kind": "final_cp", "fields": report,
                                           "mono": time.monotonic()}, timeout=5.0)
        except VmemuError:
            pass  # no answer: Domain 0 keeps this node's NVRAM, as for a node that died
        finally:
            self.monitor.stop()
            if self.mirror_rx is not None:
                self.mirror_rx.stop()
            if self.mirror_tx is not None:
                self.mirror_tx.close()
            for peer in self.peers.values():
                peer.close()
            self.nmodule.close()
            self.nbd.close()
            self.dmodule.close()
            self.rdb.close()
            self.control.close()
            self.uplink.close()
            self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmemu-guest")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--node", type=int, required=True)
    ap.add_argument("--hypervisor-pid", type=int, required=True)
    args = ap.parse_args(argv)
    set_umask()  # what this domain creates is the cluster user's alone
    lossy_stdio()  # a full disk must not turn a printed report into a crash
    die_with_parent(args.hypervisor_pid)
    replay.warm()
    nvlog_check.warm()  # the corrupt-region path too: never a compile inside a takeover
    replay_gather.warm()  # a takeover into the cache gathers blocks with it
    exactly_once.warm()  # and rebuilds the exactly-once table with it
    aggregate.warm()  # the file system's kernels too: a cold compile starves the heartbeat
    guest = Guest(Path(args.data_dir), args.node)
    # Beating before registering: Domain 0 counts silence from the registration on, and the
    # grants round trip and partner mappings that follow it could eat that grace period on a
    # busy host (beats before it are ignored: nobody is watching this incarnation yet).
    guest.monitor.start()
    guest.register()
    try:
        guest.run()
    finally:
        guest.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
