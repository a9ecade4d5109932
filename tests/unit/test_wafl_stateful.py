"""Stateful property test of storage/wafl against a model.

The model keeps, as plain dicts of name -> bytearray: the pending (in-memory) state, the last
committed CP, and each snapshot. Rules write, create, delete, run CPs, create/delete snapshots,
and crash a CP after a random number of block writes (with a write cache that loses a random
subset of unsynced writes), then remount. After every step the file system must match the model;
after every remount fsck must be clean.
"""

from __future__ import annotations

import copy
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis import event
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage.wafl import BLOCK_SIZE, MemDevice, Wafl, WaflCrash, WaflNoSpace
from storage.wafl.layout import NDIRECT, PTRS_PER_BLOCK

BS = BLOCK_SIZE
DIND_START = (NDIRECT + PTRS_PER_BLOCK) * BS
NAMES = ["a", "b", "c", "lun0"]
SNAPS = ["s1", "s2", "s3"]

offsets = st.one_of(
    st.integers(0, 20 * BS),
    st.integers(NDIRECT * BS - 2 * BS, NDIRECT * BS + 40 * BS),
    st.integers(DIND_START - BS, DIND_START + 3 * PTRS_PER_BLOCK * BS),
)


def _write(buf: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off : off + len(data)] = data


class WaflMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev = MemDevice(2048, volatile=True)  # 8 MiB
        self.fs = Wafl.format(self.dev)
        self.pending: dict[str, bytearray] = {}
        self.committed: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytearray]] = {}

    # ---- helpers
    def _commit_model(self) -> None:
        self.committed = copy.deepcopy(self.pending)

    def _check_fs(self, fs: Wafl, model: dict[str, bytearray]) -> None:
        assert fs.list() == {n: len(b) for n, b in model.items()}
        for n, b in model.items():
            assert fs.read(n, 0, len(b) + 10) == bytes(b), n

    # ---- rules
    @rule(name=st.sampled_from(NAMES), size=st.integers(0, 3 * BS))
    def create(self, name, size):
        if name in self.pending:
            return
        self.fs.create(name, size)
        self.pending[name] = bytearray(size)

    @rule(name=st.sampled_from(NAMES), off=offsets, n=st.integers(1, 3 * BS), seed=st.integers(0, 255))
    def write(self, name, off, n, seed):
        if name not in self.pending:
            return
        data = random.Random(seed).randbytes(n)
        self.fs.write(name, off, data)
        _write(self.pending[name], off, data)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name):
        if name not in self.pending:
            return
        self.fs.delete(name)
        del self.pending[name]

    @rule()
    def cp(self):
        try:
            self.fs.cp()
        except WaflNoSpace:
            return
        self._commit_model()

    @rule(snap=st.sampled_from(SNAPS))
    def snapshot_create(self, snap):
        if snap in self.snaps:
            return
        try:
            self.fs.snapshot_create(snap)
        except WaflNoSpace:
            return
        self._commit_model()
        self.snaps[snap] = copy.deepcopy(self.committed)

    @rule(snap=st.sampled_from(SNAPS))
    def snapshot_delete(self, snap):
        if snap not in self.snaps:
            return
        self.fs.snapshot_delete(snap)
        self._commit_model()
        del self.snaps[snap]

    @rule(k=st.integers(1, 40), kind=st.sampled_from(["cp", "snap_create", "snap_delete"]),
          snap=st.sampled_from(SNAPS), seed=st.integers(0, 2**16),
          batch=st.lists(st.tuples(st.sampled_from(NAMES), offsets, st.integers(1, 2 * BS),
                                   st.integers(0, 255)), max_size=6))
    def crash_during_cp(self, k, kind, snap, seed, batch):
        for name, off, n, dseed in batch:  # make the CP carry some weight
            if name not in self.pending:
                self.create(name, 0)
            self.write(name, off, n, dseed)
        gen0 = self.fs.generation
        new_snaps = dict(self.snaps)
        self.fs.crash_after_writes = k
        try:
            if kind == "snap_create" and snap not in self.snaps:
                new_snaps[snap] = copy.deepcopy(self.pending)
                self.fs.snapshot_create(snap)
            elif kind == "snap_delete" and snap in self.snaps:
                del new_snaps[snap]
                self.fs.snapshot_delete(snap)
            else:
                self.fs.cp()
            crashed = False
        except WaflCrash:
            crashed = True
        except WaflNoSpace:
            self.fs.crash_after_writes = None
            event("no space")
            return
        if not crashed:
            self.fs.crash_after_writes = None
        # power cut in any case: unsynced writes lost at random; remount from the device
        self.dev.lose_unsynced(random.Random(seed))
        fs = Wafl.mount(self.dev)
        rep = fs.fsck()
        assert rep.ok, rep.errors
        event(f"crash: crashed={crashed} committed={fs.generation == gen0 + 1}")
        if fs.generation == gen0 + 1:
            self._commit_model()
            self.snaps = new_snaps
        else:
            assert crashed and fs.generation == gen0
        self.pending = copy.deepcopy(self.committed)
        self.fs = fs

    @rule()
    def remount(self):
        self.fs.cp()
        self._commit_model()
        self.fs = Wafl.mount(self.dev)
        rep = self.fs.fsck()
        assert rep.ok, rep.errors

    # ---- invariants
    @invariant()
    def matches_model(self):
        self._check_fs(self.fs, self.pending)
        assert sorted(s["name"] for s in self.fs.snapshot_list()) == sorted(self.snaps)
        for snap, model in self.snaps.items():
            assert self.fs.snapshot_files(snap) == {n: len(b) for n, b in model.items()}
            for n, b in model.items():
                assert self.fs.read_snapshot(snap, n, 0, len(b)) == bytes(b)

    @invariant()
    def fsck_clean_and_df_consistent(self):
        rep = self.fs.fsck()
        assert rep.ok, rep.errors
        d = self.fs.df()
        assert d.used_active + d.used_snapshots_only + d.free == d.total_blocks

    @invariant()
    def committed_state_on_device(self):
        # a mount right now sees exactly the last committed CP (pending writes are not on disk)
        fs = Wafl.mount(self.dev)
        assert fs.generation == self.fs.generation
        self._check_fs(fs, self.committed)


WaflMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWafl = WaflMachine.TestCase
