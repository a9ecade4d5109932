"""The data dir: where a cluster's disks, event log and contact details live.

    <data-dir>/cluster.json   config, control endpoint, fd-broker name, hypervisor pid
    <data-dir>/lock           flock held by the running hypervisor (one cluster per dir)
    <data-dir>/events.jsonl   the event log
    <data-dir>/metrics.jsonl  per-domain counters, sampled twice a second
    <data-dir>/logs/          one log file per process
    <data-dir>/nodeN/diskK.img
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from vmemu.errors import DataDirInUse, NotRunning

ENV = "VMEMU_DATA_DIR"


def resolve(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(ENV) or ".vmemu"
    return Path(data_dir).absolute()


def cluster_file(d: Path) -> Path:
    return d / "cluster.json"


def events_file(d: Path) -> Path:
    return d / "events.jsonl"


def metrics_file(d: Path) -> Path:
    """Per-domain counters sampled twice a second (JSON lines): throughput over time."""
    return d / "metrics.jsonl"


def logs_dir(d: Path) -> Path:
    return d / "logs"


def control_endpoint(cluster_id: str) -> str:
    return f"ipc://@vmemu-{cluster_id}-hv"


def guest_endpoint(cluster_id: str, node: int) -> str:
    return f"ipc://@vmemu-{cluster_id}-node{node}-ctl"


def identity_endpoint(cluster_id: str, node: int) -> str:
    """Where clients reach a node's identity; whoever serves the identity binds it.

    An abstract socket name: a second bind fails while the holder lives and is free the
    instant it dies, so at most one process serves an identity.
    """
    return f"ipc://@vmemu-{cluster_id}-node{node}"


def fd_socket_name(cluster_id: str) -> str:
    return f"\0vmemu-{cluster_id}-fd"


def write_cluster(d: Path, info: dict[str, Any]) -> None:
    tmp = d / "cluster.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(cluster_file(d))


def read_cluster(d: Path) -> dict[str, Any]:
    try:
        return json.loads(cluster_file(d).read_text())
    except FileNotFoundError:
        raise NotRunning(f"no cluster is running in {d} (start one with `vmemu up`)") from None
    except json.JSONDecodeError:
        raise NotRunning(f"{cluster_file(d)} is damaged; is a cluster starting?") from None


class DirLock:
    """An flock on <data-dir>/lock, held by the hypervisor for its whole life."""

    def __init__(self, d: Path) -> None:
        self.path = d / "lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(f"data dir {self.path.parent} is in use by a running cluster "
                               f"(hypervisor pid {holder}); stop it with `vmemu down` "
                               "or pick another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def held_by_other(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
