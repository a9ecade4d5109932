"""Disk faults of a chaos run, and the healing after them (mixed into nemesis.Nemesis).

    disk_eio         a disk of one identity fails every read, write and sync for `hold_s`
    disk_slow        its I/O waits `delay_ms` first, for `hold_s`
    disk_torn        its writes store whole sectors of half their data, then fail, for `hold_s`
    disk_bitflip     bits flipped straight into the image file, in allocated data blocks
    kill_in_rebuild  a disk failed and replaced, and the guest killed -9 at
                     `reconstruction_started`, while it rebuilds

The first three are rules of the guest serving the identity (storage/fault_io.py, installed
by the `disk_fault` management request through Domain 0; they expire on their own, and are
cleared once `hold_s` is over). Bit flips are written by the nemesis itself, behind the
storage OS's back, like bit rot. What the system promises: an I/O error or a torn write fails
the RAID member and the group serves from the others (no acknowledged write lost, reads
right); a flipped block fails its checksum and is rebuilt from parity (never read back
wrong); a rebuild cut by a kill starts again where the identity is next served.

Healing, after each: every rule cleared, every failed disk replaced, every rebuild finished
(`reconstruction_done`), and after a bit flip or a cut rebuild a scrub, whose report must
list no unrecoverable stripe.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Sequence

from storage.disk import HEADER, disk_path
from storage.raid.checksummed import data_blocks_for
from vmemu.chaos.schedule import DISK_KINDS, Fault
from vmemu.cluster import Cluster, Status
from vmemu.errors import VmemuError

BLOCK = 4096
__all__ = ["DISK_KINDS", "DiskFaults", "flip_bits"]


def raid_of(st: Status, node: str) -> dict[str, Any]:
    return ((st.node(node).get("storage") or {}).get("raid")) or {}


def flip_bits(path: os.PathLike[str] | str, rng: random.Random, flips: int) -> list[dict[str, int]]:
    """Flip one bit in each of `flips` allocated data blocks of a member's image (not its
    header, not its checksum table: data the RAID layer must catch). Prefers blocks that
    hold something (a hole reads as zeros on both sides of a flip only once written)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size - HEADER
        data_blocks = data_blocks_for(size // BLOCK)
        used: list[int] = []
        pos = HEADER
        end = HEADER + data_blocks * BLOCK
        while pos < end and len(used) < 65536:  # the allocated extents of the data area
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            used += range((start - HEADER) // BLOCK, (stop - HEADER + BLOCK - 1) // BLOCK)
            pos = stop
        nonzero = [b for b in used if os.pread(fd, BLOCK, HEADER + b * BLOCK).strip(b"\0")]
        pool = nonzero or used or list(range(data_blocks))
        out = []
        for b in rng.sample(pool, min(flips, len(pool))):
            bit = rng.randrange(BLOCK * 8)
            at = HEADER + b * BLOCK + bit // 8
            old = os.pread(fd, 1, at)[0]
            os.pwrite(fd, bytes([old ^ (1 << (bit % 8))]), at)
            out.append({"block": b, "bit": bit})
        return out
    finally:
        os.close(fd)


class DiskFaults:
    """The disk faults; Nemesis supplies c, status, wait_event, tail, _crash, alive."""

    c: Cluster
    alive: Callable[[], bool]

    def _manage(self, node: str, what: str, **args: Any) -> Any:
        return self.c.control.call("manage", dict(args, what=what, node=node), timeout=65)

    def disk_precondition(self, f: Fault, st: Status) -> str | None:
        """Why a disk fault cannot be done now (None if it can): no RAID, or not whole."""
        raid = raid_of(st, f.target)
        if not raid:
            return f"{f.target} has no RAID aggregate in status (--raid none?)"
        if raid.get("state") != "normal":
            return f"{f.target}'s RAID is {raid.get('state')}, not normal"
        return None

    def _disk(self, f: Fault) -> int:
        ndisks = len(raid_of(self.status(), f.target).get("disks") or [1])  # type: ignore[attr-defined]
        return int(f.params.get("disk_draw", 0)) % ndisks

    def _rule_fault(self, f: Fault, kind: str, **extra: Any) -> dict[str, Any]:
        d = self._disk(f)
        # A schedule is read back from a file: its numbers are bounded before they are used.
        hold = min(max(float(f.params.get("hold_s", 2.0)), 0.1), 60.0)
        t = time.monotonic()
        self._manage(f.target, "disk_fault", disk=d, kind=kind, duration_s=hold + 5.0,
                     probability=min(max(float(f.params.get("probability", 1.0)), 0.01), 1.0),
                     **extra)
        try:
            time.sleep(hold)  # the fault itself is a length of time
        finally:
            self._manage(f.target, "disk_fault", disk=-1, kind="clear")
        return {"disk": d, "mono": t, "held_s": hold}

    def _disk_eio(self, f: Fault, pid: int) -> dict[str, Any]:
        return self._rule_fault(f, "eio")

    def _disk_slow(self, f: Fault, pid: int) -> dict[str, Any]:
        return self._rule_fault(f, "slow", delay_ms=min(max(float(f.params.get("delay_ms", 20.0)), 1.0), 200.0))

    def _disk_torn(self, f: Fault, pid: int) -> dict[str, Any]:
        return self._rule_fault(f, "torn", ops=["write"])

    def _disk_bitflip(self, f: Fault, pid: int) -> dict[str, Any]:
        d = self._disk(f)
        rng = random.Random(int(f.params.get("flip_seed", 0)))
        t = time.monotonic()
        path = disk_path(self.c.dir, int(f.target[4:]), d)
        flips = flip_bits(path, rng, min(max(int(f.params.get("flips", 1)), 1), 64))
        return {"disk": d, "mono": t, "flips": flips, "scrub": True}

    def _kill_in_rebuild(self, f: Fault, pid: int) -> dict[str, Any]:
        """Fail a disk, replace it, and kill -9 the guest as its rebuild starts."""
        d = self._disk(f)
        ident = int(f.target[4:])
        t = time.monotonic()
        self._manage(f.target, "disk_fail", disk=d)
        self.tail.new()  # type: ignore[attr-defined]
        self._manage(f.target, "disk_replace", disk=d)
        rec: dict[str, Any] = {"disk": d, "mono": t, "scrub": True}
        try:
            ev = self.wait_event(  # type: ignore[attr-defined]
                lambda e: e.get("kind") == "reconstruction_started"
                and e.get("identity") == ident, 30.0, f"the rebuild of {f.target} d{d}")
        except TimeoutError as exc:
            rec["phase_missed"] = str(exc)
            return rec
        k = self._crash(f.target)  # type: ignore[attr-defined]
        done_before = any(e.get("kind") == "reconstruction_done" and e.get("identity") == ident
                          for e in self.tail.new())  # type: ignore[attr-defined]
        rec.update(killed=[f.target], mono=k, trigger="reconstruction_started",
                   late_ms=round((k - float(ev["mono"])) * 1000, 1),
                   rebuild_done_before_kill=done_before)
        return rec

    # -- healing ---------------------------------------------------------------------------
    def heal_disks(self, end: float, scrub: Sequence[str] = ()) -> dict[str, Any]:
        """Rules cleared, failed disks replaced, rebuilds done, then a scrub of the
        identities in `scrub` (the fault's target: where bits were flipped or a rebuild was
        cut); what was done. The RAID state comes from the reply to a `disk_fault`
        clear, as of that moment: status rides on heartbeats and may be one behind."""
        out: dict[str, Any] = {"replaced": [], "scrubs": {}}
        nodes = [n["name"] for n in self.status().nodes]  # type: ignore[attr-defined]
        while True:
            pending = False
            for node in nodes:
                try:
                    raid = self._manage(node, "disk_fault", disk=-1, kind="clear").get("raid")
                except VmemuError:
                    pending = True  # not served this moment
                    continue
                if not raid:
                    continue  # --raid none: nothing to replace
                for disk in raid["disks"]:
                    if disk["state"] == "failed" and \
                            self._try(node, "disk_replace", disk=int(disk["disk"][1:])):
                        out["replaced"].append(f"{node}/{disk['disk']}")
                pending |= raid["state"] != "normal"
            if not pending:
                break
            if not self.alive() or time.monotonic() > end:
                raise TimeoutError("the RAID groups were not whole again in time")
            time.sleep(0.1)
        for node in scrub:
            out["scrubs"][node] = self._scrub(node, end)
        return out

    def _try(self, node: str, what: str, **args: Any) -> bool:
        try:
            self._manage(node, what, **args)
            return True
        except VmemuError:
            return False  # already done, or the status was a heartbeat behind

    def _scrub(self, node: str, end: float) -> dict[str, Any]:
        ident = int(node[4:])
        self.tail.new()  # type: ignore[attr-defined]
        self._manage(node, "scrub")
        ev = self.wait_event(lambda e: e.get("kind") in ("scrub_done", "scrub_failed")  # type: ignore[attr-defined]
                             and e.get("identity") == ident, max(1.0, end - time.monotonic()),
                             f"the scrub of {node}")
        rep = {k: ev.get(k) for k in ("checksum_errors", "parity_mismatches", "repaired_data",
                                      "repaired_parity", "unrecoverable", "error") if k in ev}
        if ev["kind"] == "scrub_failed" or rep.get("unrecoverable"):
            raise RuntimeError(f"the scrub of {node} after the fault found damage it could not "
                               f"repair: {rep}")
        return rep
