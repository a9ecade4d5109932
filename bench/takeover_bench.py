"""Takeover latency: kill -9 of node1 to the first successful client op on node1's identity.

A 2-node cluster (one HA pair), 64 MiB NVRAM, timer CPs pushed out of the way. Each trial:
fill node1's NVLog to just under half (the guest forces a CP at half full) with 4 KiB writes
pipelined at depth 32; read the fill the hypervisor reports; with a probe client already
connected to node1's identity, take a timestamp, `crash("node1")` (SIGKILL), send a read at
once and wait for its answer (the client resends when node2 binds the identity). Then
restart node1 and wait for the automatic giveback (giveback_delay_s=0).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MiB, log, percentile, wait_no_processes
from storage import nvlog_format as F
from vmemu.cluster import Cluster, Status
from vmemu.errors import Timeout

NVRAM_MB = 64
FILL_TARGET = 0.485  # of the log area; the guest CPs at 0.5
DEPTH = 32
PAYLOAD = 4096
TARGET_P99_MS = 200.0
MAX_FAILED_TRIALS = 3  # a failed trial is recorded and the cluster recovered, up to this many


def _records_per_trial() -> int:
    capacity = (NVRAM_MB << 20) - F.REGION_HEADER
    return int(FILL_TARGET * capacity // F.record_size(PAYLOAD)) + 1


def _disk_mb(trials: int) -> int:
    """Disks big enough that every trial writes blocks no earlier trial wrote."""
    need = trials * (_records_per_trial() // 2 + 1) * PAYLOAD
    return max(256, -(-need // MiB) + 16)


def _offset(pattern: str, trial: int, k: int, blocks: int, per_lun: int,
            rng: np.random.Generator) -> int:
    if pattern == "random":
        return int(rng.integers(0, blocks)) * PAYLOAD
    return ((trial * per_lun + k) % blocks) * PAYLOAD


def _fresh_node(c: Cluster, node: str) -> dict[str, Any]:
    """`node`'s row from a status whose figures come from a heartbeat sent after this call."""
    time.sleep(3 * c.cfg.heartbeat_ms / 1000.0)
    return c.status().node(node)


def _settle(c: Cluster, node: str, since: float) -> dict[str, Any]:
    """Wait out the CP a node makes ~0.5 s after an assignment that replayed a region.

    (At giveback the releaser's region is in the chain, so the owner replays it and then
    schedules a CP.) A CP in the middle of the fill would empty the log we are filling.
    """
    evs = [e for e in c.events() if e.get("node") == node and e.get("mono", 0) >= since]
    replays = [e for e in evs if e.get("kind") == "replay_done" and e.get("identity") == node
               and (e.get("regions") or 0) > 0]
    if not replays:
        return {"post_assign_cp": False}
    after = replays[-1]["mono"]
    end = time.monotonic() + 10.0
    while time.monotonic() < end:
        if any(e.get("kind") == "cp" and e.get("node") == node and e.get("mono", 0) >= after
               for e in c.events()):
            return {"post_assign_cp": True}
        time.sleep(0.05)
    return {"post_assign_cp": "not seen within 10 s"}


