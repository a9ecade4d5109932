"""lz4-compressed NVLog records (FLAG_LZ4): the writer, ``record_payload``, and every replay
path (fused ``replay_region``, ``scan`` + ``apply``, ``plan`` + ``write_plan`` into a file)
against the pure-Python reference and against the same writes logged uncompressed.

Logs are built by the independent builder (google_crc32c, lz4 called directly), which
compresses whichever records it is told to, savings or not: a reader must not care.
"""

from __future__ import annotations

import mmap
import os
import random
import tempfile

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import nvlog_format as F
from storage import replay, replay_ref
from storage.nvlog import (
    LZ4_MIN_PAYLOAD,
    BadRecord,
    NVLogWriter,
    RegionHeader,
    decode_lz4,
    format_region,
    log_view,
    record_payload,
)
from tests.unit.nvlog_build import Record, build_log, pack_raw, record_positions
from vmemu.errors import LogFull

DISK = 4096
LUNS = [F.lun_gid(1, 0), F.lun_gid(1, 1)]
GEN = 5
BASE = 40
BACKGROUND = 0x3C

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def region(size: int = F.REGION_HEADER + 256 * 1024) -> mmap.mmap:
    buf = mmap.mmap(-1, size)
    format_region(buf, 1, 0xC0DE)
    return buf


