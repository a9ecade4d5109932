"""Corrupt NVRAM read back: header checks (quarantine), log breaks, and what they cost.

Regions are real: formatted by storage.nvlog and filled by the real writer (TwoHalfLog), then
damaged byte by byte as a buggy owner could. Each check is shown both passing on a clean
region and failing on a damaged one.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest

from storage import nvlog_check as C
from storage import nvlog_format as F
from storage.nvlog import RegionHeader, TwoHalfLog, format_region, region_logs
from storage.nvlog_header import GENERATION_LIMIT, check_region
from vmemu.errors import CorruptRegion

OWNER, RID = 1, 0xC0FFEE
A, B = F.lun_gid(OWNER, 0), F.lun_gid(OWNER, 1)
SIZE = 64 << 10


@pytest.fixture
def buf() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, SIZE)
    format_region(m, OWNER, RID, halves=True)
    yield m
    try:
        m.close()
    except BufferError:
        pass  # a numpy view of it is still alive; it goes with the view


def fill(buf: mmap.mmap, n: int, compress: str | None = None,
         log: TwoHalfLog | None = None) -> tuple[TwoHalfLog, list[tuple[int, int, int]]]:
    """n writes by the real writer: [(seq, region offset, size)] of each record."""
    log = log or TwoHalfLog(buf, compress=compress)
    out = []
    for i in range(n):
        w = log.active
        pos = w.log_off + w.tail
        data = bytes([i % 7]) * (200 + 8 * i) if i % 2 else bytes(range(256)) * 2
        seq = log.append((A, B)[i % 2], 4096 * i, data, 9, 1000 + i)
        out.append((seq, pos, w.log_off + w.tail - pos))
    return log, out


def problems(buf: object, **kw: object) -> list[tuple[str, dict, str]]:
    return [C.report(p) for p in C.read_region(buf, OWNER, RID, **kw).problems]  # type: ignore[arg-type]


def test_a_clean_region_has_no_problem_and_every_record_is_read(buf: mmap.mmap) -> None:
    log, recs = fill(buf, 30, compress="lz4")
    read = C.read_region(buf, OWNER, RID, {A, B})
    assert read.problems == [] and read.notes == []
    assert [s.count for s in read.logs] == [30]
    assert read.logs[0].end == read.logs[0].area.tail == log.active.tail


# -- the header ----------------------------------------------------------------------------------
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


@pytest.mark.parametrize("offset,value,reason", [
    (0, b"XMNVRAM1", "bad magic"),
    (8, U32.pack(3), "bad version 3"),
    (12, U32.pack(0), "owner node 0 out of range"),
    (12, U32.pack(2), "header names node2, but the region is node1's"),
    (16, U64.pack(0xBAD), "header names region 0xbad, expected 0xc0ffee"),
    (24, U64.pack(SIZE), f"capacity {SIZE} does not match"),
    (24, U64.pack(2**64 - 1), "does not match"),
])
def test_a_header_that_does_not_check_out_quarantines_the_region(
        buf: mmap.mmap, offset: int, value: bytes, reason: str) -> None:
    fill(buf, 10)
    assert check_region(buf, OWNER, RID).logs  # clean: the same check passes
    buf[offset:offset + len(value)] = value
    with pytest.raises(CorruptRegion, match=reason):
        check_region(buf, OWNER, RID)
    read = C.read_region(buf, OWNER, RID, {A, B})
    assert read.logs == [] and read.quarantine is not None and reason in read.quarantine.reason
    kind, fields, line = C.report(read.quarantine)
    assert kind == "nvram_region_quarantined" and fields["half"] is None
    # The records are still there: the estimate says what is lost, and says it is an estimate.
    assert fields["data_loss"] and fields["lost_records"] == 10 and fields["estimate"]
    assert fields["lost_seq"] == [1, 10] and "LOST" in line


def test_a_short_or_unformatted_buffer_is_refused_not_crashed_on() -> None:
    for raw in (b"", b"VMNVRAM1", bytes(F.REGION_HEADER), bytes(8192)):
        read = C.read_region(raw, OWNER, RID)
        assert read.quarantine is not None and "not an NVRAM region" in read.quarantine.reason
        with pytest.raises(ValueError, match="not an NVRAM region"):
            RegionHeader.read(raw)


def test_version_1_with_half_1_fields_set_is_a_version_2_region_that_was_hit(buf) -> None:
    log, _ = fill(buf, 5)
    log.switch()
    fill(buf, 5, log=log)
    buf[8:12] = U32.pack(F.REGION_VERSION)
    assert "half 1's fields are set" in C.read_region(buf, OWNER, RID).quarantine.reason


@pytest.mark.parametrize("field,value,why", [
    (F.HALF_FIELDS[0][0], GENERATION_LIMIT, "generation .* absurd"),
    (F.HALF_FIELDS[0][1], 2**63, "base_seq .* absurd"),  # raised OverflowError in the scan
    (F.HALF_FIELDS[0][1], 2**64 - 1, "base_seq .* absurd"),
    (F.HALF_FIELDS[0][2], SIZE, "beyond"),
    (F.HALF_FIELDS[0][2], 12, "aligned"),
    (F.HALF_FIELDS[0][0], 0, "generation 0"),
])
def test_a_half_with_absurd_fields_is_skipped_and_the_other_half_still_replays(
        buf: mmap.mmap, field: int, value: int, why: str) -> None:
    log, first = fill(buf, 6)
    log.switch()
    log.release()
    _, second = fill(buf, 4, log=log)
    buf[field:field + 8] = U64.pack(value)
    read = C.read_region(buf, OWNER, RID, {A, B})
    assert read.quarantine is None
    assert [s.area.half for s in read.logs] == [1] and read.logs[0].count == 4
    assert len(read.skipped) == 1 and read.skipped[0].half == 0
    kind, fields, _ = C.report(read.skipped[0])
    assert kind == "nvram_region_quarantined" and fields["half"] == 0
    import re
    assert re.search(why, fields["reason"])
    assert fields["lost_records"] == 6  # half 0's records still verify: what was not replayed


def test_half_fields_zeroed_to_look_unused_are_caught_by_the_generations(buf) -> None:
    """Half 1 at generation 0 is "never used": legit only while half 0 is at generation 1."""
    log, _ = fill(buf, 4)
    for _ in range(2):  # half 1, then half 0 again: half 0 at generation 2
        log.switch()
        log.release()
        fill(buf, 3, log=log)
    log.switch()
    log.release()
    fill(buf, 5, log=log)  # half 1 (generation 2) holds the newest records
    assert C.read_region(buf, OWNER, RID).problems == []
    buf[F.HALF_FIELDS[1][0]:F.HALF_HEADER_END] = bytes(24)  # all of half 1's fields
    read = C.read_region(buf, OWNER, RID, {A, B})
    (q,) = read.skipped
    assert q.half == 1 and "fields were hit" in q.reason and q.loss.records >= 5


def test_an_unused_half_that_holds_records_was_hit(buf) -> None:
    log, _ = fill(buf, 2)
    log.switch()
    fill(buf, 3, log=log)  # half 1 at generation 1: half 0 is still at 1
    buf[F.HALF_FIELDS[1][0]:F.HALF_HEADER_END] = bytes(24)
    (q,) = C.read_region(buf, OWNER, RID, {A, B}).skipped
    assert q.half == 1 and "it holds records" in q.reason and q.loss.records == 3


def test_an_empty_looking_log_whose_first_record_is_current_is_a_break(buf) -> None:
    """Generation hit and tail zeroed: the scan finds nothing and the tail agrees; the record
    at position 0 still verifies, and is not older than base_seq: not an honest empty log."""
    fill(buf, 6)
    buf[F.OFF_GENERATION:F.OFF_GENERATION + 8] = U64.pack(2)
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(0)
    (brk,) = C.read_region(buf, OWNER, RID, {A, B}).breaks
    assert brk.position == 0 and "generation 1, the log is at 2" in brk.why
    assert brk.verified_after == 0 and brk.loss.unknown is None  # other generation: unknown


def test_a_record_being_appended_by_a_live_owner_is_not_corruption(buf) -> None:
    """A giveback replays the releaser's region while the releaser writes it: its first
    record may be half written (header in, checksum not yet, tail still 0)."""
    log, recs = fill(buf, 1)
    seq, pos, size = recs[0]
    buf[pos + size - 8:pos + size] = bytes(8)  # the checksum not written yet
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(0)  # nor the tail
    assert C.read_region(buf, OWNER, RID, live=True).problems == []
    assert C.read_region(buf, OWNER, RID, live=False).breaks  # a dead owner's: reported


def test_region_logs_applies_the_same_checks(buf: mmap.mmap) -> None:
    fill(buf, 3)
    assert len(region_logs(buf, OWNER, RID)) == 1
    with pytest.raises(CorruptRegion, match="node2"):
        region_logs(buf, 2, RID)


# -- breaks in the middle of a log ------------------------------------------------------------------
@pytest.mark.parametrize("compress", [None, "lz4"])
@pytest.mark.parametrize("where", ["payload", "crc", "magic", "seq", "stored"])
def test_a_corrupt_record_mid_log_is_reported_with_its_position_and_the_lost_records(
        buf: mmap.mmap, compress: str | None, where: str) -> None:
    log, recs = fill(buf, 20, compress=compress)
    k = 8
    seq, pos, size = recs[k]
    hit = {"payload": pos + F.RECORD_HEADER + 3, "crc": pos + size - 8 if size % 8 == 0 else pos + 60,
           "magic": pos, "seq": pos + 16, "stored": pos + F.OFF_STORED + 1}[where]
    if where == "crc":  # the crc's own bytes: right after the stored payload
        stored = struct.unpack_from("<I", buf, pos + F.OFF_STORED)[0]
        hit = pos + F.RECORD_HEADER + stored
    buf[hit] ^= 0x40
    read = C.read_region(buf, OWNER, RID, {A, B})
    assert read.logs[0].count == k  # every record before the bad one is still read
    (brk,) = read.breaks
    assert (brk.half, brk.position, brk.region_offset) == (0, pos - F.REGION_HEADER, pos)
    assert brk.expected_seq == seq == k + 1
    assert brk.tail == log.active.tail and brk.bytes_after == log.active.tail - brk.position
    assert brk.verified_after == 20 - k - 1  # each record after it verifies on its own
    assert brk.seq_after == (k + 2, 20)
    assert brk.loss.records == 11 and brk.loss.seq == (k + 2, 20) and brk.loss.unknown == 1
    luns = {l["lun"]: l for l in brk.loss.luns}
    assert luns["node1/lun0"]["records"] + luns["node1/lun1"]["records"] == 11
    assert luns["node1/lun0"]["extents"][0][0] == 4096 * (k + 2)  # where the lost writes went
    kind, fields, line = C.report(brk)
    assert kind == "nvlog_corrupt_record" and fields["data_loss"]
    assert "LOST" in line and f"byte {brk.position}" in line


def test_records_already_on_disk_after_a_break_are_not_counted_lost(buf: mmap.mmap) -> None:
    _, recs = fill(buf, 10)
    buf[recs[3][1] + F.RECORD_HEADER] ^= 1
    (brk,) = C.read_region(buf, OWNER, RID, {A, B}, min_seq=10).breaks
    assert brk.verified_after == 6 and brk.loss.records == 0 and not brk.loss.any
    only_a = C.read_region(buf, OWNER, RID, {A}).breaks[0]
    assert only_a.loss.records == 3  # seq 5..10 of lun0 only: 6, 8, 10


def test_scan_end_beyond_the_tail_is_benign_and_equal_is_clean(buf: mmap.mmap) -> None:
    log, recs = fill(buf, 5)
    # The writer died between its last record and the tail update: the tail lags one record.
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(recs[-1][1] - F.REGION_HEADER)
    read = C.read_region(buf, OWNER, RID)
    assert read.problems == [] and read.logs[0].count == 5


def test_a_tail_that_lags_by_more_than_one_record_cannot_hide_a_corrupt_record(buf) -> None:
    """The tail is advisory: hit to a small value, it must not make a break look benign."""
    log, recs = fill(buf, 12)
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(8)
    read = C.read_region(buf, OWNER, RID)
    assert read.problems == [] and "stale" in read.notes[0]  # nothing lost: a note only
    buf[recs[5][1] + F.RECORD_HEADER] ^= 1
    (brk,) = C.read_region(buf, OWNER, RID).breaks
    assert brk.expected_seq == 6 and brk.verified_after == 6 and brk.loss.seq == (7, 12)
    assert brk.bytes_after == log.active.tail - brk.position


def test_a_tail_past_the_last_record_is_reported_even_if_nothing_verifies_after(buf) -> None:
    log, _ = fill(buf, 5)
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(log.active.tail + 512)
    (brk,) = C.read_region(buf, OWNER, RID).breaks
    assert brk.verified_after == 0 and brk.loss.unknown is None and brk.loss.any


def test_an_interrupted_log_reset_is_benign_but_a_raised_base_seq_is_not(buf: mmap.mmap) -> None:
    log, _ = fill(buf, 6)  # half 0: seq 1..6
    log.switch()
    log.release()
    fill(buf, 4, log=log)  # half 1: seq 7..10
    # The next switch resets half 0: base_seq written (11), then the crash, before the
    # generation and the tail. Its old records sit under a new base: not lost (on disk).
    # (The CP that let half 0 be reset made its records durable: the disks hold up to 6.)
    buf[F.OFF_BASE_SEQ:F.OFF_BASE_SEQ + 8] = U64.pack(11)
    read = C.read_region(buf, OWNER, RID, {A, B}, min_seq=6)
    assert read.problems == [] and read.notes and "interrupted" in read.notes[0]
    # Not a reset: the disks do not hold the old records (a base_seq hit to continue half 1).
    (brk,) = C.read_region(buf, OWNER, RID, {A, B}, min_seq=0).breaks
    assert brk.half == 0 and brk.position == 0 and "seq 1, expected 11" in brk.why
    # Nor: a base_seq that does not continue half 1.
    buf[F.OFF_BASE_SEQ:F.OFF_BASE_SEQ + 8] = U64.pack(12)
    (brk,) = C.read_region(buf, OWNER, RID, {A, B}, min_seq=6).breaks
    assert brk.half == 0 and brk.position == 0 and "seq 1, expected 12" in brk.why


def test_a_clean_older_half_that_ends_short_of_the_newer_half_is_reported(buf) -> None:
    log, recs = fill(buf, 6)
    log.switch()
    fill(buf, 3, log=log)  # half 1 starts at seq 7
    # Half 0 loses its last two records and its tail with them: it scans clean (end ==
    # tail), but seq 5 and 6 are missing before half 1.
    cut = recs[4][1]
    buf[cut:recs[5][1] + recs[5][2]] = bytes(recs[5][1] + recs[5][2] - cut)
    buf[F.OFF_TAIL:F.OFF_TAIL + 8] = U64.pack(cut - F.REGION_HEADER)
    (brk,) = C.read_region(buf, OWNER, RID).breaks
    assert brk.half == 0 and brk.expected_seq == 5 and "2 records from seq 5" in brk.why
    assert brk.loss.unknown == 2 and brk.loss.any


def test_halves_holding_the_same_sequence_numbers_quarantine_the_region(buf) -> None:
    log, _ = fill(buf, 4)
    log.switch()
    log.release()
    fill(buf, 2, log=log)
    # Forge half 1 into a copy of half 0 (records, generation, base_seq, tail): both verify.
    h = (SIZE - F.REGION_HEADER) // 2 // 8 * 8
    buf[F.REGION_HEADER + h:F.REGION_HEADER + 2 * h] = buf[F.REGION_HEADER:F.REGION_HEADER + h]
    for src, dst in zip(F.HALF_FIELDS[0], F.HALF_FIELDS[1]):
        buf[dst:dst + 8] = buf[src:src + 8]
    q = C.read_region(buf, OWNER, RID).quarantine
    assert q is not None and "both hold records" in q.reason


def test_a_log_reset_by_a_live_writer_while_it_was_read_is_not_corruption(buf) -> None:
    log, _ = fill(buf, 6)
    read = C.read_region(buf, OWNER, RID)
    s = read.logs[0]
    # As if the writer reset the half between our header read and the scan: the scan (of the
    # old fields) stops at the first overwritten record, the header says something new.
    buf[F.REGION_HEADER] ^= 0xFF
    from storage import replay
    s.index, s.count, s.end = replay.scan(s.view, s.area.generation, s.area.base_seq)
    assert isinstance(C.diagnose(buf, s, [], None, 0), C.LogBreak)  # unchanged header: a break
    buf[F.OFF_GENERATION:F.OFF_GENERATION + 8] = U64.pack(s.area.generation + 2)
    note = C.diagnose(buf, s, [], None, 0)
    assert isinstance(note, str) and "live writer" in note
    del s, read


def test_resync_work_is_bounded_on_a_log_of_forged_candidates() -> None:
    """Every 64 bytes a record header (magic, generation) whose payload reaches to the end of
    the log, with a bad checksum: without a budget, a quadratic number of checksum bytes."""
    size = 1 << 20
    raw = bytearray(size)
    for pos in range(0, size - 64, 64):
        stored = size - pos - 64
        raw[pos:pos + F.RECORD_HEADER] = F.RECORD_STRUCT.pack(
            F.RECORD_MAGIC, F.RECORD_VERSION, 0, 5, stored, 1, A, stored, 0, 0, 0)
    log = np.frombuffer(bytes(raw), np.uint8)
    C.warm()  # time the work, not a compilation
    t = time.monotonic()
    rows, n, spent, gave_up = C.resync(log, 0, size, 5, C.budget(size))
    assert time.monotonic() - t < 2.0
    assert gave_up and n == 0 and spent <= C.budget(size) + size


def test_warm_compiles_the_kernel_for_read_only_logs_too() -> None:
    C.warm()
    ro = np.frombuffer(bytes(256), np.uint8)
    assert C.resync(ro, 0, 256, -1, 1 << 20)[1] == 0
