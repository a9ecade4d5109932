"""Takeover replay on the real path: `DModule.replay_chain`, exactly what a takeover runs.

`replay_bench` times `storage.replay.replay_region`, a fused kernel nothing in domains/ or
vmemu/ calls: a kernel-only figure. This part times the code a partner runs when it takes
over (domains/guest.py `_assign` -> `DModule.replay_chain`): `nvlog_check.read_region` (scan
and verify both halves, crc32c included), `replay.plan` per LUN, then the rows put into the
identity's cache (file-system LUNs, the storage-OS default: whole blocks gathered by one numba
pass and inserted in bulk, `storage/replay_gather.py`) or pwritten onto the disk files (flat
LUNs), and the exactly-once table rebuilt (`ExactlyOnce.record_many`).

Setup, per layout (in a temp data dir): node1's disks (RAID-4 on 4 disks, the default; and
`raid none` on 2), a D-module on a real memfd NVRAM region of NVRAM_MIB in two halves, random
4 KiB writes through `DModule.write` (the path a client write takes) until the active half is
full, no CP (so half the NVRAM is to replay, as after a crash under load). Then node1 is
abandoned (a crash: its cache is lost), its disks fenced to a new epoch, and the region sealed
and mapped read-only, as the hypervisor hands it to the partner. Each trial opens the identity
afresh on node2's D-module (untimed: a fresh cache, and for flat LUNs fresh disk files) and times
`replay_chain` alone. One untimed trial first: a guest warms its kernels before it reports ready.

GB/s = bytes of log replayed (the used part of the half, headers included, 1 GB = 1e9 bytes) per
second, the same measure as the kernel figure; the baseline is numpy memcpy of that many bytes,
in this run.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import GB, MiB, log, memcpy_gbps
from domains.dmodule import DModule
from storage import nvlog, nvlog_check, replay
from storage import nvlog_format as F
from storage import region as shm
from storage.disk import Disk, disk_path, stamp_epoch

NVRAM_MIB = 64
DISK_MB = 256
BLOCK = 4096
R1, R2 = 0xB1, 0xB2
LAYOUTS = (("raid4", 4), ("none", 2))  # the storage-OS default first


def _make_disks(data_dir: Path, node: int, count: int) -> None:
    for d in range(count):
        p = disk_path(data_dir, node, d)
        if p.exists():
            p.unlink()
        Disk.create(p, node, d, DISK_MB << 20)


def _fence(data_dir: Path, node: int, count: int) -> int:
    """What the hypervisor does before an assign: a new epoch on every disk of the identity."""
    epoch = 0
    for d in range(count):
        epoch = stamp_epoch(disk_path(data_dir, node, d))
    return epoch


class _Region:
    """A memfd NVRAM region in two halves, read-write for its owner; read-only view later."""

    def __init__(self, node: int, region_id: int, size: int) -> None:
        self.fd = shm.allocate(f"vmemu-bench-takeover-replay-{node}", size)
        self.rw = shm.map_read_write(self.fd)
        nvlog.format_region(self.rw, node, region_id, halves=True)
        self.ro_fd: int | None = None
        self.ro: Any = None

    def read_only(self) -> Any:
        shm.seal(self.fd, read_only=True)
        self.ro_fd = shm.reopen_read_only(self.fd)
        self.ro = shm.map_read_only(self.ro_fd)
        return self.ro

    def close(self) -> None:
        gc.collect()  # numpy views of the mappings held by dropped D-modules
        for m in (self.ro, self.rw):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a view still lives: the mapping goes with the process
        for fd in (self.ro_fd, self.fd):
            if fd is not None:
                os.close(fd)


def _fill(d: DModule, lun_sizes: list[int], seed: int) -> int:
    """Random 4 KiB client writes until the active half is full; returns the writes."""
    rnd = random.Random(seed)
    payloads = [rnd.randbytes(BLOCK) for _ in range(64)]
    k = 0
    while d.log.fits(BLOCK):
        lun = k % len(lun_sizes)
        off = rnd.randrange(lun_sizes[lun] // BLOCK) * BLOCK
        d.write(1, lun, off, payloads[k % len(payloads)], 4242, k + 1)
        k += 1
    return k


def _layout(raid: str, ndisks: int, root: Path, trials: int) -> dict[str, Any]:
    data_dir = root / raid
    data_dir.mkdir()
    size = F.REGION_HEADER + NVRAM_MIB * MiB
    r1, r2 = _Region(1, R1, size), _Region(2, R2, size)
    a = b = None
    try:
        _make_disks(data_dir, 1, ndisks)
        _make_disks(data_dir, 2, ndisks)
        emit = lambda *args: None  # noqa: E731 - events are not what is measured
        a = DModule(1, data_dir, ndisks, r1.rw, R1, emit=emit, raid=raid)
        a.open_identity(1, _fence(data_dir, 1, ndisks), "boot")
        sizes = [h.size for h in a.served[1].handles]
        writes = _fill(a, sizes, seed=7)
        log_bytes = int(a.log.used)
        a.close()  # node1 dies: its cache is gone, its NVRAM and disks remain
        a = None
        view = r1.read_only()
        b = DModule(2, data_dir, ndisks, r2.rw, R2, emit=emit, raid=raid)
        times: list[float] = []
        open_ms: list[float] = []
        rep: dict[str, Any] = {}
        for trial in range(trials + 1):  # the first one warms the kernels, untimed
            if raid == "none" and trial:
                _make_disks(data_dir, 1, ndisks)  # a fresh takeover meets the disks' holes
            epoch = _fence(data_dir, 1, ndisks)
            t0 = time.perf_counter()
            served = b.open_identity(1, epoch, "takeover")
            t1 = time.perf_counter()
            rep = b.replay_chain(served, [(R1, view, 1, False)])
            t2 = time.perf_counter()
            if trial:
                times.append(t2 - t1)
                open_ms.append((t1 - t0) * 1000)
            b.served.pop(1).store.close()
        if rep.get("records") != writes or rep.get("bad"):
            raise RuntimeError(f"replay found {rep.get('records')} of {writes} records "
                               f"({rep.get('bad')} bad): not a whole takeover")
        best, median = min(times), statistics.median(times)
        return {"gbps": round(log_bytes / best / GB, 3),
                "gbps_median": round(log_bytes / median / GB, 3),
                "ms": round(best * 1000, 2), "ms_median": round(median * 1000, 2),
                "open_identity_ms_median": round(statistics.median(open_ms), 2),
                "log_bytes": log_bytes, "records": int(rep["records"]),
                "payload_bytes": int(rep["bytes"]), "written": int(rep["written"]),
                "writes": int(rep["writes"]), "trials": trials, "raid": raid, "disks": ndisks,
                "into": "cache (file-system LUNs)" if raid != "none" else "disk files (pwrite)"}
    finally:
        for d in (a, b):
            if d is not None:
                d.close()
        r1.close()
        r2.close()


def run(quick: bool) -> dict[str, Any]:
    trials = 3 if quick else 5
    replay.warm()
    nvlog_check.warm()
    out: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="vmemu-bench-tkreplay-"))
    try:
        for raid, ndisks in LAYOUTS:
            log(f"takeover_replay: {raid} on {ndisks} disks, {NVRAM_MIB} MiB NVRAM, "
                f"one half of 4 KiB writes, replay_chain x{trials}")
            out[raid] = _layout(raid, ndisks, root, trials)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    default = out["raid4"]
    mc = memcpy_gbps(default["log_bytes"], reps=9)
    res: dict[str, Any] = {
        "gbps": default["gbps"],
        "memcpy_gbps": round(mc["gbps"], 3),
        "memcpy_bytes": mc["bytes"],
        "ratio_memcpy": round(default["gbps"] / mc["gbps"], 3),
        "flat_gbps": out["none"]["gbps"],
        "flat_ratio_memcpy": round(out["none"]["gbps"] / mc["gbps"], 3),
        "layouts": out,
        "nvram_mib": NVRAM_MIB,
        "method": ("DModule.replay_chain (nvlog_check.read_region: scan + verify, replay.plan, "
                   "rows into the cache or pwritten onto the disks, exactly-once table) of one "
                   f"full half of a {NVRAM_MIB} MiB NVRAM written by DModule.write, best of "
                   f"{trials} after an untimed warm-up; memcpy: np.copyto of the same number of "
                   "log bytes, best of 9, this run"),
    }
    log(f"takeover_replay: raid4 {res['gbps']} GB/s ({res['ratio_memcpy']}x memcpy "
        f"{res['memcpy_gbps']} GB/s of {mc['bytes'] // MiB} MiB), flat {res['flat_gbps']} GB/s")
    return res


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--full" not in sys.argv), indent=2))
