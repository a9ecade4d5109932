"""The bulk takeover replay (gathered blocks, one exactly-once pass) against the per-record
path it replaced: same cache contents, same figures, same exactly-once table, on random logs
with overlapping, unaligned, partial and compressed writes and repeated (client, request)."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains import exactly_once
from domains.dmodule import DModule, _count_replay
from domains.exactly_once import ExactlyOnce, rebuild_table, rebuild_table_py
from domains.store import LunHandle
from storage import nvlog_format as F
from storage import replay
from storage.blockcache import BLOCK, BlockCache
from storage.nvlog import record_payload
from tests.unit.nvlog_build import build_log, record_positions

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LUN_BLOCKS = 12
GID = F.lun_gid(1, 0)
OTHER = F.lun_gid(1, 1)
GEN, BASE = 5, 1


def old_replay_into_cache(cache: BlockCache, lun: LunHandle, log: np.ndarray, index: np.ndarray,
                          count: int, gid: int, min_seq: int, total: dict[str, Any]) -> None:
    """The per-row path the bulk one replaced (as it was)."""
    rows, bad = replay.plan(log, index, count, gid, min_seq, lun.size)
    nbytes = 0
    for r in rows:
        row = index[int(r)]
        data = record_payload(log, row)
        cache.write(lun.index, int(row[F.IDX_OFFSET]), data)
        nbytes += len(data)
    _count_replay(total, index, count, gid, min_seq, lun.size, bad, rows.size, nbytes, rows.size)


@st.composite
def writes(draw: st.DrawFn) -> tuple[list[tuple], list[bool]]:
    """Mostly whole aligned blocks (the bulk path), with partial, unaligned, multi-block,
    out-of-range, empty and compressed rows among them, on two LUNs."""
    n = draw(st.integers(0, 30))
    recs: list[tuple] = []
    comp: list[bool] = []
    for i in range(n):
        kind = draw(st.sampled_from(["block", "block", "blocks", "partial", "unaligned", "empty",
                                     "outside"]))
        b = draw(st.integers(0, LUN_BLOCKS - 1))
        if kind == "block":
            off, length = b * BLOCK, BLOCK
        elif kind == "blocks":
            off, length = b * BLOCK, BLOCK * draw(st.integers(1, 3))
        elif kind == "partial":
            off, length = b * BLOCK + draw(st.sampled_from([0, 8, 1000])), draw(st.sampled_from([8, 512]))
        elif kind == "unaligned":
            off, length = b * BLOCK + 100, BLOCK
        elif kind == "empty":
            off, length = b * BLOCK, 0
        else:
            off, length = LUN_BLOCKS * BLOCK, BLOCK
        # Random bytes from a drawn seed (4 KiB drawn byte by byte would be too much entropy);
        # compressible runs too, so lz4 rows really compress.
        seed = draw(st.integers(0, 255))
        payload = bytes([seed]) * length if draw(st.booleans()) \
            else np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
        recs.append((draw(st.sampled_from([GID, GID, OTHER])), off, payload,
                     draw(st.integers(0, 3)), draw(st.integers(0, 5))))
        comp.append(draw(st.booleans()) and draw(st.booleans()))
    return recs, comp


def scanned(recs: list[tuple], comp: list[bool]) -> tuple[np.ndarray, np.ndarray, int]:
    raw = build_log(recs, GEN, BASE, record_positions(recs, comp)[-1] + 64, comp)
    log = np.frombuffer(bytes(raw), dtype=np.uint8)  # read-only, as a partner maps it
    index, count, _ = replay.scan(log, GEN, BASE)
    assert count == len(recs)
    return log, index, int(count)


def fresh_cache(seed: int) -> BlockCache:
    """A cache over a committed image, with some frozen and some active blocks already."""
    rng = np.random.default_rng(seed)
    disk = rng.integers(0, 256, LUN_BLOCKS * BLOCK, dtype=np.uint8).tobytes()
    cache = BlockCache(lambda lun, first, n: disk[first * BLOCK:(first + n) * BLOCK])
    for b in rng.choice(LUN_BLOCKS, 3, replace=False).tolist():
        cache.write(0, b * BLOCK, bytes([0xF0]) * BLOCK)
    cache.freeze()
    for b in rng.choice(LUN_BLOCKS, 3, replace=False).tolist():
        cache.write(0, b * BLOCK + 16, bytes([0xA0]) * 32)
    return cache


def contents(cache: BlockCache) -> tuple[dict, dict, bytes]:
    gen = lambda g: {lun: {b: bytes(v) for b, v in blks.items()} for lun, blks in g.items()}  # noqa: E731
    return gen(cache.active), gen(cache.frozen), cache.read(0, 0, LUN_BLOCKS * BLOCK)


def totals() -> dict[str, Any]:
    return collections.Counter({k: 0 for k in ("records", "bytes", "bad", "written",
                                               "written_bytes", "writes")})


@SETTINGS
@given(log=writes(), min_seq=st.integers(0, 10), seed=st.integers(0, 3),
       after=st.lists(st.tuples(st.integers(0, LUN_BLOCKS * BLOCK - 600), st.integers(1, 600)),
                      max_size=4))
def test_bulk_replay_into_the_cache_equals_the_per_row_path(
        log: tuple[list[tuple], list[bool]], min_seq: int, seed: int,
        after: list[tuple[int, int]]) -> None:
    recs, comp = log
    arr, index, count = scanned(recs, comp)
    lun = LunHandle(1, 0, LUN_BLOCKS * BLOCK, "lun0")
    new, old = fresh_cache(seed), fresh_cache(seed)
    t_new, t_old = totals(), totals()
    DModule._replay_into_cache(new, lun, arr, index, count, GID, BASE + min_seq, t_new)
    old_replay_into_cache(old, lun, arr, index, count, GID, BASE + min_seq, t_old)
    assert t_new == t_old
    assert contents(new) == contents(old)
    # The gathered blocks stay ordinary cache blocks: written in place, frozen, committed.
    for off, n in after:
        for c in (new, old):
            c.write(0, off, bytes([0x3C]) * n)
    assert contents(new) == contents(old)
    for c in (new, old):
        c.thaw()
    fa, fo = new.freeze(), old.freeze()
    assert {b: bytes(v) for b, v in fa.get(0, {}).items()} == \
        {b: bytes(v) for b, v in fo.get(0, {}).items()}


def test_put_blocks_later_block_wins_and_refuses_a_short_buffer() -> None:
    cache = BlockCache(lambda lun, first, n: bytes(n * BLOCK))
    data = bytearray(b"".join(bytes([i]) * BLOCK for i in range(1, 4)))
    cache.put_blocks(2, [5, 7, 5], memoryview(data))
    assert cache.read(2, 5 * BLOCK, BLOCK) == bytes([3]) * BLOCK
    assert cache.read(2, 7 * BLOCK, BLOCK) == bytes([2]) * BLOCK
    cache.write(2, 7 * BLOCK + 1, b"\x09")  # in place, in the gathered buffer
    assert cache.read(2, 7 * BLOCK, 3) == b"\x02\x09\x02"
    with pytest.raises(ValueError):
        cache.put_blocks(2, [1, 2], memoryview(bytearray(BLOCK)))
    with pytest.raises(ValueError):
        cache.put_blocks(2, [1], memoryview(bytes(BLOCK)))  # read-only: writes go in place


# --------------------------------------------------------------------------- exactly-once


def table_state(t: ExactlyOnce) -> list[tuple[int, list[int]]]:
    return [(c, list(r)) for c, r in t.seen.items()]


pairs = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9)), max_size=60)


@SETTINGS
@given(before=pairs, events=pairs, per_client=st.integers(1, 6), clients=st.integers(1, 7))
def test_record_many_equals_record_per_pair(before: list[tuple[int, int]],
                                            events: list[tuple[int, int]], per_client: int,
                                            clients: int) -> None:
    with pytest.MonkeyPatch.context() as mp:  # small bounds: eviction of both kinds happens
        mp.setattr(exactly_once, "DEDUP_PER_CLIENT", per_client)
        mp.setattr(exactly_once, "DEDUP_CLIENTS", clients)
        a, b = ExactlyOnce(), ExactlyOnce()
        for c, r in before:
            a.record(c, r)
            b.record(c, r)
        cs = np.array([c for c, _ in events], dtype=np.int64)
        rs = np.array([r for _, r in events], dtype=np.int64)
        a.record_many(cs, rs)
        b.record_py(cs, rs)
        assert table_state(a) == table_state(b)


def test_record_many_keeps_ids_above_2_63_as_record_does() -> None:
    a, b = ExactlyOnce(), ExactlyOnce()
    for t in (a, b):
        t.record(3, 1 << 63)  # from a table record: a u64 no int64 holds
    cs, rs = np.array([3, 3, -2], dtype=np.int64), np.array([-1, 4, -5], dtype=np.int64)
    a.record_many(cs, rs)
    b.record_py(cs, rs)
    assert table_state(a) == table_state(b)


@st.composite
def logs_with_tables(draw: st.DrawFn) -> list[tuple]:
    big = st.sampled_from([1 << 63, (1 << 64) - 1, 1 << 62])
    ids = st.one_of(st.integers(0, 4), big) if draw(st.booleans()) else st.integers(0, 4)
    out: list[tuple] = []
    for _ in range(draw(st.integers(0, 25))):
        if draw(st.integers(0, 5)) == 0:  # a table record: pairs, maybe a torn last one
            n = draw(st.integers(0, 6))
            vals = [draw(ids) for _ in range(2 * n)]
            payload = np.asarray(vals, dtype="<u8").tobytes() + bytes(draw(st.sampled_from([0, 8])))
            out.append((F.DEDUP_LUN, 0, payload, 0, 0))
        else:
            out.append((draw(st.sampled_from([GID, OTHER, F.lun_gid(2, 0)])), 0, b"\x01" * 8,
                        draw(ids), draw(ids)))
    return out


@SETTINGS
@given(recs=logs_with_tables(), before=pairs)
def test_rebuild_table_equals_the_per_record_rebuild(recs: list[tuple],
                                                     before: list[tuple[int, int]]) -> None:
    arr, index, count = scanned(recs, [False] * len(recs))
    a, b = ExactlyOnce(), ExactlyOnce()
    for t in (a, b):
        for c, r in before:
            t.record(c, r)
    gids = {GID, OTHER}
    assert rebuild_table(a, arr, index, count, gids) == rebuild_table_py(b, arr, index, count, gids)
    assert table_state(a) == table_state(b)
