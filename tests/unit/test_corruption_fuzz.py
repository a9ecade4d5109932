"""Fuzz, bounded for CI: real NVRAM regions and real disk headers, mutated by hypothesis.

The properties live in tests/fuzz/nvram.py and tests/fuzz/disk_header.py (``check``);
`python -m tests.fuzz --target nvram`
runs the same checks for 100,000 inputs. Each property is also shown failing on a reader with
the check it guards taken out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import disk_header, nvram
from storage import nvlog_check

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
N_SAMPLES = 4


@functools.cache
def samples() -> list[nvram.Sample]:
    nvlog_check.warm()
    return [nvram.build(100 + k) for k in range(N_SAMPLES)]


@st.composite
def nvram_input(draw: st.DrawFn) -> tuple[nvram.Sample, list[nvram.Mutation]]:
    sample = draw(st.sampled_from(samples()))
    n = len(sample.records)
    in_record = (st.sampled_from(sample.records).flatmap(
        lambda r: st.builds(nvram.Mutation, st.just("flip"),
                            st.integers(r.pos, r.pos + r.padded - 1), st.integers(0, 7)))
        if n else st.nothing())
    one = st.one_of(
        in_record,
        st.builds(nvram.Mutation, st.just("flip"), st.integers(0, nvram.REGION - 1),
                  st.integers(0, 7)),
        st.builds(nvram.Mutation, st.just("field"), st.integers(0, len(nvram.HEADER_FIELDS) - 1),
                  st.integers(0, len(nvram.EXTREMES) - 1), st.integers(0, 1 << 16)),
        st.builds(nvram.Mutation, st.just("record_field"), st.integers(0, max(n - 1, 0)),
                  st.integers(0, len(nvram.RECORD_FIELDS) - 1),
                  st.integers(0, len(nvram.EXTREMES) - 1)),
        st.builds(nvram.Mutation, st.just("zero"), st.integers(0, nvram.REGION - 1),
                  st.integers(1, 512)),
        st.builds(nvram.Mutation, st.just("truncate"), st.integers(0, nvram.REGION - 1)),
    )
    return sample, draw(st.lists(one, min_size=1, max_size=3))


@SETTINGS
@given(inp=nvram_input())
def test_mutated_regions_never_crash_never_apply_unverified_records_and_are_reported(
        inp: tuple[nvram.Sample, list[nvram.Mutation]]) -> None:
    sample, muts = inp
    assert nvram.check(sample, muts) == []


@pytest.fixture(scope="module")
def disk_target() -> Iterator[disk_header.Target]:
    t = disk_header.Target(seed=3)
    yield t
    t.close()


DISK_MUTATION = st.one_of(
    st.builds(disk_header.Mutation, st.just("flip"), st.integers(0, 300), st.integers(0, 7)),
    st.builds(disk_header.Mutation, st.just("field"), st.integers(0, len(disk_header.FIELDS) - 1),
              st.integers(0, len(disk_header.EXTREMES) - 1)),
    st.builds(disk_header.Mutation, st.just("applied"), st.integers(0, 1 << 30)),
    st.builds(disk_header.Mutation, st.just("raw_applied"), st.integers(0, 1 << 30),
              st.integers(0, 200)),
    st.builds(disk_header.Mutation, st.just("truncate"), st.integers(0, 2 * 4096)),
)


@SETTINGS
@given(muts=st.lists(DISK_MUTATION, min_size=1, max_size=3))
def test_mutated_disk_headers_are_refused_with_a_typed_error_or_open_sound(
        disk_target: disk_header.Target, muts: list[disk_header.Mutation]) -> None:
    assert disk_target.check(muts) == []


# -- the properties can fail --------------------------------------------------------------------
def test_the_nvram_properties_catch_a_reader_that_ignores_the_tail(monkeypatch) -> None:
    """Today's reader: no tail comparison, a corrupt record ends the log in silence."""
    sample = max(samples(), key=lambda s: len(s.records))
    rec = sample.records[len(sample.records) // 2]
    flip = [nvram.Mutation("flip", rec.pos + 60, 0)]
    assert nvram.check(sample, flip) == []
    monkeypatch.setattr(nvlog_check, "diagnose", lambda *a: None)
    found = nvram.check(sample, flip)
    assert "the outcome changed and nothing was reported" in found
    assert any("reported as []" in p for p in found)


def test_the_nvram_properties_catch_a_crash_and_an_unverified_record(monkeypatch) -> None:
    sample = samples()[0]
    real = nvlog_check.read_region

    def crashing(*a, **k):  # type: ignore[no-untyped-def]
        raise OverflowError("int too big to convert")  # what a base_seq >= 2**63 did

    monkeypatch.setattr(nvlog_check, "read_region", crashing)
    assert nvram.check(sample, [nvram.Mutation("field", 5, 13)])[0].startswith("raised")

    def one_more(*a, **k):  # type: ignore[no-untyped-def]
        read = real(*a, **k)
        for s in read.logs:  # claim the first record that did not verify verified
            if s.end < s.area.tail:
                s.count += 1
        return read

    monkeypatch.setattr(nvlog_check, "read_region", one_more)
    rec = max(samples(), key=lambda s: len(s.records))
    mid = rec.records[len(rec.records) // 2]
    assert any("reference" in p for p in nvram.check(rec, [nvram.Mutation("flip", mid.pos, 3)]))


def test_the_disk_properties_catch_an_unchecked_applied_map_and_epoch(
        disk_target: disk_header.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    import msgpack

    from storage import disk as disk_mod

    odd = [disk_header.Mutation("applied", seed) for seed in range(40)]
    assert all(disk_target.check([m]) == [] for m in odd)
    top_epoch = [disk_header.Mutation("field", 4, len(disk_header.EXTREMES) - 1)]  # 2**64 - 1
    assert disk_target.check(top_epoch) == []

    def unchecked(raw, n, where):  # type: ignore[no-untyped-def]
        return msgpack.unpackb(bytes(raw[44:44 + n]), strict_map_key=False) if n else {}

    monkeypatch.setattr(disk_mod, "_applied", unchecked)
    assert any(disk_target.check([m]) for m in odd)
    monkeypatch.setattr(disk_mod, "EPOCH_LIMIT", 1 << 70)
    assert disk_target.check(top_epoch)  # today's stamp: struct.error packing 2**64
