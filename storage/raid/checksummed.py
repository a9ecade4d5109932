"""A checksum table at the end of each member, so silent corruption is caught on read.

Layout of a member with ``B`` raw blocks::

    [0, D)        data blocks, full 4096 bytes each (the RAID stripe units)
    [D, B)        checksum table: 512 entries of 8 bytes per table block
                  entry = <I crc32c> <I tag>, tag = TAG_WRITTEN once the block is written

``D`` is the largest count with ``D + ceil(D / 512) <= B`` (0.2% overhead). Keeping data blocks
a full 4 KiB (rather than 4088 bytes + checksum in-block) keeps logical blocks aligned with the
LUN layer's 4 KiB blocks, which the write-anywhere file system above will want.

The crc covers the block's index then its data (``crc32c(data, crc32c(index))``), so a block
written to the wrong place (a misdirected write) fails its check too. A never-written entry
(all zero) stands for the zero block, so a fresh device verifies without initialisation.

Not atomic: a write stores the data block, then its table entry. A crash between the two leaves
a checksum mismatch, which the group resolves from redundancy like any other corruption (the
old stripe contents win, consistently). A corrupted *table* entry looks like a bad data block
whose reconstruction equals what is on disk; the group then just rewrites the entry.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from storage.checksum import crc32c
from storage.raid.crc_batch import gather_indexed_crcs, indexed_block_crcs
from storage.raid.device import BLOCK_SIZE, BlockDevice, RunData, run_bytes
from vmemu.errors import OutOfRange

ENTRY = struct.Struct("<II")
ENTRIES_PER_BLOCK = BLOCK_SIZE // ENTRY.size
TAG_WRITTEN = 0x52414944  # "RAID"
_ZERO = bytes(BLOCK_SIZE)


def data_blocks_for(nblocks: int) -> int:
    """How many data blocks fit in ``nblocks`` raw blocks alongside their checksum table."""
    d = nblocks * ENTRIES_PER_BLOCK // (ENTRIES_PER_BLOCK + 1)
    while d > 0 and d + -(-d // ENTRIES_PER_BLOCK) > nblocks:
        d -= 1
    return d


Run = tuple[int, "bytes | bytearray | memoryview | np.ndarray"]


def block_crc(i: int, data: bytes) -> int:
    return crc32c(data, crc32c(struct.pack("<Q", i)))


class ChecksummedDevice:
    """A member device seen through its checksum table."""

    def __init__(self, raw: BlockDevice) -> None:
        self.raw = raw
        self.data_blocks = data_blocks_for(raw.nblocks)

    @property
    def failed(self) -> bool:
        return self.raw.failed

    def _entry_pos(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.data_blocks:
            raise OutOfRange(f"data block {i} is past {self.data_blocks}")
        return self.data_blocks + i // ENTRIES_PER_BLOCK, (i % ENTRIES_PER_BLOCK) * ENTRY.size

    def expected_crc(self, i: int) -> int | None:
        """The stored crc of block i; None if the entry itself is garbage."""
        tb, off = self._entry_pos(i)
        crc, tag = ENTRY.unpack_from(self.raw.read_block(tb), off)
        if tag == TAG_WRITTEN:
            return crc
        if tag == 0 and crc == 0:
            return block_crc(i, _ZERO)
        return None

    def matches(self, i: int, data: bytes) -> bool:
        """Does ``data`` agree with block i's stored checksum?"""
        return self.expected_crc(i) == block_crc(i, data)

    def read_checked(self, i: int) -> tuple[bytes, bool]:
        """Block i and whether it verified (raises DeviceFailed if the device is dead)."""
        data = self.raw.read_block(i)
        return data, self.matches(i, data)

    def write_block(self, i: int, data: bytes) -> None:
        """Write data, then its checksum entry (read-modify-write of one table block)."""
        tb, off = self._entry_pos(i)
        self.raw.write_block(i, data)
        table = bytearray(self.raw.read_block(tb))
        ENTRY.pack_into(table, off, block_crc(i, data), TAG_WRITTEN)
        self.raw.write_block(tb, bytes(table))

    # -- runs: many blocks per call (the batched write path and rebuild) -------------------
    def _read_raw_run(self, first: int, count: int) -> bytes:
        read_run = getattr(self.raw, "read_run", None)
        if read_run is not None:
            return read_run(first, count)
        return b"".join(self.raw.read_block(first + k) for k in range(count))

    def _write_raw_run(self, first: int, data: RunData) -> None:
        write_run = getattr(self.raw, "write_run", None)
        if write_run is not None:
            write_run(first, data)
            return
        blocks = data if isinstance(data, (list, tuple)) else [
            data[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE] for k in range(len(data) // BLOCK_SIZE)]
        for k, b in enumerate(blocks):
            self.raw.write_block(first + k, bytes(b))

    def _table_entries(self, first: int, count: int) -> tuple[int, np.ndarray]:
        """(first table block, entries as a (n, 2) uint32 array) covering data blocks
        ``first .. first+count-1``; the array holds whole table blocks."""
        tb0 = first // ENTRIES_PER_BLOCK
        tb1 = (first + count - 1) // ENTRIES_PER_BLOCK
        raw = self._read_raw_run(self.data_blocks + tb0, tb1 - tb0 + 1)
        return tb0, np.frombuffer(raw, dtype="<u4").reshape(-1, 2).copy()

    def write_many(self, runs: Sequence[Run]) -> None:
        """Write runs of consecutive data blocks ``(first block, 4 KiB * k bytes)``.

        Data first (one raw run write per run), then every touched checksum-table block once.
        Runs must not overlap.
        """
        arrays = [np.frombuffer(run_bytes(d), dtype=np.uint8).reshape(-1, BLOCK_SIZE) for _, d in runs]
        if not arrays:
            return
        rows = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        dest = np.concatenate([np.arange(f, f + a.shape[0]) for (f, _), a in zip(runs, arrays)])
        self.write_rows(rows, np.arange(rows.shape[0]), dest)

    def write_rows(self, rows: np.ndarray, sel: np.ndarray, dest: np.ndarray) -> None:
        """Write block ``rows[sel[i]]`` to data block ``dest[i]`` for every i.

        ``rows`` is a (k, 4096) uint8 array; ``dest`` strictly increasing. Consecutive
        destinations go out as one raw run (gathered from ``rows`` without copying when the
        rows are not consecutive), then each touched table block is updated once, crcs
        computed in one numba call. Reading a table block is skipped when the batch rewrites
        all of its entries.
        """
        rows = np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, BLOCK_SIZE)
        sel = np.asarray(sel, dtype=np.int64)
        dest = np.asarray(dest, dtype=np.int64)
        if sel.size == 0:
            return
        if dest[0] < 0 or dest[-1] >= self.data_blocks:
            raise OutOfRange(f"data block {int(dest[-1])} is past {self.data_blocks}")
        if sel.size > 1 and not (np.diff(dest) > 0).all():
            raise ValueError("destinations must be strictly increasing")
        crcs = gather_indexed_crcs(rows, sel, dest)
        flat = memoryview(rows.reshape(-1))
        breaks = np.flatnonzero(np.diff(dest) != 1) + 1
        bounds = [0, *breaks.tolist(), int(dest.size)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = sel[a:b]
            lo = int(part[0])
            if b - a == 1 or (np.diff(part) == 1).all():
                data: object = flat[lo * BLOCK_SIZE:(lo + b - a) * BLOCK_SIZE]
            else:
                data = [flat[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in part.tolist()]
            self._write_raw_run(int(dest[a]), data)  # type: ignore[arg-type]
        # The table: maximal runs of touched table blocks, each read (unless fully rewritten),
        # patched in numpy and written back with one run write.
        tb = dest // ENTRIES_PER_BLOCK
        touched, counts = np.unique(tb, return_counts=True)
        tbreaks = np.flatnonzero(np.diff(touched) != 1) + 1
        tbounds = [0, *tbreaks.tolist(), int(touched.size)]
        for a, b in zip(tbounds[:-1], tbounds[1:]):
            t0, t1 = int(touched[a]), int(touched[b - 1]) + 1
            if (counts[a:b] == ENTRIES_PER_BLOCK).all():
                ent = np.zeros(((t1 - t0) * ENTRIES_PER_BLOCK, 2), dtype="<u4")
            else:
                raw = self._read_raw_run(self.data_blocks + t0, t1 - t0)
                ent = np.frombuffer(raw, dtype="<u4").reshape(-1, 2).copy()
            lo = np.searchsorted(dest, t0 * ENTRIES_PER_BLOCK)
            hi = np.searchsorted(dest, t1 * ENTRIES_PER_BLOCK)
            pos = dest[lo:hi] - t0 * ENTRIES_PER_BLOCK
            ent[pos, 0] = crcs[lo:hi]
            ent[pos, 1] = TAG_WRITTEN
            self._write_raw_run(self.data_blocks + t0, memoryview(ent.tobytes()))

    def write_run(self, first: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Consecutive data blocks from ``first``: ``write_many`` of one run."""
        self.write_many([(first, data)])

    def read_run_checked(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks ``first .. first+count-1`` as a (count, 4096) uint8 array, and a bool array
        saying which verified. Raises DeviceFailed if the device is dead."""
        if count <= 0:
            return np.zeros((0, BLOCK_SIZE), dtype=np.uint8), np.zeros(0, dtype=bool)
        if first < 0 or first + count > self.data_blocks:
            raise OutOfRange(f"data blocks [{first}, {first + count}) are past {self.data_blocks}")
        data = np.frombuffer(self._read_raw_run(first, count), dtype=np.uint8).reshape(count, BLOCK_SIZE)
        tb0, ent = self._table_entries(first, count)
        e = ent[first - tb0 * ENTRIES_PER_BLOCK:first - tb0 * ENTRIES_PER_BLOCK + count]
        got = indexed_block_crcs(data, np.arange(first, first + count))
        written = e[:, 1] == TAG_WRITTEN
        ok = written & (e[:, 0] == got)
        # A never-written entry (all zero) vouches for the zero block only.
        blank = ~written & (e[:, 0] == 0) & (e[:, 1] == 0)
        if blank.any():
            ok |= blank & ~data.any(axis=1)
        return data, ok

    def sync(self) -> None:
        sync = getattr(self.raw, "sync", None)
        if sync is not None:
            sync()
