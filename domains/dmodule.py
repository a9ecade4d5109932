"""The D-module: the storage server of a guest. NVLog, LUNs, consistency points, replay.

Write path: validate -> exactly-once check -> append to this domain's NVLog -> merge into the
LUN's dirty cache -> acknowledge. A CP later writes the dirty blocks, syncs, records in each
disk's header how far it holds every log, and starts a new log generation.

Replay (at takeover, at recovery): the regions of an identity's chain are scanned by the numba
kernels and applied, oldest first, with pwrite into the disk images; records a disk already holds
(its header's `applied` map) are skipped, so replaying twice changes nothing.
"""

from __future__ import annotations

import collections
import mmap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from storage import nvlog_format as F
from storage import replay
from storage.disk import HEADER as DISK_HEADER
from storage.disk import Disk, disk_path
from storage.lun import Lun
from storage.nvlog import NVLogWriter, RegionHeader, log_view
from vmemu.errors import UnknownLun, VmemuError

DEDUP_PER_CLIENT = 8192
DEDUP_CLIENTS = 1024
CARRY_PER_CLIENT = 1024  # how much of the table survives a CP, per client


@dataclass
class Served:
    """One identity (a node's disks and LUNs) as served by this domain."""

    identity: int
    luns: list[Lun]
    epoch: int
    reason: str
    needs_sync: bool = False  # replay wrote to the disks behind the cache's back
    replayed: dict[int, int] = field(default_factory=dict)  # region -> last seq replayed
    first_request_pending: bool = False


