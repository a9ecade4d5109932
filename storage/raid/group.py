"""RaidGroup: RAID-4 or RAID-1 over checksummed members, degraded mode, rebuild, scrub.

Layouts
    RAID-4: members ``0..N-1`` hold data, member ``N`` holds parity. Stripe ``s`` is block
    ``s`` of every member; logical block ``L`` lives on member ``L % N`` at stripe ``L // N``,
    so consecutive blocks spread over the data disks. Parity is the XOR of the stripe's data.
    RAID-1: every member holds every block; logical block ``L`` is stripe ``L``.

Trust: every member block carries a crc32c (``checksummed.py``). A block that fails its check
is treated exactly like a block on a failed disk: reconstructed from the rest of the stripe,
and the reconstruction is accepted only if it matches the block's stored checksum (or equals
what is on disk, which means only the checksum entry was damaged). Anything else raises
:class:`BlockUnrecoverable`; more failed members than the layout survives raises
:class:`RaidOffline`. The group never returns data it cannot vouch for -- with the one
exception of the write hole below.

Writes are *reconstruct-writes*: a RAID-4 block write reads the whole stripe (verifying every
block), substitutes the new block and writes data then parity = XOR(data). It costs N-1 reads
instead of read-modify-write's 2, but parity is always derived from verified data, so a stale
parity block is healed by the next write to its stripe instead of being propagated.

The write hole (honest version): there is no journal. A crash between the data write and the
parity write (the ``crash_hook("after_data", stripe)`` fault-injection point) leaves a stripe
whose data verifies but whose parity is stale. ``scrub()`` finds it as a parity mismatch and
recomputes parity from the verified data; recovery after a crash must therefore scrub before
trusting parity. If a disk fails *before* that scrub, a reconstruction on that stripe can be
wrong and undetectable (the failed disk's checksums are gone with it) -- the classic RAID-4 hole,
which a later per-stripe intent log (or the WAFL layer never overwriting in place) would close.
A crash between a data block and its checksum entry is safe: it reads as corruption and the old
stripe contents are reconstructed from parity.

Batched writes (``write_blocks``): stripes the batch covers completely are written as full
stripes -- no reads at all, parity computed with numpy over all of them at once, each member's
consecutive stripes written with one run write and its checksum-table blocks updated once.
Stripes the batch covers partly take the reconstruct-write path above, block by block. A
full-stripe write never reads or depends on the stripe's old contents, so a crash in the middle
of one (data written, parity not: ``crash_hook("after_data", s)`` is still called per stripe,
after all the batch's data and before any of its parity) can only leave stale parity on a stripe
whose every block was just rewritten. If the writer only full-stripe-writes stripes that hold no
live data -- what WAFL's stripe-aligned allocator does for a consistency point -- the write hole
cannot reach live data: until the root that references those blocks is committed (after a sync
barrier), nothing depends on them.

Member state is in memory only (which members are failed or rebuilding); persisting it belongs
to whoever wires this into the D-module.
"""

from __future__ import annotations

import enum
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from dataclasses import dataclass, field

import numpy as np

from storage.raid.checksummed import ChecksummedDevice
from storage.raid.device import BLOCK_SIZE, BlockDevice
from storage.raid.errors import BlockUnrecoverable, DeviceFailed, RaidOffline
from storage.raid.parity import gather_xor, xor_blocks
from vmemu.errors import InvalidState, OutOfRange


F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    """Hold the group's lock: writes (data then parity) and reconstructions of one stripe by
    different threads (a CP thread, the serving loop) must not interleave."""
    @functools.wraps(fn)
    def wrapper(self: "RaidGroup", *args: Any, **kw: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kw)
    return wrapper  # type: ignore[return-value]


class Layout(enum.Enum):
    RAID4 = "raid4"
    RAID1 = "raid1"


