"""The D-module aggregate stack: WAFL on a RAID group (RAID-4 or RAID-1) over memory devices.

A hypothesis state machine against a model of plain dicts (pending state, last committed CP,
snapshots). Rules write files, run CPs, create and delete snapshots, crash a CP after k block
writes (WAFL's ``crash_after_writes``), crash it inside a RAID stripe write (the group's
``crash_hook`` raising ``SimulatedCrash`` at ``"after_data"``), fail a member, replace and
rebuild it, and silently corrupt member blocks. After every crash the file system is remounted
and must hold exactly one of the two states a crash allows (the last committed CP, or the one
being written if its root made it to disk), decided by the generation it mounts at; pending
writes are lost. After every step the file system must match the model and fsck clean.

Corruption is injected only while the group is fully redundant and at most once per stripe
between scrubs, so every read must still succeed (repaired from redundancy); double faults
belong to the RAID layer's own tests. A RAID-level crash is recovered as documented: scrub,
then remount. The module's plain tests check the write-hole claim directly: a member lost
right after a crashed CP, before any scrub, does not damage the committed state.
"""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from storage.raid import BLOCK_SIZE, Layout, MemberState, MemoryDevice, RaidGroup, SimulatedCrash
from storage.raid.blockdev import RaidBlockDevice
from storage.wafl import Wafl, WaflCrash, WaflNoSpace
from storage.wafl.layout import NDIRECT, PTRS_PER_BLOCK

BS = BLOCK_SIZE
RAW_BLOCKS = 400  # per member: ~400 stripes, a few MiB of file system
NAMES = ["a", "b", "lun0"]
SNAPS = ["s1", "s2"]
DIND_START = (NDIRECT + PTRS_PER_BLOCK) * BS

offsets = st.one_of(
    st.integers(0, 24 * BS),
    st.integers(NDIRECT * BS - BS, NDIRECT * BS + 24 * BS),
    st.integers(DIND_START - BS, DIND_START + PTRS_PER_BLOCK * BS + 4 * BS),
)
Model = dict[str, bytearray]


def _apply(buf: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off : off + len(data)] = data


def _check(fs: Wafl, model: Model) -> None:
    assert fs.list() == {n: len(b) for n, b in model.items()}
    for n, b in model.items():
        assert fs.read(n, 0, len(b) + 7) == bytes(b), n


class StackMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.devs: list[MemoryDevice] = []
        self.group: RaidGroup | None = None
        self.fs: Wafl | None = None
        self.pending: Model = {}
        self.committed: Model = {}
        self.snaps: dict[str, Model] = {}
        self.corrupted: set[int] = set()  # stripes with an injected corruption, until scrub

    @initialize(layout=st.sampled_from(Layout), n=st.integers(2, 4))
    def make(self, layout: Layout, n: int) -> None:
        self.devs = [MemoryDevice(RAW_BLOCKS, f"d{i}") for i in range(n)]
        self.group = RaidGroup(layout, self.devs)
        self.fs = Wafl.format(RaidBlockDevice(self.group))

    # ---- helpers
    @property
    def g(self) -> RaidGroup:
        assert self.group is not None
        return self.group

    @property
    def f(self) -> Wafl:
        assert self.fs is not None
        return self.fs

    def _fully_redundant(self) -> bool:
        return self.group is not None and not self.group.degraded

    def _run_cp(self, kind: str, snap: str) -> tuple[Model, dict[str, Model]]:
        """Start a CP of `kind`; returns the (committed, snapshots) model it would commit."""
        new_snaps = dict(self.snaps)
        if kind == "snap_create" and snap not in self.snaps:
            new_snaps[snap] = copy.deepcopy(self.pending)
            self.f.snapshot_create(snap)
        elif kind == "snap_delete" and snap in self.snaps:
            del new_snaps[snap]
            self.f.snapshot_delete(snap)
        else:
            self.f.cp()
        return copy.deepcopy(self.pending), new_snaps

    def _after_crash(self, gen0: int, new_committed: Model, new_snaps: dict[str, Model]) -> None:
        fs = Wafl.mount(RaidBlockDevice(self.g))
        assert fs.generation in (gen0, gen0 + 1)
        if fs.generation == gen0 + 1:  # the root reached the disk: the CP is committed
            self.committed, self.snaps = new_committed, new_snaps
        event(f"crash recovered to {'new' if fs.generation == gen0 + 1 else 'old'} CP")
        self.pending = copy.deepcopy(self.committed)
        self.fs = fs

    # ---- file system rules
    @precondition(lambda self: self.fs is not None)
    @rule(name=st.sampled_from(NAMES), off=offsets, n=st.integers(1, 2 * BS),
          seed=st.integers(0, 255))
    def write(self, name: str, off: int, n: int, seed: int) -> None:
        if name not in self.pending:
            self.f.create(name)
            self.pending[name] = bytearray()
        data = random.Random(seed).randbytes(n)
        self.f.write(name, off, data)
        _apply(self.pending[name], off, data)

    @precondition(lambda self: self.fs is not None)
    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        if name in self.pending:
            self.f.delete(name)
            del self.pending[name]

    @precondition(lambda self: self.fs is not None)
    @rule(kind=st.sampled_from(["cp", "snap_create", "snap_delete"]), snap=st.sampled_from(SNAPS))
    def cp(self, kind: str, snap: str) -> None:
        try:
            self.committed, self.snaps = self._run_cp(kind, snap)
        except WaflNoSpace:
            event("no space")

    @precondition(lambda self: self.fs is not None)
    @rule(k=st.integers(1, 6), kind=st.sampled_from(["cp", "snap_create", "snap_delete"]),
          snap=st.sampled_from(SNAPS))
    def crash_in_cp(self, k: int, kind: str, snap: str) -> None:
        """WAFL dies after k block writes of a CP (per-block writes: the point is exact)."""
        gen0 = self.f.generation
        self.f.crash_after_writes = k
        try:
            new_committed, new_snaps = self._run_cp(kind, snap)
        except WaflCrash:
            event("CP crash")
        except WaflNoSpace:
            self.f.crash_after_writes = None
            return
        else:
            self.f.crash_after_writes = None
            self.committed, self.snaps = new_committed, new_snaps
            return
        self._after_crash(gen0, copy.deepcopy(self.pending),
                          self._snaps_after(kind, snap))

    def _snaps_after(self, kind: str, snap: str) -> dict[str, Model]:
        new_snaps = dict(self.snaps)
        if kind == "snap_create" and snap not in self.snaps:
            new_snaps[snap] = copy.deepcopy(self.pending)
        elif kind == "snap_delete" and snap in self.snaps:
            del new_snaps[snap]
        return new_snaps

    @precondition(lambda self: self._fully_redundant())
    @rule(k=st.integers(1, 4), kind=st.sampled_from(["cp", "snap_create"]),
          snap=st.sampled_from(SNAPS))
    def crash_in_stripe_write(self, k: int, kind: str, snap: str) -> None:
        """Power cut inside the k-th stripe write of a CP: data written, parity not."""
        gen0 = self.f.generation
        calls = [0]

        def hook(stage: str, stripe: int) -> None:
            assert stage == "after_data"
            calls[0] += 1
            if calls[0] == k:
                raise SimulatedCrash(stripe)

        self.g.crash_hook = hook
        try:
            new_committed, new_snaps = self._run_cp(kind, snap)
        except SimulatedCrash:
            event("stripe-write crash")
        except WaflNoSpace:
            return
        else:
            self.committed, self.snaps = new_committed, new_snaps
            return
        finally:
            self.g.crash_hook = None
        # Restart: a fresh group over the same devices, scrubbed before use (the documented
        # recovery for stale parity), then the file system.
        self.group = RaidGroup(self.g.layout, self.devs)
        rep = self.group.scrub()
        assert not rep.unrecoverable
        self.corrupted.clear()
        self._after_crash(gen0, copy.deepcopy(self.pending), self._snaps_after(kind, snap))

    @precondition(lambda self: self.fs is not None)
    @rule()
    def remount(self) -> None:
        self.fs = Wafl.mount(RaidBlockDevice(self.g))
        self.pending = copy.deepcopy(self.committed)

    # ---- RAID rules
    @precondition(lambda self: self._fully_redundant())
    @rule(data=st.data())
    def fail_member(self, data: st.DataObject) -> None:
        if self.corrupted:
            return  # a corruption plus a lost member is a double fault
        m = data.draw(st.integers(0, len(self.devs) - 1))
        self.g.fail_member(m)
        event("member failed")

    @precondition(lambda self: self._fully_redundant())
    @rule(data=st.data(), name=st.sampled_from(NAMES), seed=st.integers(0, 255))
    def lose_and_rebuild(self, data: st.DataObject, name: str, seed: int) -> None:
        """Fail a member, replace it, and rebuild in steps with writes and CPs in between."""
        if self.corrupted:
            return
        m = data.draw(st.integers(0, len(self.devs) - 1))
        self.g.fail_member(m)
        self.devs[m] = MemoryDevice(RAW_BLOCKS, f"r{m}")
        self.g.replace(m, self.devs[m])
        while not self.g.rebuild_step(data.draw(st.sampled_from([60, 200]))).complete:
            self.write(name, data.draw(offsets), BS, seed)
            self.cp("cp", SNAPS[0])
        event("rebuild complete")

    @precondition(lambda self: self.group is not None and self.group.rebuild_member is None
                  and MemberState.FAILED in self.group.state)
    @rule()
    def replace(self) -> None:
        m = self.g.state.index(MemberState.FAILED)
        self.devs[m] = MemoryDevice(RAW_BLOCKS, f"r{m}")
        self.g.replace(m, self.devs[m])
        event("member replaced")

    @precondition(lambda self: self.group is not None and self.group.rebuild_member is not None)
    @rule(n=st.sampled_from([100, 1000]))
    def rebuild(self, n: int) -> None:
        if self.g.rebuild_step(n).complete:
            event("rebuild complete")

    @precondition(lambda self: self._fully_redundant())
    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        free = [s for s in range(self.g.stripes) if s not in self.corrupted]
        s = data.draw(st.sampled_from(free))
        m = data.draw(st.integers(0, len(self.devs) - 1))
        self.devs[m].corrupt_block(s, data.draw(st.integers(0, BS - 1)))
        self.corrupted.add(s)
        event("block corrupted")

    @precondition(lambda self: self.group is not None)
    @rule()
    def scrub(self) -> None:
        rep = self.g.scrub()
        assert not rep.unrecoverable and rep.parity_mismatches == 0 and rep.mirror_mismatches == 0
        self.corrupted.clear()

    # ---- invariants
    @invariant()
    def matches_model(self) -> None:
        if self.fs is None:
            return
        _check(self.fs, self.pending)
        assert sorted(s["name"] for s in self.fs.snapshot_list()) == sorted(self.snaps)
        for snap, model in self.snaps.items():
            assert self.fs.snapshot_files(snap) == {n: len(b) for n, b in model.items()}
            for n, b in model.items():
                assert self.fs.read_snapshot(snap, n, 0, len(b)) == bytes(b)

    @invariant()
    def committed_state_and_fsck(self) -> None:
        if self.fs is None:
            return
        rep = self.fs.fsck()
        assert rep.ok, rep.errors
        fs = Wafl.mount(RaidBlockDevice(self.g))
        assert fs.generation == self.fs.generation
        _check(fs, self.committed)
        assert not self.g.offline


StackMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStack = StackMachine.TestCase


# -- the write hole, closed for CP writes ----------------------------------------------------

def _stack(n: int = 4) -> tuple[list[MemoryDevice], RaidGroup, Wafl]:
    devs = [MemoryDevice(RAW_BLOCKS, f"d{i}") for i in range(n)]
    group = RaidGroup(Layout.RAID4, devs)
    return devs, group, Wafl.format(RaidBlockDevice(group))


def test_cp_on_raid4_writes_full_stripes_only() -> None:
    devs, group, fs = _stack()
    fs.create("lun0")
    fs.write("lun0", 0, random.Random(1).randbytes(40 * BS))
    partial: list[int] = []
    orig = group.write_block

    def spy(lba: int, data: bytes) -> None:
        partial.append(lba)
        orig(lba, data)

    group.write_block = spy  # type: ignore[method-assign]
    fs.cp()
    # only the fsinfo root goes through the read-modify-write path
    assert partial == [fs.generation % 2]
    assert group.scrub().parity_mismatches == 0


@pytest.mark.parametrize("crash_at", [1, 3, 7])
@pytest.mark.parametrize("lost", [0, 1, 2, 3])
def test_stripe_crash_then_member_loss_without_scrub(crash_at: int, lost: int) -> None:
    devs, group, fs = _stack()
    fs.create("lun0")
    committed = random.Random(2).randbytes(30 * BS)
    fs.write("lun0", 0, committed)
    fs.snapshot_create("s")
    fs.write("lun0", 5 * BS, random.Random(3).randbytes(30 * BS))
    calls = [0]

    def hook(stage: str, stripe: int) -> None:
        calls[0] += 1
        if calls[0] == crash_at:
            raise SimulatedCrash(stripe)

    group.crash_hook = hook
    with pytest.raises(SimulatedCrash):
        fs.cp()
    # Restart and lose a disk *before* any scrub: stale parity only sits on stripes the CP
    # wrote in full, which the committed root does not reference, so nothing live is hit.
    g2 = RaidGroup(Layout.RAID4, devs)
    g2.fail_member(lost)
    fs2 = Wafl.mount(RaidBlockDevice(g2))
    assert fs2.read("lun0", 0, len(committed)) == committed
    assert fs2.read_snapshot("s", "lun0", 0, len(committed)) == committed
    rep = fs2.fsck()
    assert rep.ok, rep.errors
