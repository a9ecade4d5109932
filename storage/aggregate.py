"""An aggregate: one node's disks as a RAID group, a write-anywhere file system on it, and the
volumes and LUNs (files) that live in it.

    disks (storage.disk, epoch-fenced) -> DiskDevice -> RaidGroup (RAID-4 | RAID-1, per-block
    checksums) -> Wafl (write-anywhere, snapshots) -> volumes (namespaces) -> LUNs (files)

Volumes are flexible: they share the aggregate's free blocks; a volume's size is a reservation
checked when LUNs are created (LUN sizes are thin: blocks are allocated when written). A LUN is
the file ``<volume>/<lun>``; a volume snapshot is a file-system snapshot named
``<volume>@<snapshot>`` (it preserves the whole aggregate as of that CP, which costs nothing
extra in a write-anywhere design and keeps every snapshot crash-atomic with its CP).

The catalog (volumes, LUNs and their stable LUN indexes, which NVLog records and clients use)
is itself a file in the file system, so it is committed atomically with everything else.

Threading: :meth:`commit` runs in the D-module's CP thread while the main thread serves reads
through :meth:`read_committed`, which walks a private copy of the LUN inodes as of the last
commit with its own reader. That is safe because a CP writes only blocks free in the committed
state: the tree the copy points into is not touched until the next commit, after which the
main thread refreshes the copy (:meth:`refresh_view`). Everything else runs on the main thread
with no CP in flight (the D-module waits for it first).
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from storage.blockcache import BLOCK, Blocks
from storage.lun import check_io
from storage.names import check_name
from storage.names import human_size as _h
from storage import loopdev
from storage.disk import OFF_EPOCH, Disk, disk_path
from storage.raid import DiskDevice, Layout, MemberState, RaidBlockDevice, RaidGroup
from storage.wafl import Wafl
from storage.wafl.fs import _Reader
from storage.wafl.layout import MAX_SNAPSHOTS, Inode
from vmemu.errors import BadRequest, InvalidState, OutOfRange
from vmemu.errors import UnknownLun as NotFound
from vmemu.privfs import write_atomic

CATALOG = ".vmemu-catalog"
LAYOUTS = ("raid4", "raid1")
SNAP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,22}$")
RESERVE = 0.9  # volumes may reserve this share of the aggregate; the rest is CP/metadata room
_LEN = struct.Struct("<I")


@dataclass
class LunInfo:
    index: int
    volume: str
    name: str
    size: int

    @property
    def path(self) -> str:
        return f"{self.volume}/{self.name}"


class Aggregate:
    def __init__(self, identity: int, node_dir: Path, disks: list[Disk], group: RaidGroup,
                 fs: Wafl, state: dict[str, Any]) -> None:
        self.identity = identity
        self.node_dir = node_dir
        self.disks = disks
        self.group = group
        self.dev = RaidBlockDevice(group)
        self.fs = fs
        self.state = state
        self.volumes: dict[str, dict[str, Any]] = {}
        self.luns: dict[int, LunInfo] = {}
        self._load_catalog()
        self._view: dict[int, Inode] = {}
        self._rd = _Reader(self.dev)
        self.refresh_view()
        self.last_rebuild: dict[str, Any] = {}
        self.scrubbing: dict[str, Any] | None = None
        self.remounts = 0  # after CPs the disks refused (recover)
        self.remount_failed = False
        self._rebuild_t0 = time.monotonic()
        # Members the group failed at run time (I/O errors), for the D-module to report.
        self.failures: list[dict[str, Any]] = []
        self._state_lock = threading.Lock()
        self._state_unsaved = False
        group.on_member_failed = self._member_failed
        if group.rebuild_member is not None:  # a rebuild resumed at open (from stripe 0)
            self.last_rebuild = {"disk": f"d{group.rebuild_member}", "started": time.time(),
                                 "done": 0, "total": group.stripes, "rate_mbps": 0.0}

    # -- open / format -----------------------------------------------------------------------
    @classmethod
    def open(cls, data_dir: Path, identity: int, ndisks: int, epoch: int, layout: str,
             default_luns: int = 2, lun_bytes: int | None = None) -> "Aggregate":
        if layout not in LAYOUTS:
            raise BadRequest(f"unknown RAID layout {layout!r}; choose raid4 or raid1")
        node_dir = data_dir / f"node{identity}"
        state = _load_state(node_dir, layout, ndisks)
        disks: list[Disk] = []
        try:
            for d in range(ndisks):
                disks.append(Disk.open(disk_path(data_dir, identity, d), epoch, node=identity, index=d))
            devs = [DiskDevice(disk) for disk in disks]
            for d in state["failed"]:
                devs[d].fail()
            group = RaidGroup(Layout(layout), devs)
            rb = state.get("rebuilding")
            if rb is not None:
                # The cursor is not persisted: restarting a rebuild from stripe 0 is always safe.
                group._mark_failed(rb)
                group.replace(rb, devs[rb])
            dev = RaidBlockDevice(group)
            if state["formatted"]:
                fs = Wafl.mount(dev)
            else:
                fs = Wafl.format(dev)
                _write_catalog(fs, {"volumes": {}, "luns": {}, "next_lun": 0})
                fs.cp()
                state["formatted"] = True
                _save_state(node_dir, state)
        except BaseException:
            for disk in disks:
                disk.close()
            raise
        agg = cls(identity, node_dir, disks, group, fs, state)
        if not agg.volumes and default_luns > 0:
            agg._default_layout(default_luns, lun_bytes)
        return agg

    def _default_layout(self, count: int, lun_bytes: int | None) -> None:
        # vol0 takes at most half the aggregate, so there is room to make more volumes.
        half = self.reservable() // 2
        each = min(lun_bytes or half, half // count) // (1 << 20) * (1 << 20)
        each = max(each, 1 << 20)
        self.volume_create("vol0", each * count)
        for i in range(count):
            self.lun_create("vol0", f"lun{i}", each)

    def close(self) -> None:
        for disk in self.disks:
            try:
                disk.close()
            except OSError:
                pass

    # -- catalog -----------------------------------------------------------------------------
    def _load_catalog(self) -> None:
        raw = self.fs.read(CATALOG, 0, _LEN.size) if CATALOG in self.fs.dir else b""
        if len(raw) < _LEN.size:
            cat: dict[str, Any] = {"volumes": {}, "luns": {}, "next_lun": 0}
        else:
            (n,) = _LEN.unpack(raw)
            cat = msgpack.unpackb(self.fs.read(CATALOG, _LEN.size, n), strict_map_key=False)
        self.volumes = dict(cat["volumes"])
        self.luns = {int(k): LunInfo(int(k), v["volume"], v["name"], int(v["size"]))
                     for k, v in cat["luns"].items()}
        self.next_lun = int(cat["next_lun"])

    def _catalog(self) -> dict[str, Any]:
        return {"volumes": self.volumes, "next_lun": self.next_lun,
                "luns": {i: {"volume": l.volume, "name": l.name, "size": l.size}
                         for i, l in self.luns.items()}}

    def refresh_view(self) -> None:
        """After a commit (main thread): the inodes reads walk from now on."""
        self._view = {i: self.fs.inodes[self.fs.dir[l.path]].copy()
                      for i, l in self.luns.items() if l.path in self.fs.dir}

    # -- geometry ----------------------------------------------------------------------------
    def capacity(self) -> int:
        return self.fs.nblocks * BLOCK

    def reservable(self) -> int:
        return int(self.capacity() * RESERVE)

    def reserved(self) -> int:
        return sum(int(v["size"]) for v in self.volumes.values())

    # -- volumes and LUNs (main thread, no CP in flight) ---------------------------------------
    def volume_create(self, name: str, size: int) -> dict[str, Any]:
        check_name(name, "volume")
        if name in self.volumes:
            raise BadRequest(f"volume {name} already exists")
        if not isinstance(size, int) or size < BLOCK:
            raise BadRequest(f"volume size {size} is too small (at least 4 KiB)")
        free = self.reservable() - self.reserved()
        if size > free:
            raise OutOfRange(f"volume {name} of {_h(size)} does not fit: the aggregate of "
                             f"node{self.identity} has {_h(free)} left to reserve "
                             f"(of {_h(self.capacity())})")
        self.volumes[name] = {"size": size, "created": time.time()}
        try:
            self._commit_catalog()
        except BaseException:
            self.volumes.pop(name, None)  # the catalog on disk never had it
            self._undo_pending(None)
            raise
        return self.volume_info(name)

    def volume_delete(self, name: str) -> None:
        self._volume(name)
        if any(l.volume == name for l in self.luns.values()):
            raise InvalidState(f"volume {name} still holds LUNs")
        if any(s["name"].startswith(name + "@") for s in self.fs.snapshot_list()):
            raise InvalidState(f"volume {name} still has snapshots")
        vol = self.volumes.pop(name)
        try:
            self._commit_catalog()
        except BaseException:
            self.volumes[name] = vol
            self._undo_pending(None)
            raise

    def _volume(self, name: str) -> dict[str, Any]:
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume {name!r} on node{self.identity} "
                           f"(volumes: {', '.join(sorted(self.volumes)) or 'none'})")
        return vol

    def lun_create(self, volume: str, name: str, size: int) -> LunInfo:
        vol = self._volume(volume)
        check_name(name, "LUN")
        if any(l.volume == volume and l.name == name for l in self.luns.values()):
            raise BadRequest(f"LUN {volume}/{name} already exists")
        if not isinstance(size, int) or size <= 0 or size % BLOCK:
            raise BadRequest(f"LUN size {size} must be a positive multiple of 4096")
        used = sum(l.size for l in self.luns.values() if l.volume == volume)
        if used + size > int(vol["size"]):
            raise OutOfRange(f"LUN {volume}/{name} of {_h(size)} does not fit in volume "
                             f"{volume}: {_h(int(vol['size']) - used)} of {_h(int(vol['size']))} left")
        info = LunInfo(self.next_lun, volume, name, size)
        self.fs.create(info.path, size)
        self.luns[info.index] = info
        self.next_lun += 1
        try:
            self._commit_catalog()
        except BaseException:
            del self.luns[info.index]
            self.next_lun -= 1
            self._undo_pending(info.path)
            raise
        return info

    def lun_delete(self, index: int) -> None:
        info = self.lun(index)
        self.fs.delete(info.path)
        del self.luns[index]
        try:
            self._commit_catalog()
        except BaseException:
            self.luns[index] = info
            self._undo_pending(None)
            raise

    def lun(self, index: int) -> LunInfo:
        info = self.luns.get(index)
        if info is None:
            raise NotFound(f"node{self.identity} has no LUN with index {index}")
        return info

    def lun_by_path(self, path: str) -> LunInfo:
        for info in self.luns.values():
            if info.path == path:
                return info
        raise NotFound(f"no LUN {path!r} on node{self.identity}")

    def _undo_pending(self, path: str | None) -> None:
        """A metadata CP failed: take its file and catalog change back out of the file
        system's pending state, so a later CP does not commit a half-made LUN or volume."""
        if self.fs._dead:
            # Nothing more commits from that instance; if the disks refused a write (full,
            # I/O error), remount what they hold, which is the catalog before the change.
            self.recover()
            return
        if path is not None and path in self.fs.dir:
            self.fs.delete(path)
        _write_catalog(self.fs, self._catalog())

    def recover(self) -> bool:
        """After a CP the disks refused (an OSError: no space, an I/O error): remount the last
        committed root, so the file system serves and commits again once the disks take
        writes. The dirty data is not lost: the D-module keeps it (cache and NVLog) and the
        next CP writes it again. Not after any other failure (a simulated crash, a bug):
        then the file system stays stopped and its domain ends, for the partner to replay.

        True if the file system is usable (again).
        """
        if not self.fs._dead:
            return True
        if not self.recoverable():
            return False
        try:
            fs = Wafl.mount(self.dev)
        except Exception:
            self.remount_failed = True
            raise
        self.fs = fs
        self._load_catalog()
        self.refresh_view()
        self.remounts += 1
        return True

    def recoverable(self) -> bool:
        """A file system stopped by a CP the disks refused, not yet remounted: it serves on
        (writes go to the NVLog and the cache, reads to its committed view) meanwhile."""
        return (self.fs._dead and isinstance(self.fs.death, OSError)
                and not self.remount_failed)

    def _commit_catalog(self) -> None:
        _write_catalog(self.fs, self._catalog())
        self.fs.cp()
        self.refresh_view()

    def volume_info(self, name: str) -> dict[str, Any]:
        vol = self._volume(name)
        luns = [l for l in self.luns.values() if l.volume == name]
        used = 0
        for l in luns:
            ino = self._view.get(l.index)
            if ino is not None:
                used += sum(1 for _ in self._rd.tree_blocks(ino)) * BLOCK
        snaps = [s["name"].split("@", 1)[1] for s in self.fs.snapshot_list()
                 if s["name"].startswith(name + "@")]
        return {"name": name, "size": int(vol["size"]), "used": used,
                "luns": [{"name": l.name, "index": l.index, "size": l.size} for l in luns],
                "snapshots": snaps}

    # -- data (main thread) ------------------------------------------------------------------
    def read_committed(self, index: int, first: int, count: int) -> bytes:
        ino = self._view.get(index)
        if ino is None:
            raise NotFound(f"node{self.identity} has no LUN with index {index}")
        data = self._rd.read_range(ino, first * BLOCK, count * BLOCK)
        if len(data) < count * BLOCK:
            data += bytes(count * BLOCK - len(data))
        return data

    # -- consistency points (CP thread) --------------------------------------------------------
    def commit(self, frozen: dict[int, Blocks], snapshot: str | None = None) -> dict[str, Any]:
        """Write the frozen blocks into the file system and commit a CP (and a snapshot)."""
        fs = self.fs
        blocks = 0
        for index, blks in frozen.items():
            info = self.luns.get(index)
            if info is None:
                continue  # the LUN was deleted after the writes were acknowledged
            path = info.path
            for b in sorted(blks):
                fs.write(path, b * BLOCK, blks[b])
                blocks += 1
        stats = fs.snapshot_create(snapshot) if snapshot else fs.cp()
        return {"blocks": blocks, "written": stats.blocks_written, "freed": stats.blocks_freed,
                "generation": stats.generation, "fs_ms": round(stats.ms, 3)}

    # -- snapshots ---------------------------------------------------------------------------
    def check_snapshot_room(self) -> None:
        """Before the CP that would take it: the file system's table has a fixed size."""
        if len(self.fs.snapshots) >= MAX_SNAPSHOTS:
            raise OutOfRange(f"the aggregate of node{self.identity} holds {MAX_SNAPSHOTS} "
                             "snapshots already, the most it can; delete one first")

    def snapshot_name(self, volume: str, snap: str) -> str:
        self._volume(volume)
        if not isinstance(snap, str) or not SNAP_RE.match(snap):
            raise BadRequest(f"invalid snapshot name {snap!r}: 1-23 characters, letters, digits, "
                             "'.', '-' or '_'")
        return f"{volume}@{snap}"

    def snapshot_delete(self, volume: str, snap: str) -> None:
        full = self.snapshot_name(volume, snap)
        if not any(s["name"] == full for s in self.fs.snapshot_list()):
            raise NotFound(f"volume {volume} has no snapshot {snap!r}")
        self.fs.snapshot_delete(full)

    def snapshot_list(self, volume: str) -> list[dict[str, Any]]:
        self._volume(volume)
        return [dict(s, name=s["name"].split("@", 1)[1]) for s in self.fs.snapshot_list()
                if s["name"].startswith(volume + "@")]

    def read_snapshot(self, volume: str, snap: str, lun: str, offset: int, length: int) -> bytes:
        full = self.snapshot_name(volume, snap)
        info = self.lun_by_path(f"{volume}/{lun}")
        check_io(info.path, info.size, offset, length)
        if not any(s["name"] == full for s in self.fs.snapshot_list()):
            raise NotFound(f"volume {volume} has no snapshot {snap!r}")
        return self.fs.read_snapshot(full, f"{volume}/{lun}", offset, length)

    # -- disks -------------------------------------------------------------------------------
    def _member(self, d: int) -> int:
        if not isinstance(d, int) or not 0 <= d < len(self.disks):
            raise BadRequest(f"node{self.identity} has disks d0..d{len(self.disks) - 1}, not d{d}")
        return d

    def fail_disk(self, d: int) -> None:
        m = self._member(d)
        if self.group.state[m] is MemberState.FAILED:
            raise InvalidState(f"disk d{m} of node{self.identity} has already failed")
        self.group.fail_member(m)  # recorded in aggr.json by _member_failed
        if self._state_unsaved:
            with self._state_lock:
                _save_state(self.node_dir, self.state)
                self._state_unsaved = False
        # Asked for, and reported by the caller: not a run-time failure to report again.
        self.failures[:] = [f for f in self.failures if f["disk"] != f"d{m}"]

    def _member_failed(self, m: int) -> None:
        """The group has failed member m (an I/O error, from any thread): record it in
        aggr.json now, before any CP can commit a root that depends on the member being left
        out. A member that missed writes but came back as healthy after a restart would hold
        stale blocks whose own checksums still verify. If the record cannot be written, the
        next ``set_applied`` (which every CP does before its NVLog half is let go) retries it
        and fails the CP until it can."""
        with self._state_lock:
            self.state["failed"] = sorted(set(self.state["failed"]) | {m})
            if self.state.get("rebuilding") == m:
                self.state["rebuilding"] = None
            try:
                _save_state(self.node_dir, self.state)
            except OSError:
                self._state_unsaved = True
        self.failures.append({"disk": f"d{m}", "mono": time.monotonic(),
                              "raid": "offline" if self.group.offline else "degraded"})

    def take_failures(self) -> list[dict[str, Any]]:
        """The run-time member failures since the last call (list.pop is atomic: the CP
        thread may append meanwhile)."""
        out = []
        while self.failures:
            out.append(self.failures.pop(0))
        return out

    def replace_disk(self, d: int, epoch: int) -> None:
        """A fresh disk in the failed member's slot; reconstruction then runs in the background."""
        m = self._member(d)
        if self.group.state[m] is not MemberState.FAILED:
            raise InvalidState(f"disk d{m} of node{self.identity} is "
                               f"{self.group.state[m].value}; only a failed disk can be replaced")
        if self.group.offline:
            raise InvalidState(f"the aggregate of node{self.identity} is offline (too many failed "
                               "disks); it cannot be reconstructed")
        old = self.disks[m]
        path, size = disk_path(self.node_dir.parent, self.identity, m), old.size
        on_loop = loopdev.resolve(path) != path  # --disk-backend loop: swap the device too
        old.close()
        if on_loop:
            loopdev.detach(str(loopdev.resolve(path)), image=path)
        os.unlink(path)
        Disk.create(path, self.identity, m, size)
        if on_loop:
            loopdev.attach(path, data_dir=self.node_dir.parent)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.pwrite(fd, struct.pack("<Q", epoch), OFF_EPOCH)
            os.fsync(fd)
        finally:
            os.close(fd)
        disk = Disk.open(path, epoch, node=self.identity, index=m)
        self.disks[m] = disk
        self.group.replace(m, DiskDevice(disk))
        self.state["failed"] = [x for x in self.state["failed"] if x != m]
        self.state["rebuilding"] = m
        self.last_rebuild = {"disk": f"d{m}", "started": time.time(), "done": 0,
                             "total": self.group.stripes, "rate_mbps": 0.0}
        self._rebuild_t0 = time.monotonic()
        _save_state(self.node_dir, self.state)

    def rebuilding(self) -> bool:
        return self.group.rebuild_member is not None

    def rebuild_step(self, stripes: int) -> dict[str, Any]:
        prog = self.group.rebuild_step(stripes)
        elapsed = max(time.monotonic() - self._rebuild_t0, 1e-6)
        nbytes = prog.done * BLOCK * (self.group.ndata if self.group.layout is Layout.RAID4 else 1)
        self.last_rebuild.update(done=prog.done, total=prog.total,
                                 rate_mbps=round(nbytes / elapsed / 1e6, 1))
        if prog.complete:
            self.state["rebuilding"] = None
            self.last_rebuild["finished"] = time.time()
            self.last_rebuild["seconds"] = round(elapsed, 3)
            _save_state(self.node_dir, self.state)
        return dict(self.last_rebuild, complete=prog.complete)

    def scrub(self) -> dict[str, Any]:
        """The whole scrub at once (tests, offline tools); the D-module runs it in slices."""
        rep = self.group.scrub()
        return {k: (v if not isinstance(v, list) else v[:20]) for k, v in vars(rep).items()}

    def scrub_start(self) -> dict[str, Any]:
        if self.scrubbing is not None and not self.scrubbing.get("finished"):
            raise InvalidState(f"a scrub of node{self.identity} is already running "
                               f"({self.scrubbing['stripes']}/{self.group.stripes} stripes)")
        self.group._guard()  # an offline group says so now, not in the background
        self.scrubbing = {"started": time.time(), "stripes": 0, "total": self.group.stripes,
                          "checksum_errors": 0, "parity_mismatches": 0, "mirror_mismatches": 0,
                          "repaired_data": 0, "repaired_parity": 0, "degraded_stripes": 0,
                          "unrecoverable": []}
        return dict(self.scrubbing)

    def scrub_step(self, stripes: int) -> bool:
        """One slice of the running scrub; True when it has just finished."""
        sc = self.scrubbing
        if sc is None or sc.get("finished"):
            return False
        rep = self.group.scrub(sc["stripes"], stripes)
        for k, v in vars(rep).items():
            if k == "stripes":
                continue
            if isinstance(v, list):
                sc[k] = (sc[k] + v)[:20]
            else:
                sc[k] += v
        sc["stripes"] = min(sc["total"], sc["stripes"] + stripes)
        if sc["stripes"] >= sc["total"]:
            sc["finished"] = time.time()
            return True
        return False

    def raid_status(self) -> dict[str, Any]:
        g = self.group
        return {"layout": g.layout.value, "state": "offline" if g.offline else
                ("degraded" if g.degraded else "normal"),
                "disks": [{"disk": f"d{m}", "state": g.state[m].value} for m in range(len(g.state))],
                "read_errors": dict(g.read_errors),
                "scrub": dict(self.scrubbing) if self.scrubbing else None,
                "rebuild": dict(self.last_rebuild) if self.last_rebuild else None}

    def fsck(self) -> dict[str, Any]:
        rep = self.fs.fsck()
        return {"ok": rep.ok, "errors": rep.errors[:20], "generation": rep.generation,
                "blocks_checked": rep.blocks_checked, "files": rep.files,
                "snapshots": {k: v for k, v in rep.snapshot_blocks.items()}}

    def df(self) -> dict[str, Any]:
        # From the block maps only (fs.df also counts fs.dirty, which the CP thread fills):
        # this runs on the heartbeat thread, beside a CP.
        alloc, snap = self.fs.alloc, self.fs.snap_used
        used = int(alloc.sum())
        snap_only = int((snap & ~alloc).sum())
        return {"capacity": self.capacity(), "used": used * BLOCK,
                "snapshot_only": snap_only * BLOCK,
                "free": (self.fs.nblocks - used - snap_only) * BLOCK, "reserved": self.reserved()}

    # -- replay bookkeeping ------------------------------------------------------------------
    def applied(self) -> dict[int, int]:
        """What the file system holds from each log: the newest mark over the live members."""
        out: dict[int, int] = {}
        for m, disk in enumerate(self.disks):
            if self.group.state[m] is MemberState.OK:
                for region, seq in disk.applied().items():
                    out[region] = max(out.get(region, 0), seq)
        return out

    def set_applied(self, applied: dict[int, int]) -> None:
        """Every live member's header records `applied`. A member whose header write fails
        with EIO is failed (like any other I/O error on it); if that leaves the group
        offline, this raises and the CP fails."""
        for m, disk in enumerate(self.disks):
            if self.group.state[m] is not MemberState.FAILED:
                try:
                    disk.set_applied(applied)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    self.group.fail_member(m)
        self.group._guard()
        if self._state_unsaved:
            with self._state_lock:
                _save_state(self.node_dir, self.state)
                self._state_unsaved = False

    def check_epoch(self) -> None:
        for disk in self.disks:
            disk.check_epoch()

    def unusable(self) -> str | None:
        """Why the aggregate can take no I/O (None while it can)."""
        if self.group.offline:
            failed = [f"d{m}" for m, st in enumerate(self.group.state) if st is not MemberState.OK]
            return (f"the {self.group.layout.value} aggregate of node{self.identity} is offline: "
                    f"disks {', '.join(failed)} failed, more than it survives")
        if self.fs._dead and not self.recoverable():
            return (f"the file system of node{self.identity} stopped after a failed "
                    "consistency point")
        return None


