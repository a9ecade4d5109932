"""RAID-4 rebuild throughput over vmemu disk files, vs raw sequential writes of the same bytes.

A RAID-4 group over 4 disk images (3 data + parity) is filled (one batched full-stripe write,
synced), member 1 fails and is replaced by a fresh image; the timed part is the
``rebuild_step`` loop until complete plus a sync of the new member. Rebuild reads the 3
surviving members in runs, verifies their checksums in bulk, XORs and writes runs.
``raid_rebuild_mbps`` counts bytes rebuilt onto the new member (1 MB = 1e6 bytes); the
baseline is ``os.pwrite`` of 1 MiB chunks + ``fdatasync`` of the same byte count into the same
replacement file, past its data area (fresh extents, like the rebuild's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.disk import HEADER, Disk, stamp_epoch
from storage.raid import BLOCK_SIZE, DiskDevice, Layout, RaidGroup

MiB = 1 << 20
NDISKS = 4


def _disk(root: Path, name: str, index: int, size: int) -> Disk:
    p = root / name
    Disk.create(p, 1, index, size)
    return Disk.open(p, stamp_epoch(p))


def run(quick: bool) -> dict[str, Any]:
    mib = 16 if quick else 64  # per member
    size = mib * MiB + MiB  # room for the checksum table
    root = Path(tempfile.mkdtemp(prefix="vmemu-rebuild-bench-"))
    disks: list[Disk] = []
    try:
        disks = [_disk(root, f"disk{i}.img", i, size) for i in range(NDISKS)]
        group = RaidGroup(Layout.RAID4, [DiskDevice(d) for d in disks])
        rng = np.random.default_rng(1)
        chunk = 4096  # logical blocks per fill batch (16 MiB)
        for first in range(0, group.nblocks, chunk):
            n = min(chunk, group.nblocks - first)
            rows = rng.integers(0, 256, (n, BLOCK_SIZE), dtype=np.uint8)
            group.write_block_array(np.arange(first, first + n), rows)
        group.sync()
        probe = [int(x) for x in rng.integers(0, group.nblocks, 16)]
        expect = {lba: group.read_block(lba) for lba in probe}
        group.fail_member(1)
        spare = _disk(root, "spare.img", 9, size)
        disks.append(spare)
        group.replace(1, DiskDevice(spare))
        t0 = time.perf_counter()
        while not group.rebuild_step(4096).complete:
            pass
        spare.sync()
        rebuild_s = time.perf_counter() - t0
        rebuilt = group.stripes * BLOCK_SIZE
        group.fail_member(0)  # member 1 must now serve reconstructions correctly
        for lba, data in expect.items():
            assert group.read_block(lba) == data
        buf = os.urandom(MiB)
        t0 = time.perf_counter()
        for k in range(rebuilt // MiB):
            os.pwrite(spare.fd, buf, HEADER + size + k * MiB)
        os.fdatasync(spare.fd)
        base_s = time.perf_counter() - t0
        base_bytes = (rebuilt // MiB) * MiB
        rebuild_mbps = rebuilt / 1e6 / rebuild_s
        base_mbps = base_bytes / 1e6 / base_s
        return {
            "raid_rebuild_mbps": round(rebuild_mbps, 1),
            "baseline_seq_mbps": round(base_mbps, 1),
            "ratio": round(rebuild_mbps / base_mbps, 3),
            "mib": round(rebuilt / MiB, 2),
        }
    finally:
        for d in disks:
            d.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--full" not in sys.argv)))
