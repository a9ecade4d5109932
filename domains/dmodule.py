"""The D-module: the storage server of a guest. NVLog, LUNs, consistency points, replay.

Write path: validate -> exactly-once check -> append to this domain's NVLog -> merge into the
LUN's dirty cache -> acknowledge. A CP later writes the dirty blocks, syncs, records in each
disk's header how far it holds every log, and starts a new log generation.

Replay (at takeover, at recovery): the regions of an identity's chain are scanned by the numba
kernels and applied, oldest first, with pwrite into the disk images; records a disk already holds
(its header's `applied` map) are skipped, so replaying twice changes nothing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from storage import nvlog_format as F
from storage import fault_io, nvlog_check, replay, replay_gather
from domains.exactly_once import ExactlyOnce, rebuild_table
from domains.store import FlatStore, FsStore, LunHandle, Store
from storage.aggregate import Aggregate
from storage.blockcache import BLOCK, BlockCache
from storage.disk import HEADER as DISK_HEADER
from storage.disk import Disk
from storage.nvlog import BadRecord, TwoHalfLog, record_payload
from storage.raid.errors import RaidOffline
from vmemu.errors import (BadRequest, CorruptDisk, Fenced, InvalidState, LogFull, NoSpace,
                          UnknownLun, VmemuError)

CP_RETRY_S = 0.5  # a failed CP is tried again after this, doubling up to CP_RETRY_MAX_S
CP_RETRY_MAX_S = 8.0
BG_RETRY_S = 5.0  # a failed slice of reconstruction is tried again after this
CARRY_PER_CLIENT = 1024  # how much of the table survives a CP, per client
# A deliberately broken build, for showing that the chaos checker catches a lost write: with
# VMEMU_BREAK=unlogged_ack in its environment a guest acknowledges writes it never put in
# NVRAM (a takeover then cannot replay them). The guest says so in an event at boot.
BROKEN_UNLOGGED_ACK = os.environ.get("VMEMU_BREAK") == "unlogged_ack"


@dataclass
class Served:
    """One identity (a node's disks and LUNs) as served by this domain."""

    identity: int
    store: Store
    cache: BlockCache
    epoch: int
    reason: str
    needs_sync: bool = False  # replay wrote to the disks behind the cache's back
    replayed: dict[int, int] = field(default_factory=dict)  # region -> last seq replayed
    handles: list[LunHandle] = field(default_factory=list)
    read_errors_seen: dict[str, int] = field(default_factory=dict)
    bg_retry_at: float = 0.0  # background work (rebuild, scrub) failed: not before this

    @property
    def luns(self) -> list[LunHandle]:
        return self.handles

    def refresh_luns(self) -> None:
        self.handles = self.store.luns()


def _count_replay(total: dict[str, Any], index: np.ndarray, count: int, gid: int, min_seq: int,
                  size: int, bad: int, rows: int, nbytes: int, writes: int) -> None:
    """Add one LUN's replay of one log to `total`: `records`/`bytes` are the valid records
    above what the disk holds and their payload; `written*`/`writes` what was written."""
    rs = index[:count]
    mine = (rs[:, F.IDX_LUN] == gid) & (rs[:, F.IDX_SEQ] > min_seq)
    off, length = rs[:, F.IDX_OFFSET], rs[:, F.IDX_LENGTH]
    fits = (off >= 0) & (length >= 0) & (length <= size) & (off <= size - length)
    total["records"] += int(np.count_nonzero(mine)) - int(bad)
    total["bytes"] += int(length[mine & fits].sum())
    total["bad"] += int(bad)
    total["written"] += int(rows)
    total["written_bytes"] += int(nbytes)
    total["writes"] += int(writes)


@dataclass
class CpJob:
    """One consistency point: what it froze, and (from the CP thread) how it went."""

    reason: str
    t0: float
    last_seq: int
    frozen: list[tuple[Served, dict, dict[int, int]]]
    snapshot: tuple[int, str] | None
    switched: bool
    background: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


class DModule:
    def __init__(self, node: int, data_dir: Path, disks: int, region: mmap.mmap,
                 region_id: int, emit: Callable[..., None], ha_mode: str = "shm",
                 mirror: Any = None, raid: str = "none", default_luns: int = 2,
                 lun_bytes: int | None = None, compress: str | None = None) -> None:
        self.node = node
        self.raid = raid  # "none": the flat LUN path; raid4/raid1: the aggregate
        self.data_dir = data_dir
        self.disks = disks
        self.region = region
        self.region_id = region_id
        self.ha_mode = ha_mode
        self.mirror = mirror  # domains.mirror.MirrorSender in --ha-mode mirror
        # The transports hold every reply until ack_gate.releasable(its ticket): in mirror
        # mode, until the partner holds what was logged before it (domains/mirror_link.py).
        self.ack_gate = mirror
        self.log = TwoHalfLog(region, track_spans=mirror is not None, compress=compress)
        self.served: dict[int, Served] = {}
        self.dedup = ExactlyOnce()
        self.emit = emit
        self.ops = 0
        self.writes_since_cp = 0
        self.cp_count = 0
        self.last_cp = time.monotonic()
        self.last_cp_info: dict[str, Any] = {}
        # Writes that waited for log space (a CP had to end first), and how long in all:
        # counted in _waiting_for_log, which every such wait goes through.
        self.cp_stalls = 0
        self.cp_stall_ms = 0.0
        # CPs the disks refused (full, I/O errors): the NVLog keeps their writes meanwhile.
        self.cp_failures = 0  # in a row; 0 once one succeeds
        self.cp_failing: str | None = None  # the last failure, while they go on failing
        self.cp_retry_at = 0.0  # the loop starts no CP before this (backoff)
        self.cp_job: CpJob | None = None
        self.pending_commit = False  # --ha-mode none: writes taken, not yet committed
        self.pending_dedup: list[tuple[int, int]] = []
        self.default_luns = default_luns
        self.lun_bytes = lun_bytes

    # -- client operations (the N-module calls these directly: same domain, local path) ----
    def served_or_raise(self, identity: int) -> Served:
        served = self.served.get(identity)
        if served is None:
            raise UnknownLun(f"node{self.node} does not serve node{identity}")
        return served

    def lun(self, identity: int, index: int) -> LunHandle:
        served = self.served_or_raise(identity)
        why = served.store.unusable()
        if why is not None:  # never acknowledge a write that cannot reach a disk
            # Not "unavailable": clients retry that (a takeover is brief); this is not brief.
            raise RaidOffline(why) if "offline" in why else InvalidState(why)
        for h in served.handles:
            if h.index == index:
                return h
        names = ", ".join(f"lun{h.index}" for h in served.handles) or "none"
        raise UnknownLun(f"node{identity} has no lun{index} (it has {names})")

    def write(self, identity: int, lun_index: int, offset: int, data: bytes, client: int,
              request: int) -> int:
        lun = self.lun(identity, lun_index)
        lun.check(offset, len(data))
        if self.dedup.applied(client, request):
            return 0  # a retry of a write already logged: acknowledge, do not apply again
        served = self.served[identity]
        if self.ha_mode == "none":
            # No NVRAM: the write must be on disk before it is acknowledged. The transports
            # hold their acknowledgements and call commit_pending_writes once per turn, so
            # the writes that arrived together share one CP (group commit).
            served.cache.write(lun_index, offset, data)
            self.pending_commit = True
            # Recorded as applied only once committed: a CP carries the exactly-once table
            # into the NVLog, and a retry after a crash must not be taken for a done write.
            self.pending_dedup.append((client, request))
            self.ops += 1
            return 0
        if not self.log.fits(len(data)):
            self._make_room(len(data))
        if BROKEN_UNLOGGED_ACK:  # the chaos checker's test: acknowledged, never logged
            served.cache.write(lun_index, offset, data)
            self.ops += 1
            return 0
        seq = self.log.append(F.lun_gid(identity, lun_index), offset, data, client, request)
        self._replicate()
        served.cache.write(lun_index, offset, data)
        self.dedup.record(client, request)
        self.ops += 1
        self.writes_since_cp += 1
        return seq

    def read(self, identity: int, lun_index: int, offset: int, length: int) -> bytes:
        self.lun(identity, lun_index).check(offset, length)
        served = self.served[identity]
        try:
            data = served.cache.read(lun_index, offset, length)
        finally:
            self._note_read_errors(served)
        self.ops += 1
        return data

    def _note_disk_failures(self, served: Served) -> None:
        """Members the RAID group failed on an I/O error: one ``disk_failed`` event each."""
        store = served.store
        if isinstance(store, FsStore) and store.aggr.failures:
            for f in store.aggr.take_failures():
                self.emit("disk_failed", {"identity": served.identity, "disk": f["disk"],
                                          "raid": f["raid"], "cause": "io_error"}, f["mono"])

    def _note_read_errors(self, served: Served) -> None:
        """A read met a corrupt block (repaired from RAID, or not), or a disk that failed:
        say so in the events."""
        store = served.store
        if not isinstance(store, FsStore):
            return
        self._note_disk_failures(served)
        now = store.aggr.group.read_errors
        seen = served.read_errors_seen
        # Reconstructing a failed disk's blocks is the degraded mode working (counted in
        # status, not an event per read); a bad checksum or an unrecoverable block is news.
        if any(now[k] != seen.get(k, 0) for k in ("checksum", "repaired", "unrecoverable")):
            new = {k: now[k] - seen.get(k, 0) for k in now}
            served.read_errors_seen = dict(now)
            self.emit("read_errors", {"identity": served.identity,
                                      **{k: v for k, v in new.items() if v}}, time.monotonic())

    def flush(self, identity: int, lun_index: int) -> None:
        # An acknowledged write is already on stable storage: the NVLog is NVRAM.
        self.lun(identity, lun_index)

    # -- consistency points ------------------------------------------------------------------
    def cp_needed(self) -> bool:
        return (self.writes_since_cp > 0 or self.cp_failures > 0  # a failed CP is retried
                or any(s.needs_sync for s in self.served.values()))

    def log_fill(self) -> float:
        """How full the active log half is."""
        return self.log.used / self.log.capacity

    def commit_pending_writes(self) -> None:
        """--ha-mode none: make the writes taken since the last call durable (one CP)."""
        if self.pending_commit:
            self.pending_commit = False
            done, self.pending_dedup = self.pending_dedup, []
            try:
                self.consistency_point("write_through")
            except OSError as exc:  # no NVRAM to keep them: these writes are not acknowledged
                raise NoSpace(f"node{self.node}: the disks refused the write ({exc.strerror or exc}); "
                              "it was not acknowledged") from exc
            for client, request in done:
                self.dedup.record(client, request)
            # Into the NVLog before any ack leaves, so that a partner knows these requests
            # are done (the table the CP carried was taken before they were).
            pairs = np.asarray([x for pair in done if pair[0] for x in pair], dtype="<u8")
            if pairs.size:
                if self.log.fits(pairs.nbytes):
                    self.log.append(F.DEDUP_LUN, 0, pairs.tobytes(), flags=F.FLAG_DEDUP)
                    self._replicate()
                else:
                    with self._waiting_for_log():
                        self.consistency_point("log_full")  # carries the whole table

    def _make_room(self, length: int) -> None:
        """The active log half is full: switch halves (a CP starts) or, if the other half is
        still being flushed by the running CP, wait for that CP first -- a stall. If the
        other half is held because CPs fail (the disks refuse writes), refuse: NoSpace."""
        if F.record_size(length) > self.log.capacity:
            raise LogFull(f"a {length}-byte write cannot fit an NVLog half of "
                          f"{self.log.capacity} bytes")
        if self.cp_job is not None:
            with self._waiting_for_log():
                try:
                    self.poll_cp(wait=True)
                except Fenced:
                    raise
                except Exception:  # noqa: BLE001 - reported (cp_failed); refused just below
                    pass
        if not self.log.can_switch():
            # The other half still holds writes no CP has made durable. Refuse now, without
            # a CP per write: the loop retries CPs (with a backoff) and writes resume when one
            # succeeds. Everything acknowledged so far is in NVRAM, and stays there.
            raise NoSpace(f"node{self.node}: NVLog full and consistency points are failing "
                          f"({self.cp_failing or 'the last one failed'}); new writes are "
                          "refused until one succeeds, acknowledged ones are safe in NVRAM")
        self.start_cp("log_full")
        if not self.log.fits(length):  # a retried CP does not switch halves: finish it
            with self._waiting_for_log():
                self.poll_cp(wait=True)
            raise LogFull("NVLog full: the consistency point did not free a log half")

    @contextlib.contextmanager
    def _waiting_for_log(self) -> Iterator[None]:
        """Around every wait of a write for NVLog space: one stall, and its time. The bench's
        "no stall a CP could have avoided" verdict is only as honest as this count, so no
        such wait may bypass it (see bench/report.py stall_verdict)."""
        t = time.monotonic()
        self.cp_stalls += 1
        try:
            yield
        finally:
            self.cp_stall_ms += (time.monotonic() - t) * 1000

    def consistency_point(self, reason: str, snapshot: tuple[int, str] | None = None) -> dict[str, Any]:
        """A CP now, waited for (explicit, snapshot, giveback, shutdown, no-NVRAM writes).

        `snapshot` = (identity, name): that identity's commit also takes a snapshot.
        """
        try:
            self.poll_cp(wait=True)
        except Fenced:
            raise
        except Exception:  # noqa: BLE001 - that CP's failure was reported (cp_failed); this
            pass           # one retries everything it left behind
        self.start_cp(reason, snapshot, background=False)
        info = self.poll_cp(wait=True)
        assert info is not None
        return info

    def start_cp(self, reason: str, snapshot: tuple[int, str] | None = None,
                 background: bool = True) -> CpJob:
        """Freeze every identity's cache and commit it (in the CP thread when `background`).

        Writes keep going meanwhile: into fresh caches and the other NVLog half. If a
        previous CP failed, its half is still held; this CP then does not switch halves but
        covers everything logged so far.
        """
        if self.cp_job is not None:
            raise RuntimeError("a consistency point is already running")
        t0 = time.monotonic()
        switched = self.log.can_switch()
        last_seq = self.log.last_seq
        if switched:
            self.log.switch()
        # An aggregate that can take no I/O (offline RAID) is left out: its cached writes stay
        # cached (and reported), and the other identities' CPs go on.
        frozen = [(s, s.cache.freeze(), dict(s.replayed)) for s in self.served.values()
                  if s.store.unusable() is None]
        if switched:
            self._carry_dedup()  # the new half starts with the exactly-once table
            self._replicate()
        self.writes_since_cp = 0
        job = CpJob(reason, t0, last_seq, frozen, snapshot, switched, background)
        self.cp_job = job
        if background:  # a CP under way is a phase a failure can hit (vmemu chaos kill_in_cp)
            self.emit("cp_started", {"reason": reason, "switched": switched}, t0)
        if background:
            threading.Thread(target=self._run_cp, args=(job,), name="cp", daemon=True).start()
        else:
            self._run_cp(job)
        return job

    def _run_cp(self, job: CpJob) -> None:
        """The CP thread: only the stores' commit runs here; everything else is main-thread."""
        try:
            blocks = written = 0
            for served, blks, _ in job.frozen:
                snap = job.snapshot[1] if job.snapshot and job.snapshot[0] == served.identity else None
                st = served.store.commit(blks, snap)
                blocks += st["blocks"]
                written += st.get("written", st["blocks"])
            # Then record (durably: fdatasync) what the disks now hold from each log. Here,
            # not on the main thread, so the syncs never hold up a write.
            for served, _, replayed in job.frozen:
                applied = served.store.applied()
                applied.update(replayed)
                applied[self.region_id] = job.last_seq
                served.store.set_applied(applied)
            job.result = {"blocks": blocks, "written": written}
        except BaseException as exc:  # handed to the main thread by poll_cp
            job.error = exc
        finally:
            job.done.set()

    def storage_lost(self) -> str | None:
        """A file system that stopped after a failed CP (not an offline RAID group): this
        incarnation cannot make its NVLog durable any more. The domain should end, so that
        the partner remounts the last good root and replays the log."""
        for served in self.served.values():
            store = served.store
            if isinstance(store, FsStore) and store.aggr.fs._dead and not store.aggr.group.offline \
                    and not store.aggr.recoverable():
                return f"node{served.identity}: {store.unusable()}"
        return None

    def cp_running(self) -> bool:
        return self.cp_job is not None

    def poll_cp(self, wait: bool = False) -> dict[str, Any] | None:
        """Finish the running CP if it is done (or once it is, with `wait`); its info."""
        job = self.cp_job
        if job is None or not (job.done.is_set() or wait):
            return None
        job.done.wait()
        self.cp_job = None
        for served, _, _ in job.frozen:
            self._note_disk_failures(served)
        if job.error is not None:
            for served, blks, _ in job.frozen:  # nothing is lost: the writes go back in the cache
                served.cache.unfreeze()
                try:
                    # One store may have committed before another failed: read its new tree
                    # (the old one's blocks are free again and a retry CP may reuse them). One
                    # whose disks refused the CP's writes is remounted at its last root.
                    if served.store.recover():
                        served.store.refresh_view()
                except Exception:  # noqa: BLE001 - a dead file system has no view to refresh
                    pass
            self.cp_failures += 1
            self.cp_failing = f"{type(job.error).__name__}: {job.error}"[:300]
            backoff = min(CP_RETRY_MAX_S, CP_RETRY_S * 2 ** (self.cp_failures - 1))
            self.cp_retry_at = time.monotonic() + backoff
            self.emit("cp_failed", {"reason": job.reason, "error": self.cp_failing,
                                    "region": self.region_id, "failures": self.cp_failures,
                                    "retry_in_s": backoff}, job.t0)
            raise job.error
        for served, _, replayed in job.frozen:
            served.cache.thaw()
            served.store.refresh_view()
            for r, seq in replayed.items():
                if served.replayed.get(r) == seq:
                    served.replayed.pop(r)
            served.needs_sync = bool(served.replayed)
        self.log.release()
        self.cp_count += 1
        self.last_cp = time.monotonic()
        if self.cp_failures:
            self.emit("cp_recovered", {"failures": self.cp_failures, "reason": job.reason,
                                       "last_error": self.cp_failing}, job.t0)
            self.cp_failures, self.cp_failing, self.cp_retry_at = 0, None, 0.0
        info = {"reason": job.reason, "blocks": job.result["blocks"],
                "written": job.result["written"], "ms": round((self.last_cp - job.t0) * 1000, 3),
                "seq": job.last_seq, "region": self.region_id,
                "identities": sorted(s.identity for s, _, _ in job.frozen),
                # which time each was served: Domain 0 ignores a late report of an earlier one
                "epochs": sorted([s.identity, s.epoch] for s, _, _ in job.frozen),
                "stalls": self.cp_stalls, "background": job.background}
        self.last_cp_info = info
        # A write-through CP is reported only when it also made replayed regions durable:
        # the hypervisor lets go of a region on that news.
        if job.reason != "write_through" or any(r for _, _, r in job.frozen):
            self.emit("cp_done", info, job.t0)
        return info

    def _replicate(self) -> None:
        # Only noted here: the loop sends one turn's spans in one batch (group commit), and
        # the transports hold the acknowledgements until the partner has them.
        if self.mirror is not None:
            spans = self.log.drain_spans()
            if spans:
                self.mirror.add_spans(spans)

    def _carry_dedup(self) -> None:
        limit = max(0, (self.log.capacity // 8 - F.record_size(0)) // 16)
        payload = self.dedup.snapshot(CARRY_PER_CLIENT, min(limit, 32768))
        if payload:
            self.log.append(F.DEDUP_LUN, 0, payload, flags=F.FLAG_DEDUP)

    # -- serving identities ------------------------------------------------------------------
    def open_identity(self, identity: int, epoch: int, reason: str) -> Served:
        """Open an identity's disks (and aggregate) at `epoch`. A disk whose header does not
        check out is refused with CorruptDisk naming the file (and a ``disk_corrupt`` event):
        the identity is not served from bytes we cannot trust."""
        store: Store
        try:
            if self.raid == "none":
                store = FlatStore.open(self.data_dir, identity, self.disks, epoch)
            else:
                store = FsStore.open(self.data_dir, identity, self.disks, epoch, self.raid,
                                     self.default_luns, self.lun_bytes)
        except CorruptDisk as exc:
            self.emit("disk_corrupt", {"identity": identity, "error": exc.message,
                                       "reason": exc.reason, "assign": reason}, time.monotonic())
            raise
        served = Served(identity, store, BlockCache(store.read_committed), epoch, reason)
        served.refresh_luns()
        if isinstance(store, FsStore):
            served.read_errors_seen = dict(store.aggr.group.read_errors)
        self.served[identity] = served
        return served

    def replay_chain(self, served: Served, chain: list[tuple]) -> dict[str, Any]:
        """Apply every region of the chain, oldest first, onto the identity's disks.

        `chain` holds (region id, mapping), optionally followed by the owner node and whether
        the owner is alive and still writing it (a giveback's releaser); a mapping of None is
        our own live region (its records are in our cache already). Each region is
        read through ``nvlog_check.read_region``: a region whose header does not check out
        is quarantined (not replayed, reported, the rest of the chain goes on), and a log
        that ends at a corrupt record is replayed up to it, with the records lost after it
        reported (events ``nvram_region_quarantined``, ``nvlog_corrupt_record``).

        Per region and LUN: ``replay.plan`` the rows to write, pwrite them into the disk file
        (not through a mapping: a write fault on a hole of a sparse image costs ~4x a pwrite)
        or into the cache (file-system LUNs). In the result, `records`/`bytes` are the valid
        records above what the disk holds and their payload bytes; `written`/`written_bytes`/
        `writes` what actually went to the files (rows a later same-range row overwrites are
        skipped) and in how many pwrite(v) calls; `quarantined`, `corrupt_records` and
        `lost_records` count the problems reported.
        """
        t0 = time.monotonic()
        total = {"records": 0, "bytes": 0, "bad": 0, "regions": 0, "scanned": 0,
                 "written": 0, "written_bytes": 0, "writes": 0, "quarantined": 0,
                 "corrupt_records": 0, "lost_records": 0}
        luns = {F.lun_gid(served.identity, lun.index): lun for lun in served.luns}
        store = served.store
        for item in chain:
            region_id, mapping = item[0], item[1]
            owner = item[2] if len(item) > 2 else None
            live = bool(item[3]) if len(item) > 3 else False
            if mapping is None:
                continue  # our own live region: its records are in our cache already
            total["regions"] += 1
            store.check_epoch()  # once per region: its rows are one batch of writes
            min_seq = store.applied().get(region_id, 0)
            read = nvlog_check.read_region(mapping, owner, region_id, set(luns), min_seq, live)
            self._report_region(served.identity, region_id, owner, read, total)
            last = 0
            for s in read.logs:  # both halves, oldest first; each up to its first bad record
                total["scanned"] += s.count
                for gid, lun in luns.items():
                    if isinstance(store, FlatStore):
                        self._replay_onto(store.disk_of(lun.index), s.view, s.index, s.count,
                                          gid, min_seq, total)
                    else:
                        self._replay_into_cache(served.cache, lun, s.view, s.index, s.count,
                                                gid, min_seq, total)
                total["bad"] += self._rebuild_dedup(s.view, s.index, s.count, set(luns))
                if s.count:
                    last = max(last, s.area.base_seq + s.count - 1)
            if read.quarantine is None:  # never below what the disks already hold
                served.replayed[region_id] = max(last, min_seq)
            served.needs_sync = True
        total["ms"] = round((time.monotonic() - t0) * 1000, 3)
        return total

    def _report_region(self, identity: int, region_id: int, owner: int | None,
                       read: nvlog_check.RegionRead, total: dict[str, Any]) -> None:
        """Say loudly what a region's corruption costs: one event per problem."""
        for p in read.problems:
            kind, fields, line = nvlog_check.report(p)
            total["quarantined" if kind == "nvram_region_quarantined" else "corrupt_records"] += 1
            total["lost_records"] += fields["lost_records"]
            who = f"node{owner}" if owner is not None else "unknown"
            self.emit(kind, {"identity": identity, "region": region_id, "owner": who, **fields,
                             "message": f"node{identity} replay, region {region_id:#x} of "
                                        f"{who}: {line}"}, time.monotonic())

    @staticmethod
    def _replay_into_cache(cache: BlockCache, lun: LunHandle, log: np.ndarray, index: np.ndarray,
                           count: int, gid: int, min_seq: int, total: dict[str, Any]) -> None:
        """File-system LUNs: the planned rows become dirty blocks; the next CP commits them
        through the file system (write-anywhere, checksummed, on RAID) like any other write.

        Whole aligned blocks are gathered into one buffer by one numba pass and go into the
        cache in bulk; a row that is not (partial, unaligned, compressed) goes through
        ``cache.write`` at its place in the order, so later rows still win."""
        rows, bad = replay.plan(log, index, count, gid, min_seq, lun.size)
        first, blocks, data = replay_gather.gather_blocks(log, index, rows)
        slow = np.flatnonzero(first < 0)
        blist = blocks.tolist()
        mv = memoryview(data)
        done = 0  # blocks of `blist` in the cache so far
        if slow.size:
            nblk = np.where(first >= 0, index[rows, F.IDX_LENGTH] // BLOCK, 0)
            upto = np.cumsum(nblk)  # blocks of the simple rows up to each row
            for k in slow.tolist():
                end = int(upto[k])
                if end > done:
                    cache.put_blocks(lun.index, blist[done:end], mv[done * BLOCK:end * BLOCK])
                    done = end
                row = index[int(rows[k])]
                cache.write(lun.index, int(row[F.IDX_OFFSET]), record_payload(log, row))
        if len(blist) > done:
            cache.put_blocks(lun.index, blist[done:], mv[done * BLOCK:])
        nbytes = int(index[rows, F.IDX_LENGTH].sum())
        _count_replay(total, index, count, gid, min_seq, lun.size, bad, rows.size, nbytes,
                      rows.size)

    @staticmethod
    def _replay_onto(disk: Disk, log: np.ndarray, index: np.ndarray, count: int, gid: int,
                     min_seq: int, total: dict[str, Any]) -> None:
        """Plan and pwrite one LUN's records of one region; add the figures to `total`."""
        rows, bad = replay.plan(log, index, count, gid, min_seq, disk.size)
        nbytes, calls = replay.write_plan(log, index, rows, disk.fd, DISK_HEADER, disk.size)
        _count_replay(total, index, count, gid, min_seq, disk.size, bad, rows.size, nbytes,
                      calls)

    def _rebuild_dedup(self, log: np.ndarray, index: np.ndarray, count: int,
                       gids: set[int]) -> int:
        """The exactly-once table from the replayed records; returns the bad table records."""
        return rebuild_table(self.dedup, log, index, count, gids)

    # -- management (the aggregate's volumes, LUNs, snapshots and disks) ----------------------
    def aggregate(self, identity: int) -> Aggregate:
        store = self.served_or_raise(identity).store
        if not isinstance(store, FsStore):
            raise BadRequest("volumes, snapshots and RAID need the file system; this cluster "
                             "runs --raid none (the flat LUN path)")
        return store.aggr

    def volume_create(self, identity: int, name: str, size: int) -> dict[str, Any]:
        return self.aggregate(identity).volume_create(name, size)

    def lun_create(self, identity: int, volume: str, name: str, size: int) -> dict[str, Any]:
        info = self.aggregate(identity).lun_create(volume, name, size)
        self.served[identity].refresh_luns()
        return {"index": info.index, "path": info.path, "size": info.size}

    def volumes(self, identity: int) -> list[dict[str, Any]]:
        aggr = self.aggregate(identity)
        return [aggr.volume_info(v) for v in sorted(aggr.volumes)]

    def snapshot_create(self, identity: int, volume: str, name: str) -> dict[str, Any]:
        """A snapshot holds every write acknowledged before it: it is taken by a CP."""
        aggr = self.aggregate(identity)
        full = aggr.snapshot_name(volume, name)
        if any(s["name"] == name for s in aggr.snapshot_list(volume)):
            raise BadRequest(f"volume {volume} already has a snapshot {name!r}")
        why = aggr.unusable()
        if why is not None:  # its CP would leave this identity out: no snapshot would exist
            raise RaidOffline(why) if "offline" in why else InvalidState(why)
        aggr.check_snapshot_room()
        info = self.consistency_point("snapshot", snapshot=(identity, full))
        return {"volume": volume, "snapshot": name, "cp": info}

    def snapshot_delete(self, identity: int, volume: str, name: str) -> None:
        self.aggregate(identity).snapshot_delete(volume, name)

    def snapshot_list(self, identity: int, volume: str) -> list[dict[str, Any]]:
        return self.aggregate(identity).snapshot_list(volume)

    def read_snapshot(self, identity: int, volume: str, snap: str, lun: str, offset: int,
                      length: int) -> bytes:
        return self.aggregate(identity).read_snapshot(volume, snap, lun, offset, length)

    def fsck(self, identity: int) -> dict[str, Any]:
        return self.aggregate(identity).fsck()

    def disk_fail(self, identity: int, disk: int) -> dict[str, Any]:
        aggr = self.aggregate(identity)
        aggr.fail_disk(disk)
        self.emit("disk_failed", {"identity": identity, "disk": f"d{disk}",
                                  "raid": aggr.raid_status()["state"]}, time.monotonic())
        return aggr.raid_status()

    def disk_replace(self, identity: int, disk: int) -> dict[str, Any]:
        served = self.served_or_raise(identity)
        aggr = self.aggregate(identity)
        aggr.replace_disk(disk, served.epoch)
        self.emit("reconstruction_started", {"identity": identity, "disk": f"d{disk}"},
                  time.monotonic())
        return aggr.raid_status()

    def background_work(self, budget_stripes: int = 512) -> bool:
        """One slice of reconstruction; True if any was done (the loop then polls sooner).

        A slice that fails (the replacement disk failing too, a stripe that cannot be
        rebuilt, the group going offline) is reported (``reconstruction_failed``,
        ``scrub_failed``) and never ends the domain; a rebuild that is still pending after
        a failure is tried again after ``BG_RETRY_S``."""
        did = False
        now = time.monotonic()
        for served in self.served.values():
            store = served.store
            if not isinstance(store, FsStore) or now < served.bg_retry_at:
                continue
            aggr = store.aggr
            try:
                if aggr.scrubbing is not None and not aggr.scrubbing.get("finished") \
                        and not aggr.group.offline:
                    did = True
                    if aggr.scrub_step(budget_stripes):
                        sc = aggr.scrubbing
                        self.emit("scrub_done", {"identity": served.identity, **{
                            k: v for k, v in sc.items() if isinstance(v, int)},
                            "unrecoverable": sc["unrecoverable"]}, time.monotonic())
                if aggr.rebuilding():
                    prog = aggr.rebuild_step(budget_stripes)
                    did = True
                    if prog["complete"]:
                        self.emit("reconstruction_done", {"identity": served.identity, **{
                            k: prog[k] for k in ("disk", "total", "rate_mbps", "seconds")}},
                            time.monotonic())
            except Fenced:
                raise  # a stale incarnation: the hypervisor has handed our disks on
            except VmemuError as exc:
                served.bg_retry_at = time.monotonic() + BG_RETRY_S
                if aggr.scrubbing is not None and not aggr.scrubbing.get("finished"):
                    aggr.scrubbing["finished"] = time.time()
                    aggr.scrubbing["error"] = exc.message
                kind = "reconstruction_failed" if aggr.last_rebuild and \
                    not aggr.last_rebuild.get("finished") else "scrub_failed"
                self.emit(kind, {"identity": served.identity, "error": exc.message[:300],
                                 "raid": aggr.raid_status()["state"]}, time.monotonic())
            self._note_disk_failures(served)
        return did

    def disk_fault(self, identity: int, args: dict[str, Any]) -> dict[str, Any]:
        """Install (or clear) a fault rule on one of the identity's disks (storage.fault_io):
        for vmemu chaos and tests. Every field is checked first; a bad one changes nothing."""
        served = self.served_or_raise(identity)
        store = served.store
        disks = len(store.aggr.disks) if isinstance(store, FsStore) else len(store.disks)
        now = time.monotonic()
        try:
            rule = fault_io.parse_rule(args, identity, disks, now)
            if rule is None:
                cleared = fault_io.TABLE.clear(identity, int(args["disk"]))
            else:
                fault_io.TABLE.add(rule, now)
                cleared = 0
        except fault_io.RuleError as exc:
            raise BadRequest(str(exc)) from None
        if rule is not None or cleared:  # a clear of nothing is a query: no event
            self.emit("disk_fault_set", {"identity": identity, "kind": args["kind"],
                                         "disk": args["disk"], "cleared": cleared,
                                         **({"rule": rule.to_dict(now)} if rule else {})}, now)
        out = fault_io.TABLE.summary(now)
        if isinstance(store, FsStore):  # as of now, not a heartbeat ago (the nemesis heals by it)
            out["raid"] = store.aggr.raid_status()
        return out

    def scrub(self, identity: int) -> dict[str, Any]:
        """Start a scrub; it runs in slices between requests (a whole-aggregate pass at once
        would stall the loop past the hypervisor's stall limit). Progress in status."""
        info = self.aggregate(identity).scrub_start()
        self.emit("scrub_started", {"identity": identity, "stripes": info["total"]},
                  time.monotonic())
        return info

    def scrub_status(self, identity: int) -> dict[str, Any] | None:
        return self.aggregate(identity).scrubbing

    def storage_summary(self, identity: int) -> dict[str, Any]:
        served = self.served_or_raise(identity)
        out = served.store.status()
        out["luns"] = [[h.index, h.name, h.size] for h in served.handles]
        out["dirty_blocks"] = served.cache.dirty_blocks()
        return out

    def release_identity(self, identity: int) -> dict[str, Any]:
        """Giveback: make the identity's disks hold everything, then let go of them."""
        info = self.consistency_point("giveback")
        self.served.pop(identity).store.close()
        return info

    def close(self) -> None:
        for served in self.served.values():
            try:
                served.store.close()
            except (OSError, VmemuError):
                pass
        self.served.clear()