def u8(raw: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(bytes(raw), np.uint8)  # read-only, as a partner's grant


def fresh(luns: list[int] = LUNS) -> dict[int, np.ndarray]:
    return {lun: np.full(DISK, BACKGROUND, np.uint8) for lun in luns}


def model(records: list[Record], min_seqs: dict[int, int], good: list[bool] | None = None
          ) -> dict[int, np.ndarray]:
    """The disks after applying every in-range (and good) record above min_seq, in order."""
    disks = fresh()
    for i, (lun, off, payload, _, _) in enumerate(records):
        if good is not None and not good[i]:
            continue
        if lun in disks and BASE + i > min_seqs.get(lun, -1) and 0 <= off <= DISK - len(payload):
            disks[lun][off:off + len(payload)] = np.frombuffer(payload, np.uint8)
    return disks


def file_replay(log: np.ndarray, min_seqs: dict[int, int], base: int = 512
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """plan + write_plan into a file per LUN: (disks, the planned rows, total bad)."""
    index, count, _ = replay.scan(log, GEN, BASE)
    out, plans, bad = {}, {}, 0
    for lun in LUNS:
        fd, path = tempfile.mkstemp()
        try:
            os.pwrite(fd, bytes([BACKGROUND]) * DISK, base)
            rows, b = replay.plan(log, index, count, lun, min_seqs.get(lun, -1), DISK)
            replay.write_plan(log, index, rows, fd, base, DISK)
            out[lun] = np.frombuffer(os.pread(fd, DISK, base), np.uint8)
            plans[lun] = rows
            bad += int(b)
        finally:
            os.close(fd)
            os.unlink(path)
    return out, plans, bad


def all_ways(log: np.ndarray, min_seqs: dict[int, int]) -> tuple[replay.ReplayResult,
                                                                   dict[int, np.ndarray]]:
    """Replay every way; assert they agree with the reference; return the fused result."""
    fused_disks = fresh()
    fused = replay.replay_region(log, GEN, BASE, fused_disks, min_seqs)
    ref_disks = fresh()
    ref = replay_ref.replay_region(log, GEN, BASE, ref_disks, min_seqs)
    assert fused == ref
    index, count, end = replay.scan(log, GEN, BASE)
    r_index, r_count, r_end = replay_ref.scan(log, GEN, BASE)
    assert (count, end) == (r_count, r_end)
    assert np.array_equal(index[:count], r_index[:r_count])
    files, plans, bad = file_replay(log, min_seqs)
    assert bad == ref.bad
    for lun in LUNS:
        disk = np.full(DISK, BACKGROUND, np.uint8)
        assert replay.apply(log, index, count, lun, min_seqs.get(lun, -1), disk) == \
            replay_ref.apply(log, r_index, r_count, lun, min_seqs.get(lun, -1), fresh()[lun])
        ref_rows, _ = replay_ref.plan(log, r_index, r_count, lun, min_seqs.get(lun, -1), DISK)
        assert np.array_equal(plans[lun], ref_rows)
        for other in (fused_disks[lun], disk, files[lun]):
            assert np.array_equal(other, ref_disks[lun]), lun
    return fused, fused_disks


# ------------------------------------------------------------------------------ writer


def test_writer_compresses_a_write_only_when_it_saves_an_eighth() -> None:
    buf = region()
    w = NVLogWriter(buf, compress="lz4")
    text = b"2024-05-01 12:00:00 INFO request served in 3 ms\n" * 85
    cases = [
        (LUNS[0], 0, bytes(4096), F.FLAG_WRITE),  # zeros: compressed
        (LUNS[1], 4096, os.urandom(4096), F.FLAG_WRITE),  # random: raw, no flag
        (LUNS[0], 8192, text, F.FLAG_WRITE),  # text: compressed
        (LUNS[0], 0, bytes(LZ4_MIN_PAYLOAD - 1), F.FLAG_WRITE),  # too small to try
        (F.DEDUP_LUN, 0, bytes(1024), F.FLAG_DEDUP),  # read raw by its consumer: never
    ]
    for lun, off, data, flags in cases:
        w.append(lun, off, data, 3, 9, flags=flags)
    hdr = RegionHeader.read(buf)
    index, count, end = replay.scan(log_view(buf), hdr.generation, hdr.base_seq)
    assert count == len(cases) and end == w.tail
    want_lz4 = [True, False, True, False, False]
    for row, (lun, off, data, flags), lz in zip(index, cases, want_lz4):
        assert row[F.IDX_LENGTH] == len(data) and row[F.IDX_OFFSET] == off
        assert bool(row[F.IDX_FLAGS] & F.FLAG_LZ4) == lz
        assert row[F.IDX_FLAGS] & ~F.FLAG_LZ4 == flags
        if lz:
            assert row[F.IDX_STORED] <= len(data) - len(data) // 8
        else:
            assert row[F.IDX_STORED] == len(data)
        assert record_payload(log_view(buf), row) == data
    assert w.lz4_records == 2
    assert w.lz4_in == 2 * 4096 + len(text)  # the three it tried: zeros, random, text
    assert w.lz4_out < w.lz4_in


def test_writer_bytes_equal_the_independent_builder() -> None:
    buf = region()
    w = NVLogWriter(buf, compress="lz4")
    recs: list[Record] = [(LUNS[i % 2], 512 * i, bytes([i]) * (100 + 37 * i), 7, i) for i in range(9)]
    recs.append((LUNS[0], 0, os.urandom(300), 7, 99))
    for lun, off, data, client, req in recs:
        w.append(lun, off, data, client, req)
    compress = [True] * 9 + [False]
    want = build_log(recs, generation=1, base_seq=1, capacity=w.tail, compress=compress)
    assert log_view(buf)[:w.tail].tobytes() == bytes(want)
    assert w.tail == record_positions(recs, compress)[-1]


def test_no_compression_writes_no_lz4_and_unknown_names_are_refused() -> None:
    buf = region()
    w = NVLogWriter(buf)
    w.append(LUNS[0], 0, bytes(4096))
    hdr = RegionHeader.read(buf)
    index, count, _ = replay.scan(log_view(buf), hdr.generation, hdr.base_seq)
    assert count == 1 and index[0, F.IDX_FLAGS] == 0 and index[0, F.IDX_STORED] == 4096
    assert "append" not in vars(w)  # the raw method itself, no per-call dispatch
    with pytest.raises(ValueError, match="zstd"):
        NVLogWriter(buf, compress="zstd")


def test_a_compressed_log_holds_more_and_still_refuses_what_does_not_fit() -> None:
    held = {}
    for compress in (None, "lz4"):
        w = NVLogWriter(region(F.REGION_HEADER + 64 * 1024), compress=compress)
        n = 0
        with pytest.raises(LogFull):
            while True:
                w.append(LUNS[0], 4096 * n, (b"page %d " % n) * 512)
                n += 1
        held[compress] = n
    assert held["lz4"] > 10 * held[None]


# ---------------------------------------------------------------------- mixed logs


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    n = draw(st.sampled_from([0, 8, 64, 100, 512, 1000, 4096]))
    kind = draw(st.sampled_from(["fill", "pattern", "random", "sparse"]))
    if kind == "fill":
        return bytes([draw(st.integers(0, 255))]) * n
    if kind == "pattern":
        return (draw(st.binary(min_size=1, max_size=16)) * n)[:n]
    if kind == "random":
        return draw(st.binary(min_size=n, max_size=n))
    out = bytearray(n)
    for _ in range(draw(st.integers(0, 4))):
        if n:
            out[draw(st.integers(0, n - 1))] = draw(st.integers(1, 255))
    return bytes(out)


@st.composite
def mixed_logs(draw: st.DrawFn) -> tuple[list[Record], list[bool]]:
    """Records over few ranges (so many supersede or overlap), some out of the disk, each
    stored compressed or raw at random."""
    n = draw(st.integers(0, 20))
    recs: list[Record] = []
    for i in range(n):
        data = draw(payloads())
        off = draw(st.sampled_from([0, 8, 100, 512, DISK - len(data), DISK - len(data) + 8]))
        recs.append((draw(st.sampled_from(LUNS)), off, data, 1, i))
    return recs, draw(st.lists(st.booleans(), min_size=n, max_size=n))


@SETTINGS
@given(mixed_logs(), st.dictionaries(st.sampled_from(LUNS), st.integers(BASE - 1, BASE + 20)))
def test_mixed_log_replays_like_the_reference_and_the_uncompressed_log(
        mixed: tuple[list[Record], list[bool]], min_seqs: dict[int, int]) -> None:
    recs, compress = mixed
    log = u8(build_log(recs, GEN, BASE, record_positions(recs, compress)[-1] + 64, compress))
    result, disks = all_ways(log, min_seqs)
    plain = u8(build_log(recs, GEN, BASE, record_positions(recs)[-1] + 64))
    p_result, p_disks = all_ways(plain, min_seqs)
    want = model(recs, min_seqs)
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])
        assert np.array_equal(p_disks[lun], want[lun])
    assert (result.records, result.bytes, result.bad, result.scanned, result.last_seq) == \
        (p_result.records, p_result.bytes, p_result.bad, p_result.scanned, p_result.last_seq)


