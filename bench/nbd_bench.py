"""fio 4k randwrite over NBD: a vmemu LUN beside nbdkit's memory plugin, in the same run.

vmemu: a 2-node shm cluster with its NBD export on; fio's nbd engine against node1's lun0
(`fio --name=j --ioengine=nbd --uri=URI --rw=randwrite --bs=4k --iodepth=16 --runtime=8
--time_based --size=64M`). Baseline: the same fio job under `nbdkit -U - memory size=1G
--run 'fio ... --uri="$uri"'`, run right after. Target: vmemu >= 0.25x nbdkit's IOPS.

Needs /usr/bin/fio, nbdkit and the NBD export (a ClusterConfig field `nbd_port` and a status
row "nbd": {"uris": [...]}); without any of them the part records "skipped: <reason>". When
only the export is missing the nbdkit baseline is still measured (it checks the fio path).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import fio_nbd
from bench.common import log, wait_no_processes
from vmemu.cluster import Cluster, Status

TARGET = 0.25
NODES = 2


def _healthy(s: Status) -> bool:
    return s.all_serving() and all(n["takeover_possible"] for n in s.nodes)


def run(quick: bool) -> dict[str, Any]:
    runtime = 3.0 if quick else 8.0
    job = " ".join(["fio", *fio_nbd.fio_args(runtime)[:-1], "--uri=URI"])
    res: dict[str, Any] = {"job": job, "target": f">= {TARGET:g}x nbdkit memory IOPS"}
    why = fio_nbd.skip_reason_tools(need_nbdkit=True)
    if why:
        res["skipped"] = why
        log(f"nbd_randwrite: skipped: {why}")
        return res
    vm: dict[str, Any] | None = None
    if not fio_nbd.nbd_config():
        _, why = fio_nbd.nbd_uri({})
    else:
        with tempfile.TemporaryDirectory(prefix="vmemu-bench-nbd-") as tmp:
            data_dir = Path(tmp) / "data"
            try:
                with Cluster(nodes=NODES, data_dir=data_dir, ha_mode="shm",
                             **fio_nbd.nbd_config()) as c:
                    c.wait_for(_healthy, 30.0, "both nodes serving, each able to take over")
                    uri, why = fio_nbd.nbd_uri(c.status().raw)
                    if uri is not None:
                        log(f"nbd_randwrite: fio against {uri} for {runtime:g} s")
                        vm = fio_nbd.run_fio(uri, runtime)
            finally:
                res["leftover_processes"] = wait_no_processes(str(data_dir))
    log(f"nbd_randwrite: fio against nbdkit memory for {runtime:g} s")
    base = fio_nbd.run_fio_nbdkit_memory(runtime)
    res["nbdkit_memory"] = base
    if vm is None:
        res["skipped"] = why
        log(f"nbd_randwrite: skipped the vmemu side: {why} "
            f"(nbdkit memory: {base['iops']:.0f} IOPS)")
        return res
    res["vmemu"] = vm
    res["ratio"] = round(vm["iops"] / base["iops"], 3) if base["iops"] else None
    res["nodes"] = NODES
    log(f"nbd_randwrite: vmemu {vm['iops']:.0f} IOPS, nbdkit memory {base['iops']:.0f} IOPS "
        f"({res['ratio']}x)")
    return res
