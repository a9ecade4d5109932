"""The Python API: start, inspect, break and stop a cluster.

    with vmemu.Cluster(nodes=4, data_dir=tmp) as c:
        c.wait_serving()
        with c.client("node1") as blk:
            blk.write(0, 0, b"x" * 4096)
        c.crash("node1")
        c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2")

The CLI is a thin layer over the same calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from clients.block import BlockClient
from vmemu import datadir
from vmemu.bus.rpc import RpcClient
from vmemu.config import ClusterConfig, node_index
from vmemu.errors import NotRunning, Timeout, VmemuError
from vmemu.hypervisor.events import read_events
from vmemu.privfs import ensure_private_dir, open_private


@dataclass
class Status:
    raw: dict[str, Any]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.raw["nodes"]

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.nodes if n["name"] == name)

    def all_serving(self) -> bool:
        """Every domain serves its own identity, and the management database takes changes."""
        return all(n["state"] == "serving" and n["identity_served_by"] == n["name"]
                   for n in self.nodes) and (self.raw.get("rdb") or {}).get("ready", True)


class Control:
    """Talks to a running hypervisor, found through <data-dir>/cluster.json."""

    def __init__(self, data_dir: str | os.PathLike | None = None, timeout: float = 10.0) -> None:
        self.dir = datadir.resolve(data_dir)
        info = datadir.read_cluster(self.dir)
        pid = int(info.get("hypervisor_pid", 0))
        if not pid_alive(pid):
            raise NotRunning(f"no cluster is running in {self.dir} (hypervisor pid {pid} is gone; "
                             "start one with `vmemu up`)")
        self.info = info
        self.config = ClusterConfig.from_dict(info["config"])
        self.ctx = zmq.Context()
        self.rpc = RpcClient(self.ctx, info["control"], timeout=timeout)

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        return self.rpc.call(op, args or {}, timeout)

    def status(self) -> Status:
        return Status(self.call("status"))

    def node(self, name: str) -> int:
        return node_index(name, self.config.nodes)

    def endpoint(self, name: str) -> str:
        return datadir.run_dir(self.info).identity(self.node(name))

    def hypervisor_alive(self) -> bool:
        return pid_alive(int(self.info.get("hypervisor_pid", 0)))

    def close(self) -> None:
        self.rpc.close()
        self.ctx.term()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(data_dir: Path, cfg: ClusterConfig, detach: bool) -> subprocess.Popen:
    """Start the hypervisor process; it refuses (exit 2, one line) if the dir is in use."""
    ensure_private_dir(data_dir)  # one line if it is someone else's, or open to all
    lock = datadir.DirLock(data_dir)
    if lock.held_by_other():
        lock.acquire()  # raises DataDirInUse naming the holder
    logs = ensure_private_dir(datadir.logs_dir(data_dir), "log dir")
    datadir.remove_stale(data_dir)  # what a crashed run left: cluster.json, its sockets
    cmd = [sys.executable, "-m", "vmemu.hypervisor.main", "--data-dir", str(data_dir),
           "--config", json.dumps(cfg.to_dict())]
    if not detach:
        cmd += ["--parent-pid", str(os.getpid())]
    with os.fdopen(open_private(logs / "hypervisor.log",
                                os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


def wait_started(data_dir: Path, proc: subprocess.Popen, timeout: float) -> Control:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = (datadir.logs_dir(data_dir) / "hypervisor.log").read_text(errors="replace")
            last = [l for l in tail.strip().splitlines() if l.startswith("vmemu:")]
            raise NotRunning(last[-1][7:] if last else
                             f"the hypervisor exited with code {proc.returncode}; see "
                             f"{datadir.logs_dir(data_dir) / 'hypervisor.log'}")
        try:
            info = json.loads(datadir.cluster_file(data_dir).read_text())
            if info.get("hypervisor_pid") == proc.pid:
                return Control(data_dir)
        except (FileNotFoundError, json.JSONDecodeError, NotRunning):
            pass
        time.sleep(0.02)
    raise Timeout(f"the hypervisor did not start within {timeout:.0f}s")


def wait_for(ctl: Control, pred: Callable[[Status], bool], timeout: float, what: str) -> Status:
    end = time.monotonic() + timeout
    last: Status | None = None
    while time.monotonic() < end:
        last = ctl.status()
        if pred(last):
            return last
        time.sleep(0.02)
    raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}")


class Cluster:
    def __init__(self, nodes: int = 4, data_dir: str | os.PathLike | None = None,
                 detach: bool = False, **config: Any) -> None:
        self.dir = datadir.resolve(data_dir)
        self.cfg = ClusterConfig(nodes=nodes, **config)
        self.detach = detach
        self.proc: subprocess.Popen | None = None
        self.ctl: Control | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "Cluster":
        self.proc = launch(self.dir, self.cfg, self.detach)
        try:
            self.ctl = wait_started(self.dir, self.proc, timeout)
            self.wait_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_serving(self, timeout: float = 120.0) -> Status:
        return self.wait_for(Status.all_serving, timeout, "every domain to serve")

    def stop(self, timeout: float = 60.0) -> None:
        if self.ctl is not None:
            try:
                # A dead one would cost the whole timeout (and a child of ours that was killed
                # is a zombie until waited for: kill(pid, 0) still finds it).
                if (self.proc is None or self.proc.poll() is None) and self.ctl.hypervisor_alive():
                    self.ctl.call("shutdown", timeout=timeout)
            except VmemuError:
                pass
            self.ctl.close()
            self.ctl = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- operations --------------------------------------------------------------------------
    @property
    def control(self) -> Control:
        if self.ctl is None:
            raise NotRunning("the cluster is not started")
        return self.ctl

    def status(self) -> Status:
        return self.control.status()

    def wait_for(self, pred: Callable[[Status], bool], timeout: float = 30.0,
                 what: str = "a cluster state") -> Status:
        return wait_for(self.control, pred, timeout, what)

    def crash(self, node: str, hang: bool = False) -> dict[str, Any]:
        return self.control.call("crash", {"node": node, "hang": hang})

    def restart(self, node: str) -> dict[str, Any]:
        return self.control.call("restart", {"node": node})

    def giveback(self, node: str) -> dict[str, Any]:
        return self.control.call("giveback", {"node": node})

    def events(self) -> list[dict[str, Any]]:
        return read_events(datadir.events_file(self.dir))

    def endpoint(self, node: str) -> str:
        return self.control.endpoint(node)

    def client(self, node: str, **kw: Any) -> BlockClient:
        return BlockClient(self.endpoint(node), **kw)