@SETTINGS
@given(mixed_logs(), st.data())
def test_any_corruption_of_a_mixed_log_matches_the_reference(
        mixed: tuple[list[Record], list[bool]], data: st.DataObject) -> None:
    recs, compress = mixed
    raw = build_log(recs, GEN, BASE, record_positions(recs, compress)[-1] + 64, compress)
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    all_ways(u8(raw), {})


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(LUNS), st.integers(0, DISK - 1), payloads()),
                max_size=30))
def test_the_writer_with_lz4_replays_to_the_writes(recs: list[tuple[int, int, bytes]]) -> None:
    buf = region()
    w = NVLogWriter(buf, compress="lz4")
    w.generation = GEN  # the builder's generation and base, so all_ways can scan it
    w.next_seq = BASE
    records: list[Record] = []
    for lun, off, data in recs:
        off = min(off, DISK - len(data))
        w.append(lun, off, data)
        records.append((lun, off, data, 0, 0))
    _, disks = all_ways(log_view(buf), {})
    want = model(records, {})
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])


# -------------------------------------------------------------- crc-valid but bad lz4


def bad_lz4_cases() -> list[tuple[str, bytes, int]]:
    """(name, stored bytes, logical length) of records that verify but cannot decompress."""
    good = lz4.block.compress(bytes(range(200)) * 2, store_size=False)  # 400 bytes logical
    return [
        ("garbage", random.Random(7).randbytes(64), 400),
        ("shorter_than_said", good, 401),  # lz4 itself accepts this: the reader must check
        ("longer_than_said", good, 399),
        ("huge_length", good, 2**31),
        ("said_empty", good, 0),
    ]


@pytest.mark.parametrize("name,stored,length", bad_lz4_cases(),
                         ids=[c[0] for c in bad_lz4_cases()])
