"""Every wait of a write for NVLog space is a stall, counted with its time (cp_stalls,
cp_stall_ms): the bench's "no stall a CP could have avoided" verdict reads these counters, so a
wait that bypassed them would make that verdict pass on a run that stalled."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from domains.dmodule import DModule
from storage import nvlog_format as F
from storage.lun import BLOCK
from tests.unit.conftest import Fds
from tests.unit.test_dmodule import DISKS, R1, Node, block, data_dir, fence  # noqa: F401

HOLD_S = 0.05


def _hold_commits(d: DModule, release: threading.Event) -> list[float]:
    """Make identity 1's CP commit wait for `release` (a CP still under way when the log
    fills, as under fio); returns the list the number of held commits goes into."""
    store = d.served[1].store
    real = store.commit
    held: list[float] = []

    def commit(*a: Any, **kw: Any) -> Any:
        held.append(1.0)
        release.wait(10.0)
        return real(*a, **kw)

    store.commit = commit  # type: ignore[method-assign]
    return held


def test_a_write_that_waits_for_the_running_cp_is_one_stall_with_its_time(
        fds: Fds, data_dir: Path) -> None:
    n = Node(fds, data_dir, 1, R1, size=F.REGION_HEADER + 8 * F.record_size(BLOCK))
    n.d.open_identity(1, fence(data_dir, 1), "boot")
    release = threading.Event()
    held = _hold_commits(n.d, release)
    k = 0
    while n.d.log.fits(BLOCK):  # fill the active half
        n.d.write(1, k % DISKS, k * BLOCK, block(k), 5, k + 1)
        k += 1
    n.d.start_cp("log_half_full")  # the CP flushes that half; writes go to the other
    while n.d.log.fits(BLOCK):
        n.d.write(1, k % DISKS, (k % 16) * BLOCK, block(k), 5, k + 1)
        k += 1
    assert n.d.cp_stalls == 0 and n.d.cp_job is not None  # no wait yet: there was room
    timer = threading.Timer(HOLD_S, release.set)
    timer.start()
    try:
        n.d.write(1, 0, 0, block(999), 5, k + 1)  # both halves in use: waits for the CP
    finally:
        timer.cancel()
        release.set()
    assert held and n.d.cp_stalls == 1
    assert n.d.cp_stall_ms >= HOLD_S * 1000 * 0.9  # the wait's time, not a token figure
    n.d.poll_cp(wait=True)


def test_writes_that_fit_the_other_half_during_a_cp_do_not_stall(fds: Fds,
                                                                 data_dir: Path) -> None:
    n = Node(fds, data_dir, 1, R1, size=F.REGION_HEADER + 8 * F.record_size(BLOCK))
    n.d.open_identity(1, fence(data_dir, 1), "boot")
    release = threading.Event()
    _hold_commits(n.d, release)
    n.d.write(1, 0, 0, block(1), 5, 1)
    n.d.start_cp("timer")
    try:
        n.d.write(1, 1, 0, block(2), 5, 2)
        n.d.write(1, 0, BLOCK, block(3), 5, 3)
        assert n.d.cp_job is not None and n.d.cp_stalls == 0 and n.d.cp_stall_ms == 0.0
    finally:
        release.set()
    n.d.poll_cp(wait=True)


def test_a_no_nvram_commit_whose_table_does_not_fit_the_log_counts_its_wait(
        fds: Fds, data_dir: Path) -> None:
    """--ha-mode none: the exactly-once pairs of one batch go into the log; when they do not
    fit, the batch waits for a log_full CP, and that wait is a stall like any other."""
    size = F.REGION_HEADER + 4 * F.record_size(BLOCK)
    fd, buf = fds.region(1, R1, size, halves=True)
    d = DModule(1, data_dir, DISKS, buf, R1, emit=lambda *a: None, ha_mode="none")
    fds.closers.append(d.close)
    d.open_identity(1, fence(data_dir, 1), "boot")
    pairs = d.log.capacity // 16 + 8  # more (client, request) pairs than a half holds
    for k in range(pairs):
        d.write(1, k % DISKS, (k % 8) * 512, b"\x5a" * 512, 9, k + 1)
    d.commit_pending_writes()
    assert d.cp_stalls == 1 and d.cp_stall_ms > 0.0
