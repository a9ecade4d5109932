"""One chaos run: a fresh cluster, concurrent clients, a seeded fault schedule, a verdict.

    <out>/schedule.json   the faults asked for (seed, times, kinds, targets)
    <out>/faults.jsonl    what each fault did when it was applied, and the healing after it
    <out>/history.jsonl   every client op, invoke and completion (vmemu/chaos/workload.py)
    <out>/events.jsonl    the cluster's own event log
    <out>/verdict.json    the checker's verdict, per block, anomalies named with their ops
    <out>/result.json     the run in one object: verdict, ops, faults, availability
    <out>/timeline.png    client ops and faults on one time axis
    <out>/cluster/        the cluster's data dir (kept only when the run failed, or asked)

Everything random in a run (the schedule, each client's choice of ops and blocks) comes from
the seed; the interleaving of real processes on real cores does not, so a replay repeats the
same faults in the same order against the same workload, not the same microsecond timing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vmemu.chaos import availability, fencing, schedule as sched_mod
from vmemu.chaos.nemesis import BOOT_S, Nemesis
from vmemu.chaos.schedule import DEFAULT_KINDS, Schedule
from vmemu.chaos.workload import Client, ClientCut, History, Mix, Target, final_reads
from vmemu.cluster import Cluster
from vmemu.config import ClusterConfig, nbd_uri, partner_of
from vmemu.hypervisor.events import read_events
from vmemu.privfs import ensure_private_dir


@dataclass
class RunSpec:
    seed: int
    duration: float = 20.0
    nodes: int = 2
    kinds: tuple[str, ...] = DEFAULT_KINDS
    block_clients: int = 3  # per identity
    nbd_clients: int = 1  # per identity
    mix: Mix = field(default_factory=Mix)
    gap_s: float = 12.0  # between faults, at least
    budget_s: float = 10.0  # the checker's time per block, then "unknown"
    # Availability budgets are multiplied by it (availability.BUDGETS): for loaded hosts
    availability_slack: float = 1.0
    keep_cluster: bool = False
    broken: str = ""  # VMEMU_BREAK for the guests: a deliberately broken build (tests only)
    cluster: dict[str, Any] = field(default_factory=lambda: {
        "disk_mb": 64, "nvram_mb": 16, "disks": 3, "heartbeat_ms": 100, "heartbeat_misses": 10,
        "giveback_delay_s": -1.0, "cp_interval_s": 2.0, "nbd_port": 0})

    @property
    def detection_s(self) -> float:
        return self.cluster["heartbeat_ms"] * self.cluster["heartbeat_misses"] / 1000


def private_nbd_base() -> str:
    """127.a.b.0 of this run's own: parallel runs never meet on an NBD address."""
    return f"127.{64 + os.getpid() % 64}.{secrets.randbelow(250) + 1}.0"


