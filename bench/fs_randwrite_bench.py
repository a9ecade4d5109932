"""4k random writes through the full stack: the storage OS (RAID-4 + WAFL) beside the flat-LUN path.

Two 2-node clusters, started one after the other in the same run, each in a fresh temp data
dir (`disk_mb=256, nvram_mb=64`, NBD export on a free port):

* fs:   the default storage OS, ``raid="raid4"``, 4 disks per node (an aggregate, LUNs are
        files of a write-anywhere FS, a CP commits the cache through RAID-4);
* flat: ``raid="none"``, 2 disks per node (one LUN per disk, no FS).

The job, the same on both: 4 KiB random writes, iodepth 16, for 15 s (quick 5 s), over the
first REGION_CAP (128 MiB) of node1's lun0, or all of it if the LUN is smaller (its size is
read from node1's status row, ``storage.luns``). With /usr/bin/fio and the NBD export it is
``fio --ioengine=nbd`` (``--rw=randwrite --bs=4k --iodepth=16 --time_based``, plus a per-I/O
completion log); otherwise vmemu's own load generator (clients.load.run_load) against node1's
identity. Reported: IOPS and completion latency p50 / p99 / max of each, fs / flat IOPS.

CP figures, per cluster, from the events of kind "cp" on node1 whose start falls inside the
run: count, reasons, longest (ms) and largest (blocks), and the user MB/s the CPs moved per
second of CP (``cp_mbps_in_run``); ``cp_stalls`` / ``cp_stall_ms`` are the growth of node1's
status counters over the run (every wait of a write for NVLog space, and their time; None when
the status has no such field); ``ingest_mbps`` is the job's IOPS x 4 KiB. ``nvlog_full`` says
whether a CP of reason "log_full" ran (reported; it excuses nothing: bench/verdicts.py judges
the stalls against whether the disks could absorb the ingest rate). Independent of that, the
client's own view: the longest stretch without any write completing, overall and overlapping a
CP (for fio, its log is aligned to the CP events by fio's start time, to within ~tens of ms).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import fio_nbd
from bench.common import MiB, log, percentile, wait_no_processes
from clients.load import LoadSpec, run_load
from vmemu.cluster import Cluster, Control, Status

REGION_CAP = 128 * MiB
NODES = 2
DISK_MB = 256
NVRAM_MB = 64
SEED = 4242
CLUSTERS = (("fs", "raid4", 4), ("flat", "none", 2))
POLL_S = 0.25


def _healthy(s: Status) -> bool:
    return s.all_serving() and all(n["takeover_possible"] for n in s.nodes)


def _has_storage(s: Status) -> bool:
    st = s.node("node1").get("storage")
    return isinstance(st, dict) and bool(st.get("luns"))


def lun_size(storage: dict[str, Any] | None, lun: int = 0) -> int | None:
    """Size in bytes of `lun` in a status row's storage summary ([[index, name, size], ...])."""
    for row in (storage or {}).get("luns") or []:
        if isinstance(row, (list, tuple)) and len(row) >= 3 and row[0] == lun:
            return int(row[2])
        if isinstance(row, dict) and row.get("index", row.get("lun")) == lun:
            return int(row["size"])
    return None


def longest_gap_ms(done: list[float], start: float, end: float,
                   windows: list[tuple[float, float]] | None = None) -> float:
    """Longest stretch (ms) of [start, end] without a completion at any of the sorted `done`
    times; with `windows`, only stretches that overlap one of them count."""
    pts = [start] + [t for t in done if start <= t <= end] + [end]
    best = 0.0
    for a, b in zip(pts, pts[1:]):
        if b - a <= best / 1000.0:
            continue
        if windows is not None and not any(a < we and b > ws for ws, we in windows):
            continue
        best = (b - a) * 1000.0
    return round(best, 1)


