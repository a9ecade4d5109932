"""Disk headers read back as untrusted bytes: a typed error naming the file, nothing written."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest

from storage.disk import (EPOCH_LIMIT, HEADER, MAX_APPLIED, OFF_APPLIED, OFF_APPLIED_LEN, Disk,
                          disk_path, parse_header, stamp_epoch)
from vmemu.errors import CorruptDisk

SIZE = 1 << 20


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = disk_path(tmp_path, 1, 0)
    Disk.create(p, 1, 0, SIZE)
    return p


def poke(p: Path, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


def applied_raw(obj: object) -> bytes:
    raw = msgpack.packb(obj)
    return struct.pack("<I", len(raw)) + raw


def test_a_sound_header_parses_with_its_fields(path: Path) -> None:
    d = Disk.open(path, 0, node=1, index=0)
    try:
        d.set_applied({7: 3, (1 << 62) | 5: 0})
    finally:
        d.close()
    h = parse_header(path.read_bytes()[:HEADER], str(path), path.stat().st_size, 1, 0)
    assert (h.node_index, h.disk_index, h.size, h.epoch) == (1, 0, SIZE, 0)
    assert h.applied == {7: 3, (1 << 62) | 5: 0}


@pytest.mark.parametrize("offset,data,reason", [
    (0, b"VMDISK02", "bad magic"),
    (8, struct.pack("<I", 2), "unknown version 2"),
    (12, struct.pack("<I", 3), "header says node3"),
    (16, struct.pack("<I", 1), "header says disk 1"),
    (24, struct.pack("<Q", 0), "data size 0"),
    (24, struct.pack("<Q", SIZE + 100), "512-byte multiple"),
    (24, struct.pack("<Q", 2 * SIZE), "truncated"),
    (32, struct.pack("<Q", EPOCH_LIMIT), "epoch .* absurd"),
    (OFF_APPLIED_LEN, struct.pack("<I", HEADER), "does not fit"),
    (OFF_APPLIED_LEN, struct.pack("<I", 3) + b"\xc1\xc1\xc1", "does not parse"),
    (OFF_APPLIED_LEN, applied_raw([1, 2]), "not a map"),
    (OFF_APPLIED_LEN, applied_raw({i + 1: i for i in range(MAX_APPLIED + 1)}), "applied map"),
    (OFF_APPLIED_LEN, applied_raw({"r": 1}), "region -> seq"),
    (OFF_APPLIED_LEN, applied_raw({1: -1}), "region -> seq"),
    (OFF_APPLIED_LEN, applied_raw({1: 1.5}), "region -> seq"),
    (OFF_APPLIED_LEN, applied_raw({0: 1}), "region -> seq"),
    (OFF_APPLIED_LEN, applied_raw({1: {2: 3}}), "region -> seq"),
    (OFF_APPLIED_LEN, applied_raw({1: True}), "region -> seq"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_header_is_refused_by_open_and_by_stamp_with_the_file_named(
        path: Path, offset: int, data: bytes, reason: str) -> None:
    Disk.open(path, 0, node=1, index=0).close()  # sound: the same checks pass
    poke(path, offset, data)
    before = path.read_bytes()[:HEADER]
    with pytest.raises(CorruptDisk, match=reason) as err:
        Disk.open(path, 0, node=1, index=0)
    assert str(path) in err.value.message and err.value.code == "corrupt_disk"
    with pytest.raises(CorruptDisk, match=reason):
        stamp_epoch(path, node=1, index=0)
    assert path.read_bytes()[:HEADER] == before  # no epoch written into it


def test_stamp_epoch_refuses_a_file_that_is_not_a_disk(tmp_path: Path) -> None:
    """Today's hypervisor stamped whatever file was at the disk path."""
    p = tmp_path / "precious.txt"
    p.write_bytes(b"somebody's notes, not a vmemu disk" * 200)
    before = p.read_bytes()
    with pytest.raises(CorruptDisk, match="not a vmemu disk"):
        stamp_epoch(p)
    assert p.read_bytes() == before


def test_a_file_shorter_than_a_header_is_refused_before_it_is_mapped(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    for n in (0, 10, HEADER - 1):
        p.write_bytes(b"VMDISK01" + bytes(max(0, n - 8)))
        with pytest.raises(CorruptDisk, match="shorter than its|shorter than"):
            Disk.open(p, 0)
        with pytest.raises(CorruptDisk):
            stamp_epoch(p)


def test_an_applied_map_hit_while_the_disk_is_open_is_refused_when_read(path: Path) -> None:
    d = Disk.open(path, 0)
    try:
        d.set_applied({9: 9})
        assert d.applied() == {9: 9}
        poke(path, OFF_APPLIED, b"\xc1")
        with pytest.raises(CorruptDisk, match="applied map"):
            d.applied()
    finally:
        d.close()
