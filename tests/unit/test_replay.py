"""NVLog replay: the numba kernels against the pure-Python reference, and the rules a
takeover depends on (stop at the first unverifiable record, never write out of bounds,
idempotence, read-only grants)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba.core.errors import TypingError

from storage import replay, replay_ref
from storage.nvlog_format import (
    IDX_CLIENT,
    IDX_COLUMNS,
    IDX_FLAGS,
    IDX_LENGTH,
    IDX_LUN,
    IDX_OFFSET,
    IDX_POS,
    IDX_REQUEST,
    IDX_SEQ,
    IDX_STORED,
    RECORD_HEADER,
    lun_gid,
    record_size,
)
from tests.unit.nvlog_build import Record, build_log, pack_record, record_positions

DISK = 4096
LUNS = [lun_gid(1, 0), lun_gid(1, 1), lun_gid(2, 0)]
GEN = 7
BASE = 100

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def u8(buf: bytes | bytearray, readonly: bool = False) -> np.ndarray:
    if readonly:
        return np.frombuffer(bytes(buf), np.uint8)
    return np.frombuffer(bytearray(buf), np.uint8)


def fresh_disks(luns: list[int] = LUNS) -> dict[int, np.ndarray]:
    # Non-zero background, so a write of zeros is visible too.
    return {lun: np.full(DISK, 0xA5 ^ (lun & 0xFF), np.uint8) for lun in luns}


def run_both(
    log: np.ndarray, records_luns: list[int] = LUNS, min_seqs: dict[int, int] | None = None,
    generation: int = GEN, base_seq: int = BASE,
) -> tuple[replay.ReplayResult, dict[int, np.ndarray]]:
    """Replay with numba and with the reference; assert they agree; return numba's."""
    min_seqs = min_seqs or {}
    d_fast, d_ref = fresh_disks(records_luns), fresh_disks(records_luns)
    fast = replay.replay_region(log, generation, base_seq, d_fast, min_seqs)
    ref = replay_ref.replay_region(log, generation, base_seq, d_ref, min_seqs)
    assert fast == ref
    for lun in d_fast:
        assert np.array_equal(d_fast[lun], d_ref[lun]), lun
    i_fast, c_fast, e_fast = replay.scan(log, generation, base_seq)
    i_ref, c_ref, e_ref = replay_ref.scan(log, generation, base_seq)
    assert (c_fast, e_fast) == (c_ref, e_ref)
    assert i_fast.dtype == np.int64 and i_fast.shape[1] == IDX_COLUMNS
    assert np.array_equal(i_fast[:c_fast], i_ref[:c_ref])
    return fast, d_fast


def expected_disks(
    records: list[Record], upto: int, min_seqs: dict[int, int] | None = None,
    base_seq: int = BASE,
) -> dict[int, np.ndarray]:
    """What the disks must hold after replaying the first `upto` records: a model."""
    min_seqs = min_seqs or {}
    disks = fresh_disks()
    for i, (lun, off, payload, _c, _r) in enumerate(records[:upto]):
        if base_seq + i <= min_seqs.get(lun, -1) or off + len(payload) > DISK:
            continue
        disks[lun][off : off + len(payload)] = np.frombuffer(payload, np.uint8)
    return disks


@st.composite
def record_lists(draw: st.DrawFn, max_records: int = 12) -> list[Record]:
    n = draw(st.integers(0, max_records))
    out: list[Record] = []
    for _ in range(n):
        length = draw(st.sampled_from([0, 1, 7, 8, 9, 63, 200, 512, 777]))
        # Mostly in bounds, sometimes not (those must be counted bad, never written).
        off = draw(st.integers(0, DISK - length) | st.integers(DISK - length + 1, DISK + 64))
        payload = draw(st.binary(min_size=length, max_size=length))
        client = draw(st.integers(0, 2**64 - 1))
        request = draw(st.integers(0, 2**64 - 1))
        out.append((draw(st.sampled_from(LUNS)), off, payload, client, request))
    return out


def capacity_for(records: list[Record], slack: int = 0) -> int:
    return record_positions(records)[-1] + slack


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(records=record_lists(), slack=st.integers(0, 200), readonly=st.booleans())
def test_matches_reference_and_model(records: list[Record], slack: int, readonly: bool) -> None:
    log = u8(build_log(records, GEN, BASE, capacity_for(records, slack)), readonly)
    result, disks = run_both(log)
    assert result.scanned == len(records)
    assert result.end_pos == record_positions(records)[-1]
    assert result.last_seq == BASE + len(records) - 1
    oob = sum(off + len(p) > DISK for _, off, p, _, _ in records)
    assert result.bad == oob
    assert result.records == len(records) - oob
    want = expected_disks(records, len(records))
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])


