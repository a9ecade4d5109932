"""Property test: a RAID group against a dict model under writes, failures, rebuilds, corruption.

The invariant is the RAID contract: a read returns exactly what was last written, or raises --
never other data. Corruption is injected at most once per stripe between scrubs and only while
the group is fully redundant, so every read must in fact succeed; double faults are covered by
the unit tests.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from storage.raid import (
    BLOCK_SIZE,
    BlockUnrecoverable,
    Layout,
    MemberState,
    MemoryDevice,
    RaidError,
    RaidGroup,
    SimulatedCrash,
)
from vmemu.errors import VmemuError

NBLOCKS = 12  # raw blocks per device -> 11 stripes


def block_of(seed: int) -> bytes:
    return seed.to_bytes(4, "little") * (BLOCK_SIZE // 4)


class RaidMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.group: RaidGroup | None = None
        self.devs: list[MemoryDevice] = []
        self.model: dict[int, bytes] = {}
        self.corrupted: set[int] = set()  # stripes with an injected corruption, until scrub

    @initialize(layout=st.sampled_from(Layout), n=st.integers(2, 4))
    def make(self, layout: Layout, n: int) -> None:
        self.devs = [MemoryDevice(NBLOCKS, f"d{i}") for i in range(n)]
        self.group = RaidGroup(layout, self.devs)

    @precondition(lambda self: self.group is not None)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write(self, data: st.DataObject, seed: int) -> None:
        g = self.group
        assert g is not None
        lba = data.draw(st.integers(0, g.nblocks - 1))
        g.write_block(lba, block_of(seed))
        self.model[lba] = block_of(seed)

    @precondition(lambda self: self.group is not None)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        g = self.group
        assert g is not None
        lba = data.draw(st.integers(0, g.nblocks - 1))
        assert g.read_block(lba) == self.model.get(lba, bytes(BLOCK_SIZE))

    @precondition(lambda self: self.group is not None and not self.group.degraded
                  and not self.corrupted and not any(d.failed for d in self.devs))
    @rule(data=st.data())
    def fail_disk(self, data: st.DataObject) -> None:
        g = self.group
        assert g is not None
        m = data.draw(st.integers(0, len(g.members) - 1))
        if data.draw(st.booleans()):
            g.fail_member(m)
        else:
            self.devs[m].fail()  # discovered by the next I/O touching it

    @precondition(lambda self: self.group is not None and self.group.rebuild_member is None
                  and any(s is MemberState.FAILED for s in self.group.state))
    @rule()
    def replace(self) -> None:
        g = self.group
        assert g is not None
        m = g.state.index(MemberState.FAILED)
        self.devs[m] = MemoryDevice(NBLOCKS, f"r{m}")
        g.replace(m, self.devs[m])

    @precondition(lambda self: self.group is not None and self.group.rebuild_member is not None)
    @rule(n=st.integers(1, 6))
    def rebuild(self, n: int) -> None:
        g = self.group
        assert g is not None
        before = g.rebuild_cursor
        p = g.rebuild_step(n)
        assert p.done == min(p.total, before + n)
        if p.complete:
            event(f"{g.layout.value} rebuild complete")

    @precondition(lambda self: self.group is not None and not self.group.degraded
                  and not any(d.failed for d in self.devs))
    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        g = self.group
        assert g is not None
        free = [s for s in range(g.stripes) if s not in self.corrupted]
        if not free:
            return
        s = data.draw(st.sampled_from(free))
        m = data.draw(st.integers(0, len(g.members) - 1))
        self.devs[m].corrupt_block(s, data.draw(st.integers(0, BLOCK_SIZE - 1)))
        self.corrupted.add(s)

    @precondition(lambda self: self.group is not None)
    @rule()
    def scrub(self) -> None:
        g = self.group
        assert g is not None
        rep = g.scrub()
        assert not rep.unrecoverable
        if rep.repaired_data or rep.repaired_parity:
            event("scrub repaired corruption")
        assert rep.parity_mismatches == 0 and rep.mirror_mismatches == 0
        assert g.scrub().checksum_errors == 0
        self.corrupted.clear()

    @invariant()
    def never_offline(self) -> None:
        if self.group is not None:
            assert not self.group.offline


RaidMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("RAID_EXAMPLES", "100")), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRaidStateful = RaidMachine.TestCase


class ChaosMachine(RuleBasedStateMachine):
    """Unrestricted faults: any number of failures and corruptions, crashes mid-write.

    Here the group may well lose data; the only promise checked is the important one: a read
    returns a value that was really written to that block (the old or new value of a write that
    crashed or failed midway), or raises a RaidError -- never anything else. After a simulated
    crash the group is rebuilt over the same devices and scrubbed first, which is the documented
    recovery procedure for the write hole.
    """

    def __init__(self) -> None:
        super().__init__()
        self.devs: list[MemoryDevice] = []
        self.group: RaidGroup | None = None
        self.layout = Layout.RAID4
        self.ok: dict[int, set[bytes]] = {}

    @initialize(layout=st.sampled_from(Layout), n=st.integers(2, 4))
    def make(self, layout: Layout, n: int) -> None:
        self.layout = layout
        self.devs = [MemoryDevice(NBLOCKS, f"d{i}") for i in range(n)]
        self.group = RaidGroup(layout, self.devs)

    def _lba(self, data: st.DataObject) -> int:
        assert self.group is not None
        return data.draw(st.integers(0, self.group.nblocks - 1))

    def _allowed(self, lba: int) -> set[bytes]:
        return self.ok.get(lba, {bytes(BLOCK_SIZE)})

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write(self, data: st.DataObject, seed: int) -> None:
        assert self.group is not None
        lba, new = self._lba(data), block_of(seed)
        try:
            self.group.write_block(lba, new)
        except BlockUnrecoverable:
            return  # refused before writing anything
        except RaidError:
            self.ok[lba] = self._allowed(lba) | {new}
            return
        self.ok[lba] = {new}

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.group is not None
        lba = self._lba(data)
        try:
            got = self.group.read_block(lba)
        except RaidError:
            event("read refused")
            return
        assert got in self._allowed(lba)

    @rule(data=st.data())
    def fail_disk(self, data: st.DataObject) -> None:
        m = data.draw(st.integers(0, len(self.devs) - 1))
        self.devs[m].fail()

    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        m = data.draw(st.integers(0, len(self.devs) - 1))
        b = data.draw(st.integers(0, NBLOCKS - 1))  # data or checksum-table block
        self.devs[m].corrupt_block(b, data.draw(st.integers(0, BLOCK_SIZE - 1)))

    @rule(data=st.data())
    def replace_and_rebuild(self, data: st.DataObject) -> None:
        g = self.group
        assert g is not None
        failed = [m for m, s in enumerate(g.state) if s is MemberState.FAILED]
        try:
            if failed and g.rebuild_member is None:
                m = failed[0]
                self.devs[m] = MemoryDevice(NBLOCKS, f"r{m}")
                g.replace(m, self.devs[m])
            if g.rebuild_member is not None:
                g.rebuild_step(data.draw(st.integers(1, 12)))
        except VmemuError:
            pass

    @precondition(lambda self: self.group is not None and not self.group.degraded
                  and not any(d.failed for d in self.devs))
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def crash_mid_write(self, data: st.DataObject, seed: int) -> None:
        g = self.group
        assert g is not None
        lba, new = self._lba(data), block_of(seed)

        def crash(stage: str, stripe: int) -> None:
            raise SimulatedCrash(stripe)

        g.crash_hook = crash
        try:
            g.write_block(lba, new)
        except SimulatedCrash:
            self.ok[lba] = self._allowed(lba) | {new}
        except RaidError:
            return
        # restart and recover: a new group over the same devices, scrubbed before use
        self.group = RaidGroup(self.layout, self.devs)
        self.scrub()

    @rule()
    def scrub(self) -> None:
        assert self.group is not None
        try:
            rep = self.group.scrub()
        except RaidError:
            return
        if rep.unrecoverable:
            event("scrub found unrecoverable stripes")


ChaosMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("RAID_EXAMPLES", "100")), stateful_step_count=40,
    deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
TestRaidChaos = ChaosMachine.TestCase
