"""One load job against node1 of a 2-node cluster in each HA mode: shm, mirror, none.

The job: 4 KiB random writes, iodepth 16, over the first 64 MiB of lun0, for 8 s (quick 3 s),
run by vmemu's own load generator (clients.load.run_load, the client library every other
figure uses). Each mode gets a fresh cluster in a fresh data dir, started and healthy (both
nodes serving and able to take over) before the load begins; the same seed picks the same
offsets in every mode. Figures per mode: write IOPS and completion latency p50/p99; ratios
shm/mirror and shm/none of IOPS.

When the cluster exports its LUNs over NBD (status node row "nbd": {"uris": [...]}) and
/usr/bin/fio exists, the same job is also run with fio's nbd engine, after the vmemu load, on
the same cluster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import fio_nbd
from bench.common import MiB, log, wait_no_processes
from clients.load import LoadSpec, run_load
from vmemu.cluster import Cluster, Status

MODES = ("shm", "mirror", "none")
SIZE = 64 * MiB
TARGET_VS_NONE = 3.0


def _healthy(s: Status) -> bool:
    return s.all_serving() and all(n["takeover_possible"] for n in s.nodes)


def _spec(duration: float) -> LoadSpec:
    return LoadSpec(workload="randwrite", bs=4096, iodepth=16, duration=duration, size=SIZE,
                    lun=0, seed=12345)


def _one(mode: str, tmp: Path, duration: float, fio_skip: str | None) -> dict[str, Any]:
    data_dir = tmp / mode
    out: dict[str, Any] = {}
    try:
        with Cluster(nodes=2, data_dir=data_dir, ha_mode=mode, **fio_nbd.nbd_config()) as c:
            c.wait_for(_healthy, 30.0, "both nodes serving, each able to take over")
            load = run_load(c.endpoint("node1"), _spec(duration), target="node1")
            w = load["write"]
            out = {"iops": w["iops"], "p50_us": w["clat_us"]["p50"], "p99_us": w["clat_us"]["p99"],
                   "ops": w["ops"], "runtime_s": load["runtime_s"], "errors": load["errors"],
                   "retries": load["retries"], "cp_count": c.status().node("node1")["cp_count"]}
            log(f"ha_modes: {mode}: {w['iops']:.0f} IOPS, p50 {w['clat_us']['p50']} us, "
                f"p99 {w['clat_us']['p99']} us")
            if fio_skip is None:
                uri, why = fio_nbd.nbd_uri(c.status().raw)
                if uri is None:
                    out["fio"] = f"skipped: {why}"
                else:
                    try:
                        f = fio_nbd.run_fio(uri, duration)
                        out["fio"] = {"iops": f["iops"], "p50_us": f["clat_us"]["p50"],
                                      "p99_us": f["clat_us"]["p99"], "uri": uri}
                        log(f"ha_modes: {mode}: fio over NBD {f['iops']:.0f} IOPS")
                    except Exception as exc:  # noqa: BLE001 - recorded, the vmemu figure stands
                        out["fio"] = f"failed: {type(exc).__name__}: {exc}"
            else:
                out["fio"] = f"skipped: {fio_skip}"
    finally:
        out["leftover_processes"] = wait_no_processes(str(data_dir))
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b \
        else None


def run(quick: bool) -> dict[str, Any]:
    duration = 3.0 if quick else 8.0
    fio_skip = fio_nbd.skip_reason_tools()
    modes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmemu-bench-ha-") as tmp:
        for mode in MODES:
            log(f"ha_modes: {mode}: 2-node cluster, randwrite 4k iodepth 16 for {duration:g} s")
            modes[mode] = _one(mode, Path(tmp), duration, fio_skip)
    iops = {m: modes[m].get("iops") for m in MODES}
    res: dict[str, Any] = {
        "modes": modes,
        "ratio_shm_mirror": _ratio(iops["shm"], iops["mirror"]),
        "ratio_shm_none": _ratio(iops["shm"], iops["none"]),
        "targets": {"shm_vs_mirror": "reported", "shm_vs_none": f">= {TARGET_VS_NONE:g}x"},
        "job": {"workload": "randwrite", "bs": 4096, "iodepth": 16, "duration_s": duration,
                "size": SIZE, "lun": 0, "target": "node1", "nodes": 2, "seed": 12345},
        "method": ("clients.load.run_load against node1's identity; one fresh 2-node cluster per "
                   "mode (default config otherwise: 64 MiB NVRAM, CP every 5 s), in the order "
                   f"{', '.join(MODES)}"),
    }
    fio = {m: modes[m].get("fio") for m in MODES}
    if all(isinstance(v, dict) for v in fio.values()):
        res["fio_ratio_shm_mirror"] = _ratio(fio["shm"]["iops"], fio["mirror"]["iops"])
        res["fio_ratio_shm_none"] = _ratio(fio["shm"]["iops"], fio["none"]["iops"])
    else:
        res["fio"] = next((v for v in fio.values() if isinstance(v, str)), None)
    log(f"ha_modes: shm/mirror {res['ratio_shm_mirror']}x, shm/none {res['ratio_shm_none']}x")
    return res
