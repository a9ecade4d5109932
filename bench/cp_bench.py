"""WAFL consistency-point throughput on a RAID-4 group over vmemu disk files, vs raw sequential I/O.

Setup (in a temp dir): 4 vmemu disk images (``storage.disk.Disk``, epoch stamped as the
hypervisor does), a RAID-4 group over them (3 data + parity, ``DiskDevice`` members), and WAFL
formatted on it through ``storage.raid.blockdev.RaidBlockDevice``. One file receives N MiB
(quick 16, full 64) of random 4 KiB blocks in random order; the timed part is the ``cp()``
that commits them (allocation, checksums, parity, the writes and both sync barriers).

Baseline, same run, same 4 files: ``os.pwrite`` of 1 MiB chunks (round-robin over the files,
past their data areas so they land on fresh extents like the CP's) then ``fdatasync`` of each,
for the same N MiB. ``cp_mbps`` counts user data only (1 MB = 1e6 bytes), so RAID-4's parity
(+1/3) and WAFL's metadata are overhead the CP pays and the baseline does not.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from storage.disk import HEADER, Disk, stamp_epoch
from storage.raid import DiskDevice, Layout, RaidGroup
from storage.raid.blockdev import RaidBlockDevice
from storage.wafl import BLOCK_SIZE, Wafl

MiB = 1 << 20
NDISKS = 4


def _open_disks(root: Path, per_disk: int) -> list[Disk]:
    disks = []
    for i in range(NDISKS):
        p = root / f"disk{i}.img"
        Disk.create(p, 1, i, per_disk)
        disks.append(Disk.open(p, stamp_epoch(p)))
    return disks


def _baseline(disks: list[Disk], total: int, base: int) -> float:
    """Seconds to pwrite `total` bytes in 1 MiB chunks over the disks, then fdatasync them."""
    chunk = os.urandom(MiB)
    t0 = time.perf_counter()
    for k in range(total // MiB):
        d = disks[k % len(disks)]
        os.pwrite(d.fd, chunk, base + (k // len(disks)) * MiB)
    for d in disks:
        os.fdatasync(d.fd)
    return time.perf_counter() - t0


def run(quick: bool) -> dict[str, Any]:
    mib = 16 if quick else 64
    reps = 2 if quick else 3
    nblk = mib * MiB // BLOCK_SIZE
    # Room for a CP of N MiB beside the previous one (old blocks stay live until it commits).
    per_disk = ((mib * 3 // (NDISKS - 1)) + 8) * MiB
    root = Path(tempfile.mkdtemp(prefix="vmemu-cp-bench-"))
    disks: list[Disk] = []
    try:
        disks = _open_disks(root, per_disk)
        group = RaidGroup(Layout.RAID4, [DiskDevice(d) for d in disks])
        fs = Wafl.format(RaidBlockDevice(group))
        fs.create("warm")
        fs.write("warm", 0, os.urandom(64 * BLOCK_SIZE))
        fs.cp()  # compiles / loads every numba kernel outside the timed CPs
        fs.create("lun0")
        rng = random.Random(1)
        cp_times: list[float] = []
        base_times: list[float] = []
        written = 0
        for rep in range(reps):
            order = list(range(nblk))
            rng.shuffle(order)
            payload = os.urandom(mib * MiB)
            for fbn in order:
                fs.write("lun0", fbn * BLOCK_SIZE, payload[fbn * BLOCK_SIZE:(fbn + 1) * BLOCK_SIZE])
            assert fs.dirty_blocks == nblk
            t0 = time.perf_counter()
            stats = fs.cp()
            cp_times.append(time.perf_counter() - t0)
            written = stats.blocks_written
            probe = rng.randrange(nblk)
            got = fs.read("lun0", probe * BLOCK_SIZE, BLOCK_SIZE)
            assert got == payload[probe * BLOCK_SIZE:(probe + 1) * BLOCK_SIZE]
            # Past the data area of every disk, a fresh region per repetition.
            base_times.append(_baseline(disks, mib * MiB, HEADER + per_disk + rep * mib * MiB))
        report = fs.fsck()
        assert report.ok, report.errors
        cp_s, base_s = min(cp_times), min(base_times)
        cp_mbps = mib * MiB / 1e6 / cp_s
        base_mbps = mib * MiB / 1e6 / base_s
        return {
            "cp_mbps": round(cp_mbps, 1),
            "baseline_seq_mbps": round(base_mbps, 1),
            "ratio": round(cp_mbps / base_mbps, 3),
            "blocks": written,
            "cp_ms": round(cp_s * 1000.0, 1),
            "mib": mib,
        }
    finally:
        for d in disks:
            d.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--full" not in sys.argv)))
