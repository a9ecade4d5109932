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

    def overdue(self, now: float) -> list[int]:
        return sorted(n for n, t in self.last.items() if now - t > self.limit)