@SETTINGS
@given(records=record_lists(), data=st.data())
def test_any_corruption_matches_reference(records: list[Record], data: st.DataObject) -> None:
    raw = build_log(records, GEN, BASE, capacity_for(records, 64))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    run_both(u8(raw))


@SETTINGS
@given(records=record_lists(max_records=10).filter(bool), data=st.data())
def test_torn_record_ends_the_log(records: list[Record], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    raw = build_log(records, GEN, BASE, capacity_for(records))
    pos = record_positions(records)
    # Any byte of record k's header, payload or crc (not its zero padding).
    body = RECORD_HEADER + len(records[k][2]) + 4
    at = pos[k] + data.draw(st.integers(0, body - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    result, disks = run_both(u8(raw))
    assert result.scanned == k
    assert result.end_pos == pos[k]
    assert result.last_seq == BASE + k - 1
    want = expected_disks(records, k)
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])


@SETTINGS
@given(records=record_lists(), data=st.data())
def test_min_seq_skips_what_a_cp_wrote(records: list[Record], data: st.DataObject) -> None:
    min_seqs = {
        lun: data.draw(st.integers(BASE - 2, BASE + len(records) + 1)) for lun in LUNS[:2]
    }
    log = u8(build_log(records, GEN, BASE, capacity_for(records)))
    result, disks = run_both(log, min_seqs=min_seqs)
    want = expected_disks(records, len(records), min_seqs)
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])
    assert result.scanned == len(records)


@SETTINGS
@given(records=record_lists())
def test_replay_twice_equals_once(records: list[Record]) -> None:
    log = u8(build_log(records, GEN, BASE, capacity_for(records)), readonly=True)
    once, twice = fresh_disks(), fresh_disks()
    replay.replay_region(log, GEN, BASE, once, {})
    replay.replay_region(log, GEN, BASE, twice, {})
    replay.replay_region(log, GEN, BASE, twice, {})
    for lun in LUNS:
        assert np.array_equal(once[lun], twice[lun])


# --------------------------------------------------------------------------- stop rules


def payloads(n: int, length: int = 100) -> list[Record]:
    return [
        (LUNS[i % len(LUNS)], (i * 37) % (DISK - length), bytes([i + 1]) * length, 9, i)
        for i in range(n)
    ]


def test_empty_log() -> None:
    for log in (u8(bytes(4096)), u8(b""), u8(bytes(8))):
        result, _ = run_both(log)
        assert (result.scanned, result.end_pos, result.last_seq) == (0, 0, BASE - 1)
        assert (result.records, result.bytes, result.bad) == (0, 0, 0)


@pytest.mark.parametrize("field", ["generation", "seq_gap", "seq_repeat"])
def test_stops_at_wrong_generation_or_sequence(field: str) -> None:
    records = payloads(6)
    k = 3
    parts = []
    for i, (lun, off, p, c, r) in enumerate(records):
        gen, seq = GEN, BASE + i
        if i >= k:  # record k breaks the rule; later ones follow on from it consistently
            if field == "generation":
                gen = GEN + 1
            elif field == "seq_gap":
                seq += 1
            else:
                seq -= 1
        parts.append(pack_record(lun, off, p, c, r, gen, seq))
    log = u8(b"".join(parts) + bytes(64))
    result, disks = run_both(log)
    assert result.scanned == k
    assert result.end_pos == record_positions(records)[k]
    want = expected_disks(records, k)
    for lun in LUNS:
        assert np.array_equal(disks[lun], want[lun])


def test_first_record_must_carry_base_seq() -> None:
    log = u8(build_log(payloads(3), GEN, BASE + 1, 4096))
    result, _ = run_both(log)
    assert result.scanned == 0 and result.end_pos == 0


