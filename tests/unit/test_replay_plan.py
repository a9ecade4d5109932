"""The other two ways to replay: the fused ``scan_apply`` kernel, and ``plan`` +
``write_plan`` (pwrite into a disk file), each against ``scan`` + ``apply`` and the
pure-Python reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba.core.errors import TypingError

from storage import replay, replay_ref
from storage.nvlog_format import IDX_LENGTH, IDX_OFFSET, IDX_POS, RECORD_HEADER, lun_gid
from tests.unit.nvlog_build import Record, build_log, record_positions

DISK = 4096
LUNS = [lun_gid(1, 0), lun_gid(1, 1), lun_gid(2, 0)]
GEN = 7
BASE = 100
BACKGROUND = 0x5A

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def colliding_records(draw: st.DrawFn, max_records: int = 24) -> list[Record]:
    """Records over few (offset, length) pairs: many supersede each other, some overlap
    without superseding, some are empty or out of bounds."""
    n = draw(st.integers(0, max_records))
    out: list[Record] = []
    for i in range(n):
        length = draw(st.sampled_from([0, 8, 100, 200, 512]))
        off = draw(st.sampled_from([0, 8, 100, 200, 300, DISK - 512, DISK - 100, DISK - 8, DISK + 8]))
        payload = draw(st.binary(min_size=length, max_size=length)) if draw(st.booleans()) \
            else bytes([i + 1]) * length
        out.append((draw(st.sampled_from(LUNS)), off, payload, 0, i))
    return out


def log_of(records: list[Record], readonly: bool = True) -> np.ndarray:
    raw = build_log(records, GEN, BASE, record_positions(records)[-1] + 64)
    return np.frombuffer(bytes(raw) if readonly else raw, np.uint8)


def write_rows(log: np.ndarray, index: np.ndarray, rows: np.ndarray, disk: np.ndarray) -> None:
    for r in rows:
        off, length = int(index[r, IDX_OFFSET]), int(index[r, IDX_LENGTH])
        src = int(index[r, IDX_POS]) + RECORD_HEADER
        disk[off : off + length] = log[src : src + length]


# --------------------------------------------------------------------------- plan


@SETTINGS
@given(records=colliding_records(), data=st.data())
def test_plan_matches_reference_and_writing_it_equals_apply(
    records: list[Record], data: st.DataObject
) -> None:
    log = log_of(records, readonly=data.draw(st.booleans()))
    index, count, _ = replay.scan(log, GEN, BASE)
    for lun in LUNS:
        min_seq = data.draw(st.integers(BASE - 1, BASE + len(records)))
        rows, bad = replay.plan(log, index, count, lun, min_seq, DISK)
        ref_rows, ref_bad = replay_ref.plan(log, index, count, lun, min_seq, DISK)
        assert rows.dtype == np.int64
        assert rows.tolist() == ref_rows.tolist() and bad == ref_bad
        assert rows.tolist() == sorted(rows.tolist())  # seq order
        everything = np.full(DISK, BACKGROUND, np.uint8)
        applied, _, apply_bad = replay.apply(log, index, count, lun, min_seq, everything)
        planned = np.full(DISK, BACKGROUND, np.uint8)
        write_rows(log, index, rows, planned)
        assert np.array_equal(planned, everything)
        assert bad == apply_bad and rows.size <= applied


def test_plan_drops_only_rows_a_later_same_range_row_overwrites() -> None:
    a = LUNS[0]
    records: list[Record] = [
        (a, 0, b"\x01" * 100, 0, 0),  # superseded by row 3
        (a, 50, b"\x02" * 100, 0, 1),  # overlaps both: kept, and between them
        (a, 0, b"\x03" * 50, 0, 2),  # same offset, other length: kept
        (a, 0, b"\x04" * 100, 0, 3),
        (a, 200, b"", 0, 4),  # empty: nothing to write
        (a, DISK - 10, b"\x05" * 20, 0, 5),  # out of bounds: bad
        (LUNS[1], 0, b"\x06" * 100, 0, 6),  # other LUN
        (a, 300, b"\x07" * 8, 0, 7),  # superseded by row 8...
        (a, 300, b"\x08" * 8, 0, 8),  # ...which is superseded by row 9
        (a, 300, b"\x09" * 8, 0, 9),
    ]
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    rows, bad = replay.plan(log, index, count, a, -1, DISK)
    assert rows.tolist() == [1, 2, 3, 9] and bad == 1
    disk = np.zeros(DISK, np.uint8)
    write_rows(log, index, rows, disk)
    assert (disk[:100] == 4).all() and (disk[100:150] == 2).all() and (disk[300:308] == 9).all()
    # min_seq hides the superseding row: the one it superseded is written again.
    rows, _ = replay.plan(log, index, count, a, BASE + 8, DISK)
    assert rows.tolist() == [9]
    rows, _ = replay.plan(log, index, 4, a, -1, DISK)  # only the first four rows exist
    assert rows.tolist() == [1, 2, 3]


def test_plan_of_many_rows_keeps_the_last_write_of_each_block() -> None:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 64, 3000)
    records: list[Record] = [(LUNS[0], int(b) * 64, bytes([i % 251]) * 64, 0, i)
                             for i, b in enumerate(blocks)]
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    rows, bad = replay.plan(log, index, count, LUNS[0], -1, DISK)
    last = {int(b): i for i, b in enumerate(blocks)}
    assert bad == 0 and rows.tolist() == sorted(last.values())


def test_plan_bogus_index_rows_are_bad() -> None:
    records: list[Record] = [(LUNS[0], 0, b"\x01" * 10, 0, 0), (LUNS[0], 10, b"\x02" * 10, 0, 1)]
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    index = index.copy()
    index[0, IDX_POS] = log.size
    index[1, IDX_POS] = -RECORD_HEADER - 1
    for mod in (replay, replay_ref):
        rows, bad = mod.plan(log, index, count, LUNS[0], -1, DISK)
        assert rows.size == 0 and bad == 2
    rows, bad = replay.plan(log, index, count + 5, LUNS[0], -1, DISK)  # count past the index
    assert rows.size == 0 and bad == 2


# --------------------------------------------------------------------------- write_plan


def file_image(fd: int, base: int) -> np.ndarray:
    return np.frombuffer(os.pread(fd, DISK, base), np.uint8)


@SETTINGS
@given(records=colliding_records(), base=st.sampled_from([0, 4096, 13]))
def test_write_plan_into_a_file_equals_apply(records: list[Record], base: int) -> None:
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    fd = os.memfd_create("vmemu-test-write-plan")
    try:
        os.pwrite(fd, bytes([BACKGROUND]) * (base + DISK + 64), 0)
        for lun in LUNS:  # all LUNs into one file: with bounds as they are, same as apply
            rows, _ = replay.plan(log, index, count, lun, -1, DISK)
            nbytes, calls = replay.write_plan(log, index, rows, fd, base, DISK)
            assert nbytes == int(index[rows, IDX_LENGTH].sum()) and calls <= rows.size
        want = np.full(DISK, BACKGROUND, np.uint8)
        for lun in LUNS:
            replay.apply(log, index, count, lun, -1, want)
        assert np.array_equal(file_image(fd, base), want)
        assert os.pread(fd, base, 0) == bytes([BACKGROUND]) * base
        assert os.pread(fd, 64, base + DISK) == bytes([BACKGROUND]) * 64
    finally:
        os.close(fd)


def adjacent(n: int, length: int, start: int = 0) -> list[Record]:
    return [(LUNS[0], start + i * length, bytes([i % 256]) * length, 0, i) for i in range(n)]


@pytest.mark.parametrize(
    ("records", "calls"),
    [
        (adjacent(200, 16), 4),  # 64 rows per call
        (adjacent(3, 512 * 1024), 2),  # 1 MiB per call
        (adjacent(5, 16) + adjacent(5, 16, start=1000), 2),  # a gap splits the run
        (adjacent(4, 16)[::-1], 4),  # adjacent the other way round: no run
    ],
)
def test_write_plan_coalesces_runs(records: list[Record], calls: int, tmp_path: Path) -> None:
    size = 4 << 20
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    rows, _ = replay.plan(log, index, count, LUNS[0], -1, size)
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse, as a fresh disk image
    fd = os.open(path, os.O_RDWR)
    try:
        nbytes, n = replay.write_plan(log, index, rows, fd, 0, size)
    finally:
        os.close(fd)
    assert n == calls and nbytes == sum(len(p) for _, _, p, _, _ in records)
    want = np.zeros(size, np.uint8)
    replay.apply(log, index, count, LUNS[0], -1, want)
    assert np.array_equal(np.fromfile(path, np.uint8), want)


def test_write_plan_finishes_short_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    seen = []

    def short_pwrite(fd, buf, off):  # type: ignore[no-untyped-def]
        seen.append(len(buf))
        return real_pwrite(fd, bytes(buf)[:7], off)

    def short_pwritev(fd, bufs, off):  # type: ignore[no-untyped-def]
        seen.append(len(bufs))
        return real_pwrite(fd, b"".join(bufs)[:37], off)  # a prefix, as a short write is

    monkeypatch.setattr(replay.os, "pwrite", short_pwrite)
    monkeypatch.setattr(replay.os, "pwritev", short_pwritev)
    records = adjacent(6, 30) + [(LUNS[0], 1000, b"\x77" * 50, 0, 6)]
    log = log_of(records)
    index, count, _ = replay.scan(log, GEN, BASE)
    rows, _ = replay.plan(log, index, count, LUNS[0], -1, DISK)
    fd = os.memfd_create("vmemu-test-short")
    try:
        real_pwrite(fd, bytes(DISK), 0)
        assert replay.write_plan(log, index, rows, fd, 0, DISK) == (230, 2)
        want = np.zeros(DISK, np.uint8)
        replay.apply(log, index, count, LUNS[0], -1, want)
        assert np.array_equal(file_image(fd, 0), want)
    finally:
        os.close(fd)
    assert len(seen) > 2


def test_write_plan_refuses_a_row_outside_the_disk() -> None:
    log = log_of([(LUNS[0], 100, b"\x01" * 100, 0, 0)])
    index, count, _ = replay.scan(log, GEN, BASE)
    fd = os.memfd_create("vmemu-test-refuse")
    try:
        with pytest.raises(ValueError):
            replay.write_plan(log, index, np.array([0], np.int64), fd, 0, 150)
        assert os.fstat(fd).st_size == 0
        assert replay.write_plan(log, index, np.empty(0, np.int64), fd, 0, 150) == (0, 0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- scan_apply


@SETTINGS
@given(records=colliding_records(), data=st.data())
def test_scan_apply_equals_scan_then_apply(records: list[Record], data: st.DataObject) -> None:
    raw = build_log(records, GEN, BASE, record_positions(records)[-1] + 64)
    if records and data.draw(st.booleans()):  # sometimes a torn record somewhere
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0x10
    log = np.frombuffer(bytes(raw), np.uint8)
    luns = data.draw(st.lists(st.sampled_from(LUNS), min_size=1, max_size=3, unique=True))
    mins = [data.draw(st.integers(BASE - 1, BASE + len(records))) for _ in luns]
    fused = [np.full(DISK, BACKGROUND, np.uint8) for _ in luns]
    index, count, end, records_n, nbytes, bad = replay.scan_apply(
        log, GEN, BASE, np.array(luns, np.int64), np.array(mins, np.int64), tuple(fused))
    s_index, s_count, s_end = replay.scan(log, GEN, BASE)
    assert (count, end) == (s_count, s_end)
    assert np.array_equal(index[:count], s_index[:s_count])
    want = (0, 0, 0)
    for lun, m, disk in zip(luns, mins, fused):
        other = np.full(DISK, BACKGROUND, np.uint8)
        r = replay.apply(log, s_index, s_count, lun, m, other)
        want = tuple(a + b for a, b in zip(want, r))
        assert np.array_equal(disk, other)
    assert (records_n, nbytes, bad) == want


def test_scan_apply_first_entry_of_a_lun_wins() -> None:
    log = log_of([(LUNS[0], 0, b"\x01" * 10, 0, 0)])
    first, second = np.zeros(DISK, np.uint8), np.zeros(DISK, np.uint8)
    out = replay.scan_apply(log, GEN, BASE, np.array([LUNS[0]] * 2, np.int64),
                            np.array([-1, -1], np.int64), (first, second))
    assert out[3:] == (1, 10, 0)
    assert (first[:10] == 1).all() and not second.any()


def test_replay_region_falls_back_for_disks_it_cannot_fuse() -> None:
    records: list[Record] = [(LUNS[0], 0, b"\x01" * 10, 0, 0), (LUNS[1], 0, b"\x02" * 10, 0, 1)]
    log = log_of(records)
    strided = np.zeros(2 * DISK, np.uint8)[::2]
    with pytest.raises(TypingError):  # apply refuses it, as before
        replay.replay_region(log, GEN, BASE, {LUNS[0]: np.zeros(DISK, np.uint8),
                                              LUNS[1]: strided}, {})
    assert not replay._fusable([np.zeros(4, np.uint8), np.zeros(4, np.uint16)])
    assert not replay._fusable([np.frombuffer(bytes(4), np.uint8)])  # read-only
    r = replay.replay_region(log, GEN, BASE, {}, {})
    assert (r.scanned, r.records) == (2, 0)


@pytest.mark.parametrize("off", [0, 1, 63, 64, 4096 + 17])
@pytest.mark.parametrize("length", [255, 256, 1000, 65536 + 13])
def test_scan_apply_streaming_copies_at_any_alignment(off: int, length: int) -> None:
    payload = np.random.default_rng(length + off).integers(0, 256, length, np.uint8).tobytes()
    records: list[Record] = [(LUNS[0], off, payload, 0, 0), (LUNS[0], off + 1, b"\x01", 0, 1)]
    log = log_of(records)
    backing = np.full(off + length + 256, BACKGROUND, np.uint8)
    disk = backing[: off + length + 128]
    out = replay.scan_apply(log, GEN, BASE, np.array([LUNS[0]], np.int64),
                            np.array([-1], np.int64), (disk,))
    assert out[1:] == (2, record_positions(records)[-1], 2, length + 1, 0)
    want = np.full_like(backing, BACKGROUND)
    want[off : off + length] = np.frombuffer(payload, np.uint8)
    want[off + 1] = 1
    assert np.array_equal(backing, want)


def test_scan_apply_onto_a_disk_that_overlaps_the_payload_is_a_memmove() -> None:
    payload = bytes(range(256)) * 4
    raw = build_log([(LUNS[0], RECORD_HEADER + 8, payload, 0, 0)], GEN, BASE, 2 * len(payload) + 256)
    log = np.frombuffer(raw, np.uint8)  # writable: it is its own disk here
    out = replay.scan_apply(log, GEN, BASE, np.array([LUNS[0]], np.int64),
                            np.array([-1], np.int64), (log,))
    assert out[3:] == (1, len(payload), 0)
    assert bytes(log[RECORD_HEADER + 8 : RECORD_HEADER + 8 + len(payload)]) == payload
