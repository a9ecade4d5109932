"""The data dir: where a cluster's disks, event log and contact details live.

    <data-dir>/cluster.json   config, control endpoint, fd-broker name, hypervisor pid
    <data-dir>/lock           flock held by the running hypervisor (one cluster per dir)
    <data-dir>/events.jsonl   the event log
    <data-dir>/metrics.jsonl  per-domain counters, sampled twice a second
    <data-dir>/logs/          one log file per process
    <data-dir>/run/           the sockets (see RunDir; elsewhere when the path is too long)
    <data-dir>/nodeN/diskK.img
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
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


# A unix socket path is at most 107 bytes (sun_path); the longest name below is 9 ("n64.nbd.s").
SUN_PATH_MAX = 107
_LONGEST_NAME = 10


class RunDir:
    """Where a running cluster's sockets live: a private (0700) directory, so that no other
    user can connect to any endpoint, or bind an identity's name before its server does.

    Every endpoint is a filesystem socket in it: the control endpoint, each guest's control
    and mirror endpoints, each identity's endpoint (bound by whoever serves the identity),
    the fd broker, and a lock file per identity, held by its server, that keeps a second
    process of ours from binding the same name (binding a filesystem ipc socket that exists
    replaces it: the lock is what makes "one server per identity" hold).

    `<data-dir>/run` when its path leaves room for the socket names; else, since a data dir
    can be deep (pytest's tmp_path), `/tmp/vmemu-<uid>/<cluster-id>` (both 0700, checked).
    The hypervisor chooses it at boot and writes it in cluster.json; everyone else reads it there.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def choose(cls, data_dir: Path, cluster_id: str) -> "RunDir":
        near = data_dir / "run"
        if len(str(near)) + 1 + _LONGEST_NAME <= SUN_PATH_MAX:
            return cls(near)
        return cls(Path(tempfile.gettempdir()) / f"vmemu-{os.geteuid()}" / cluster_id)

    def create(self) -> None:
        from vmemu.privfs import ensure_private_dir

        if self.path.name != "run":
            ensure_private_dir(self.path.parent, "socket directory")
        ensure_private_dir(self.path, "socket directory")
        for p in self.path.iterdir():  # sockets and locks of a cluster that died here
            if p.is_socket() or p.suffix == ".lock":
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _ep(self, name: str) -> str:
        return f"ipc://{self.path / name}"

    def control(self) -> str:
        return self._ep("hv")

    def guest(self, node: int) -> str:
        return self._ep(f"n{node}c")

    def identity(self, node: int) -> str:
        """Where clients reach a node's identity; whoever serves the identity binds it."""
        return self._ep(f"n{node}")

    def identity_lock(self, node: int) -> Path:
        return self.path / f"n{node}.lock"

    def mirror(self, node: int) -> str:
        return self._ep(f"n{node}m")

    def broker(self) -> str:
        return str(self.path / "fd")

    def nbd_socket(self, node: int) -> Path:
        return self.path / f"n{node}.nbd.s"


def run_dir(info: dict[str, Any]) -> RunDir:
    """The run dir of a running cluster, from its cluster.json."""
    try:
        return RunDir(info["run_dir"])
    except KeyError:
        raise NotRunning("cluster.json names no socket directory: it was written by an older "
                         "vmemu; stop that cluster and start it again") from None


def remove_stale(d: Path) -> None:
    """Before a new hypervisor starts in `d`: the cluster.json of one that died without
    cleaning up, and the socket directory it names (only where vmemu puts them)."""
    try:
        info = json.loads(cluster_file(d).read_text())
        run = Path(info.get("run_dir", ""))
        if run == d / "run" or run.parent.name == f"vmemu-{os.geteuid()}":
            RunDir(run).remove()
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    cluster_file(d).unlink(missing_ok=True)


def write_cluster(d: Path, info: dict[str, Any]) -> None:
    from vmemu.privfs import write_atomic

    write_atomic(cluster_file(d), json.dumps(info, indent=2).encode())


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
        from vmemu.privfs import ensure_private_dir, open_private

        ensure_private_dir(self.path.parent)
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
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
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
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