def _write_n(c: Cluster, node: str, n: int, trial: int, first: int, pattern: str,
             rng: np.random.Generator, pool: list[bytes]) -> None:
    errors = 0
    t0 = time.monotonic()
    with c.client(node) as w:
        luns = w.info()["luns"]
        blocks = [l["size"] // PAYLOAD for l in luns]
        per_lun = _records_per_trial() // len(luns) + 1
        sent = done = 0
        while done < n:
            while sent < n and len(w.pending) < DEPTH:
                k = first + sent
                lun = k % len(luns)
                off = _offset(pattern, trial, k // len(luns), blocks[lun], per_lun, rng)
                w.submit("write", {"lun": lun, "offset": off, "data": pool[k % len(pool)]})
                sent += 1
            for comp in w.poll(1.0):
                done += 1
                if not comp.ok:
                    errors += 1
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"filling {node}: {done}/{n} writes after 120 s")
    if errors:
        raise RuntimeError(f"filling {node}: {errors} of {n} writes failed")


def _fill(c: Cluster, node: str, target: float, trial: int, pattern: str) -> dict[str, Any]:
    """Write 4 KiB blocks into `node` until its NVLog holds `target` of its capacity.

    pattern "seq": each LUN gets a sequential run of blocks that no earlier trial wrote
    (so every trial replays onto never-written blocks of the sparse disk images, the same
    condition each time); "random": uniformly random blocks over the whole LUN.
    The NVLog figures come from heartbeats; if a CP empties the log during the fill, the
    fill is topped up (at most twice more).
    """
    rsize = F.record_size(PAYLOAD)
    rng = np.random.default_rng(1000 + trial)
    pool = [rng.integers(0, 256, PAYLOAD, dtype=np.uint8).tobytes() for _ in range(64)]
    t0 = time.monotonic()
    written = rounds = 0
    st = _fresh_node(c, node)
    for rounds in range(1, 4):
        capacity = st["nvlog_capacity"] or ((NVRAM_MB << 20) - F.REGION_HEADER)
        used = st["nvlog_used"] or 0
        n = int((target * capacity - used) // rsize)
        if n <= 0:
            break
        _write_n(c, node, n, trial, written, pattern, rng, pool)
        written += n
        cps = st.get("cp_count")
        want = used + n * rsize
        # The hypervisor learns nvlog_used from heartbeats: wait until one shows our writes
        # (or shows that a CP reset the log meanwhile).
        _wait(c, lambda s: (s.node(node)["nvlog_used"] or 0) >= want
              or s.node(node)["cp_count"] != cps, 10.0,
              f"{node}'s heartbeat to report {want} NVLog bytes")
        st = _fresh_node(c, node)
        if (st["nvlog_used"] or 0) + rsize > target * capacity:
            break
    secs = time.monotonic() - t0
    return {"writes": written, "fill_rounds": rounds, "write_s": round(secs, 3),
            "write_ops_per_s": round(written / secs, 1) if secs else None,
            "nvlog_used": st["nvlog_used"], "nvlog_capacity": st["nvlog_capacity"],
            "cp_count_at_crash": st.get("cp_count"),
            "fill": round((st["nvlog_used"] or 0) / st["nvlog_capacity"], 4)}


def _summary(c: Cluster) -> str:
    try:
        s = c.status()
    except Exception as exc:  # noqa: BLE001 - only for an error message
        return f"(status failed: {exc})"
    keys = ("state", "pid", "identity_served_by", "serves", "takeover_possible", "region",
            "nvlog_used", "cp_count")
    return "; ".join(f"{n['name']}: " + ", ".join(f"{k}={n.get(k)}" for k in keys)
                     for n in s.nodes) + f"; grants={s.raw.get('grants')}"


def _wait(c: Cluster, pred: Any, timeout: float, what: str) -> Status:
    try:
        return c.wait_for(pred, timeout, what)
    except Timeout as exc:
        raise Timeout(f"{exc.message}; cluster: {_summary(c)}") from None


def _healthy(s: Status) -> bool:
    return s.all_serving() and s.node("node1")["takeover_possible"] and \
        s.node("node2")["takeover_possible"]


def _trial(c: Cluster, trial: int, pattern: str) -> dict[str, Any]:
    fill = _fill(c, "node1", FILL_TARGET, trial, pattern)
    probe = c.client("node1", retry_after=0.005)
    try:
        probe.read(0, 0, PAYLOAD)  # connected and answered before the crash
        t0 = time.monotonic()
        crash = c.crash("node1")
        req = probe.submit("read", {"lun": 0, "offset": 0, "length": PAYLOAD})
        failed_ops = 0
        while True:
            comps = [x for x in probe.poll(0.5) if x.req_id == req]
            if comps:
                if comps[0].ok:
                    break
                failed_ops += 1  # a non-retryable error: ask again until an op succeeds
                req = probe.submit("read", {"lun": 0, "offset": 0, "length": PAYLOAD})
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no successful op on node1's identity within 60 s of the crash")
        t1 = time.monotonic()
        attempts = comps[0].attempts
    finally:
        probe.close()
    ms = (t1 - t0) * 1000
    s = _wait(c, lambda s: "first_request_served" in
                   ((s.node("node1")["last_takeover"] or {}).get("stages") or {}),
                   10.0, "the takeover's stages")
    lt = s.node("node1")["last_takeover"]
    served_by = s.node("node1")["identity_served_by"]
    from_kill = _from_kill(c, t0, t1, lt.get("stages") or {})
    # Bring node1 back; giveback_delay_s=0 hands its identity back as soon as it registers.
    _wait(c, lambda s: s.node("node1")["state"] == "down" and s.node("node1")["pid"] is None,
               10.0, "node1 to be reaped")
    t_r = time.monotonic()
    c.restart("node1")
    _wait(c, lambda s: _healthy(s) and s.node("node1")["identity_served_by"] == "node1",
          60.0, "node1 to serve its identity again")
    back = time.monotonic()
    settled = _settle(c, "node1", t_r)
    return {"trial": trial, "ms": round(ms, 3), "served_by": served_by,
            "kill_sent_ms": round((crash["mono"] - t0) * 1000, 3), "from_kill": from_kill,
            "probe_attempts": attempts, "probe_failed_ops": failed_ops,
            "stages": lt.get("stages"), "replay": lt.get("replay"),
            "restart_to_giveback_s": round(back - t_r, 3), **settled, **fill}


def _from_kill(c: Cluster, t0: float, t1: float, stages: dict[str, float]) -> dict[str, float]:
    """The same stages on the bench's clock: ms since the timestamp taken just before the kill.

    CLOCK_MONOTONIC is one clock for every process on the host, so the event log's `mono`
    (failure_detected) anchors the hypervisor's stages to our t0.
    """
    det = [e for e in c.events() if e.get("kind") == "failure_detected"
           and e.get("node") == "node1" and e.get("mono", 0) >= t0 - 0.001]
    out: dict[str, float] = {}
    if det:
        base = (det[0]["mono"] - t0) * 1000
        out = {k: round(base + v, 3) for k, v in stages.items()}
    out["client_reply"] = round((t1 - t0) * 1000, 3)
    return out


def _keep_diagnostics(data_dir: Path, diag_dir: Path | None) -> Path | None:
    """Copy the cluster's event log and process logs out of the temp dir after a failure."""
    if diag_dir is None:
        return None
    dest = diag_dir / f"takeover-failure-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for src in [data_dir / "events.jsonl", *sorted((data_dir / "logs").glob("*.log"))]:
            if src.exists():
                shutil.copy2(src, dest / src.name)
    except OSError:
        return None
    return dest


def _recent_events(c: Cluster, n: int = 40) -> list[dict[str, Any]]:
    keep = ("kind", "node", "mono", "reason", "ms", "silent_ms", "limit_ms", "identity", "error",
            "detail")
    try:
        return [{k: e[k] for k in keep if k in e} for e in c.events()[-n:]]
    except Exception:  # noqa: BLE001 - diagnostics only
        return []


def _recover(c: Cluster) -> bool:
    """After a failed trial: restart whatever is down and wait for a healthy pair again."""
    since = time.monotonic()
    try:
        for n in c.status().nodes:
            if n["state"] in ("down", "stopped") and n["pid"] is None:
                c.restart(n["name"])
        _wait(c, _healthy, 60.0, "both nodes serving again after a failed trial")
        for name in ("node1", "node2"):
            _settle(c, name, since)
        return True
    except Exception as exc:  # noqa: BLE001
        log(f"takeover: could not recover the cluster: {exc}")
        return False


def run(quick: bool, trials: int | None = None, pattern: str = "seq",
        diag_dir: Path | None = None) -> dict[str, Any]:
    trials = trials or (3 if quick else 10)
    disk_mb = _disk_mb(trials)
    with tempfile.TemporaryDirectory(prefix="vmemu-bench-takeover-") as tmp:
        data_dir = Path(tmp) / "data"
        log(f"takeover: 2-node cluster in {data_dir}, {trials} trials")
        results: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        kept = None
        try:
            with Cluster(nodes=2, data_dir=data_dir, nvram_mb=NVRAM_MB, cp_interval_s=600.0, nbd_port=0,
                         giveback_delay_s=0.0, disk_mb=disk_mb) as c:
                _wait(c, _healthy, 30.0, "both nodes serving, each able to take over")
                for i in range(trials + MAX_FAILED_TRIALS):
                    if len(results) == trials:
                        break
                    try:
                        r = _trial(c, i, pattern)
                    except Exception as exc:  # noqa: BLE001 - recorded, then recovered from
                        failures.append({"trial": i, "error": f"{type(exc).__name__}: {exc}",
                                         "events": _recent_events(c)})
                        log(f"takeover trial {i + 1} failed: {type(exc).__name__}: {exc}")
                        kept = kept or _keep_diagnostics(data_dir, diag_dir)
                        if len(failures) > MAX_FAILED_TRIALS or not _recover(c):
                            raise
                        continue
                    log(f"takeover {len(results) + 1}/{trials}: {r['ms']:.1f} ms "
                        f"(fill {r['fill']:.3f}, "
                        f"{(r['replay'] or {}).get('records')} records replayed)")
                    results.append(r)
        except Exception as exc:
            kept = kept or _keep_diagnostics(data_dir, diag_dir)
            raise RuntimeError(f"takeover trials stopped after {len(results)} good and "
                               f"{len(failures)} failed: {type(exc).__name__}: {exc}"
                               + (f" (event log and process logs kept in {kept})" if kept else "")
                               ) from exc
        finally:
            leftover = wait_no_processes(str(data_dir))
        if leftover:
            log(f"takeover: processes left behind: {leftover}")
    ms = [r["ms"] for r in results]
    stage_names: list[str] = []
    for r in results:
        for k in r["stages"] or {}:
            if k not in stage_names:
                stage_names.append(k)
    stages = {k: round(statistics.median([r["stages"][k] for r in results
                                          if k in (r["stages"] or {})]), 3)
              for k in stage_names}
    fk_names: list[str] = []
    for r in results:
        for k in r["from_kill"]:
            if k not in fk_names:
                fk_names.append(k)
    from_kill = {k: round(statistics.median([r["from_kill"][k] for r in results
                                             if k in r["from_kill"]]), 3) for k in fk_names}
    rep = [r["replay"] or {} for r in results]
    p99 = percentile(ms, 99)
    return {
        "p50": round(percentile(ms, 50), 3),
        "p99": round(p99, 3),
        "max": round(max(ms), 3),
        "min": round(min(ms), 3),
        "n": len(ms),
        "stages": stages,
        "stages_from_kill": from_kill,
        "stages_note": ("hypervisor-side, ms since the failure was detected (median over trials); "
                        "the headline figure runs from just before the kill; stages_from_kill puts the same "
                        "stages on the bench's clock (ms since the timestamp taken just before "
                        "crash(), anchored by the failure_detected event's CLOCK_MONOTONIC time), "
                        "ending with client_reply (the probe's answer arrived)"),
        "kill_sent_ms_median": statistics.median([r["kill_sent_ms"] for r in results]),
        "replay": {
            "records_median": statistics.median([x.get("records", 0) for x in rep]),
            "bytes_median": statistics.median([x.get("bytes", 0) for x in rep]),
            "ms_median": statistics.median([x.get("ms", 0.0) for x in rep]),
            "scanned_median": statistics.median([x.get("scanned", 0) for x in rep]),
        },
        "fill": {"min": min(r["fill"] for r in results),
                 "median": statistics.median([r["fill"] for r in results]),
                 "target": FILL_TARGET},
        "nvram_mb": NVRAM_MB,
        "write_ops_per_s_median": statistics.median([r["write_ops_per_s"] or 0 for r in results]),
        "p99_note": (f"percentile with linear interpolation over n={len(ms)}: with few trials "
                     "p99 is close to the maximum"),
        "failed_trials": len(failures),
        "failures": failures,
        "diagnostics_dir": str(kept) if kept else None,
        "trials": results,
        "leftover_processes": leftover,
        "config": {"nodes": 2, "nvram_mb": NVRAM_MB, "cp_interval_s": 600.0,
                   "giveback_delay_s": 0.0, "disk_mb": disk_mb, "write_depth": DEPTH,
                   "payload": PAYLOAD, "probe_retry_after_s": 0.005,
                   "offsets": pattern,
                   "offsets_note": ("seq: per trial a sequential run of never-written blocks "
                                    "per LUN (replay fills holes of the sparse disk images)"
                                    if pattern == "seq" else
                                    "random: uniformly random 4 KiB blocks over each LUN")},
    }