def warm() -> None:
    """Compile (or load from the cache) the kernels the file system on RAID uses: block
    checksums, batched crcs, parity. At domain boot, not inside the first assign: a cold
    compile holds the interpreter for seconds, long enough to starve the heartbeat thread."""
    from storage.raid import MemoryDevice

    group = RaidGroup(Layout.RAID4, [MemoryDevice(256, f"warm{i}") for i in range(3)])
    fs = Wafl.format(RaidBlockDevice(group))
    fs.create("w", 64 * BLOCK)
    fs.write("w", 0, bytes(range(256)) * 16 * 8)
    fs.cp()
    fs.read("w", 0, 8 * BLOCK)
    group.fail_member(0)
    fs.read("w", 0, 8 * BLOCK)  # degraded: reconstruction from parity
    fs.fsck()


def _write_catalog(fs: Wafl, cat: dict[str, Any]) -> None:
    raw = msgpack.packb(cat)
    if CATALOG not in fs.dir:
        fs.create(CATALOG, 0)
    fs.write(CATALOG, 0, _LEN.pack(len(raw)) + raw)


def _state_path(node_dir: Path) -> Path:
    return node_dir / "aggr.json"


def _load_state(node_dir: Path, layout: str, ndisks: int) -> dict[str, Any]:
    p = _state_path(node_dir)
    if p.exists():
        state = json.loads(p.read_text())
        if state["layout"] != layout or state["disks"] != ndisks:
            raise InvalidState(f"node{node_dir.name[4:]}'s aggregate is {state['layout']} over "
                               f"{state['disks']} disks, not {layout} over {ndisks}")
        return state
    return {"layout": layout, "disks": ndisks, "formatted": False, "failed": [], "rebuilding": None}


def _save_state(node_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(_state_path(node_dir), json.dumps(state).encode(), sync=True)