def cp_summary(events: list[dict[str, Any]], t0: float, t1: float,
               node: str = "node1") -> dict[str, Any]:
    """CP figures of `node` from events of kind "cp" that started within [t0, t1] (monotonic)."""
    cps = [e for e in events if e.get("kind") == "cp" and e.get("node") == node
           and e.get("mono") is not None and t0 <= e["mono"] <= t1]
    ms = [float(e["ms"]) for e in cps if isinstance(e.get("ms"), (int, float))]
    blocks = [int(e["blocks"]) for e in cps if isinstance(e.get("blocks"), (int, float))]
    reasons: dict[str, int] = {}
    for e in cps:
        reasons[str(e.get("reason"))] = reasons.get(str(e.get("reason")), 0) + 1
    return {
        "cp_count": len(cps),
        "cp_reasons": reasons,
        "cp_ms_max": round(max(ms), 1) if ms else None,
        "cp_ms_median": round(percentile(ms, 50), 1) if ms else None,
        "cp_blocks_max": max(blocks) if blocks else None,
        # user data the run's CPs moved per second of CP: what the disks absorbed through CPs
        # under this load (4 KiB blocks, 1 MB = 1e6 bytes)
        "cp_mbps_in_run": round(sum(blocks) * 4096 / 1e6 / (sum(ms) / 1000.0), 1)
        if blocks and sum(ms) > 0 else None,
        "cp_background": sum(1 for e in cps if e.get("background")),
        "nvlog_full": reasons.get("log_full", 0) > 0,
        "windows": [(e["mono"], e["mono"] + float(e.get("ms") or 0) / 1000.0) for e in cps],
    }


def _fio_cmd(uri: str, runtime: float, size: int, logdir: Path) -> list[str]:
    args = fio_nbd.fio_args(runtime, size=f"{size // MiB}M")
    return [fio_nbd.FIO, *args, "--percentile_list=50:99:99.9", f"--write_lat_log={logdir}/j",
            "--log_avg_msec=0", f"--uri={uri}"]


def _fio_completions(logdir: Path, t_start: float) -> list[float]:
    """Completion times (monotonic) from fio's per-I/O clat log (ms since `t_start`)."""
    logs = sorted(logdir.glob("j_clat*.log"))
    if not logs:
        return []
    out = []
    with open(logs[0]) as f:
        for line in f:
            parts = line.split(",", 2)
            if len(parts) >= 2:
                out.append(t_start + int(parts[0]) / 1000.0)
    out.sort()
    return out


