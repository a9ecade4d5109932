"""Domain supervision: spawn a guest, watch it, stop it politely or kill it.

Each guest is a fresh interpreter (`python -m domains.guest`), never a fork of the hypervisor:
ZeroMQ contexts and numba state do not survive fork. A pidfd per child lets the hypervisor's
poll loop learn of an exit the instant it happens, which is the fast half of failure detection
(the heartbeat is the other half, for hangs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Child:
    node: int
    proc: subprocess.Popen
    pidfd: int
    started: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.children: dict[int, Child] = {}

    def spawn(self, node: int, env_extra: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"node{node}.log"
        env = dict(os.environ)
        # Two cores shared by many domains: one numba thread each keeps them from fighting.
        env.setdefault("NUMBA_NUM_THREADS", "1")
        env.update(env_extra or {})
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "domains.guest", "--data-dir", str(self.data_dir),
                 "--node", str(node), "--hypervisor-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                close_fds=True,
            )
        child = Child(node, proc, os.pidfd_open(proc.pid), time.time(), log_path)
        self.children[node] = child
        return child

    def by_pidfd(self, fd: int) -> Child | None:
        return next((c for c in self.children.values() if c.pidfd == fd), None)

    def kill(self, node: int) -> int | None:
        """SIGKILL and reap: once this returns the old incarnation can do nothing at all."""
        child = self.children.pop(node, None)
        if child is None:
            return None
        try:
            child.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = child.proc.wait()
        os.close(child.pidfd)
        return code

    def signal(self, node: int, sig: int) -> None:
        child = self.children.get(node)
        if child is None:
            from vmemu.errors import InvalidState
            raise InvalidState(f"node{node} is not running")
        child.proc.send_signal(sig)

    def exited(self, node: int) -> bool:
        child = self.children.get(node)
        return child is None or child.proc.poll() is not None

    def stop_all(self, grace: float) -> None:
        """Ask nicely (SIGTERM), wait up to `grace`, then kill what is left."""
        for child in self.children.values():
            if child.proc.poll() is None:
                try:
                    child.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for node in list(self.children):
            child = self.children[node]
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(node)
