"""The docs' bench tables are generated from a results file: the figures of the given json end
up in the pages, stale ones are replaced, the prose around the markers is kept, and every
results file says which commit, machine and date it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import docs_tables as D
from bench.common import machine_facts

RESULTS = {
    "started": "2031-02-03T04:05:06+0000", "quick": True,
    "baseline": {"git": {"rev": "abc1234", "commit": "abc1234" + "0" * 33 + "-dirty",
                         "dirty": True},
                 "cpu_model": "Test CPU 9000", "nproc": 2, "mem_gib": 23.5, "kernel": "6.1.0"},
    "cp_mbps": {"cp_mbps": 123.4, "baseline_seq_mbps": 567.8, "ratio": 0.217, "mib": 16},
    "takeover_replay_gbps": {"gbps": 0.377, "memcpy_gbps": 11.1, "memcpy_bytes": 33550400,
                             "ratio_memcpy": 0.034, "flat_ratio_memcpy": 0.02, "nvram_mib": 64,
                             "layouts": {"raid4": {"gbps": 0.377, "ms": 89.0,
                                                   "log_bytes": 33550400}}},
    "replay_gbps": {"numba": 6.85, "memcpy": 12.9, "ratio_memcpy": 0.532, "log_bytes": 33550400},
    "fs_randwrite_iops": {"tool": "fio", "fs_iops": 20839.0, "flat_iops": 37323.3,
                          "ratio": 0.558, "fs_p99_us": 4489.2, "flat_p99_us": 1417.2,
                          "cp_stalls": 47, "cp_stall_ms": 2345.6, "gap_ms": 123.0,
                          "cp_count": 42, "cp_reasons": {"log_full": 25}, "cp_ms_max": 541.0},
}

PAGE = """# A page

Prose before.

{begin}
| figure | value |
|---|---|
| writes that waited for a CP | 0 (passed) |
| fs / flat | 0.90 |
{end}

Prose after.
"""


def _page(name: str) -> str:
    return PAGE.format(begin=D.begin_marker(name), end=D.end_marker(name))


def test_storage_os_table_comes_from_the_given_json():
    t = D.storage_os_table(RESULTS)
    assert "2031-02-03T04:05:06+0000" in t and "abc1234 (dirty)" in t and "Test CPU 9000" in t
    assert "quick run" in t and "2 cores" in t
    assert "| 123 MB/s | sequential 1 MiB pwrite + fdatasync to the same files: 568 MB/s " \
           "(ratio 0.217; target >= 0.5 x: missed) |" in t
    assert "real path (`DModule.replay_chain`" in t and "0.377 GB/s" in t
    assert "kernel only" in t and "6.85 GB/s" in t
    assert "47 stalls, gap 123 ms" in t and "missed" in t
    assert "20839 IOPS" in t and "(0.558)" in t


def test_stale_figures_are_replaced_and_the_prose_is_kept():
    out = D.rewrite(_page("storage-os"), "storage-os", D.storage_os_table(RESULTS))
    assert "0 (passed)" not in out and "0.90" not in out  # the hand-typed, stale figures
    assert "47 stalls" in out
    assert out.startswith("# A page\n\nProse before.\n\n" + D.begin_marker("storage-os"))
    assert out.endswith(D.end_marker("storage-os") + "\n\nProse after.\n")
    # idempotent: a second pass over its own output changes nothing
    assert D.rewrite(out, "storage-os", D.storage_os_table(RESULTS)) == out
    # new figures replace the previous generation
    newer = json.loads(json.dumps(RESULTS))
    newer["fs_randwrite_iops"]["cp_stalls"] = 0
    again = D.rewrite(out, "storage-os", D.storage_os_table(newer))
    assert "47 stalls" not in again and "| 0 (2346 ms" in again


def test_a_page_without_its_markers_is_an_error():
    with pytest.raises(ValueError, match="bench:storage-os"):
        D.rewrite("# no markers\n", "storage-os", "x")


def test_update_docs_rewrites_every_page_from_a_results_file(tmp_path: Path):
    for page, names in D.PAGES.items():
        p = tmp_path / page
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(_page(n) for n in names))
    changed = D.update_docs(RESULTS, tmp_path)
    assert sorted(changed) == sorted(tmp_path / p for p in D.PAGES)
    readme = (tmp_path / "README.md").read_text()
    assert "| no stall a CP could have avoided" in readme and "| FAIL |" in readme
    assert "| takeover replay, real path / memcpy of the same bytes | 0.034 | >= 0.3 x | FAIL |" \
        in readme
    assert D.update_docs(RESULTS, tmp_path) == []  # nothing stale left


def test_the_committed_pages_carry_the_markers():
    root = Path(D.__file__).resolve().parent.parent
    for page, names in D.PAGES.items():
        text = (root / page).read_text()
        for n in names:
            assert D.begin_marker(n) in text and D.end_marker(n) in text, (page, n)


def test_results_record_commit_machine_and_date():
    m = machine_facts()
    assert m["nproc"] and m["cpu_model"] and m["mem_gib"] and m["kernel"] and m["date"]
    g = m["git"]
    assert len(g["commit"].removesuffix("-dirty")) == 40
    assert g["commit"].endswith("-dirty") == g["dirty"]
