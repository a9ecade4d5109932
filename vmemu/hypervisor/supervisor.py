"""Domain supervision: spawn a guest, watch it, stop it politely or kill it.

Each guest is a fresh interpreter (`python -m domains.guest`), never a fork of the hypervisor:
ZeroMQ contexts and numba state do not survive fork. A pidfd per child lets the hypervisor's
poll loop learn of an exit the instant it happens, which is the fast half of failure detection
(the heartbeat is the other half, for hangs).

With `--nvram-placement mediator` one more process is supervised here, the mediator
(`python -m domains.mediator`): it allocates every guest's NVRAM region. It dies with Domain 0
like a guest (PR_SET_PDEATHSIG), its requests arrive on its stdin (a pipe only Domain 0 holds),
and `MediatorLink` restarts it when it dies; see there for what a mediator death means.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vmemu.hypervisor.fdbroker import FdBroker

MEDIATOR = 0  # the mediator's index (as on the fd broker's wire); guests are 1..N


def _open_log(path: Path) -> Any:
    from vmemu.privfs import open_private

    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


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
        # Not among the children: those are guests (failover, heartbeats, identities).
        self.mediator: Child | None = None

    def spawn_mediator(self) -> Child:
        """Start the mediator domain; its stdin is the pipe Domain 0 sends requests on."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "mediator.log"
        with _open_log(log_path) as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "domains.mediator", "--data-dir", str(self.data_dir),
                 "--hypervisor-pid", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
            )
        os.set_blocking(proc.stdin.fileno(), False)  # type: ignore[union-attr]
        self.mediator = Child(MEDIATOR, proc, os.pidfd_open(proc.pid), time.time(), log_path)
        return self.mediator

    def tell_mediator(self, msg: dict[str, Any]) -> bool:
        """One request line to the mediator; False if it cannot take it (gone, or stuck)."""
        child = self.mediator
        if child is None or child.proc.stdin is None:
            return False
        try:
            os.write(child.proc.stdin.fileno(), (json.dumps(msg) + "\n").encode())
        except (BrokenPipeError, BlockingIOError, OSError):
            return False
        return True

    def kill_mediator(self) -> int | None:
        """SIGKILL (if still running) and reap the mediator; its exit code."""
        child, self.mediator = self.mediator, None
        if child is None:
            return None
        try:
            child.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = child.proc.wait()
        if child.proc.stdin is not None:
            try:
                child.proc.stdin.close()
            except OSError:
                pass
        os.close(child.pidfd)
        return code

    def spawn(self, node: int, env_extra: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"node{node}.log"
        env = dict(os.environ)
        # Two cores shared by many domains: one numba thread each keeps them from fighting.
        env.setdefault("NUMBA_NUM_THREADS", "1")
        env.update(env_extra or {})
        with _open_log(log_path) as log:
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
        if self.mediator is not None:
            # It holds nothing (Domain 0 holds every region): no need to wait for it.
            self.kill_mediator()
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


class MediatorLink:
    """The mediator domain as Domain 0 sees it: its process, the regions asked of it, restarts.

    Who asks: Domain 0, for every guest it spawns (`allocate_for`), so the mediator works while
    the guest interpreter starts. The region comes back through the fd broker (`deposit`); the
    guest takes it there (`claim`). A request stays *wanted* until its region is deposited.

    When the mediator dies (pidfd readable, through the broker's poll set): an event
    `mediator_exited`; every region already deposited stays alive and usable, since the broker,
    not the mediator, holds the descriptors (the mediator keeps neither a descriptor nor a
    mapping after a deposit); running guests, their partners' read-only mappings, takeover
    replay and giveback do not involve it at all. What it had not deposited yet is lost, so
    the link starts a new mediator (`mediator_started`, restart > 0) and sends it every wanted
    request again; a guest booting meanwhile just waits a little longer for its region. A
    mediator that keeps dying (more than `max_starts` starts within `window_s`) is left down
    (`mediator_gave_up`) until the next guest spawn asks for a region.
    """

    def __init__(self, sup: Supervisor, emit: Callable[..., Any], stopping: Callable[[], bool],
                 max_starts: int = 5, window_s: float = 30.0) -> None:
        self.sup = sup
        self.emit = emit
        self.stopping = stopping
        self.max_starts = max_starts
        self.window_s = window_s
        self.wanted: set[int] = set()
        self.starts: deque[float] = deque()
        self.restarts = 0
        self.allocated = 0
        self.broker: FdBroker | None = None
        self.given_up = False

    @property
    def pid(self) -> int | None:
        child = self.sup.mediator
        return child.pid if child is not None else None

    def bind(self, broker: "FdBroker") -> None:
        self.broker = broker

    def start(self) -> None:
        now = time.monotonic()
        while self.starts and now - self.starts[0] > self.window_s:
            self.starts.popleft()
        if len(self.starts) >= self.max_starts:
            if not self.given_up:
                self.given_up = True
                self.emit("mediator_gave_up", "mediator", starts=len(self.starts),
                          window_s=self.window_s, wanted=[f"node{n}" for n in sorted(self.wanted)])
            return
        self.given_up = False
        if self.starts:
            self.restarts += 1
        self.starts.append(now)
        child = self.sup.spawn_mediator()
        if self.broker is not None:
            self.broker.watch(child.pidfd, self._exited)
        self.emit("mediator_started", "mediator", pid=child.pid, restart=self.restarts)
        for node in sorted(self.wanted):
            self.sup.tell_mediator({"op": "allocate", "node": node})

    def allocate_for(self, node: int) -> None:
        """A guest is booting: have a fresh region made for it."""
        self.wanted.add(node)
        if self.sup.mediator is None:
            self.starts.clear()  # a new guest is a new reason to try again
            self.start()  # sends every wanted request, this one included
            return
        if not self.sup.tell_mediator({"op": "allocate", "node": node}):
            self.emit("mediator_unreachable", "mediator", node=f"node{node}")

    def deposited(self, node: int) -> None:
        self.wanted.discard(node)
        self.allocated += 1

    def _exited(self) -> None:
        child = self.sup.mediator
        if child is None:
            return
        if self.broker is not None:
            self.broker.unwatch(child.pidfd)
        code = self.sup.kill_mediator()
        held = len(self.broker.held) + len(self.broker.pending) if self.broker else 0
        self.emit("mediator_exited", "mediator", pid=child.pid, exit_code=code,
                  regions_held_by_hypervisor=held,
                  wanted=[f"node{n}" for n in sorted(self.wanted)])
        if not self.stopping():
            self.start()

    def view(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.sup.mediator is not None,
                "restarts": self.restarts, "regions_allocated": self.allocated,
                "wanted": [f"node{n}" for n in sorted(self.wanted)], "gave_up": self.given_up}
