"""The whole D-module write path on the storage OS, against a model, across crashes.

A hypothesis state machine drives acknowledged writes, background and explicit CPs and
snapshots into a D-module whose identity is an aggregate (RAID-4 over three disk files, the
write-anywhere file system, LUNs in vol0) and NVRAM (a memfd region in two halves). At any
step it may crash the domain: plainly, in the middle of a CP (the file system's
``crash_after_writes``: the CP dies after its k-th block write), or in the middle of a RAID
stripe write (the group's ``crash_hook``: data written, parity not). A crash abandons the
D-module (its cache, like a process's memory, is gone) and a new incarnation -- a partner --
fences the disks, opens the identity (remounting the file system from its newest valid root)
and replays every earlier incarnation's NVRAM, oldest first. After every step every LUN must
read back exactly what the model says acknowledged writes left there, and each snapshot what
it held when taken.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domains.dmodule import DModule
from storage import nvlog
from storage import region as shm
from storage.disk import Disk, disk_path, stamp_epoch
from storage.raid.errors import SimulatedCrash
from storage.wafl.errors import WaflCrash

DISKS = 3
DISK_SIZE = 4 << 20
NVRAM = 256 << 10  # small: the halves fill and switch often
BLOCK = 4096
LUN_BLOCKS = 64  # the part of each LUN the machine writes (LUNs are bigger)


class DModuleOnTheStorageOS(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vmemu-dmsm-"))
        for d in range(DISKS):
            Disk.create(disk_path(self.dir, 1, d), 1, d, DISK_SIZE)
        self.regions: list[tuple[int, int, mmap.mmap]] = []  # (region id, fd, mapping)
        self.dead: list[DModule] = []
        self.d: DModule | None = None
        self.model = [bytearray(LUN_BLOCKS * BLOCK) for _ in range(2)]
        self.snaps: dict[str, list[bytes]] = {}
        self.request = 0
        self.crashes = 0

    # -- incarnations ------------------------------------------------------------------------
    def _boot(self) -> None:
        """A new incarnation of the domain: new NVRAM, fenced disks, replay of the old ones."""
        rid = 0x1000 + len(self.regions)
        fd = shm.allocate(f"vmemu-dmsm-{os.getpid()}-{rid:x}", NVRAM)
        buf = shm.map_read_write(fd)
        nvlog.format_region(buf, 1, rid, halves=True)
        chain = [(r, m) for r, _, m in self.regions]
        self.regions.append((rid, fd, buf))
        epoch = 0
        for d in range(DISKS):
            epoch = stamp_epoch(disk_path(self.dir, 1, d))
        self.d = DModule(1, self.dir, DISKS, buf, rid, emit=lambda *a: None, raid="raid4",
                         default_luns=2, lun_bytes=1 << 20)
        served = self.d.open_identity(1, epoch, "boot" if not chain else "takeover")
        self.d.replay_chain(served, chain)

    @initialize()
    def boot(self) -> None:
        self._boot()

    def teardown(self) -> None:
        for d in [*self.dead, self.d]:
            if d is not None:
                if d.cp_job is not None:
                    d.cp_job.done.wait()
                d.close()
        for _, fd, m in self.regions:
            try:
                m.close()
            except BufferError:
                pass
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _crash(self) -> None:
        assert self.d is not None
        if self.d.cp_job is not None:
            self.d.cp_job.done.wait()  # the thread dies with the process; wait so files close
        self.dead.append(self.d)
        self.d = None
        self.crashes += 1
        self._boot()

    # -- rules -------------------------------------------------------------------------------
    @rule(lun=st.integers(0, 1), block=st.integers(0, LUN_BLOCKS - 1),
          sectors=st.sampled_from([1, 8, 16, 24]), seed=st.integers(0, 2**16))
    def write(self, lun: int, block: int, sectors: int, seed: int) -> None:
        assert self.d is not None
        off = block * BLOCK
        n = min(sectors * 512, LUN_BLOCKS * BLOCK - off)
        data = random.Random(seed).randbytes(n)
        self.request += 1
        self.d.write(1, lun, off, data, 7, self.request)  # returns: the write is acknowledged
        self.model[lun][off:off + n] = data
        self.d.poll_cp()  # as the guest's loop does between requests

    @rule()
    def background_cp(self) -> None:
        assert self.d is not None
        if self.d.cp_job is None and self.d.cp_needed():
            self.d.start_cp("timer")

    @rule()
    def finish_cp(self) -> None:
        assert self.d is not None
        self.d.poll_cp(wait=True)

    @rule()
    def explicit_cp(self) -> None:
        assert self.d is not None
        self.d.consistency_point("explicit")

    @precondition(lambda self: len(self.snaps) < 8)
    @rule()
    def snapshot(self) -> None:
        assert self.d is not None
        name = f"s{len(self.snaps)}-{self.crashes}"
        self.d.snapshot_create(1, "vol0", name)
        self.snaps[name] = [bytes(m) for m in self.model]

    @rule()
    def crash(self) -> None:
        self._crash()

    @rule(k=st.integers(1, 40))
    def crash_in_a_cp(self, k: int) -> None:
        assert self.d is not None
        self.d.poll_cp(wait=True)
        self.d.served[1].store.aggr.fs.crash_after_writes = k
        try:
            self.d.consistency_point("explicit")
        except WaflCrash:
            pass  # died after the k-th block write of the CP
        self._crash()

    @rule(k=st.integers(1, 6))
    def crash_in_a_stripe_write(self, k: int) -> None:
        assert self.d is not None
        self.d.poll_cp(wait=True)
        group = self.d.served[1].store.aggr.group
        seen = [0]

        def hook(point: str, stripe: int) -> None:
            seen[0] += 1
            if point == "after_data" and seen[0] >= k:
                raise SimulatedCrash(f"power cut after the data of stripe {stripe}")

        group.crash_hook = hook
        try:
            self.d.consistency_point("explicit")
        except SimulatedCrash:
            pass
        group.crash_hook = None
        self._crash()

    # -- what must hold ----------------------------------------------------------------------
    @invariant()
    def every_acknowledged_write_reads_back(self) -> None:
        if self.d is None:
            return
        for lun in (0, 1):
            got = self.d.read(1, lun, 0, LUN_BLOCKS * BLOCK)
            assert got == bytes(self.model[lun]), f"lun{lun} differs from the model"

    @invariant()
    def snapshots_hold_what_they_held(self) -> None:
        if self.d is None or not self.snaps:
            return
        name = sorted(self.snaps)[-1]
        for lun in (0, 1):
            got = self.d.read_snapshot(1, "vol0", name, f"lun{lun}", 0, LUN_BLOCKS * BLOCK)
            assert got == self.snaps[name][lun], f"snapshot {name} lun{lun}"


DModuleOnTheStorageOS.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestDModuleOnTheStorageOS = DModuleOnTheStorageOS.TestCase
