"""The guest's failover monitor: heartbeats to Domain 0 and the partner regions it maps.

The partner's region is mapped at boot, read-only, as soon as the hypervisor grants it, so a
takeover starts replaying at once instead of asking for memory while clients wait.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Callable

from vmemu.bus.rpc import RpcClient


class FailoverMonitor:
    def __init__(self, node: int, interval: float,
                 map_region: Callable[[int, int], mmap.mmap]) -> None:
        self.node = node
        self.interval = interval
        self.map_region = map_region
        self.mapped: dict[int, tuple[int, mmap.mmap]] = {}  # region -> (owner, mapping)
        self.next_due = 0.0
        self.sent = 0

    def beat(self, uplink: RpcClient, stats: dict[str, Any], now: float) -> None:
        uplink.notify("heartbeat", {"node": self.node, "pid": os.getpid(), "stats": stats})
        self.sent += 1
        self.next_due = now + self.interval