def test_stale_older_generation_after_tail_not_replayed() -> None:
    # Generation 6 filled the log; after a reset generation 7 wrote 2 records over its
    # start. Generation 6's records behind them are intact, checksums and all.
    old = [(LUNS[0], 0, b"\xee" * 50, 1, i) for i in range(20)]
    raw = build_log(old, GEN - 1, 10, 4096)
    new = payloads(2, length=50)
    fresh = build_log(new, GEN, BASE, 4096)
    end = record_positions(new)[-1]
    raw[:end] = fresh[:end]
    result, disks = run_both(u8(raw, readonly=True))
    assert result.scanned == 2 and result.end_pos == end
    assert not (disks[LUNS[0]] == 0xEE).any()
    # The same bytes scanned as generation 6 stop at the new records.
    assert replay.scan(u8(raw), GEN - 1, 10)[1] == 0


def test_stale_same_generation_records_with_old_seq_not_replayed() -> None:
    # A record whose seq was already passed (leftover of the same generation) also stops.
    records = payloads(4)
    raw = build_log(records, GEN, BASE, 4096)
    end = record_positions(records)[-1]
    raw[end : end + record_size(100)] = pack_record(LUNS[0], 0, b"\xab" * 100, 1, 1, GEN, BASE)
    result, _ = run_both(u8(raw))
    assert result.scanned == 4 and result.end_pos == end


def test_length_that_does_not_fit_stops() -> None:
    records = payloads(3)
    raw = build_log(records, GEN, BASE, record_positions(records)[-1])
    # Cut the log inside the last record's padding: the writer could not have put it there.
    for cut in (len(raw) - 1, len(raw) - 8, len(raw) - 30):
        result, _ = run_both(u8(raw[:cut]))
        assert result.scanned == 2
    # A length field far beyond the log (not a valid crc either way): no out-of-bounds read.
    bogus = bytearray(raw)
    bogus[record_positions(records)[1] + 12 : record_positions(records)[1] + 16] = b"\xff" * 4
    result, _ = run_both(u8(bogus))
    assert result.scanned == 1


def test_out_of_bounds_record_counted_bad_and_not_written() -> None:
    records: list[Record] = [
        (LUNS[0], 10, b"\x01" * 20, 0, 0),
        (LUNS[0], DISK - 10, b"\x02" * 20, 0, 1),  # straddles the end
        (LUNS[0], 2**63 - 5, b"\x03" * 20, 0, 2),  # offset + length overflows int64
        (LUNS[0], 2**64 - 1, b"\x04" * 20, 0, 3),  # reads back as -1
        (LUNS[0], DISK, b"", 0, 4),  # empty write at the very end: fine
        (LUNS[0], 30, b"\x05" * 20, 0, 5),  # after the bad ones: still applied
    ]
    log = u8(build_log(records, GEN, BASE, 4096))
    backing = np.full(DISK + 256, 0x77, np.uint8)
    disk = backing[:DISK]
    r = replay.replay_region(log, GEN, BASE, {LUNS[0]: disk}, {})
    assert (r.records, r.bytes, r.bad, r.scanned) == (3, 40, 3, 6)
    assert (backing[DISK:] == 0x77).all()
    assert (disk[10:30] == 1).all() and (disk[30:50] == 5).all()
    assert (disk[DISK - 10 :] == 0x77).all()
    run_both(log)


def test_bogus_index_rows_are_bad_not_crashes() -> None:
    records = payloads(2)
    log = u8(build_log(records, GEN, BASE, 1024))
    index, count, _ = replay.scan(log, GEN, BASE)
    index = index.copy()
    index[0, IDX_POS] = log.size  # payload would be read past the log
    index[1, IDX_POS] = -RECORD_HEADER - 1
    for mod in (replay, replay_ref):
        disk = np.zeros(DISK, np.uint8)
        for lun in LUNS:
            assert mod.apply(log, index, count, lun, -1, disk)[0] == 0
        assert not disk.any()


def test_index_columns_and_large_u64_fields() -> None:
    records: list[Record] = [
        (LUNS[2], 5, b"xyz", 2**64 - 2, 2**63),
        (LUNS[1], 0, b"", 1, 2),
    ]
    log = u8(build_log(records, GEN, BASE, 512))
    index, count, end = replay.scan(log, GEN, BASE)
    assert count == 2 and end == record_positions(records)[-1]
    row = index[0]
    assert row[IDX_POS] == 0 and row[IDX_SEQ] == BASE and row[IDX_LUN] == LUNS[2]
    assert row[IDX_OFFSET] == 5 and row[IDX_LENGTH] == 3
    assert row[IDX_CLIENT] == -2 and row[IDX_REQUEST] == -(2**63)
    assert row[IDX_FLAGS] == 0 and row[IDX_STORED] == 3  # raw: stored is the length
    assert index[1, IDX_POS] == record_size(3) and index[1, IDX_SEQ] == BASE + 1
    run_both(log)


