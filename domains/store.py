"""What an identity's LUNs are stored on: the file system on RAID, or the earlier flat disks.

Both stores give the D-module the same few things: the LUNs (index, name, size), reads of the
committed state, ``commit`` of a frozen set of blocks (run in the CP thread), and the durable
``applied`` map that makes replay idempotent. ``FsStore`` (the default) is an aggregate: RAID
over the node's disks, a write-anywhere file system, volumes, LUNs as files. ``FlatStore``
(``--raid none``) is the flat path of the first issue, one LUN per disk, kept as the baseline
the file system is measured against and because its replay writes straight into the disk
files with the numba kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.aggregate import Aggregate
from storage.blockcache import BLOCK, Blocks
from storage.disk import Disk, disk_path
from storage.lun import check_io
from vmemu.errors import BadRequest, UnknownLun



@dataclass(frozen=True)
class LunHandle:
    identity: int
    index: int
    size: int
    name: str

    def check(self, offset: int, length: int) -> None:
        check_io(f"node{self.identity}/{self.name}", self.size, offset, length)


class FlatStore:
    kind = "flat"

    def __init__(self, identity: int, disks: list[Disk]) -> None:
        self.identity = identity
        self.disks = disks

    @classmethod
    def open(cls, data_dir: Path, identity: int, ndisks: int, epoch: int) -> "FlatStore":
        disks: list[Disk] = []
        try:
            for d in range(ndisks):
                disks.append(Disk.open(disk_path(data_dir, identity, d), epoch, node=identity, index=d))
        except BaseException:
            for disk in disks:
                disk.close()
            raise
        return cls(identity, disks)

    def luns(self) -> list[LunHandle]:
        return [LunHandle(self.identity, i, d.size, f"lun{i}") for i, d in enumerate(self.disks)]

    def disk_of(self, index: int) -> Disk:
        if not 0 <= index < len(self.disks):
            raise UnknownLun(f"node{self.identity} has no lun{index}")
        return self.disks[index]

    def read_committed(self, index: int, first: int, count: int) -> bytes:
        return self.disk_of(index).read(first * BLOCK, count * BLOCK)

    def commit(self, frozen: dict[int, Blocks], snapshot: str | None = None) -> dict[str, Any]:
        if snapshot:
            raise BadRequest("snapshots need the file system (this cluster runs --raid none)")
        blocks = 0
        for index, blks in frozen.items():
            disk = self.disk_of(index)
            order = sorted(blks)
            i = 0
            while i < len(order):  # runs of adjacent blocks, one pwrite each
                j = i
                while j + 1 < len(order) and order[j + 1] == order[j] + 1 and j - i < 255:
                    j += 1
                disk.write(order[i] * BLOCK, b"".join(blks[b] for b in order[i:j + 1]))
                i = j + 1
            blocks += len(order)
        for disk in self.disks:
            disk.sync()
        return {"blocks": blocks, "written": blocks}

    def refresh_view(self) -> None:
        pass

    def recover(self) -> bool:
        return True  # no file system state: the cache still holds what the CP did not write

    def applied(self) -> dict[int, int]:
        # Every disk is written by every CP, so any one holds the same map; take the newest.
        out: dict[int, int] = {}
        for disk in self.disks:
            for region, seq in disk.applied().items():
                out[region] = max(out.get(region, 0), seq)
        return out

    def set_applied(self, applied: dict[int, int]) -> None:
        for disk in self.disks:
            disk.set_applied(applied)

    def check_epoch(self) -> None:
        for disk in self.disks:
            disk.check_epoch()

    def unusable(self) -> str | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        for disk in self.disks:
            try:
                disk.close()
            except OSError:
                pass


class FsStore:
    kind = "wafl"

    def __init__(self, aggr: Aggregate) -> None:
        self.aggr = aggr
        self.identity = aggr.identity

    @classmethod
    def open(cls, data_dir: Path, identity: int, ndisks: int, epoch: int, layout: str,
             default_luns: int, lun_bytes: int | None) -> "FsStore":
        return cls(Aggregate.open(data_dir, identity, ndisks, epoch, layout, default_luns,
                                  lun_bytes))

    def luns(self) -> list[LunHandle]:
        return [LunHandle(self.identity, i, l.size, l.path)
                for i, l in sorted(self.aggr.luns.items())]

    def read_committed(self, index: int, first: int, count: int) -> bytes:
        return self.aggr.read_committed(index, first, count)

    def commit(self, frozen: dict[int, Blocks], snapshot: str | None = None) -> dict[str, Any]:
        return self.aggr.commit(frozen, snapshot)

    def refresh_view(self) -> None:
        self.aggr.refresh_view()

    def recover(self) -> bool:
        return self.aggr.recover()

    def applied(self) -> dict[int, int]:
        return self.aggr.applied()

    def set_applied(self, applied: dict[int, int]) -> None:
        self.aggr.set_applied(applied)

    def check_epoch(self) -> None:
        self.aggr.check_epoch()

    def unusable(self) -> str | None:
        return self.aggr.unusable()

    def status(self) -> dict[str, Any]:
        a = self.aggr
        return {"kind": self.kind, "raid": a.raid_status(), "df": a.df(),
                "volumes": sorted(a.volumes)}

    def close(self) -> None:
        self.aggr.close()


Store = FlatStore | FsStore