def test_a_crc_valid_record_that_does_not_decompress_is_bad_not_the_end(
        name: str, stored: bytes, length: int) -> None:
    first = bytes([1]) * 400
    later = bytes([3]) * 100
    parts = [
        pack_raw(LUNS[0], 0, lz4.block.compress(first, store_size=False), 400,
                 F.FLAG_WRITE | F.FLAG_LZ4, 0, 0, GEN, BASE),
        # Same range as the first: if it counted it would supersede it in the plan.
        pack_raw(LUNS[0], 0, stored, length, F.FLAG_WRITE | F.FLAG_LZ4, 0, 1, GEN, BASE + 1),
        pack_raw(LUNS[0], 1000, later, 100, F.FLAG_WRITE, 0, 2, GEN, BASE + 2),
    ]
    log = u8(b"".join(parts) + bytes(64))
    index, count, _ = replay.scan(log, GEN, BASE)
    assert count == 3  # the log goes on past the bad record: what follows was acknowledged
    with pytest.raises(BadRecord):
        record_payload(log, index[1])
    result, disks = all_ways(log, {})
    assert (result.records, result.bad) == (2, 1)
    want = fresh()[LUNS[0]]
    want[0:400] = 1
    want[1000:1100] = 3
    assert np.array_equal(disks[LUNS[0]], want)
    # A row that plan would have refused, handed to write_plan anyway: refused, not written.
    fd, path = tempfile.mkstemp()
    try:
        with pytest.raises(ValueError):
            replay.write_plan(log, index, np.array([1], np.int64), fd, 0, 1 << 32)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
        os.unlink(path)


def test_decode_lz4_refuses_before_allocating_an_impossible_length() -> None:
    with pytest.raises(BadRecord, match="cannot hold"):
        decode_lz4(b"\x00" * 10, 10 * F.LZ4_MAX_RATIO + 1000)
    with pytest.raises(BadRecord):
        record_payload(np.zeros(100, np.uint8), [40, 0, 0, 0, 10, 0, 0, F.FLAG_LZ4, 50])


# --------------------------------------------------------------------- format rules


def test_version_1_logs_still_replay() -> None:
    recs: list[Record] = [(LUNS[i % 2], 64 * i, bytes([i + 1]) * (50 + i), 0, i) for i in range(12)]
    v1 = u8(build_log(recs, GEN, BASE, record_positions(recs)[-1] + 64, version=1))
    assert v1[4] == F.RECORD_VERSION_V1 and v1[28:32].tobytes() == bytes(4)  # pad, as before
    result, disks = all_ways(v1, {})
    assert result.scanned == 12 and result.records == 12
    want = model(recs, {})
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])


@pytest.mark.parametrize("version,flags,stored_delta", [
    (F.RECORD_VERSION_V1, F.FLAG_LZ4, 0),  # v1 never had compression
    (F.RECORD_VERSION, F.FLAG_WRITE, 8),  # raw, but stored != length
    (3, F.FLAG_WRITE, 0),  # a version no reader knows
])
def test_records_that_contradict_the_format_end_the_log(
        version: int, flags: int, stored_delta: int) -> None:
    ok = pack_raw(LUNS[0], 0, b"a" * 40, 40, F.FLAG_WRITE, 0, 0, GEN, BASE)
    stored = b"b" * 48
    bad = pack_raw(LUNS[0], 0, stored, len(stored) - stored_delta, flags, 0, 1, GEN, BASE + 1,
                   version=version)
    log = u8(ok + bad + bytes(64))
    index, count, end_pos = replay.scan(log, GEN, BASE)
    assert (count, end_pos) == (1, len(ok))
    all_ways(log, {})


def test_scan_apply_leaves_compressed_rows_to_replay_region() -> None:
    recs: list[Record] = [(LUNS[0], 0, bytes([7]) * 512, 0, 0), (LUNS[0], 512, bytes([8]) * 512, 0, 1)]
    log = u8(build_log(recs, GEN, BASE, 2048, compress=[True, False]))
    disk = np.full(DISK, BACKGROUND, np.uint8)
    out = replay.scan_apply(log, GEN, BASE, np.array([LUNS[0]], np.int64),
                            np.array([-1], np.int64), (disk,))
    assert out[1] == 2 and out[3] == 1  # both indexed, only the raw one applied and counted
    assert (disk[:512] == BACKGROUND).all() and (disk[512:1024] == 8).all()