def test_generation_compared_on_its_low_32_bits() -> None:
    gen = (5 << 32) | GEN
    log = u8(build_log(payloads(2), gen, BASE, 1024))
    assert replay.scan(log, gen, BASE)[1] == 2
    run_both(log, generation=gen)


def test_index_grows_past_first_allocation() -> None:
    records: list[Record] = [(LUNS[i % 2], i % DISK, b"", 0, i) for i in range(3000)]
    records[-1] = (LUNS[0], 0, b"end!", 0, 2999)
    log = u8(build_log(records, GEN, BASE, capacity_for(records, 100)), readonly=True)
    index, count, end = replay.scan(log, GEN, BASE)
    assert count == 3000 and end == record_positions(records)[-1]
    assert np.array_equal(index[:, IDX_SEQ], np.arange(BASE, BASE + 3000))
    ref_index, ref_count, ref_end = replay_ref.scan(log, GEN, BASE)
    assert np.array_equal(index, ref_index) and (count, end) == (ref_count, ref_end)


def test_memmap_disk_and_read_only_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    records = payloads(5)
    log = u8(build_log(records, GEN, BASE, 2048), readonly=True)
    image = np.memmap(tmp_path / "lun.img", dtype=np.uint8, mode="w+", shape=(DISK,))
    r = replay.replay_region(log, GEN, BASE, {LUNS[0]: image}, {})
    image.flush()
    want = np.zeros(DISK, np.uint8)  # a fresh image is zeros
    for lun, off, payload, _, _ in records:
        if lun == LUNS[0]:
            want[off : off + len(payload)] = np.frombuffer(payload, np.uint8)
    on_disk = np.fromfile(tmp_path / "lun.img", np.uint8)
    assert r.records == 2 and np.array_equal(on_disk, want)
    del image


def test_luns_not_asked_for_are_scanned_not_applied() -> None:
    records = payloads(6)
    log = u8(build_log(records, GEN, BASE, 2048))
    disks = {LUNS[1]: np.zeros(DISK, np.uint8)}
    r = replay.replay_region(log, GEN, BASE, disks, {})
    assert r.scanned == 6 and r.records == 2 and r.bytes == 200


def test_warm_runs() -> None:
    replay.warm()


_NO_SSE42_SCRIPT = """
import numpy as np
from storage import checksum, replay
from tests.unit.nvlog_build import build_log
assert not checksum.HAVE_SSE42, "NUMBA_CPU_NAME=generic must select the table path"
assert replay.crc32c_kernel is checksum.crc32c_kernel_table
recs = [(1, 8 * i, bytes([i]) * 300, 0, i) for i in range(5)]
raw = build_log(recs, 3, 0, 4096)
raw[1700] ^= 1  # inside record 4
log = np.frombuffer(bytes(raw), np.uint8)
disk = np.zeros(4096, np.uint8)
r = replay.replay_region(log, 3, 0, {1: disk}, {})
assert (r.scanned, r.records) == (4, 4), r
print("ok")
"""


def test_table_path_end_to_end_on_a_target_without_sse42(request: pytest.FixtureRequest) -> None:
    """What a CPU without SSE4.2 would run: detection, then scan on the table kernel.

    A subprocess, because the crc kernel is chosen at import. Its numba cache lives in
    pytest's cache dir (first run compiles for ~7 s, later runs load it).
    """
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env.update(
        NUMBA_CPU_NAME="generic",
        NUMBA_CACHE_DIR=str(request.config.cache.mkdir("numba-generic-cpu")),
        PYTHONPATH=str(root),
    )
    out = subprocess.run(
        [sys.executable, "-c", _NO_SSE42_SCRIPT], cwd=root, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_read_only_or_strided_disk_refused_at_compile_time() -> None:
    # apply copies with a raw memmove: a read-only disk must never get that far.
    log = u8(build_log(payloads(1), GEN, BASE, 512))
    index, count, _ = replay.scan(log, GEN, BASE)
    for disk in (u8(bytes(DISK), readonly=True), np.zeros(2 * DISK, np.uint8)[::2]):
        with pytest.raises(TypingError):
            replay.apply(log, index, count, LUNS[0], -1, disk)
