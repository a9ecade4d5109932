"""The NVLog writer over a real NVRAM region (a memfd mapping), read back by the replay scan.

The writer's bytes are also compared with the independent record builder of the replay tests
(google_crc32c, not our crc), so the writer and the reader cannot agree on a wrong format.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import nvlog_format as F
from storage import region as shm
from storage import replay
from storage.nvlog import NVLogWriter, RegionHeader, format_region, log_view
from tests.unit.conftest import Fds
from tests.unit.nvlog_build import build_log
from vmemu.errors import LogFull

RID = 0x5EED
LUN_A, LUN_B = F.lun_gid(1, 0), F.lun_gid(1, 1)


def writes(n: int, size: int = 100) -> list[tuple[int, int, bytes, int, int]]:
    """n distinct writes: (lun, offset, payload, client, request)."""
    return [((LUN_A, LUN_B)[i % 2], 512 * i, bytes([i % 251 + 1]) * (size + i), 7, 1000 + i)
            for i in range(n)]


def scan(buf: mmap.mmap) -> tuple[np.ndarray, int, int]:
    hdr = RegionHeader.read(buf)
    index, count, end = replay.scan(log_view(buf), hdr.generation, hdr.base_seq)
    return index[:count], int(count), int(end)


def test_format_writes_a_header_the_reader_accepts(fds: Fds) -> None:
    _, buf = fds.region(3, RID, 64 * 1024)
    hdr = RegionHeader.read(buf)
    assert hdr == RegionHeader(3, RID, 64 * 1024 - F.REGION_HEADER, 1, 1, 0)
    assert scan(buf)[1] == 0


def test_reading_a_region_that_was_never_formatted_is_refused(fds: Fds) -> None:
    fd = fds.memfd(8192)
    with pytest.raises(ValueError, match="not an NVRAM region"):
        RegionHeader.read(fds.map(shm.map_read_only(fd)))


def test_appended_records_are_exactly_what_scan_finds_with_every_column(fds: Fds) -> None:
    _, buf = fds.region(1, RID)
    w = NVLogWriter(buf)
    recs = writes(20)
    seqs = [w.append(lun, off, data, client, req) for lun, off, data, client, req in recs]
    assert seqs == list(range(1, 21))
    assert w.records == 20 and w.last_seq == 20
    index, count, end = scan(buf)
    assert count == 20 and end == w.tail
    log = log_view(buf)
    pos = 0
    for row, (lun, off, data, client, req), seq in zip(index, recs, seqs):
        assert row[F.IDX_POS] == pos
        assert row[F.IDX_SEQ] == seq
        assert row[F.IDX_LUN] == lun
        assert row[F.IDX_OFFSET] == off
        assert row[F.IDX_LENGTH] == len(data)
        assert row[F.IDX_CLIENT] == client
        assert row[F.IDX_REQUEST] == req
        assert row[F.IDX_FLAGS] == F.FLAG_WRITE and row[F.IDX_STORED] == len(data)  # raw
        body = pos + F.RECORD_HEADER
        assert log[body:body + len(data)].tobytes() == data
        pos += F.record_size(len(data))
    assert struct.unpack_from("<Q", buf, F.OFF_TAIL)[0] == w.tail  # advisory tail kept up


def test_writer_bytes_equal_an_independently_built_log(fds: Fds) -> None:
    _, buf = fds.region(1, RID)
    w = NVLogWriter(buf)
    recs = writes(9, size=37)  # odd lengths: padding bytes must be zero too
    for lun, off, data, client, req in recs:
        w.append(lun, off, data, client, req)
    want = build_log(recs, generation=1, base_seq=1, capacity=w.tail)
    assert log_view(buf)[:w.tail].tobytes() == bytes(want)


def test_log_full_raises_and_writes_nothing(fds: Fds) -> None:
    _, buf = fds.region(1, RID, F.REGION_HEADER + 4096)
    w = NVLogWriter(buf)
    payload = b"\x11" * 1000  # 1064 bytes a record: three fit in 4096
    for i in range(3):
        assert w.fits(len(payload))
        w.append(LUN_A, 4096 * i, payload)
    assert not w.fits(len(payload))
    before = bytes(buf)
    state = (w.tail, w.next_seq, w.records)
    with pytest.raises(LogFull):
        w.append(LUN_A, 0, payload)
    assert bytes(buf) == before
    assert (w.tail, w.next_seq, w.records) == state
    assert scan(buf)[1] == 3
    w.append(LUN_A, 0, b"\x22" * (4096 - 3 * 1064 - F.record_size(0)))  # exactly fills it
    assert w.used == w.capacity and scan(buf)[1] == 4


def test_reset_starts_a_new_generation_and_old_records_are_no_longer_scanned(fds: Fds) -> None:
    _, buf = fds.region(1, RID)
    w = NVLogWriter(buf)
    for lun, off, data, c, r in writes(10, size=300):
        w.append(lun, off, data, c, r)
    w.reset()
    hdr = RegionHeader.read(buf)
    assert (hdr.generation, hdr.base_seq, hdr.tail) == (2, 11, 0)
    assert w.used == 0 and w.records == 0
    assert scan(buf)[1] == 0
    # A short new record over the start: the stale old ones behind it stay invisible.
    assert w.append(LUN_B, 0, b"new") == 11
    index, count, end = scan(buf)
    assert count == 1 and index[0][F.IDX_SEQ] == 11 and end == F.record_size(3)


def test_crash_between_base_seq_and_generation_writes_replays_nothing_old(fds: Fds) -> None:
    _, buf = fds.region(1, RID)
    w = NVLogWriter(buf)
    for lun, off, data, c, r in writes(5):
        w.append(lun, off, data, c, r)
    # reset() dies right after its first store: base_seq moved, generation did not.
    struct.pack_into("<Q", buf, F.OFF_BASE_SEQ, w.next_seq)
    hdr = RegionHeader.read(buf)
    assert (hdr.generation, hdr.base_seq) == (1, 6)
    assert scan(buf)[1] == 0  # those records were on disk already (a CP preceded the reset)


@pytest.mark.parametrize("where", ["crc", "payload", "header"])
def test_torn_last_record_ends_the_log_before_it(fds: Fds, where: str) -> None:
    _, buf = fds.region(1, RID)
    w = NVLogWriter(buf)
    recs = writes(6)
    for lun, off, data, c, r in recs:
        w.append(lun, off, data, c, r)
    last_pos = F.REGION_HEADER + w.tail - F.record_size(len(recs[-1][2]))
    at = {"crc": last_pos + F.RECORD_HEADER + len(recs[-1][2]),
          "payload": last_pos + F.RECORD_HEADER + 3,
          "header": last_pos + 32}[where]  # the offset field
    buf[at] ^= 0x40
    index, count, end = scan(buf)
    assert count == 5 and end == last_pos - F.REGION_HEADER
    assert list(index[:, F.IDX_SEQ]) == [1, 2, 3, 4, 5]


DISK = 16 * 1024


@contextlib.contextmanager
def scratch_region(size: int) -> Iterator[mmap.mmap]:
    fd = shm.allocate(f"vmemu-test-{os.getpid()}-nvlog-prop", size)
    buf = shm.map_read_write(fd)
    try:
        format_region(buf, 1, RID)
        yield buf
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([LUN_A, LUN_B]), st.integers(0, DISK - 1),
                          st.binary(min_size=1, max_size=700)), max_size=40),
       st.integers(0, 10), st.booleans())
def test_writer_then_apply_equals_applying_the_writes_directly(
        recs: list[tuple[int, int, bytes]], min_seq: int, read_only: bool) -> None:
    recs = [(lun, min(off, DISK - len(p)), p) for lun, off, p in recs]
    with scratch_region(F.REGION_HEADER + 64 * 1024) as buf:
        w = NVLogWriter(buf)
        for lun, off, data in recs:
            w.append(lun, off, data)
        log = log_view(buf)
        if read_only:  # what a partner holding a read-only grant sees
            log = np.frombuffer(log.tobytes(), np.uint8)
        index, count, _ = replay.scan(log, w.generation, 1)
        assert count == len(recs)
        for lun in (LUN_A, LUN_B):
            disk = np.full(DISK, 0xA5, np.uint8)
            want = disk.copy()
            for seq, (rl, off, data) in enumerate(recs, start=1):
                if rl == lun and seq > min_seq:
                    want[off:off + len(data)] = np.frombuffer(data, np.uint8)
            replay.apply(log, index, count, lun, min_seq, disk)
            assert np.array_equal(disk, want)
        del w, log, index
