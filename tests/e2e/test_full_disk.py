"""A full disk refuses, never loses: a real file system (a small tmpfs) filling up under load.

The data dir lives on a tmpfs small enough that a random-write load fills it within seconds
(write-anywhere CPs allocate fresh blocks in the sparse disk images). Then: CPs fail, the
NVLog keeps every acknowledged write, new writes get a one-line no_space error, no domain
dies and nothing is taken over; once the file system grows, CPs succeed again and writes
resume; a `vmemu down` on a full disk keeps the NVRAM it could not make durable, and the
next `vmemu up` replays it. `verify` passes at the end of each act.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from clients.load import LoadSpec, run_load
from clients.verify import verify
from tests.e2e.conftest import TEST_DEFAULTS, alive, private_nbd_base, wait_until
from vmemu.cluster import Cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

CONFIG = dict(TEST_DEFAULTS, nbd_addr_base=private_nbd_base(), disks=2, disk_mb=64, nvram_mb=16,
              lun_mb=16, cp_interval_s=1.0)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def resize(mnt: Path, mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mb}m", str(mnt)], check=True)


def fill(mnt: Path, leave_mb: int = 0, name: str = "filler") -> Path:
    """Take every byte left on the file system but `leave_mb` MiB."""
    st = os.statvfs(mnt)
    want = st.f_bavail * st.f_frsize - (leave_mb << 20)
    filler = mnt / name
    with open(filler, "wb") as f:
        chunk = bytes(1 << 20)
        try:
            while want > 0:
                want -= f.write(chunk[:min(len(chunk), want)])
                f.flush()
        except OSError:
            pass
    return filler


def events(c: Cluster, kind: str) -> list[dict[str, Any]]:
    return [e for e in c.events() if e["kind"] == kind]


def load(c: Cluster, journal: Path, seconds: float, lun: int) -> dict[str, Any]:
    # Each act its own LUN, or its journal would also judge another act's later writes.
    return run_load(c.endpoint("node1"), LoadSpec(duration=seconds, iodepth=16, lun=lun),
                    journal, "node1")


def test_full_disk_refuses_writes_loses_none_and_recovers(small_fs: Path, tmp_path: Path) -> None:
    data = small_fs / "d"
    journal = tmp_path / "w.jsonl"
    c = Cluster(nodes=2, data_dir=data, **CONFIG)
    pids: set[int] = set()
    try:
        c.start(timeout=240)
        pids = {c.proc.pid} | {n["pid"] for n in c.status().nodes}  # type: ignore[union-attr]
        # Act 1: the file system fills under load. CPs fail, writes are refused, none lost.
        first_filler = fill(small_fs, leave_mb=4)
        s1 = load(c, journal, 12.0, lun=0)
        assert s1["write"]["ops"] > 0 and s1["errors"] > 0, s1
        assert all("NVLog full" in e for e in s1["first_errors"]), s1["first_errors"]
        assert events(c, "cp_failed")
        st = c.status()
        why = [e for e in c.events() if e["kind"] in ("heartbeat_missed", "main_loop_stalled",
                                                      "domain_exited", "failure_detected")]
        assert st.node("node1")["state"] == "serving" and st.node("node1")["pid"] in pids, why
        assert not events(c, "failure_detected") and not events(c, "partner_alerted")
        # Act 2: room again. A retried CP succeeds, writes are taken again, verify passes.
        first_filler.unlink()
        resize(small_fs, 512)
        c.wait_for(lambda s: any(e["kind"] == "cp_recovered" for e in c.events()), 30,
                   "a CP to succeed again")
        s2 = load(c, tmp_path / "w2.jsonl", 2.0, lun=1)
        assert s2["errors"] == 0 and s2["write"]["ops"] > 0, s2
        for j in (journal, tmp_path / "w2.jsonl"):
            res = verify(c.endpoint("node1"), j)
            assert res["passed"], res["problems"][:5]
        # Act 3: full again, then `vmemu down`: the NVRAM that no CP could empty is kept.
        filler = fill(small_fs, leave_mb=1)
        s3 = load(c, tmp_path / "w3.jsonl", 6.0, lun=1)  # after w2 is judged
        assert s3["errors"] > 0 and s3["write"]["ops"] > 0, s3
        down = subprocess.run([sys.executable, "-m", "vmemu.cli", "--data-dir", str(data), "down"],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 3, down.stdout + down.stderr
        assert "node1" in down.stdout and "next `vmemu up` replays it" in down.stdout
        assert len(down.stdout.strip().splitlines()) == 1
        wait_until(lambda: not any(alive(p) for p in pids), 30, "the cluster to stop")
        c.proc = None
        c.ctl = None
        assert list((data / "nvram").glob("*.nvram"))
        # Act 4: room again, up again: the kept NVRAM is replayed, every acknowledged write is there.
        filler.unlink()
        c = Cluster(nodes=2, data_dir=data, **CONFIG)
        c.start(timeout=240)
        pids |= {c.proc.pid} | {n["pid"] for n in c.status().nodes}  # type: ignore[union-attr]
        assert events(c, "nvram_restored")
        c.wait_for(lambda s: not list((data / "nvram").glob("*.nvram")), 30,
                   "the kept NVRAM to be replayed and let go")
        for j in (journal, tmp_path / "w3.jsonl"):
            res = verify(c.endpoint("node1"), j)
            assert res["passed"], (j.name, res["problems"][:5])
    finally:
        c.stop()
        wait_until(lambda: not any(alive(p) for p in pids), 30, "every vmemu process to exit")
