"""`vmemu up --nodes 4` to all-serving, through the Python API (Cluster.start, then stop).

cold: an empty NUMBA_CACHE_DIR, so every guest compiles its kernels while booting.
warm: a second start with the same cache dir (kernels load from cache).
Each start gets a fresh data dir (disk images created by the hypervisor both times).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import log, wait_no_processes
from vmemu.cluster import Cluster

NODES = 4
TARGET_WARM_S = 3.0


def _one(data_dir: Path) -> dict[str, Any]:
    c = Cluster(nodes=NODES, data_dir=data_dir, nbd_port=0)  # a free port: never a clash
    t0 = time.monotonic()
    try:
        c.start(timeout=240.0)
        up = time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        c.stop()
        down = time.monotonic() - t1
    left = wait_no_processes(str(data_dir))
    return {"up_s": round(up, 3), "stop_s": round(down, 3), "leftover_processes": left}


def run(quick: bool) -> dict[str, Any]:
    saved = os.environ.get("NUMBA_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="vmemu-bench-up-") as tmp:
        cache = Path(tmp) / "numba-cache"
        cache.mkdir()
        # Inherited by the hypervisor and so by every guest it spawns. This process compiled
        # its own kernels before (or loads them from the tree's cache): not affected.
        os.environ["NUMBA_CACHE_DIR"] = str(cache)
        try:
            log("up: cold start (empty numba cache), 4 nodes")
            cold = _one(Path(tmp) / "cold")
            files = sum(1 for p in cache.rglob("*") if p.is_file())
            log(f"up: cold {cold['up_s']:.2f} s ({files} cache files written); warm start")
            warm = _one(Path(tmp) / "warm")
            log(f"up: warm {warm['up_s']:.2f} s")
        finally:
            if saved is None:
                os.environ.pop("NUMBA_CACHE_DIR", None)
            else:
                os.environ["NUMBA_CACHE_DIR"] = saved
    return {
        "cold": cold["up_s"],
        "warm": warm["up_s"],
        "stop_cold": cold["stop_s"],
        "stop_warm": warm["stop_s"],
        "nodes": NODES,
        "cache_files_after_cold": files,
        "leftover_processes": cold["leftover_processes"] + warm["leftover_processes"],
        "method": ("Cluster(nodes=4, data_dir=fresh).start() until status().all_serving(), "
                   "then stop(); NUMBA_CACHE_DIR a fresh temp dir for cold, reused for warm"),
    }
