"""Fixtures that start real clusters (real processes, memfds, ZeroMQ sockets, disk files).

Each cluster gets its own data dir under the test's tmp_path, its own random cluster id, which
names every socket, and its own loopback block for NBD: tests run in parallel under xdist
without sharing anything. Whatever a test starts is gone after it (no_process_left).

What settles after the call that caused it, and so is polled for (c.wait_for, wait_until,
events_when), never read once:
- `status` figures that ride on heartbeats (ops, storage: volumes, LUNs, RAID state, dirty
  blocks, CP counts), every 50-100 ms;
- a guest's own events (cp, RAID and scrub events, mapped, first_request_served and the
  takeover_complete it brings), sent apart from the reply or heartbeat that told of them;
- the RDB driver's view of a replica (caught_up, last_seq), set when its reply is read;
- anything after a CLI command that returns before it happens (crash, disk replace).
Events Domain 0 logs itself before it changes the state that was polled (failure_detected,
fenced, partner_alerted, replay_done, identity_assumed before identity_served_by moves;
giveback_started and released before the identity goes back) may be read at once.
A load that must span a crash is a LoadRun: it runs until finish(), however slow the host.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from clients.load import LoadSpec, run_load
from vmemu.cluster import Cluster, Status

TEST_DEFAULTS: dict[str, Any] = dict(
    disk_mb=64, nvram_mb=16, disks=2, heartbeat_ms=50, heartbeat_misses=10,
    giveback_delay_s=-1.0, cp_interval_s=5.0,
    nbd_port=0,  # any free port: parallel clusters never collide on 127.0.10.N:10809
)


# How long a restarted domain may take to register: a fresh interpreter that loads numpy,
# numba and its cached kernels, on two cores that other tests (and other suites) share. A
# deadline costs nothing when the wait succeeds: this one is for the slowest honest host.
BOOT_S = 120.0


def private_nbd_base() -> str:
    """A loopback block of the cluster's own for its NBD addresses (base + N). A free port is
    only free when it is picked: while an identity moves (takeover, giveback) nobody listens
    on its address, and another cluster on the same addresses could pick and take that port.
    On addresses of its own no other cluster, of this run or another, can."""
    return f"127.{random.randint(64, 254)}.{random.randint(0, 255)}.0"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; read its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events_when(c: Cluster, pred: Callable[[list[dict[str, Any]]], bool],
                timeout: float = 20.0) -> list[dict[str, Any]]:
    """The event log as soon as `pred` holds for it, or as it is at the deadline (the caller's
    assertions then say what is missing). A guest's own events (CPs, RAID, its first request
    served) reach Domain 0 on a channel of their own: they may land after the reply or the
    status that told of what they report."""
    end = time.monotonic() + timeout
    while True:
        evs = c.events()
        if pred(evs) or time.monotonic() >= end:
            return evs
        time.sleep(0.02)


class LoadRun:
    """`run_load` in a daemon thread, running for at least its duration and until finish():
    a test that waits for a crash and a takeover under load never finds the load already over
    on a slow host. finish() returns its summary, re-raises its error, and fails (rather than
    waiting for ever, or a KeyError) if the load is still running at the deadline."""

    started: list["LoadRun"] = []  # released after each test (release_loads), failed or not

    def __init__(self, endpoint: str, spec: LoadSpec, journal: Path | None,
                 target: str = "node1", timeline: Path | None = None) -> None:
        """`timeline`: where run_load writes completions per 10 ms (clients/load.Timeline)."""
        self.out: dict[str, Any] = {}
        self.until = threading.Event()

        def body() -> None:
            try:
                self.out["summary"] = run_load(endpoint, spec, journal, target,
                                               timeline=timeline, until=self.until)
            except BaseException as exc:  # reported by finish(), not lost in the thread
                self.out["error"] = exc

        self.thread = threading.Thread(target=body, name="e2e-load", daemon=True)
        LoadRun.started.append(self)
        self.thread.start()

    def finish(self, timeout: float = 90.0) -> dict[str, Any]:
        self.until.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the load did not finish within {timeout}s"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["summary"]


@pytest.fixture(autouse=True)
def release_loads():
    yield
    while LoadRun.started:
        LoadRun.started.pop().until.set()  # its thread ends once its last requests do


def processes_under(root: Path) -> dict[int, str]:
    """Live processes started for a test: an argument or the working directory under `root`
    (its tmp_path: every data dir, journal, fio run, tmux socket of the test is there)."""
    prefix = str(root).rstrip("/") + "/"
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{entry.name}/cwd") + "/"
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (cwd.startswith(prefix) or any(a.startswith(prefix) or f"={prefix}" in a for a in args)) \
                and alive(int(entry.name)):
            found[int(entry.name)] = " ".join(args)[:200]
    return found


@pytest.fixture(autouse=True)
def no_process_left(tmp_path: Path):
    """Whatever a test started must be gone once its fixtures are torn down, also when it
    failed half-way: a leftover is killed, so it cannot disturb later tests, and reported."""
    yield
    end = time.monotonic() + 20  # a cluster told to stop may take a moment to finish
    while (left := processes_under(tmp_path)) and time.monotonic() < end:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not left, f"processes left running (now killed): {left}"


@pytest.fixture(scope="session", autouse=True)
def warm_numba_cache():
    """Compile (or load) the replay kernels once per worker before any domain needs them."""
    from storage import replay

    replay.warm()


@pytest.fixture
def make_cluster(tmp_path):
    started: list[Cluster] = []
    pids: set[int] = set()

    def make(nodes: int = 2, **config: Any) -> Cluster:
        cfg = dict(TEST_DEFAULTS, nbd_addr_base=private_nbd_base(), **config)
        c = Cluster(nodes=nodes, data_dir=tmp_path / f"cluster{len(started)}", **cfg)
        started.append(c)
        c.start(timeout=240)
        pids.add(c.proc.pid)  # type: ignore[union-attr]
        return c

    def track(status: Status) -> None:
        pids.update(n["pid"] for n in status.nodes if n["pid"])

    make.track = track  # type: ignore[attr-defined]
    yield make
    for c in started:
        try:
            if c.ctl is not None and c.proc is not None and c.proc.poll() is None:
                track(c.status())
        except Exception:
            pass
        c.stop()
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every vmemu process to exit")


def served_by(c: Cluster, node: str) -> str | None:
    return c.status().node(node)["identity_served_by"]
