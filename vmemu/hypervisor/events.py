"""The cluster's event log: JSON lines in <data-dir>/events.jsonl, and the recent tail in memory.

Every line: {"t": wall-clock seconds, "mono": CLOCK_MONOTONIC seconds (one clock for every
process on the host, so stages measured in different domains subtract correctly), "kind",
"node", ...fields}.

Domain 0 holds every NVRAM region: it must not die because its own log cannot be written (a
full or failing data dir). `LineFile` appends whole lines or nothing (a short write is cut
back off), keeps what it could not write in a bounded queue, writes it when the file takes
writes again, and says how many lines were lost if the queue overflowed.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path
from typing import Any

from vmemu.privfs import open_private

PENDING_MAX = 1000  # lines held while the file refuses writes


class LineFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.pending: collections.deque[bytes] = collections.deque()
        self.lost = 0  # lines dropped because the queue was full
        self.failures = 0  # writes the file refused
        self.last_error = ""

    def write_line(self, line: str) -> bool:
        """Append one line (or queue it); True if it is in the file now."""
        self.pending.append(line.encode() + b"\n")
        if len(self.pending) > PENDING_MAX:
            self.pending.popleft()
            self.lost += 1
        return self.flush()

    def flush(self) -> bool:
        while self.pending:
            if self.lost:
                gap = json.dumps({"t": round(time.time(), 6), "mono": round(time.monotonic(), 6),
                                  "kind": "log_lines_lost", "file": self.path.name,
                                  "lines": self.lost, "error": self.last_error})
                if not self._append(gap.encode() + b"\n"):
                    return False
                self.lost = 0
            if not self._append(self.pending[0]):
                return False
            self.pending.popleft()
        return True

    def _append(self, data: bytes) -> bool:
        try:
            size = os.fstat(self.fd).st_size
            n = os.write(self.fd, data)
            if n == len(data):
                return True
            os.ftruncate(self.fd, size)  # a torn line: take it back, it goes whole later
            raise OSError(28, "short write")
        except OSError as exc:
            self.failures += 1
            self.last_error = exc.strerror or str(exc)
            return False

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


class EventLog:
    def __init__(self, path: Path, keep: int = 500) -> None:
        self.path = path
        self.file = LineFile(path)
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
        self.file.write_line(json.dumps(ev, default=str))
        self.recent.append(ev)
        return ev

    def close(self) -> None:
        self.file.close()


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
