"""Domain 0's record of corrupt NVRAM: status rows, counters, and a copy of the region."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.unit.conftest import Fds
from vmemu.cli import corruption_lines
from vmemu.hypervisor.nvram_reports import KEEP, MAX_COPIES, NvramReports

RID = 0xABC


def reports(tmp_path: Path, fds: Fds, held: dict[int, int]) -> tuple[NvramReports, list]:
    events: list = []
    r = NvramReports(tmp_path, held.get, lambda *a, **k: events.append((a, k)))
    return r, events


def test_a_quarantine_report_is_listed_counted_and_its_region_copied(tmp_path: Path,
                                                                     fds: Fds) -> None:
    fd = fds.memfd(64 << 10)
    os.pwrite(fd, b"the corrupt bytes", 100)
    r, events = reports(tmp_path, fds, {RID: fd})
    r.note("nvram_region_quarantined", 2, {
        "identity": 1, "region": RID, "owner": "node1", "reason": "bad magic", "half": None,
        "data_loss": True, "lost_records": 12, "lost_seq": [3, 14], "estimate": True,
        "message": "long line"})
    r.join()
    r.poll()
    (row,) = r.view()["quarantined"]
    assert row["region"] == "0xabc" and row["owner"] == "node1" and row["reason"] == "bad magic"
    assert row["reported_by"] == "node2" and row["when"] and "message" not in row
    assert r.view()["corruption"] == {"quarantined": 1, "corrupt_records": 0, "lost_records": 12}
    copy = Path(row["copy"])
    assert copy.read_bytes()[100:117] == b"the corrupt bytes" and copy.stat().st_size == 64 << 10
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    assert events[0][0][0] == "nvram_region_copied"
    line = "\n".join(corruption_lines({"nvram": r.view(), "nodes": []}))
    assert "quarantined" in line and "12 acknowledged writes LOST" in line and str(copy) in line


def test_reports_are_bounded_and_typed_whatever_a_guest_sends(tmp_path: Path, fds: Fds) -> None:
    r, _ = reports(tmp_path, fds, {})
    for i in range(3 * KEEP):
        r.note("nvlog_corrupt_record", 1, {"region": i, "why": "x" * 10_000,
                                           "lost_luns": [{"a": list(range(1000))}] * 500,
                                           "lost_records": 2**70, "half": object()})
    rows = r.view()["corrupt_records"]
    assert len(rows) == KEEP and len(rows[0]["why"]) == 300 and len(rows[0]["lost_luns"]) == 64
    assert rows[0]["half"] is None and r.view()["corruption"]["lost_records"] == 0
    assert rows[0]["copy_error"].startswith("region not held")  # never copies what it lacks
    assert r.note("something_else", 1, {}) is None
    assert r.note("nvlog_corrupt_record", 1, [1, 2]) is None  # type: ignore[arg-type]


def test_copies_stop_at_max_copies(tmp_path: Path, fds: Fds) -> None:
    held = {RID + i: fds.memfd(4096, f"r{i}") for i in range(MAX_COPIES + 2)}
    r, _ = reports(tmp_path, fds, held)
    for rid in held:
        r.note("nvlog_corrupt_record", 1, {"region": rid, "owner": "node1"})
        r.join()
    rows = r.view()["corrupt_records"]
    assert sum(1 for x in rows if x["copy"]) == MAX_COPIES
    assert "copies kept already" in rows[-1]["copy_error"]
