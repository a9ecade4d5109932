"""File-backed disks (epoch fencing, the applied map) and LUNs (the dirty-block cache)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from storage import disk as disk_mod
from storage.disk import HEADER, MAX_APPLIED, Disk, disk_path, stamp_epoch
from storage.lun import BLOCK, MAX_IO, Lun
from vmemu.errors import BadRequest, Fenced, OutOfRange

SIZE = 2 * 1024 * 1024


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = disk_path(tmp_path, 1, 0)
    Disk.create(p, 1, 0, SIZE)
    return p


@pytest.fixture
def disk(path: Path):  # type: ignore[no-untyped-def]
    d = Disk.open(path, 0)
    yield d
    try:
        d.close()
    except (OSError, ValueError):
        pass


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


# -- Disk --------------------------------------------------------------------------------------
def test_create_makes_a_sparse_image_that_opens_with_its_identity(tmp_path: Path) -> None:
    p = disk_path(tmp_path, 3, 1)
    assert p == tmp_path / "node3" / "disk1.img"
    Disk.create(p, 3, 1, SIZE)
    assert p.stat().st_size == HEADER + SIZE
    assert p.stat().st_blocks * 512 < SIZE  # only the header was written
    d = Disk.open(p, 0)
    try:
        assert (d.node_index, d.disk_index, d.size, d.epoch) == (3, 1, SIZE, 0)
        assert d.read(0, 4096) == bytes(4096)
        assert d.applied() == {}
    finally:
        d.close()


def test_create_refuses_to_overwrite_an_existing_disk(path: Path) -> None:
    with pytest.raises(FileExistsError):
        Disk.create(path, 1, 0, SIZE)


def test_open_of_a_file_that_is_not_a_disk_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "junk.img"
    p.write_bytes(b"x" * 8192)
    with pytest.raises(ValueError, match="not a vmemu disk"):
        Disk.open(p, 0)


def test_write_then_read_round_trips_at_any_byte_offset(disk: Disk) -> None:
    data = pattern(10_000)
    disk.write(12_345, data)
    assert disk.read(12_345, len(data)) == data
    assert disk.read(12_344, 1) == b"\x00"


def test_stamp_epoch_fences_the_holder_writes_but_reads_still_work(path: Path, disk: Disk) -> None:
    disk.write(0, b"before")
    assert stamp_epoch(path) == 1
    with pytest.raises(Fenced, match="epoch 1"):
        disk.write(0, b"after!")
    with pytest.raises(Fenced):
        disk.set_applied({1: 1})
    with pytest.raises(Fenced):
        disk.data_array()
    assert disk.read(0, 6) == b"before"
    successor = Disk.open(path, 1)
    try:
        successor.write(0, b"theirs")
        assert disk.read(0, 6) == b"theirs"
    finally:
        successor.close()


def test_open_with_a_stale_epoch_is_fenced(path: Path) -> None:
    stamp_epoch(path)
    stamp_epoch(path)
    with pytest.raises(Fenced):
        Disk.open(path, 1)
    Disk.open(path, 2).close()


def fds_open_on(path: Path) -> list[str]:
    gc.collect()  # a dropped mmap object closes its own duplicate descriptor
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("case", ["not_a_disk", "stale_epoch"])
def test_refused_open_leaves_no_descriptor_open(tmp_path: Path, case: str) -> None:
    p = tmp_path / "d.img"
    if case == "not_a_disk":
        p.write_bytes(b"x" * 8192)
    else:
        Disk.create(p, 1, 0, SIZE)
        stamp_epoch(p)
    with pytest.raises((ValueError, Fenced)):
        Disk.open(p, 0)
    assert fds_open_on(p) == []


def test_closed_disk_leaves_no_descriptor_open(path: Path) -> None:
    Disk.open(path, 0).close()
    assert fds_open_on(path) == []


def test_applied_map_round_trips_with_large_region_ids(disk: Disk, path: Path) -> None:
    applied = {(1 << 62) | 1: 17, 0x1234: 0, 5: 2**40}
    disk.set_applied(applied)
    assert disk.applied() == applied
    reopened = Disk.open(path, 0)
    try:
        assert reopened.applied() == applied  # durable, in the header
    finally:
        reopened.close()


def test_applied_map_keeps_only_the_most_recent_entries(disk: Disk) -> None:
    applied = {r: r * 10 for r in range(1, MAX_APPLIED + 5)}
    disk.set_applied(applied)
    assert list(disk.applied()) == list(range(5, MAX_APPLIED + 5))


@pytest.mark.parametrize("offset,length", [(SIZE - 10, 11), (-1, 1), (SIZE, 1), (0, SIZE + 1)])
def test_out_of_range_read_and_write_raise_and_write_nothing(disk: Disk, offset: int,
                                                             length: int) -> None:
    with pytest.raises(OutOfRange):
        disk.read(offset, length)
    with pytest.raises(OutOfRange):
        disk.write(offset, b"\xff" * length)
    assert disk.read(SIZE - 4096, 4096) == bytes(4096)
    assert disk.read(0, 4096) == bytes(4096)


def test_negative_read_length_is_out_of_range(disk: Disk) -> None:
    with pytest.raises(OutOfRange):
        disk.read(0, -1)


def test_data_array_writes_land_in_the_data_area_not_the_header(disk: Disk) -> None:
    arr = disk.data_array()
    assert arr.shape == (SIZE,)
    arr[0:5] = list(b"hello")
    arr.flush()
    assert disk.read(0, 5) == b"hello"
    assert os.pread(disk.fd, 8, 0) == disk_mod.MAGIC
    del arr


# -- Lun ---------------------------------------------------------------------------------------
@pytest.fixture
def lun(disk: Disk) -> Lun:
    return Lun(1, 0, disk)


def test_partial_block_writes_merge_with_the_block_on_disk(lun: Lun, disk: Disk) -> None:
    disk.write(0, b"\xaa" * BLOCK)
    lun.write_cached(512, b"\x01" * 512)
    lun.write_cached(3584, b"\x02" * 512)
    want = b"\xaa" * 512 + b"\x01" * 512 + b"\xaa" * 2560 + b"\x02" * 512
    assert lun.read(0, BLOCK) == want
    assert list(lun.dirty) == [0]
    assert disk.read(0, BLOCK) == b"\xaa" * BLOCK  # not written yet


def test_reads_see_dirty_data_before_flush_across_block_boundaries(lun: Lun, disk: Disk) -> None:
    disk.write(0, pattern(4 * BLOCK, 9))
    data = pattern(BLOCK + 1024, 3)
    lun.write_cached(BLOCK - 512, data)  # spans blocks 0, 1 and 2
    assert sorted(lun.dirty) == [0, 1, 2]
    model = bytearray(pattern(4 * BLOCK, 9))
    model[BLOCK - 512:BLOCK - 512 + len(data)] = data
    assert lun.read(0, 4 * BLOCK) == bytes(model)
    assert lun.read(BLOCK, 512) == bytes(model[BLOCK:BLOCK + 512])
    assert lun.read(3 * BLOCK, BLOCK) == bytes(model[3 * BLOCK:])  # clean block: from disk
    assert disk.read(0, 4 * BLOCK) == pattern(4 * BLOCK, 9)


def test_flush_dirty_writes_coalesced_runs_then_the_disk_holds_the_data(
        lun: Lun, disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = disk.write
    monkeypatch.setattr(disk, "write", lambda off, data: (calls.append((off, len(data))),
                                                          real(off, data))[1])
    blocks = [0, 1, 2, 5, 6, 9] + list(range(20, 320))  # the last run is longer than 256
    for b in blocks:
        lun.write_cached(b * BLOCK, bytes([b % 250 + 1]) * BLOCK)
    assert lun.flush_dirty() == len(blocks)
    assert calls == [(0, 3 * BLOCK), (5 * BLOCK, 2 * BLOCK), (9 * BLOCK, BLOCK),
                     (20 * BLOCK, 256 * BLOCK), (276 * BLOCK, 44 * BLOCK)]
    assert lun.dirty == {}
    for b in blocks:
        assert disk.read(b * BLOCK, BLOCK) == bytes([b % 250 + 1]) * BLOCK
    assert disk.read(3 * BLOCK, 2 * BLOCK) == bytes(2 * BLOCK)
    assert lun.flush_dirty() == 0


def test_flush_of_a_fenced_lun_raises_fenced_and_keeps_the_disk(lun: Lun, disk: Disk,
                                                                path: Path) -> None:
    lun.write_cached(0, b"\x01" * BLOCK)
    stamp_epoch(path)
    with pytest.raises(Fenced):
        lun.flush_dirty()
    assert disk.read(0, BLOCK) == bytes(BLOCK)


@pytest.mark.parametrize("offset,length,error", [
    (1, 512, BadRequest), (512, 100, BadRequest), (0, 0, BadRequest),
    (0, MAX_IO + 512, BadRequest), (-512, 512, OutOfRange), (SIZE, 512, OutOfRange),
    (SIZE - 512, 1024, OutOfRange)])
def test_bad_alignment_length_or_offset_is_refused_and_changes_nothing(
        lun: Lun, disk: Disk, offset: int, length: int, error: type) -> None:
    lun.write_cached(0, b"\x07" * BLOCK)
    with pytest.raises(error):
        lun.check(offset, length)
    with pytest.raises(error):
        lun.read(offset, length)
    assert list(lun.dirty) == [0] and lun.read(0, 512) == b"\x07" * 512
    assert disk.read(0, BLOCK) == bytes(BLOCK)


# -- path resolution and the block-device options, on plain files -----------------------------
def test_open_path_of_an_unattached_disk_is_its_image(path: Path, tmp_path: Path) -> None:
    assert disk_mod.open_path(tmp_path, 1, 0) == path
    assert disk_mod.open_path(tmp_path, 9, 9) == disk_path(tmp_path, 9, 9)  # missing: as is


def test_a_file_disk_never_uses_o_direct_and_stamps_in_place(path: Path) -> None:
    d = Disk.open(path, 0, direct=True)
    try:
        assert d.direct_fd is None and d.path == path
        d.write(0, pattern(8192))
        assert d.read(0, 8192) == pattern(8192)
        assert stamp_epoch(path) == 1
        assert d.current_epoch() == 1
    finally:
        d.close()
    assert fds_open_on(path) == []
