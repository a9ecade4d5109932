"""`vmemu demo`: the patent's mechanism, narrated while it happens on a live cluster.

Every narrated figure is read from the run itself (the event log, `status`, the load's summary),
and each line is also kept in a transcript with the figures it cites and the event they came
from, so a test can check that the story told is the story that happened.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from clients.load import LoadSpec, run_load
from clients.verify import verify
from vmemu.cluster import Cluster

SCENARIOS = ("failover", "hang", "double-failure", "ring")


@dataclass
class Line:
    step: str
    text: str
    figures: dict[str, Any] = field(default_factory=dict)
    event: dict[str, Any] | None = None


class Narrator:
    def __init__(self, console: Console, step_mode: bool, pause: float,
                 wait_enter: Callable[[], None]) -> None:
        self.console = console
        self.step_mode = step_mode
        self.pause = pause
        self.wait_enter = wait_enter
        self.lines: list[Line] = []
        self.t0 = time.monotonic()

    def step(self, title: str) -> None:
        if self.step_mode:
            self.console.print(f"[dim]  (Enter for: {title})[/]", end="")
            self.wait_enter()
        elif self.pause:
            time.sleep(self.pause)
        self.console.print(f"\n[bold cyan]== {title}[/]")

    def say(self, step: str, text: str, event: dict | None = None, **figures: Any) -> None:
        self.lines.append(Line(step, text, figures, event))
        self.console.print(f"[dim]{time.monotonic() - self.t0:6.2f}s[/]  {text}")


def _events(c: Cluster) -> list[dict[str, Any]]:
    return c.events()


def _find(c: Cluster, kind: str, after: float = 0.0, timeout: float = 20.0,
          **match: Any) -> dict[str, Any]:
    """The first event of `kind` (with matching fields) logged after `after` (mono time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in _events(c):
            if e["kind"] == kind and e["mono"] >= after and all(e.get(k) == v for k, v in match.items()):
                return e
        time.sleep(0.02)
    raise TimeoutError(f"no {kind} event {match or ''} within {timeout:.0f}s")


class LoadThread:
    """The client load: at least `seconds` long, and on until join(), so that it is still
    running when the crash comes and the takeover's first request is served, however slow the
    host (a fixed length ran out before the crash on a busy one)."""

    def __init__(self, c: Cluster, target: str, journal: Path, seconds: float) -> None:
        self.summary: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.until = threading.Event()
        spec = LoadSpec(workload="randwrite", bs=4096, iodepth=16, duration=seconds, size=16 << 20)
        endpoint = c.endpoint(target)

        def body() -> None:
            try:
                self.summary = run_load(endpoint, spec, journal, target, until=self.until)
            except BaseException as exc:  # reported by the narrator, not swallowed
                self.error = exc

        self.thread = threading.Thread(target=body, name="demo-load", daemon=True)
        self.thread.start()

    def join(self) -> dict[str, Any]:
        self.until.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.summary


def run_demo(scenario: str, data_dir: Path | None = None, fast: bool = False, speed: float = 1.0,
             step_mode: bool = False, console: Console | None = None,
             wait_enter: Callable[[], None] = lambda: input(), plot: Path | None = None) -> list[Line]:
    """Run one scenario; returns the transcript. Cleans up its cluster, also on Ctrl-C."""
    if scenario not in SCENARIOS:
        from vmemu.errors import BadRequest
        raise BadRequest(f"unknown demo {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    console = console or Console()
    own_dir = data_dir is None
    d = Path(tempfile.mkdtemp(prefix="vmemu-demo-")) if own_dir else data_dir
    pause = 0.0 if fast else 1.2 * speed
    n = Narrator(console, step_mode, pause, wait_enter)
    nodes = 3 if scenario == "ring" else (2 if scenario == "double-failure" else 4)
    cfg = dict(nodes=nodes, data_dir=d / "cluster", topology="ring" if scenario == "ring" else "pairs",
               heartbeat_ms=int(100 * speed), heartbeat_misses=5, cp_interval_s=2.0 * speed,
               giveback_delay_s=0.5 * speed, disk_mb=64, nvram_mb=32,
               nbd_port=0)  # NBD on any free port: a demo must not collide with a running cluster
    load_s = (3.0 if fast else 8.0) * max(speed, 1.0)
    load: LoadThread | None = None
    try:
        with Cluster(**cfg) as c:  # type: ignore[arg-type]
            _boot(n, c, scenario)
            _grant(n, c)
            journal = d / "demo-writes.jsonl"
            load = LoadThread(c, "node1", journal, load_s)
            _writes(n, c)
            if scenario == "hang":
                _hang(n, c)
            else:
                _kill(n, c, "node1")
            _takeover(n, c, "node1")
            if scenario == "double-failure":
                _double(n, c)
            elif scenario == "ring":
                _ring_second(n, c)
            summary = load.join()
            _load_summary(n, summary)
            _giveback(n, c, scenario)
            _verify(n, c, journal)
            if plot is not None:
                _plot(n, c, plot)
    finally:
        if load is not None:
            load.until.set()  # a step failed: let the load end with the cluster
        if own_dir:
            shutil.rmtree(d, ignore_errors=True)
    return n.lines


# -- the steps -------------------------------------------------------------------------------
def _boot(n: Narrator, c: Cluster, scenario: str) -> None:
    n.step("boot")
    s = c.status()
    regs = [e for e in _events(c) if e["kind"] == "registered"]
    first = _find(c, "cluster_up")
    took = max(e["t"] for e in regs) - first["t"]
    topo = s.raw["config"]["topology"]
    n.say("boot", f"The hypervisor (Domain 0, pid {s.raw['hypervisor_pid']}) started "
          f"{len(s.nodes)} guest domains in {'HA pairs' if topo == 'pairs' else 'a ring'}; "
          f"all registered their NVRAM within {took:.2f}s.", domains=len(s.nodes), boot_s=round(took, 2))
    nv = s.raw["config"]["nvram_mb"]
    for node in s.nodes:
        n.say("boot", f"  {node['name']} (pid {node['pid']}) allocated a {nv} MiB NVRAM region "
              f"{node['region']} (a memfd: no name anyone could open) and serves its identity; "
              f"its partner is {node['partner']}.", node=node["name"], region=node["region"])


def _grant(n: Narrator, c: Cluster) -> None:
    n.step("grant")
    g = _find(c, "granted", owner="node1")
    n.say("grant", f"The hypervisor granted node1's region {g['region']} to {g['grantee']}, "
          f"{'read-only' if g['mode'] == 'ro' else 'read-write'}: {g['grantee']} mapped it at boot, "
          "so a takeover can start replaying at once.", event=g, region=g["region"], mode=g["mode"])
    res = c.control.call("probe", {"node": g["grantee"], "what": "write_partner"})
    if res["grant_mode"] == "ro":
        n.say("grant", f"{g['grantee']} tries to write node1's region: the kernel refuses every way: "
              f"writable mmap -> {res['mmap_read_write']}, pwrite -> {res['pwrite']}, "
              f"reopen read-write and write -> {res['reopen_read_write_and_pwrite']}.",
              **{k: v for k, v in res.items()})


def _writes(n: Narrator, c: Cluster) -> None:
    n.step("writes")
    c.wait_for(lambda s: (s.node("node1")["ops"] or 0) >= 500, 30, "the load to start")
    s = c.status().node("node1")
    n.say("writes", f"A client writes 4 KiB blocks to node1 ({s['endpoint']}): each write is "
          f"appended to node1's NVLog and acknowledged before it reaches disk. So far {s['ops']} "
          f"operations; the NVLog holds {s['nvlog_used'] / 2**20:.1f} MiB.",
          ops=s["ops"], nvlog_used=s["nvlog_used"])
    since = time.monotonic()
    cp = _find(c, "cp", after=since, node="node1", timeout=30)
    n.say("writes", f"A consistency point ({cp['reason']}) wrote {cp['blocks']} dirty blocks to "
          f"node1's disks in {cp['ms']:.1f} ms and emptied the log up to record {cp['seq']}.",
          event=cp, blocks=cp["blocks"], ms=cp["ms"], seq=cp["seq"])


def _kill(n: Narrator, c: Cluster, node: str) -> None:
    n.step(f"kill {node}")
    res = c.crash(node)
    n.say("crash", f"{node} (pid {res['pid']}) is killed with SIGKILL: its memory, with every write "
          "since that CP, is gone, except what is in its NVRAM, which the hypervisor still holds.",
          pid=res["pid"])
    n.crash_mono = res["mono"]  # type: ignore[attr-defined]


def _hang(n: Narrator, c: Cluster) -> None:
    n.step("hang node1")
    res = c.crash("node1", hang=True)
    n.crash_mono = res["mono"]  # type: ignore[attr-defined]
    n.say("crash", f"node1 (pid {res['pid']}) is frozen with SIGSTOP: the process still exists, so "
          "no exit is reported. Only its missing heartbeats can give it away.", pid=res["pid"])
    miss = _find(c, "heartbeat_missed", after=res["mono"], node="node1")
    n.say("crash", f"The heartbeat monitor heard nothing from node1 for {miss['silent_ms']:.0f} ms "
          f"(limit {miss['limit_ms']:.0f} ms) and declares it failed.", event=miss,
          silent_ms=miss["silent_ms"], limit_ms=miss["limit_ms"])


def _takeover(n: Narrator, c: Cluster, node: str) -> None:
    n.step("takeover")
    after = getattr(n, "crash_mono", 0.0)
    done = _find(c, "takeover_complete", after=after, identity=node)
    det = _find(c, "failure_detected", after=after, node=node)
    fence = _find(c, "fenced", after=after, node=node)
    rep = _find(c, "replay_done", after=after, identity=node, node=done["node"])
    st = done["stages_ms"]
    n.say("takeover", f"Failure detected ({det['reason']}) {(det['mono'] - after) * 1000:.1f} ms after "
          f"the crash; {node} fenced {st['fenced']:.1f} ms later: killed, reaped, and its disks moved "
          f"to epoch {fence['disk_epochs'].get(node)}, so its old incarnation could not write.",
          event=fence, detect_ms=round((det["mono"] - after) * 1000, 1), fenced_ms=st["fenced"])
    n.say("takeover", f"Only then was {done['node']} alerted ({st['partner_alerted']:.1f} ms). It "
          f"replayed {rep['records']} records ({rep['bytes'] / 2**20:.1f} MiB) of {node}'s log from "
          f"its read-only mapping in {rep['ms']:.1f} ms.", event=rep, records=rep["records"],
          bytes=rep["bytes"], replay_ms=rep["ms"])
    n.say("takeover", f"{done['node']} assumed {node}'s identity at {st['identity_assumed']:.1f} ms "
          f"and answered its first client request at {st['first_request_served']:.1f} ms after "
          "detection. The client kept the same address.", event=done,
          assumed_ms=st["identity_assumed"], first_request_ms=st["first_request_served"])


def _double(n: Narrator, c: Cluster) -> None:
    n.step("second failure")
    res = c.crash("node2")
    c.wait_for(lambda s: all(x["identity_served_by"] is None for x in s.nodes), 20, "both down")
    un = _find(c, "unavailable", after=res["mono"])
    n.say("double", "node2, which served both identities, is killed too. Its partner is already "
          "down: nothing can serve node1 or node2 now. Unavailable, but not lost: both NVRAM "
          "regions are still held by the hypervisor.", event=un)
    n.step("restart node2")
    c.restart("node2")
    c.wait_for(lambda s: s.node("node2")["identity_served_by"] == "node2"
               and s.node("node1")["identity_served_by"] == "node2", 30, "node2 to serve both")
    reps = [e for e in _events(c) if e["kind"] == "replay_done" and e["mono"] >= res["mono"]]
    total = sum(e["records"] for e in reps)
    n.say("double", f"node2 restarts, replays the regions of both dead incarnations in order "
          f"({total} records over {len(reps)} identities) and serves node1 and node2 again.",
          records=total, identities=len(reps))


def _ring_second(n: Narrator, c: Cluster) -> None:
    n.step("second failure in the ring")
    res = c.crash("node2")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node3"
               and s.node("node2")["identity_served_by"] == "node3", 20, "node3 to serve both")
    det = _find(c, "failure_detected", after=res["mono"], node="node2")
    took = [_find(c, "identity_assumed", after=res["mono"], node="node3", identity=i)
            for i in ("node1", "node2")]
    ms = max(e["mono"] - det["mono"] for e in took) * 1000
    n.say("ring", f"In a ring each node's partner is the next one: node2 (serving node1 too) is "
          f"killed, and node3 takes over both identities, {ms:.1f} ms after the failure was "
          "detected, replaying node1's records from node2's region as well as node2's own.",
          event=took[-1], both_assumed_ms=round(ms, 1))


def _load_summary(n: Narrator, summary: dict[str, Any]) -> None:
    w = summary["write"]
    n.say("load", f"The load ran on: {w['ops']} writes acknowledged at {w['iops']:.0f} IOPS; "
          f"p50 {w['clat_us']['p50'] / 1000:.2f} ms, worst {w['clat_us']['max'] / 1000:.1f} ms (the "
          f"takeover); {summary['retries']} requests resent, {summary['errors']} errors.",
          writes=w["ops"], iops=w["iops"], max_ms=round(w["clat_us"]["max"] / 1000, 1),
          retries=summary["retries"], errors=summary["errors"])


def _giveback(n: Narrator, c: Cluster, scenario: str) -> None:
    n.step("restart and giveback")
    down = [x["name"] for x in c.status().nodes if x["state"] == "down"]
    t = time.monotonic()
    for node in down:
        c.restart(node)
    c.wait_for(lambda s: s.all_serving(), 60, "every node to serve its own identity")
    for node in down:
        rel = _find(c, "released", after=t, identity=node)
        back = _find(c, "identity_assumed", after=t, node=node, identity=node)
        n.say("giveback", f"{node} booted with a fresh NVRAM region; after the giveback delay "
              f"{rel['node']} flushed {node}'s data with a CP ({rel['cp_ms']:.1f} ms), unbound its "
              f"address and released its disks; {node} serves again ({back['reason']}).",
              event=back, cp_ms=rel["cp_ms"])


def _verify(n: Narrator, c: Cluster, journal: Path) -> None:
    n.step("verify")
    res = verify(c.endpoint("node1"), journal)
    n.say("verify", f"Reading back through node1's address: {res['acked_writes']} acknowledged "
          f"writes over {res['ranges']} blocks: {res['ok']} as last acknowledged, {res['lost']} "
          f"lost, {res['corrupt']} corrupt.", acked=res["acked_writes"], ok=res["ok"],
          lost=res["lost"], corrupt=res["corrupt"])
    if not res["passed"]:
        from vmemu.errors import VmemuError
        raise VmemuError(f"verify failed: {res['problems'][:3]}")


def _plot(n: Narrator, c: Cluster, out: Path) -> None:
    try:
        from vmemu import timeline
    except ImportError:
        return
    from vmemu import datadir

    summary = timeline.plot_timeline(c.events(), timeline.read_metrics(datadir.metrics_file(c.dir)),
                                     out, title="vmemu demo")
    n.say("plot", f"The timeline of this run is in {out}.", path=str(out), summary=summary)


def transcript_json(lines: list[Line]) -> str:
    return json.dumps([{"step": l.step, "text": l.text, "figures": l.figures, "event": l.event}
                       for l in lines], indent=2, default=str)
