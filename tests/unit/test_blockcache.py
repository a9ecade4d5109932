"""BlockCache against a model: what a client reads is always the last write of every byte.

The committed disk state is a second bytearray per LUN that only a "commit" (a CP writing out
the frozen generation) changes, exactly as the D-module does: freeze, commit the frozen blocks,
thaw. Writes land at arbitrary sector-aligned offsets and lengths (partial blocks included), and
CPs interleave with them at every point.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from storage.blockcache import BLOCK, BlockCache

SECTOR = 512
LUNS = 2
LUN_BLOCKS = 12
LUN_SIZE = LUN_BLOCKS * BLOCK
SECTORS = LUN_SIZE // SECTOR


@st.composite
def extents(draw, max_sectors: int = 3 * BLOCK // SECTOR) -> tuple[int, int, int]:
    lun = draw(st.integers(0, LUNS - 1))
    first = draw(st.integers(0, SECTORS - 1))
    count = draw(st.integers(1, min(max_sectors, SECTORS - first)))
    return lun, first * SECTOR, count * SECTOR


class CacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # What is on disk (changes only on commit), and what every read must return.
        self.disk = [bytearray(LUN_SIZE) for _ in range(LUNS)]
        for lun in range(LUNS):  # not zeros: a partial write must merge with the real old data
            for i in range(LUN_SIZE):
                self.disk[lun][i] = (i * 7 + lun * 13 + i // BLOCK) & 0xFF
        self.visible = [bytearray(d) for d in self.disk]
        self.committed_reads = 0
        self.cache = BlockCache(self._read_committed)
        self.frozen: dict | None = None
        self.stamp = 0

    def _read_committed(self, lun: int, first: int, count: int) -> bytes:
        assert 0 <= lun < LUNS and first >= 0 and count >= 1
        assert (first + count) * BLOCK <= LUN_SIZE, "read past the end of the LUN"
        self.committed_reads += 1
        return bytes(self.disk[lun][first * BLOCK:(first + count) * BLOCK])

    # -- operations ------------------------------------------------------------------------
    @rule(ext=extents(), fill=st.sampled_from(["stamp", "random"]), data=st.data())
    def write(self, ext, fill, data) -> None:
        lun, off, length = ext
        self.stamp += 1
        if fill == "stamp":
            payload = bytes([self.stamp & 0xFF]) * length
        else:
            payload = data.draw(st.binary(min_size=length, max_size=length))
        self.cache.write(lun, off, memoryview(payload) if self.stamp % 2 else payload)
        self.visible[lun][off:off + length] = payload

    @rule(ext=extents(max_sectors=SECTORS))
    def read(self, ext) -> None:
        lun, off, length = ext
        assert self.cache.read(lun, off, length) == bytes(self.visible[lun][off:off + length])

    @precondition(lambda self: self.frozen is None)
    @rule()
    def freeze(self) -> None:
        self.frozen = self.cache.freeze()
        assert self.cache.active == {}
        for blocks in self.frozen.values():
            for buf in blocks.values():
                assert len(buf) == BLOCK  # only whole blocks go to the file system

    @precondition(lambda self: bool(self.frozen))  # an empty frozen set holds nothing to lose
    @rule()
    def freeze_twice_is_refused(self) -> None:
        with pytest.raises(RuntimeError):
            self.cache.freeze()
        assert self.cache.frozen is self.frozen

    @precondition(lambda self: self.frozen is not None)
    @rule()
    def commit(self) -> None:
        """The CP thread writes the frozen set to disk; then the cache lets it go."""
        assert self.frozen is not None
        for lun, blocks in self.frozen.items():
            for b, buf in blocks.items():
                self.disk[lun][b * BLOCK:(b + 1) * BLOCK] = buf
        self.cache.thaw()
        assert self.cache.frozen == {} and self.cache.frozen_blocks() == 0
        self.frozen = None

    @precondition(lambda self: self.frozen is not None and hasattr(BlockCache, "unfreeze"))
    @rule()
    def cp_failed(self) -> None:
        """A CP that could not commit: its blocks are dirty again, newer writes still win."""
        self.cache.unfreeze()  # type: ignore[attr-defined]
        assert self.cache.frozen == {}
        self.frozen = None

    @precondition(lambda self: self.frozen is None)
    @rule()
    def full_cp(self) -> None:
        """freeze + commit + thaw with nothing in between: the cache ends empty, disk = reads."""
        frozen = self.cache.freeze()
        for lun, blocks in frozen.items():
            for b, buf in blocks.items():
                self.disk[lun][b * BLOCK:(b + 1) * BLOCK] = buf
        self.cache.thaw()
        assert self.cache.dirty_blocks() == 0 and self.cache.frozen_blocks() == 0
        assert self.disk == self.visible

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def every_lun_reads_as_the_model(self) -> None:
        for lun in range(LUNS):
            assert self.cache.read(lun, 0, LUN_SIZE) == bytes(self.visible[lun])

    @invariant()
    def committed_plus_frozen_plus_active_is_the_model(self) -> None:
        """Layer by layer, as a takeover after the CP would see it."""
        for lun in range(LUNS):
            img = bytearray(self.disk[lun])
            for gen in (self.cache.frozen, self.cache.active):
                for b, buf in gen.get(lun, {}).items():
                    assert len(buf) == BLOCK
                    img[b * BLOCK:(b + 1) * BLOCK] = buf
            assert img == self.visible[lun]

    @invariant()
    def counters_match(self) -> None:
        assert self.cache.dirty_blocks() == sum(len(b) for b in self.cache.active.values())
        assert self.cache.frozen_blocks() == sum(len(b) for b in self.cache.frozen.values())


CacheModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockCache = CacheModel.TestCase


def test_clean_reads_go_straight_to_the_committed_state() -> None:
    calls: list[tuple[int, int, int]] = []

    def rc(lun: int, first: int, count: int) -> bytes:
        calls.append((lun, first, count))
        return b"".join(bytes([b & 0xFF]) * BLOCK for b in range(first, first + count))

    c = BlockCache(rc)
    assert c.read(0, BLOCK + SECTOR, SECTOR) == bytes([1]) * SECTOR
    assert calls == [(0, 1, 1)]
    assert c.read(1, 0, 2 * BLOCK) == bytes(BLOCK) + bytes([1]) * BLOCK
    assert calls[-1] == (1, 0, 2)


def test_a_full_block_write_never_reads_the_disk() -> None:
    writing = True

    def rc(lun: int, first: int, count: int) -> bytes:
        assert not writing, "a whole-block write must not read the old block"
        return bytes(count * BLOCK)

    c = BlockCache(rc)
    c.write(0, 3 * BLOCK, b"a" * (2 * BLOCK))
    writing = False
    assert c.read(0, 3 * BLOCK, 2 * BLOCK) == b"a" * (2 * BLOCK)
    assert c.dirty_blocks() == 2


def test_a_partial_write_after_freeze_merges_with_the_frozen_block_not_the_disk() -> None:
    disk = bytearray(b"d" * BLOCK)
    c = BlockCache(lambda lun, first, count: bytes(disk[first * BLOCK:(first + count) * BLOCK]))
    c.write(0, 0, b"f" * BLOCK)
    frozen = c.freeze()
    c.write(0, SECTOR, b"n" * SECTOR)
    assert c.read(0, 0, BLOCK) == b"f" * SECTOR + b"n" * SECTOR + b"f" * (BLOCK - 2 * SECTOR)
    assert frozen[0][0] == bytearray(b"f" * BLOCK)  # the frozen generation is not touched
    disk[:] = frozen[0][0]
    c.thaw()
    assert c.read(0, 0, BLOCK) == b"f" * SECTOR + b"n" * SECTOR + b"f" * (BLOCK - 2 * SECTOR)