class ExactlyOnce:
    """Recent (client, request) pairs that were applied: a retried write is not applied twice."""

    def __init__(self) -> None:
        self.seen: collections.OrderedDict[int, collections.OrderedDict[int, None]] = \
            collections.OrderedDict()

    def applied(self, client: int, request: int) -> bool:
        return client != 0 and request in self.seen.get(client, ())

    def record(self, client: int, request: int) -> None:
        if client == 0:
            return
        reqs = self.seen.get(client)
        if reqs is None:
            reqs = self.seen[client] = collections.OrderedDict()
            if len(self.seen) > DEDUP_CLIENTS:
                self.seen.popitem(last=False)
        else:
            self.seen.move_to_end(client)
        reqs[request] = None
        if len(reqs) > DEDUP_PER_CLIENT:
            reqs.popitem(last=False)

    def snapshot(self, per_client: int, limit_pairs: int) -> bytes:
        """The most recent pairs of the most recent clients, as (client, request) u64 pairs."""
        pairs: list[int] = []
        for client in reversed(self.seen):
            reqs = list(self.seen[client])[-per_client:]
            take = min(len(reqs), (limit_pairs - len(pairs) // 2))
            if take <= 0:
                break
            for r in reqs[-take:]:
                pairs += (client, r)
        return np.asarray(pairs, dtype="<u8").tobytes()

    def load(self, payload: bytes) -> None:
        arr = np.frombuffer(payload, dtype="<u8")
        for i in range(0, len(arr) - 1, 2):
            self.record(int(arr[i]), int(arr[i + 1]))


class DModule:
    def __init__(self, node: int, data_dir: Path, disks: int, region: mmap.mmap,
                 region_id: int, emit: Callable[..., None], ha_mode: str = "shm",
                 mirror: Any = None) -> None:
        self.node = node
        self.data_dir = data_dir
        self.disks = disks
        self.region = region
        self.region_id = region_id
        self.ha_mode = ha_mode
        self.mirror = mirror  # domains.mirror.MirrorSender in --ha-mode mirror
        self.log = NVLogWriter(region, track_spans=mirror is not None)
        self.served: dict[int, Served] = {}
        self.dedup = ExactlyOnce()
        self.emit = emit
        self.ops = 0
        self.writes_since_cp = 0
        self.cp_count = 0
        self.last_cp = time.monotonic()
        self.last_cp_info: dict[str, Any] = {}

    # -- client operations (the N-module calls these directly: same domain, local path) ----
    def lun(self, identity: int, index: int) -> Lun:
        served = self.served.get(identity)
        if served is None:
            raise UnknownLun(f"node{self.node} does not serve node{identity}")
        if not 0 <= index < len(served.luns):
            raise UnknownLun(f"node{identity} has no lun{index} (it has lun0..lun{len(served.luns) - 1})")
        return served.luns[index]

    def write(self, identity: int, lun_index: int, offset: int, data: bytes, client: int,
              request: int) -> int:
        lun = self.lun(identity, lun_index)
        lun.check(offset, len(data))
        if self.dedup.applied(client, request):
            return 0  # a retry of a write already logged: acknowledge, do not apply again
        if self.ha_mode == "none":
            lun.write_through(offset, data)
            self.dedup.record(client, request)
            self.ops += 1
            return 0
        if not self.log.fits(len(data)):
            self.consistency_point("log_full")
        seq = self.log.append(F.lun_gid(identity, lun_index), offset, data, client, request)
        self._replicate()
        lun.write_cached(offset, data)
        self.dedup.record(client, request)
        self.ops += 1
        self.writes_since_cp += 1
        return seq

    def read(self, identity: int, lun_index: int, offset: int, length: int) -> bytes:
        data = self.lun(identity, lun_index).read(offset, length)
        self.ops += 1
        return data

    def flush(self, identity: int, lun_index: int) -> None:
        # An acknowledged write is already on stable storage: the NVLog is NVRAM.
        self.lun(identity, lun_index)

    # -- consistency points ------------------------------------------------------------------
    def cp_needed(self) -> bool:
        return self.writes_since_cp > 0 or any(s.needs_sync for s in self.served.values())

    def log_fill(self) -> float:
        return self.log.used / self.log.capacity

    def consistency_point(self, reason: str) -> dict[str, Any]:
        t0 = time.monotonic()
        blocks = 0
        last_seq = self.log.last_seq
        for served in self.served.values():
            for lun in served.luns:
                blocks += lun.flush_dirty()
        for served in self.served.values():
            for lun in served.luns:
                lun.disk.sync()
                applied = lun.disk.applied()
                applied.update(served.replayed)
                applied[self.region_id] = last_seq
                lun.disk.set_applied(applied)
            served.needs_sync = False
            served.replayed.clear()
        self.log.reset()
        self._carry_dedup()
        self._replicate()
        self.writes_since_cp = 0
        self.cp_count += 1
        self.last_cp = time.monotonic()
        info = {"reason": reason, "blocks": blocks, "ms": round((self.last_cp - t0) * 1000, 3),
                "seq": last_seq, "region": self.region_id,
                "identities": sorted(self.served)}
        self.last_cp_info = info
        self.emit("cp_done", info, t0)
        return info

    def _replicate(self) -> None:
        if self.mirror is not None:
            spans = self.log.drain_spans()
            if spans:
                self.mirror.send(spans)

    def _carry_dedup(self) -> None:
        limit = max(0, (self.log.capacity // 8 - F.record_size(0)) // 16)
        payload = self.dedup.snapshot(CARRY_PER_CLIENT, min(limit, 32768))
        if payload:
            self.log.append(F.DEDUP_LUN, 0, payload, flags=F.FLAG_DEDUP)

    # -- serving identities ------------------------------------------------------------------
    def open_identity(self, identity: int, epoch: int, reason: str) -> Served:
        luns = []
        try:
            for d in range(self.disks):
                disk = Disk.open(disk_path(self.data_dir, identity, d), epoch)
                luns.append(Lun(identity, d, disk))
        except Exception:
            for lun in luns:
                lun.disk.close()
            raise
        served = Served(identity, luns, epoch, reason)
        self.served[identity] = served
        return served

    def replay_chain(self, served: Served, chain: list[tuple[int, mmap.mmap | None]]) -> dict[str, Any]:
        """Apply every region of the chain, oldest first, onto the identity's disks.

        Per region and LUN: scan once, ``replay.plan`` the rows to write, pwrite them into
        the disk file (not through a mapping: a write fault on a hole of a sparse image
        costs ~4x a pwrite). In the result, `records`/`bytes` are the valid records above
        what the disk holds and their payload bytes; `written`/`written_bytes`/`writes`
        what actually went to the files (rows a later same-range row overwrites are
        skipped) and in how many pwrite(v) calls.
        """
        t0 = time.monotonic()
        total = {"records": 0, "bytes": 0, "bad": 0, "regions": 0, "scanned": 0,
                 "written": 0, "written_bytes": 0, "writes": 0}
        luns = {F.lun_gid(served.identity, lun.index): lun for lun in served.luns}
        for region_id, mapping in chain:
            if mapping is None:
                continue  # our own live region: its records are in our cache already
            hdr = RegionHeader.read(mapping)
            log = log_view(mapping)
            index, count, _end = replay.scan(log, hdr.generation, hdr.base_seq)
            total["scanned"] += int(count)
            total["regions"] += 1
            for gid, lun in luns.items():
                lun.disk.check_epoch()  # once per region: its rows are one batch of writes
                min_seq = lun.disk.applied().get(region_id, 0)
                self._replay_onto(lun.disk, log, index, int(count), gid, min_seq, total)
            self._rebuild_dedup(log, index, int(count), set(luns))
            served.replayed[region_id] = hdr.base_seq + int(count) - 1
            served.needs_sync = True
        total["ms"] = round((time.monotonic() - t0) * 1000, 3)
        return total

    @staticmethod
    def _replay_onto(disk: Disk, log: np.ndarray, index: np.ndarray, count: int, gid: int,
                     min_seq: int, total: dict[str, Any]) -> None:
        """Plan and pwrite one LUN's records of one region; add the figures to `total`."""
        rows, bad = replay.plan(log, index, count, gid, min_seq, disk.size)
        nbytes, calls = replay.write_plan(log, index, rows, disk.fd, DISK_HEADER, disk.size)
        rs = index[:count]
        mine = (rs[:, F.IDX_LUN] == gid) & (rs[:, F.IDX_SEQ] > min_seq)
        off, length = rs[:, F.IDX_OFFSET], rs[:, F.IDX_LENGTH]
        fits = (off >= 0) & (length >= 0) & (length <= disk.size) & (off <= disk.size - length)
        total["records"] += int(np.count_nonzero(mine)) - int(bad)
        total["bytes"] += int(length[mine & fits].sum())
        total["bad"] += int(bad)
        total["written"] += int(rows.size)
        total["written_bytes"] += int(nbytes)
        total["writes"] += int(calls)

    def _rebuild_dedup(self, log: np.ndarray, index: np.ndarray, count: int, gids: set[int]) -> None:
        for row in index[:count]:
            gid = int(row[F.IDX_LUN])
            if gid in gids:
                self.dedup.record(int(row[F.IDX_CLIENT]), int(row[F.IDX_REQUEST]))
            elif gid == F.DEDUP_LUN:
                pos = int(row[F.IDX_POS]) + F.RECORD_HEADER
                self.dedup.load(bytes(log[pos:pos + int(row[F.IDX_LENGTH])]))

    def release_identity(self, identity: int) -> dict[str, Any]:
        """Giveback: make the identity's disks hold everything, then let go of them."""
        info = self.consistency_point("giveback")
        served = self.served.pop(identity)
        for lun in served.luns:
            lun.disk.close()
        return info

    def close(self) -> None:
        for served in self.served.values():
            for lun in served.luns:
                try:
                    lun.disk.close()
                except (OSError, VmemuError):
                    pass
        self.served.clear()
