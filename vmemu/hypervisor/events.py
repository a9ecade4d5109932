"""The cluster's event log: JSON lines in <data-dir>/events.jsonl, and the recent tail in memory.

Every line: {"t": wall-clock seconds, "mono": CLOCK_MONOTONIC seconds (one clock for every
process on the host, so stages measured in different domains subtract correctly), "kind",
"node", ...fields}.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

from vmemu.privfs import open_append_text


class EventLog:
    def __init__(self, path: Path, keep: int = 500) -> None:
        self.path = path
        self.f = open_append_text(path)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)

    def emit(self, kind: str, node: int | str | None = None, mono: float | None = None,
             **fields: Any) -> dict[str, Any]:
        now_mono = time.monotonic()
        mono = now_mono if mono is None else mono
        ev: dict[str, Any] = {"t": round(time.time() - (now_mono - mono), 6),
                              "mono": round(mono, 6), "kind": kind}
        if node is not None:
            ev["node"] = node if isinstance(node, str) else f"node{node}"
        ev.update(fields)
        self.f.write(json.dumps(ev, default=str) + "\n")
        self.recent.append(ev)
        return ev

    def close(self) -> None:
        self.f.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash of the hypervisor
    except FileNotFoundError:
        pass
    return out