class MemberState(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    REBUILDING = "rebuilding"  # valid only below the rebuild cursor


_OK, _BAD, _MISSING = "ok", "bad", "missing"
REBUILD_CHUNK = 256  # stripes per bulk rebuild read: 1 MiB per member (larger measured no faster)


@dataclass(frozen=True)
class RebuildProgress:
    member: int
    done: int
    total: int

    @property
    def complete(self) -> bool:
        return self.done >= self.total


@dataclass
class ScrubReport:
    stripes: int = 0
    checksum_errors: int = 0
    parity_mismatches: int = 0
    mirror_mismatches: int = 0
    repaired_data: int = 0
    repaired_parity: int = 0
    degraded_stripes: int = 0
    unrecoverable: list[int] = field(default_factory=list)


@dataclass
class _Read:
    status: str
    data: bytes | None


class RaidGroup:
    """A redundant array of block devices presenting ``nblocks`` logical 4 KiB blocks."""

    def __init__(self, layout: Layout, devices: Sequence[BlockDevice]) -> None:
        minimum = 2
        if len(devices) < minimum:
            raise ValueError(f"{layout.value} needs at least {minimum} devices")
        self.layout = layout
        self.members = [ChecksummedDevice(d) for d in devices]
        self.stripes = min(m.data_blocks for m in self.members)
        self.state = [MemberState.FAILED if d.failed else MemberState.OK for d in devices]
        self.rebuild_member: int | None = None
        self.rebuild_cursor = 0
        self.crash_hook: Callable[[str, int], None] | None = None
        # Told (with the member's index) when a member turns failed, whatever failed it: an
        # I/O error in a CP, a read, a rebuild, or an administrator. The aggregate records it
        # durably, so that a restart or a takeover never trusts the member's stale blocks.
        self.on_member_failed: Callable[[int], None] | None = None
        self._offline = False
        self._sync_pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        # Foreground reads that found a bad block: what status and events report.
        self.read_errors = {"checksum": 0, "repaired": 0, "reconstructed": 0, "unrecoverable": 0}
        self._update_offline()

    # -- geometry ------------------------------------------------------------------------
    @property
    def ndata(self) -> int:
        return len(self.members) - 1 if self.layout is Layout.RAID4 else 1

    @property
    def parity_index(self) -> int | None:
        return len(self.members) - 1 if self.layout is Layout.RAID4 else None

    @property
    def nblocks(self) -> int:
        return self.stripes * self.ndata

    @property
    def offline(self) -> bool:
        return self._offline

    @property
    def degraded(self) -> bool:
        return any(s is not MemberState.OK for s in self.state)

    def _locate(self, lba: int) -> tuple[int, int]:
        if not 0 <= lba < self.nblocks:
            raise OutOfRange(f"block {lba} is past the end of a {self.nblocks}-block group")
        if self.layout is Layout.RAID4:
            return lba % self.ndata, lba // self.ndata
        return 0, lba

    # -- member state ----------------------------------------------------------------------
    def _update_offline(self) -> None:
        missing = sum(s is not MemberState.OK for s in self.state)
        if self.layout is Layout.RAID4:
            lost = missing >= 2
        else:
            lost = missing >= len(self.members)
        if lost:
            self._offline = True  # sticky: a lost group needs restore, not a rebuild

    def _guard(self) -> None:
        if self._offline:
            gone = [i for i, s in enumerate(self.state) if s is not MemberState.OK]
            raise RaidOffline(f"{self.layout.value} group is offline: members {gone} are failed "
                              f"or not yet rebuilt, more than it can survive")

    def _mark_failed(self, m: int) -> None:
        was = self.state[m]
        self.state[m] = MemberState.FAILED
        if self.rebuild_member == m:
            self.rebuild_member = None
        self._update_offline()
        if was is not MemberState.FAILED and self.on_member_failed is not None:
            self.on_member_failed(m)

    @_locked
    def fail_member(self, m: int) -> None:
        """Fail member m (fault injection at the group level: the device dies)."""
        self.members[m].raw.fail()
        self._mark_failed(m)

    def _available(self, m: int, stripe: int) -> bool:
        st = self.state[m]
        if st is MemberState.OK:
            return True
        return st is MemberState.REBUILDING and stripe < self.rebuild_cursor

    def _read(self, m: int, stripe: int) -> _Read:
        if not self._available(m, stripe):
            return _Read(_MISSING, None)
        try:
            data, ok = self.members[m].read_checked(stripe)
        except DeviceFailed:
            self._mark_failed(m)
            return _Read(_MISSING, None)
        return _Read(_OK if ok else _BAD, data)

    def _write(self, m: int, stripe: int, data: bytes) -> bool:
        if not self._available(m, stripe):
            return False
        try:
            self.members[m].write_block(stripe, data)
        except DeviceFailed:
            self._mark_failed(m)
            return False
        return True

    def _gather(self, stripe: int) -> list[_Read]:
        return [self._read(m, stripe) for m in range(len(self.members))]

    def _unrecoverable(self, stripe: int, why: str) -> Exception:
        if self._offline:
            return RaidOffline(f"{self.layout.value} group went offline during I/O to "
                               f"stripe {stripe}")
        return BlockUnrecoverable(f"stripe {stripe}: {why}")

    def _solve(self, stripe: int, target: int, g: list[_Read]) -> bytes:
        """Contents member ``target`` should hold at ``stripe``, from the other members."""
        others = [r for m, r in enumerate(g) if m != target]
        if self.layout is Layout.RAID4:
            if any(r.status != _OK for r in others):
                raise self._unrecoverable(stripe, f"cannot rebuild member {target}: another "
                                                  f"block of the stripe is also unreadable")
            value = xor_blocks(r.data for r in others)  # type: ignore[misc]
        else:
            good = [r.data for r in others if r.status == _OK]
            if not good:
                raise self._unrecoverable(stripe, "no mirror holds a verified copy")
            value = good[0]  # type: ignore[assignment]
        mine = g[target]
        if mine.status == _BAD and target != self.parity_index:
            # Accept a reconstruction only if the member's own checksum vouches for it, or it
            # equals what is on disk (then only the checksum entry was damaged).
            if not (value == mine.data or self.members[target].matches(stripe, value)):
                raise BlockUnrecoverable(f"stripe {stripe}: member {target} is corrupt and its "
                                         f"reconstruction does not match its checksum")
        return value  # type: ignore[return-value]

    # -- I/O -------------------------------------------------------------------------------
    def read_block(self, lba: int) -> bytes:
        """Logical block ``lba``: verified, or reconstructed and repaired, or an error."""
        self._guard()
        d, s = self._locate(lba)
        if self.layout is Layout.RAID1:
            return self._read_mirror(s)
        first = self._read(d, s)
        if first.status == _OK:
            return first.data  # type: ignore[return-value]
        # Reconstruction reads the stripe's other blocks and its parity: never halfway through
        # a write to the same stripe by another thread (the CP thread's data-then-parity).
        with self._lock:
            self._guard()
            g = self._gather(s)
            try:
                value = self._solve(s, d, g)
            except BlockUnrecoverable:
                self.read_errors["unrecoverable"] += 1
                raise
            if g[d].status == _BAD:
                self.read_errors["checksum"] += 1
                self._write(d, s, value)  # repair on read
                self.read_errors["repaired"] += 1
            else:
                self.read_errors["reconstructed"] += 1  # from parity: the member is failed
            return value

    def _read_mirror(self, s: int) -> bytes:
        g: list[_Read] = []
        for m in range(len(self.members)):
            r = self._read(m, s)
            g.append(r)
            if r.status == _OK:
                for k, bad in enumerate(g):
                    if bad.status == _BAD:
                        self.read_errors["checksum"] += 1
                        self._write(k, s, r.data)  # type: ignore[arg-type]
                        self.read_errors["repaired"] += 1
                return r.data  # type: ignore[return-value]
        self._guard()
        self.read_errors["unrecoverable"] += 1
        raise BlockUnrecoverable(f"stripe {s}: no mirror holds a verified copy")

    @_locked
    def write_block(self, lba: int, data: bytes) -> None:
        """Write logical block ``lba`` keeping the stripe's redundancy consistent."""
        if len(data) != BLOCK_SIZE:
            raise ValueError(f"a block is {BLOCK_SIZE} bytes, got {len(data)}")
        self._guard()
        d, s = self._locate(lba)
        if self.layout is Layout.RAID1:
            written = 0
            for m in range(len(self.members)):
                if self._write(m, s, data):
                    written += 1
                    if written == 1 and self.crash_hook is not None:
                        self.crash_hook("after_data", s)
            if not written:
                self._guard()
                raise self._unrecoverable(s, "no mirror accepted the write")
            return
        p = self.parity_index
        assert p is not None
        g = self._gather(s)
        self._guard()
        needed_bad = [m for m in range(self.ndata) if m != d and g[m].status != _OK]
        data_blocks: list[bytes] = [b"" for _ in range(self.ndata)]
        repair: int | None = None
        if len(needed_bad) > 1 or (needed_bad and any(
                g[m].status != _OK for m in range(len(g)) if m != needed_bad[0])):
            raise self._unrecoverable(s, "too many unreadable blocks to keep parity consistent")
        for m in range(self.ndata):
            if m == d:
                data_blocks[m] = data
            elif m in needed_bad:
                data_blocks[m] = self._solve(s, m, g)
                if g[m].status == _BAD:
                    repair = m
            else:
                data_blocks[m] = g[m].data  # type: ignore[assignment]
        parity = xor_blocks(data_blocks)
        self._write(d, s, data)
        if self.crash_hook is not None:
            self.crash_hook("after_data", s)
        self._write(p, s, parity)
        if repair is not None:
            self._write(repair, s, data_blocks[repair])
        self._guard()

    @_locked
    def write_stripe(self, stripe: int, blocks: Sequence[bytes]) -> None:
        """Full-stripe write: logical blocks ``stripe*N .. stripe*N+N-1`` in one go.

        Needs no reads (parity comes from the new data alone), so it is the cheap path a
        write-anywhere file system should use, and the only way to make a stripe whole again
        once it has lost two blocks.
        """
        self._guard()
        if not 0 <= stripe < self.stripes:
            raise OutOfRange(f"stripe {stripe} is past the end of a {self.stripes}-stripe group")
        if len(blocks) != self.ndata or any(len(b) != BLOCK_SIZE for b in blocks):
            raise ValueError(f"a stripe is {self.ndata} blocks of {BLOCK_SIZE} bytes")
        if self.layout is Layout.RAID1:
            self.write_block(stripe, blocks[0])
            return
        for m, b in enumerate(blocks):
            self._write(m, stripe, b)
        if self.crash_hook is not None:
            self.crash_hook("after_data", stripe)
        self._write(len(blocks), stripe, xor_blocks(blocks))
        self._guard()

    @_locked
    def write_blocks(self, items: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write many logical blocks ``(lba, 4 KiB data)``; a later duplicate lba wins.

        Stripes fully covered by the batch are written as full stripes without reading (see
        the module docstring); the rest go through ``write_block``. Works degraded: a failed
        member is skipped (parity is still written, so its blocks stay reconstructible) and a
        rebuilding member is written below its rebuild cursor only.
        """
        self._guard()
        if not items:
            return
        latest: dict[int, bytes | bytearray | memoryview] = {}
        for lba, data in items:
            if len(data) != BLOCK_SIZE:
                raise ValueError(f"a block is {BLOCK_SIZE} bytes, got {len(data)}")
            latest[lba] = data
        lbas = np.fromiter(latest.keys(), dtype=np.int64, count=len(latest))
        rows = np.frombuffer(b"".join(latest.values()), dtype=np.uint8).reshape(-1, BLOCK_SIZE)
        self.write_block_array(lbas, rows)

    @_locked
    def write_block_array(self, lbas: np.ndarray, rows: np.ndarray) -> None:
        """``write_blocks`` for data already in one array: block ``rows[i]`` goes to
        ``lbas[i]`` (lbas unique). The zero-copy entry point for a caller that stages a
        whole batch contiguously (WAFL's consistency point)."""
        self._guard()
        lbas = np.asarray(lbas, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.uint8).reshape(-1, BLOCK_SIZE)
        if lbas.size != rows.shape[0]:
            raise ValueError(f"{lbas.size} block numbers for {rows.shape[0]} blocks")
        if lbas.size == 0:
            return
        if lbas.min() < 0 or lbas.max() >= self.nblocks:
            bad = int(lbas[(lbas < 0) | (lbas >= self.nblocks)][0])
            raise OutOfRange(f"block {bad} is past the end of a {self.nblocks}-block group")
        if np.unique(lbas).size != lbas.size:
            raise ValueError("write_block_array needs distinct block numbers")
        n = self.ndata
        stripes = lbas // n
        uniq, counts = np.unique(stripes, return_counts=True)
        full = uniq[counts == n]
        is_full = np.isin(stripes, full) if full.size else np.zeros(lbas.size, dtype=bool)
        if full.size:
            sel = np.flatnonzero(is_full)
            # idx[m, i]: the row holding member m's block of full stripe full[i].
            order = sel[np.lexsort((stripes[sel], lbas[sel] % n))]
            self._write_full_stripes(full, rows, order.reshape(n, full.size))
        for i in np.flatnonzero(~is_full).tolist():
            self.write_block(int(lbas[i]), rows[i].tobytes())
        self._guard()

    def _runs(self, stripes: np.ndarray) -> list[tuple[int, int]]:
        """(start index, end index) into sorted ``stripes`` of each run of consecutive ones."""
        breaks = np.flatnonzero(np.diff(stripes) != 1) + 1
        bounds = [0, *breaks.tolist(), int(stripes.size)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _write_member(self, m: int, stripes: np.ndarray, rows: np.ndarray, sel: np.ndarray) -> None:
        """Write ``rows[sel[i]]`` to member m at ``stripes[i]``, skipping what m cannot take."""
        st = self.state[m]
        if st is MemberState.FAILED:
            return
        if st is MemberState.REBUILDING:
            k = int(np.searchsorted(stripes, self.rebuild_cursor))  # stripes >= cursor wait
            stripes, sel = stripes[:k], sel[:k]
        if not stripes.size:
            return
        try:
            self.members[m].write_rows(rows, sel, stripes)
        except DeviceFailed:
            self._mark_failed(m)

    def _write_full_stripes(self, stripes: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> None:
        """Full-stripe writes: ``rows[idx[m, i]]`` is member m's block of ``stripes[i]``."""
        if self.layout is Layout.RAID1:
            # Like write_block: the hook fires once the first mirror holds the data.
            first_done = False
            for m in range(len(self.members)):
                if self.state[m] is MemberState.FAILED:
                    continue
                self._write_member(m, stripes, rows, idx[0])
                if not first_done and self.state[m] is not MemberState.FAILED:
                    first_done = True
                    self._hooks(stripes)
            if not first_done:
                self._guard()
                raise self._unrecoverable(int(stripes[0]), "no mirror accepted the write")
            return
        p = self.parity_index
        assert p is not None
        parity = gather_xor(rows, idx)
        for m in range(self.ndata):
            self._write_member(m, stripes, rows, idx[m])
        self._hooks(stripes)
        self._write_member(p, stripes, parity, np.arange(stripes.size))

    def _hooks(self, stripes: np.ndarray) -> None:
        if self.crash_hook is not None:
            for s in stripes.tolist():
                self.crash_hook("after_data", s)

    def sync(self) -> None:
        """Flush every live member to stable storage (a barrier for the layer above).

        The members are flushed at once, one thread each: fdatasync releases the GIL and the
        disks are independent, so a CP waits for the slowest member rather than their sum.
        """
        live = [m for m in range(len(self.members)) if self.state[m] is not MemberState.FAILED]

        def flush(m: int) -> bool:
            try:
                self.members[m].sync()
                return True
            except DeviceFailed:
                return False

        if len(live) > 1:
            if self._sync_pool is None:
                self._sync_pool = ThreadPoolExecutor(max_workers=len(self.members),
                                                     thread_name_prefix="raid-sync")
            results = list(self._sync_pool.map(flush, live))
        else:
            results = [flush(m) for m in live]
        for m, ok in zip(live, results):
            if not ok:
                self._mark_failed(m)
        self._guard()

    # -- replacement and rebuild -----------------------------------------------------------
    @_locked
    def replace(self, m: int, device: BlockDevice) -> None:
        """Put a new device in place of failed member m; ``rebuild_step`` then fills it."""
        if self.state[m] is not MemberState.FAILED:
            raise InvalidState(f"member {m} is {self.state[m].value}; only a failed member "
                               f"can be replaced")
        if self.rebuild_member is not None:
            raise InvalidState(f"member {self.rebuild_member} is still rebuilding")
        new = ChecksummedDevice(device)
        if new.data_blocks < self.stripes:
            raise ValueError(f"replacement holds {new.data_blocks} blocks; the group needs "
                             f"{self.stripes}")
        self._guard()
        self.members[m] = new
        self.state[m] = MemberState.REBUILDING
        self.rebuild_member = m
        self.rebuild_cursor = 0

    @_locked
    def rebuild_step(self, max_stripes: int) -> RebuildProgress:
        """Reconstruct up to ``max_stripes`` stripes onto the replacement.

        Stripes below the cursor are live on the new member (reads use them, writes update
        them); stripes above it are served from the others and copied later, so foreground
        I/O keeps working between steps. A stripe that cannot be reconstructed raises
        ``BlockUnrecoverable`` and the cursor stays on it.
        """
        m = self.rebuild_member
        if m is None:
            raise InvalidState("no member is rebuilding")
        self._guard()
        end = min(self.stripes, self.rebuild_cursor + max_stripes)
        while self.rebuild_cursor < end:
            # Fast path: a chunk of stripes read as runs from every other member, verified in
            # bulk; only a chunk with something wrong in it goes stripe by stripe below.
            if self._rebuild_chunk(m, min(end, self.rebuild_cursor + REBUILD_CHUNK)):
                continue
            s = self.rebuild_cursor
            value = self._solve(s, m, self._gather(s))
            try:
                self.members[m].write_block(s, value)
            except DeviceFailed:
                self._mark_failed(m)
                self._guard()
                raise
            self.rebuild_cursor += 1
        progress = RebuildProgress(m, self.rebuild_cursor, self.stripes)
        if progress.complete:
            self.state[m] = MemberState.OK
            self.rebuild_member = None
        return progress

    def _rebuild_chunk(self, m: int, end: int) -> bool:
        """Rebuild stripes [cursor, end) onto member m if every source block verifies.

        Returns False (having written nothing) when a source is bad or missing, so the caller
        takes the per-stripe path, which repairs or reports exactly as before.
        """
        start = self.rebuild_cursor
        count = end - start
        sources = [k for k in range(len(self.members)) if k != m]
        if any(self.state[k] is not MemberState.OK for k in sources):
            return False
        if self.layout is Layout.RAID1:
            sources = sources[:1]
        acc: np.ndarray | None = None
        for k in sources:
            try:
                data, ok = self.members[k].read_run_checked(start, count)
            except DeviceFailed:
                self._mark_failed(k)
                self._guard()
                return False
            if not ok.all():
                return False
            words = data.view(np.uint64)
            acc = words.copy() if acc is None else np.bitwise_xor(acc, words, out=acc)
        assert acc is not None
        try:
            self.members[m].write_run(start, acc.view(np.uint8))
        except DeviceFailed:
            self._mark_failed(m)
            self._guard()
            raise
        self.rebuild_cursor = end
        return True

    # -- scrub -----------------------------------------------------------------------------
    @_locked
    def scrub(self, start: int = 0, count: int | None = None) -> ScrubReport:
        """Verify checksums and parity (or mirror agreement) and repair what can be."""
        self._guard()
        end = self.stripes if count is None else min(self.stripes, start + count)
        report = ScrubReport()
        for s in range(start, end):
            report.stripes += 1
            g = self._gather(s)
            if self.layout is Layout.RAID4:
                self._scrub_parity_stripe(s, g, report)
            else:
                self._scrub_mirror_stripe(s, g, report)
        return report

    def _scrub_parity_stripe(self, s: int, g: list[_Read], report: ScrubReport) -> None:
        p = self.parity_index
        bad = [m for m, r in enumerate(g) if r.status == _BAD]
        missing = [m for m, r in enumerate(g) if r.status == _MISSING]
        report.checksum_errors += len(bad)
        if missing:
            report.degraded_stripes += 1
        if not bad and not missing:
            parity = xor_blocks(r.data for r in g[:-1])  # type: ignore[misc]
            if parity != g[p].data:
                report.parity_mismatches += 1
                if self._write(p, s, parity):  # type: ignore[arg-type]
                    report.repaired_parity += 1
            return
        if len(bad) + len(missing) > 1:
            if bad:
                report.unrecoverable.append(s)
            return
        if bad:
            m = bad[0]
            try:
                value = self._solve(s, m, g)
            except BlockUnrecoverable:
                report.unrecoverable.append(s)
                return
            if self._write(m, s, value):
                if m == p:
                    report.repaired_parity += 1
                else:
                    report.repaired_data += 1

    def _scrub_mirror_stripe(self, s: int, g: list[_Read], report: ScrubReport) -> None:
        good = [r.data for r in g if r.status == _OK]
        report.checksum_errors += sum(r.status == _BAD for r in g)
        if any(r.status == _MISSING for r in g):
            report.degraded_stripes += 1
        if not good:
            if any(r.status == _BAD for r in g):
                report.unrecoverable.append(s)
            return
        ref = good[0]
        assert ref is not None
        for m, r in enumerate(g):
            if r.status == _BAD:
                if self._write(m, s, ref):
                    report.repaired_data += 1
            elif r.status == _OK and r.data != ref:
                # Both copies verify but differ: a mirror write torn by a crash. The
                # lowest-numbered copy wins, consistently.
                report.mirror_mismatches += 1
                self._write(m, s, ref)
