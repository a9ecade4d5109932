"""The faults of a chaos run, done to a live cluster, and the healing after each.

Phase faults are triggered by the cluster's own events (events.jsonl, tailed), never by
sleeps: "kill the partner while it replays" waits for `partner_alerted` naming it, then
kills it at once. An event seen too late for its phase (the replay ended first) still
counts as the fault, and the record says how long after the event the kill landed.

After every fault the cluster is healed before the next one: every down node restarted, each
identity given back to its owner, every domain serving. What each fault did, and when, goes
into `faults.jsonl` of the run (the applied list, beside the asked-for schedule.json).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from vmemu.chaos.nemesis_disk import DISK_KINDS, DiskFaults
from vmemu.chaos.nemesis_bus import BusNemesis
from vmemu.chaos.schedule import Fault
from vmemu.chaos.workload import ClientCut
from vmemu.cluster import Cluster, Status
from vmemu.config import partner_of
from vmemu.errors import VmemuError

BOOT_S = 120.0  # a fresh guest interpreter on two busy cores (tests/e2e/conftest.py BOOT_S)


def identities_home(st: Status) -> bool:
    """Every node up and serving its own identity."""
    return all(n["state"] == "serving" and n["identity_served_by"] == n["name"]
               for n in st.nodes)


class EventTail:
    """New complete lines of events.jsonl since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class Nemesis(BusNemesis, DiskFaults):
    def __init__(self, cluster: Cluster, detection_s: float, record: Callable[[dict], None],
                 alive: Callable[[], bool], cut: ClientCut | None = None) -> None:
        self.c = cluster
        self.detection_s = detection_s
        self.record = record
        self.alive = alive  # False once the run is being torn down: stop waiting
        self.tail = EventTail(cluster.dir / "events.jsonl")
        self.tail.new()  # from here on
        self.nodes = cluster.control.config.nodes
        self.pids_before: dict[str, int | None] = {}
        # This fault's kills, (node, mono): each starts an availability clock (availability.py)
        self.kills: list[tuple[str, float]] = []
        self.topology = cluster.control.config.topology
        self.want_scrub: list[str] = []  # nodes the healing scrubs after the last fault
        self.cut = cut  # the clients' switch for client_cut (they are threads of this process)

    # -- what the cluster looks like -------------------------------------------------------
    def status(self) -> Status:
        return self.c.status()

    def partner(self, node: str) -> str:
        p = partner_of(int(node[4:]), self.nodes, self.topology)
        return f"node{p}"

    def wait(self, pred: Callable[[Status], bool], timeout: float, what: str) -> Status:
        end = time.monotonic() + timeout
        while self.alive():
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.02)
        raise TimeoutError("the run is ending")

    def wait_event(self, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            for ev in self.tail.new():
                if pred(ev):
                    return ev
            time.sleep(0.002)
        raise TimeoutError(f"no {what} within {timeout:.0f}s")

    # -- the faults ------------------------------------------------------------------------
    def apply(self, f: Fault) -> dict[str, Any]:
        """Do one fault; what happened (for faults.jsonl)."""
        st = self.status()
        node = st.node(f.target)
        if node["state"] != "serving" or node["identity_served_by"] != f.target \
                or not identities_home(st):
            return {"skipped": f"{f.target} is {node['state']}, the cluster not all serving"}
        if f.kind in DISK_KINDS and (why := self.disk_precondition(f, st)) is not None:
            return {"skipped": why}
        self.tail.new()  # only events after the fault count as its triggers
        self.pids_before = {n["name"]: n["pid"] for n in st.nodes}
        self.kills = []
        do = getattr(self, f"_{f.kind}")
        rec = do(f, int(node["pid"]))
        self.want_scrub = [f.target] if rec.get("scrub") else []
        if self.kills:
            rec["kills"] = [[n, round(t, 6)] for n, t in self.kills]
        return rec

    def _crash(self, node: str) -> float:
        t = time.monotonic()
        self.c.crash(node)
        self.kills.append((node, t))
        return t

    def _kill(self, f: Fault, pid: int) -> dict[str, Any]:
        return {"killed": [f.target], "mono": self._crash(f.target)}

    def _pause(self, f: Fault, pid: int, hold_s: float) -> dict[str, Any]:
        t = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(hold_s)  # the fault itself is a length of time
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # fenced (killed) while stopped
        return {"paused": f.target, "pid": pid, "mono": t, "held_s": round(hold_s, 3)}

    def _pause_short(self, f: Fault, pid: int) -> dict[str, Any]:
        return self._pause(f, pid, self.detection_s * float(f.params.get("fraction", 0.4)))

    def _pause_long(self, f: Fault, pid: int) -> dict[str, Any]:
        # Held until Domain 0 has fenced it (or its deadline), then `hold_s` more: the old
        # owner wakes after its identity moved, and must not write again.
        t = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            self.wait_event(lambda e: e.get("kind") == "fenced" and e.get("node") == f.target,
                            self.detection_s * 4 + 10, f"the fencing of {f.target}")
            fenced = True
        except TimeoutError:
            fenced = False
        time.sleep(float(f.params.get("hold_s", 1.0)))
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        return {"paused": f.target, "pid": pid, "mono": t, "fenced_while_stopped": fenced,
                "killed": [f.target] if fenced else []}

    def _kill_pair(self, f: Fault, pid: int) -> dict[str, Any]:
        p = self.partner(f.target)
        t = self._crash(f.target)
        self.wait_event(lambda e: e.get("kind") == "fenced" and e.get("node") == f.target,
                        self.detection_s * 4 + 10, f"the fencing of {f.target}")
        self._crash_if_alive(p)
        return {"killed": [f.target, p], "mono": t}

    def _crash_if_alive(self, node: str) -> bool:
        try:
            self._crash(node)
            return True
        except VmemuError:
            return False  # already down: the phase ended in a failure of its own

    def _kill_in_phase(self, f: Fault, second: str, kind: str, what: str,
                       match: Callable[[dict], bool]) -> dict[str, Any]:
        t = self._crash(f.target)
        try:
            ev = self.wait_event(lambda e: e.get("kind") == kind and match(e),
                                 self.detection_s * 4 + 20, what)
        except TimeoutError as exc:
            return {"killed": [f.target], "mono": t, "phase_missed": str(exc)}
        late = time.monotonic() - float(ev.get("mono", time.monotonic()))
        killed = [f.target] + ([second] if self._crash_if_alive(second) else [])
        return {"killed": killed, "mono": t, "trigger": kind, "late_ms": round(late * 1000, 1)}

    def _kill_in_replay(self, f: Fault, pid: int) -> dict[str, Any]:
        p = self.partner(f.target)
        return self._kill_in_phase(f, p, "partner_alerted", f"{p} starting to replay",
                                   lambda e: e.get("node") == p
                                   and e.get("identity") == f.target)

    def _kill_after_assume(self, f: Fault, pid: int) -> dict[str, Any]:
        p = self.partner(f.target)
        return self._kill_in_phase(f, p, "identity_assumed", f"{p} assuming {f.target}",
                                   lambda e: e.get("node") == p
                                   and e.get("identity") == f.target)

    def _kill_in_cp(self, f: Fault, pid: int) -> dict[str, Any]:
        try:
            ev = self.wait_event(lambda e: e.get("kind") == "cp_started"
                                 and e.get("node") == f.target, 30.0,
                                 f"a consistency point on {f.target}")
        except TimeoutError as exc:
            return {"skipped": str(exc)}
        t = self._crash(f.target)
        return {"killed": [f.target], "mono": t, "trigger": "cp_started",
                "late_ms": round((t - float(ev["mono"])) * 1000, 1)}

    def _kill_in_giveback(self, f: Fault, pid: int) -> dict[str, Any]:
        """Kill the owner, let it come back, and kill one side as the giveback runs."""
        p = self.partner(f.target)
        t = self._crash(f.target)
        self.wait(lambda st: st.node(f.target)["identity_served_by"] == p
                  and st.node(f.target)["state"] in ("down", "stopped"), 60.0,
                  f"{p} to take over {f.target}")
        self.c.restart(f.target)
        self.wait(lambda st: st.node(f.target)["state"] in ("up", "serving"), BOOT_S,
                  f"{f.target} to boot again")
        self.tail.new()
        self.c.giveback(f.target)
        victim = f.target if f.params.get("victim", "owner") == "owner" else p
        try:
            ev = self.wait_event(lambda e: e.get("kind") in ("giveback_started", "released")
                                 and e.get("node") in (f.target, p), 30.0,
                                 f"the giveback of {f.target}")
        except TimeoutError as exc:
            return {"killed": [f.target], "mono": t, "phase_missed": str(exc)}
        killed = [f.target] + ([victim] if self._crash_if_alive(victim) else [])
        return {"killed": killed, "mono": t, "trigger": ev["kind"],
                "late_ms": round((time.monotonic() - float(ev["mono"])) * 1000, 1)}

    def _client_cut(self, f: Fault, pid: int) -> dict[str, Any]:
        """The target identity's clients hang up mid-request for `hold_s`; the cluster is
        left alone. What was cut, and how, is counted by the clients."""
        if self.cut is None:
            return {"skipped": "no clients to cut"}
        hold = float(f.params.get("hold_s", 3.0))
        t = time.monotonic()
        self.cut.begin(f.target, t + hold)
        try:
            while self.alive() and time.monotonic() < t + hold:
                time.sleep(0.02)  # the fault itself is a length of time
        finally:
            cuts = self.cut.end(f.target)
        return {"cut": f.target, "mono": t, "held_s": round(hold, 3), "cuts": cuts}

    # -- healing ---------------------------------------------------------------------------
    def heal(self, gone: list[str] = (), timeout: float = BOOT_S + 60) -> dict[str, Any]:
        """Every node up and serving its own identity again; how long that took.

        `gone`: the nodes the fault killed (or had fenced). Their death is seen first (their
        pid is no longer the one they had), or a cluster that has not yet noticed a kill
        would look healed already."""
        t0 = time.monotonic()
        end = t0 + timeout
        for name in gone:
            old = self.pids_before.get(name)
            self.wait(lambda st: st.node(name)["pid"] != old, self.detection_s * 4 + 10,
                      f"{name} (pid {old}) to be seen gone")
        restarted: list[str] = []
        asked: dict[str, float] = {}  # node -> when its giveback was last asked for
        while self.alive() and time.monotonic() < end:
            st = self.status()
            if identities_home(st):
                # Then the disks: rules cleared, failed ones replaced and rebuilt (a no-op
                # after faults that touched none).
                disks = self.heal_disks(end, scrub=self.want_scrub)
                self.want_scrub = []
                # The management database's readiness is recorded, not waited for: it is not
                # on the data path, and a run's verdict is about the data path.
                return {"healed_s": round(time.monotonic() - t0, 3), "restarted": restarted,
                        "rdb_ready": bool((st.raw.get("rdb") or {}).get("ready", True)),
                        **({"disks": disks} if disks["replaced"] or disks["scrubs"] else {})}
            for n in st.nodes:
                if n["state"] in ("down", "stopped") and n["pid"] is None:
                    try:
                        self.c.restart(n["name"])
                        restarted.append(n["name"])
                    except VmemuError:
                        pass  # not yet down in the coordinator's eyes: next turn
                elif n["state"] == "up" and n["identity_served_by"] not in (n["name"], None) \
                        and time.monotonic() - asked.get(n["name"], -1e9) > 5.0:
                    asked[n["name"]] = time.monotonic()
                    try:
                        self.c.giveback(n["name"])
                    except VmemuError:
                        pass
            time.sleep(0.1)
        raise TimeoutError(f"the cluster did not heal within {timeout:.0f}s")
