"""The guest's failover monitor: heartbeats to Domain 0 and the partner regions it maps.

Heartbeats come from a thread of their own, with their own socket, so that a long piece of
legitimate work on the main loop (replaying a partner's 64 MiB log, a CP syncing a large dirty
set) is not mistaken for a failure. A hung domain (SIGSTOP, a kernel-level hang) stops every
thread, so the monitor still catches it; the beat carries the main loop's age as well, so a
stuck main loop is visible in `status`.

The partner's region is mapped at boot, read-only, as soon as the hypervisor grants it, so a
takeover starts replaying at once instead of asking for memory while clients wait.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any, Callable

import zmq

from vmemu.bus.faults import Rules, Tap
from vmemu.bus.rpc import RpcClient


class FailoverMonitor:
    def __init__(self, node: int, interval: float, ctx: zmq.Context, control_endpoint: str,
                 stats: Callable[[], dict[str, Any]]) -> None:
        self.node = node
        self.interval = interval
        self.ctx = ctx
        self.endpoint = control_endpoint
        self.stats = stats
        self.mapped: dict[int, tuple[int, mmap.mmap]] = {}  # region -> (owner, mapping)
        self.loop_tick = time.monotonic()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-node{node}", daemon=True)
        self._last_stats: dict[str, Any] = {}
        self.token = ""  # this incarnation's, from the fd broker: proves the beats are ours
        self.bus_rules: Rules | None = None  # bus faults (domains/bus_tap.py), set by the guest

    def start(self) -> None:
        self._thread.start()

    def loop_alive(self) -> None:
        """Called by the main loop on every turn."""
        self.loop_tick = time.monotonic()

    def _snapshot(self) -> dict[str, Any]:
        try:
            self._last_stats = self.stats()
        except Exception:  # noqa: BLE001 - e.g. a dict changed under us on the main thread:
            pass  # send the previous figures; the heartbeat itself must never stop
        return dict(self._last_stats, loop_age_ms=round((time.monotonic() - self.loop_tick) * 1000, 1))

    def _run(self) -> None:
        uplink = RpcClient(self.ctx, self.endpoint)
        pid = os.getpid()
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.bus_rules is not None and uplink.tap is None:
                    uplink.tap, uplink.tap_node = Tap(self.bus_rules), self.node
                if now >= next_beat:
                    uplink.notify("heartbeat", {"node": self.node, "pid": pid,
                                                "token": self.token, "stats": self._snapshot()})
                    self.sent += 1
                    next_beat = now + self.interval
                uplink.flush(now)  # beats a bus fault holds (none unless one was set)
                due = uplink.next_due()
                self._stop.wait(max(0.0, min(next_beat, due if due is not None else next_beat)
                                    - time.monotonic()))
        finally:
            uplink.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