class _Log:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a")
        self.lock = threading.Lock()

    def __call__(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.f.write(json.dumps(rec, default=str) + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


def run(spec: RunSpec, out: Path, schedule: Schedule | None = None,
        progress: Any = None) -> dict[str, Any]:
    """Do one run into `out`; its result (also in result.json)."""
    out = ensure_private_dir(Path(out), "chaos run dir")
    sched = schedule or sched_mod.generate(spec.seed, spec.duration, spec.nodes, spec.kinds,
                                           spec.gap_s)
    sched_mod.save(sched, out / "schedule.json")
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")  # for --replay
    history = History()
    log = _Log(out / "faults.jsonl")
    stop_clients = threading.Event()
    ending = threading.Event()
    clients: list[Client] = []
    cut = ClientCut()  # client_cut: the nemesis tells the client threads to hang up
    nemesis_error: list[str] = []
    t_start = time.monotonic()
    cluster = Cluster(nodes=sched.nodes, data_dir=out / "cluster",
                      nbd_addr_base=private_nbd_base(), **spec.cluster)
    old_break = os.environ.get("VMEMU_BREAK")
    try:
        try:
            if spec.broken:
                os.environ["VMEMU_BREAK"] = spec.broken  # inherited by Domain 0 and guests
            cluster.start(timeout=BOOT_S * 2)
        finally:
            if old_break is None:
                os.environ.pop("VMEMU_BREAK", None)
            else:
                os.environ["VMEMU_BREAK"] = old_break
        st = cluster.status()
        cfg = cluster.control.config
        targets = [Target(n["name"], cluster.endpoint(n["name"]),
                          nbd_uri(cfg, int(n["name"][4:]), 0)) for n in st.nodes]
        for i, t in enumerate(targets):
            kinds = ["block"] * spec.block_clients + ["nbd"] * spec.nbd_clients
            for j, kind in enumerate(kinds):
                clients.append(Client(kind, t, spec.mix, history, spec.seed * 1000 + i * 50 + j,
                                      stop_clients, cut))
        t0 = time.monotonic()
        for c in clients:
            c.start()
        nem = Nemesis(cluster, spec.detection_s, log, lambda: not ending.is_set(), cut)

        def faults() -> None:
            for i, f in enumerate(sched.faults):
                while time.monotonic() < t0 + f.at and not ending.is_set():
                    ending.wait(min(0.05, t0 + f.at - time.monotonic()))
                if ending.is_set():
                    return
                rec: dict[str, Any] = {"index": i, **f.to_dict(), "started": time.monotonic()}
                try:
                    rec.update(nem.apply(f))
                    if "skipped" not in rec:
                        rec.update(nem.heal(rec.get("killed", [])))
                except Exception as exc:  # noqa: BLE001 - recorded; the run's verdict says it
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    nemesis_error.append(rec["error"])
                rec["ended"] = time.monotonic()
                log(rec)
                if progress:
                    progress(rec)
                if "error" in rec:
                    return

        nt = threading.Thread(target=faults, name="nemesis", daemon=True)
        nt.start()
        deadline = t0 + spec.duration
        while time.monotonic() < deadline or (nt.is_alive() and
                                               time.monotonic() < deadline + BOOT_S * 3):
            time.sleep(0.05)
        ending.set()
        nt.join(BOOT_S)
        t_stop = time.monotonic()  # the clients' last stretch ends here, not when they join
        stop_clients.set()
        for c in clients:
            c.join(spec.mix.op_timeout + 5)
        healed = Nemesis(cluster, spec.detection_s, log, lambda: True).heal()
        touched: dict[str, set[int]] = {}
        for c in clients:
            touched.setdefault(c.target.identity, set()).update(c.touched)
        final_reads(targets, touched, history, timeout=30.0)
    finally:
        ending.set()
        stop_clients.set()
        log.close()
        try:
            cluster.stop()
        finally:
            src = cluster.dir / "events.jsonl"
            if src.exists():
                shutil.copyfile(src, out / "events.jsonl")
    return _conclude(spec, sched, out, history, t0, t_stop, t_start, healed, nemesis_error)


def _conclude(spec: RunSpec, sched: Schedule, out: Path, history: History, t0: float,
              t_end: float, t_start: float, healed: dict[str, Any],
              nemesis_error: list[str]) -> dict[str, Any]:
    from vmemu.chaos import checker, timeline_png
    from vmemu.chaos import history as history_format

    with open(out / "history.jsonl", "w") as f:
        for op in history.ops:
            f.write(json.dumps(op, separators=(",", ":")) + "\n")
    # Checked as written: the file is the record, and reading it back checks its format too.
    verdict = checker.check(history_format.load_path(str(out / "history.jsonl")),
                            budget=spec.budget_s).to_json()
    (out / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
    applied = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    events = read_events(out / "events.jsonl")
    avail = availability.judge(history.ops, applied, events, t0, t_end, spec.detection_s,
                               _partners(spec, sched.nodes), spec.availability_slack)
    split = fencing.judge(history.ops, applied, events)
    by_kind: dict[str, int] = {}
    for a in applied:
        if "skipped" not in a:
            by_kind[a["kind"]] = by_kind.get(a["kind"], 0) + 1
    counts = {t: sum(1 for o in history.ops if o["type"] == t) for t in ("ok", "fail", "info")}
    result = {"seed": sched.seed, "valid": verdict["valid"], "ops": counts,
              "faults": by_kind, "faults_skipped": sum(1 for a in applied if "skipped" in a),
              "nemesis_error": nemesis_error[0] if nemesis_error else None,
              "anomalies": len(verdict.get("anomalies", [])),
              "availability_ok": avail["ok"], "availability_violations": avail["violations"],
              "availability": avail["identities"], "outages": avail["outages"],
              "fencing_ok": not split, "fencing_violations": split,
              "clients_mono": [t0, t_end],
              "healed_at_end_s": healed.get("healed_s"), "broken": spec.broken or None,
              "seconds": round(time.monotonic() - t_start, 1), "out": str(out),
              "spec": {k: v for k, v in asdict(spec).items() if k != "mix"}}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    try:
        timeline_png.plot(history.ops, applied, out / "events.jsonl", t0, out / "timeline.png")
    except Exception as exc:  # noqa: BLE001 - a picture is no verdict; say why it is missing
        (out / "timeline.txt").write_text(f"no timeline: {type(exc).__name__}: {exc}\n")
    if not failed(result) and not spec.keep_cluster:
        shutil.rmtree(out / "cluster", ignore_errors=True)
    return result


def _partners(spec: RunSpec, nodes: int) -> Callable[[str], str | None]:
    topology = spec.cluster.get("topology", ClusterConfig.topology)

    def partner(node: str) -> str | None:
        p = partner_of(int(node[4:]), nodes, topology)
        return None if p is None else f"node{p}"
    return partner


def failed(result: dict[str, Any]) -> bool:
    """A run fails when its history is not linearizable, its verdict is unknown, a fault
    could not be done or healed (a cluster that does not come back is a finding too), an
    identity was out of service past its budget (availability.py), or a node declared
    failed while alive was not fenced before its identity moved (fencing.py)."""
    return (result["valid"] is not True or bool(result.get("nemesis_error"))
            or result.get("availability_ok") is False
            or bool(result.get("fencing_violations")))