class _Poller:
    """node1's status every POLL_S while the load runs (a Control of its own: sockets are
    per thread): the peak NVLog fill and cp_stalls seen."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.peak_fill = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctl = Control(self.data_dir)
        try:
            while not self.stop.wait(POLL_S):
                try:
                    n = ctl.status().node("node1")
                except Exception:  # noqa: BLE001 - a missed sample is fine
                    continue
                used, cap = n.get("nvlog_used"), n.get("nvlog_capacity")
                if isinstance(used, (int, float)) and cap:
                    self.peak_fill = max(self.peak_fill, used / cap)
        finally:
            ctl.close()

    def __enter__(self) -> "_Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5.0)


def _run_fio(uri: str, runtime: float, size: int, tmp: Path) -> tuple[dict[str, Any], list[float]]:
    logdir = tmp / "fiolog"
    logdir.mkdir(exist_ok=True)
    with open(tmp / "fio.out", "w+") as out, open(tmp / "fio.err", "w+") as err:
        t_start = time.monotonic()
        p = subprocess.Popen(_fio_cmd(uri, runtime, size, logdir), stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, start_new_session=True)
        try:
            p.wait(timeout=runtime + 60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the group of the fio we started, nothing else
            p.wait()
            raise RuntimeError(f"fio did not finish within {runtime + 60:.0f} s")
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"fio exited {p.returncode}: {(stderr or stdout).strip()[-400:]}")
    res = fio_nbd.parse_fio(stdout)
    if res["error"]:
        raise RuntimeError(f"fio reported job error {res['error']}: {stderr.strip()[-400:]}")
    doc, _ = json.JSONDecoder().raw_decode(stdout[stdout.find("{"):])
    clat = doc["jobs"][0]["write"].get("clat_ns") or {}
    p999 = (clat.get("percentile") or {}).get("99.900000")
    res["clat_us"]["p999"] = None if p999 is None else round(p999 / 1000.0, 1)
    res["clat_us"]["max"] = round(clat["max"] / 1000.0, 1) if "max" in clat else None
    # fio's log times count from its job start: take that from the JSON ("job_start", epoch
    # ms, fio >= 3.28) when there, else from the launch (early by fio's own start-up)
    job_start = doc["jobs"][0].get("job_start")
    if isinstance(job_start, (int, float)) and job_start > 0:
        t_start = job_start / 1000.0 - (time.time() - time.monotonic())
        res["aligned_by"] = "job_start"
    else:
        res["aligned_by"] = "launch"
    done = _fio_completions(logdir, t_start)
    return res, done


def _run_native(c: Cluster, runtime: float, size: int,
                tmp: Path) -> tuple[dict[str, Any], list[float]]:
    tl = tmp / "timeline.json"
    spec = LoadSpec(workload="randwrite", bs=4096, iodepth=16, duration=runtime, size=size, lun=0,
                    seed=SEED)
    load = run_load(c.endpoint("node1"), spec, target="node1", timeline=tl)
    w = load["write"]
    res = {"iops": w["iops"],
           "clat_us": {k: w["clat_us"].get(k) for k in ("p50", "p99", "p999", "max")},
           "total_ios": w["ops"], "errors": load["errors"], "retries": load["retries"]}
    # 10 ms buckets: a completion at the middle of every non-empty bucket
    doc = json.loads(tl.read_text())
    b = doc["bucket_ms"] / 1000.0
    done = [doc["start_mono"] + (i + 0.5) * b for i, n in enumerate(doc.get("write") or []) if n]
    return res, done


def _one(name: str, raid: str, disks: int, tmp: Path, runtime: float, tool: str) -> dict[str, Any]:
    data_dir = tmp / name
    out: dict[str, Any] = {"raid": raid, "disks": disks}
    try:
        with Cluster(nodes=NODES, data_dir=data_dir, disk_mb=DISK_MB, nvram_mb=NVRAM_MB,
                     raid=raid, disks=disks, **fio_nbd.nbd_config()) as c:
            c.wait_for(_healthy, 30.0, "both nodes serving, each able to take over")
            s = c.wait_for(_has_storage, 30.0, "node1's storage summary")
            n1 = s.node("node1")
            size = lun_size(n1.get("storage"))
            if not size:
                raise RuntimeError(f"node1's status lists no lun0: {n1.get('storage')}")
            region = min(REGION_CAP, size) // MiB * MiB
            out.update({"storage_kind": (n1.get("storage") or {}).get("kind"),
                        "lun0_bytes": size, "region_bytes": region})
            stalls0, stall_ms0 = n1.get("cp_stalls"), n1.get("cp_stall_ms")
            uri = None
            if tool == "fio":
                uri, why = fio_nbd.nbd_uri(s.raw)
                if uri is None:
                    out["fio"] = f"skipped: {why}"
            log(f"fs_randwrite: {name} ({raid}, {disks} disks): randwrite 4k qd16 over "
                f"{region // MiB} MiB for {runtime:g} s with {'fio' if uri else 'vmemu load'}")
            job_dir = tmp / f"{name}-job"
            job_dir.mkdir()
            with _Poller(data_dir) as poller:
                t0 = time.monotonic()
                res: dict[str, Any] | None = None
                if uri is not None:
                    try:
                        res, done = _run_fio(uri, runtime, region, job_dir)
                        out["tool"] = "fio"
                    except Exception as exc:  # noqa: BLE001 - fall back, and say so
                        out["fio"] = f"failed: {type(exc).__name__}: {exc}"
                        log(f"fs_randwrite: {name}: {out['fio']}; using vmemu load")
                if res is None:
                    res, done = _run_native(c, runtime, region, job_dir)
                    out["tool"] = "vmemu load"
                t1 = time.monotonic()
            time.sleep(0.5)  # the hypervisor's view of node1 lags its stats by a beat
            n1 = c.status().node("node1")
            stalls1, stall_ms1 = n1.get("cp_stalls"), n1.get("cp_stall_ms")
            cps = cp_summary(c.events(), t0, t1)
            windows = cps.pop("windows")
            out.update({
                "iops": res["iops"], "p50_us": res["clat_us"].get("p50"),
                "p99_us": res["clat_us"].get("p99"), "p999_us": res["clat_us"].get("p999"),
                "max_us": res["clat_us"].get("max"), "total_ios": res.get("total_ios"),
                "runtime_s": round(t1 - t0, 2),
                "cp_stalls": (stalls1 - stalls0) if isinstance(stalls1, int) and
                isinstance(stalls0, int) else None,
                "cp_stall_ms": round(stall_ms1 - stall_ms0, 1)
                if isinstance(stall_ms1, (int, float)) and isinstance(stall_ms0, (int, float))
                else None,
                "ingest_mbps": round(res["iops"] * 4096 / 1e6, 1),
                "nvlog_peak_fill": round(poller.peak_fill, 3),
                # between the first and the last completion: not the tool's start or stop
                "gap_ms": longest_gap_ms(done, done[0], done[-1]) if done else None,
                "gap_in_cp_ms": longest_gap_ms(done, done[0], done[-1], windows) if done else None,
                "aligned_by": res.get("aligned_by", "timeline"),
                **cps,
            })
            log(f"fs_randwrite: {name}: {out['iops']:.0f} IOPS, p99 {out['p99_us']} us, "
                f"max {out['max_us']} us; {cps['cp_count']} CPs (max {cps['cp_ms_max']} ms), "
                f"cp_stalls {out['cp_stalls']}, longest gap {out['gap_ms']} ms "
                f"({out['gap_in_cp_ms']} ms during a CP)")
    finally:
        out["leftover_processes"] = wait_no_processes(str(data_dir))
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b \
        else None


def run(quick: bool) -> dict[str, Any]:
    runtime = 5.0 if quick else 15.0
    tool = "vmemu load" if fio_nbd.skip_reason_tools() or not fio_nbd.nbd_config() else "fio"
    sides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vmemu-bench-fsrw-") as tmp:
        for name, raid, disks in CLUSTERS:
            sides[name] = _one(name, raid, disks, Path(tmp), runtime, tool)
    fs, flat = sides["fs"], sides["flat"]
    tools = {fs.get("tool"), flat.get("tool")}
    same_tool = len(tools) == 1
    res: dict[str, Any] = {
        "fs_iops": fs.get("iops"),
        "flat_iops": flat.get("iops"),
        "ratio": _ratio(fs.get("iops"), flat.get("iops")) if same_tool else None,
        "fs_p50_us": fs.get("p50_us"), "fs_p99_us": fs.get("p99_us"), "fs_max_us": fs.get("max_us"),
        "flat_p50_us": flat.get("p50_us"), "flat_p99_us": flat.get("p99_us"),
        "flat_max_us": flat.get("max_us"),
        "tool": fs.get("tool") if same_tool else
        f"mixed: fs {fs.get('tool')}, flat {flat.get('tool')}",
        # the storage OS's CPs (node1 of the fs cluster); the flat path's are under "flat"
        "cp_count": fs.get("cp_count"), "cp_stalls": fs.get("cp_stalls"),
        "cp_stall_ms": fs.get("cp_stall_ms"), "ingest_mbps": fs.get("ingest_mbps"),
        "cp_mbps_in_run": fs.get("cp_mbps_in_run"),
        "cp_ms_max": fs.get("cp_ms_max"), "cp_blocks_max": fs.get("cp_blocks_max"),
        "cp_reasons": fs.get("cp_reasons"), "nvlog_full": fs.get("nvlog_full"),
        "gap_ms": fs.get("gap_ms"), "gap_in_cp_ms": fs.get("gap_in_cp_ms"),
        "fs": fs, "flat": flat,
        "job": {"workload": "randwrite", "bs": 4096, "iodepth": 16, "runtime_s": runtime,
                "region_bytes": {"fs": fs.get("region_bytes"), "flat": flat.get("region_bytes")},
                "lun": 0, "target": "node1", "nodes": NODES, "disk_mb": DISK_MB,
                "nvram_mb": NVRAM_MB},
        "method": ("the same job on two fresh 2-node clusters, fs (raid4, 4 disks) then flat "
                   "(raid none, 2 disks); CP figures from node1's 'cp' events that started "
                   "during the job; cp_stalls = growth of node1's status cp_stalls"),
    }
    if not same_tool:
        res["note"] = "the two clusters ran different tools: no ratio"
    log(f"fs_randwrite: fs {res['fs_iops']} IOPS, flat {res['flat_iops']} IOPS, "
        f"ratio {res['ratio']} ({res['tool']})")
    return res


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--full" not in sys.argv), indent=2))
