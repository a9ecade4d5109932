"""The heartbeat monitor: pure bookkeeping of when each domain last spoke.

The process loop feeds it beats and a clock; `overdue()` names the domains that stayed silent
longer than `misses` intervals. Only this can catch a hung (SIGSTOPped) domain: its process
still exists, so no exit notification ever comes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeartbeatMonitor:
    interval: float
    misses: int
    last: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    own_stall_s: float = 0.1  # a turn of Domain 0's loop this much past its tick: it was not running
    own_stalls: int = 0

    @property
    def limit(self) -> float:
        return self.interval * self.misses

    def watch(self, node: int, now: float) -> None:
        """Start expecting beats from `node` (a fresh incarnation gets a full grace period)."""
        self.last[node] = now
        self.count[node] = 0

    def beat(self, node: int, now: float) -> None:
        if node in self.last:
            self.last[node] = max(self.last[node], now)
            self.count[node] = self.count.get(node, 0) + 1

    def forget(self, node: int) -> None:
        self.last.pop(node, None)

    def age(self, node: int, now: float) -> float | None:
        t = self.last.get(node)
        return None if t is None else max(0.0, now - t)

    def stalled(self, loop_age_s: float, stall_limit_s: float) -> bool:
        """A domain whose heartbeat thread lives but whose main loop has not turned for longer
        than the limit serves nobody: it is as failed as a silent one."""
        return loop_age_s > stall_limit_s

    def own_turn(self, turn_s: float, tick_s: float) -> None:
        """Domain 0's loop took `turn_s` for a turn meant to last `tick_s` at most.

        Past `own_stall_s` more, Domain 0 itself was not running (descheduled on a loaded host,
        a slow turn): the beats sent meanwhile wait in its socket, and its socket's I/O thread
        was not running either. That time is not counted against the domains: each is
        credited with it. Only the excess is credited, so a Domain 0 that stalls every turn
        still counts `tick_s + own_stall_s` of every turn and still detects a hang, later.
        """
        excess = turn_s - tick_s - self.own_stall_s
        if excess > 0:
            self.own_stalls += 1
            for n in self.last:
                self.last[n] += excess

    def overdue(self, now: float) -> list[int]:
        return sorted(n for n, t in self.last.items() if now - t > self.limit)
