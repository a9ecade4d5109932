"""The load journal: which writes were issued and which were acknowledged (JSON lines).

    {"type": "header", "version": 1, "client": id, "identity": "node1", "lun": 0, "bs": 4096}
    {"w": request, "o": offset}        issued (written before the request is sent)
    {"a": request}                     acknowledged
    {"type": "summary", ...}           the load's summary, at the end

A load never has two writes to the same range in flight at once, so the writes to a range are
totally ordered by issue, which is what lets `verify` decide exactly what each range may hold.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO

from vmemu.errors import BadRequest


class JournalWriter:
    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.f: IO[str] = open(path, "w")
        self.buf: list[str] = []
        self.last_flush = time.monotonic()
        self._put(dict(header, type="header", version=1))

    def _put(self, obj: dict[str, Any]) -> None:
        self.buf.append(json.dumps(obj, separators=(",", ":")))

    def issued(self, request: int, offset: int) -> None:
        self._put({"w": request, "o": offset})

    def acked(self, request: int) -> None:
        self._put({"a": request})
        if time.monotonic() - self.last_flush > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.f.write("\n".join(self.buf) + "\n")
            self.buf.clear()
        self.f.flush()
        self.last_flush = time.monotonic()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if summary is not None:
            self._put(dict(summary, type="summary"))
        self.flush()
        self.f.close()


@dataclass
class Journal:
    header: dict[str, Any]
    writes: dict[int, list[int]] = field(default_factory=dict)  # offset -> requests in issue order
    acked: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path) -> "Journal":
        try:
            f = open(path)
        except OSError as exc:
            raise BadRequest(f"cannot read journal {path}: {exc.strerror}") from None
        with f:
            header: dict[str, Any] | None = None
            j: Journal | None = None
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when the load was killed
                if header is None:
                    if obj.get("type") != "header":
                        raise BadRequest(f"{path} is not a vmemu journal (no header line)")
                    header = obj
                    j = cls(header)
                    continue
                assert j is not None
                if "w" in obj:
                    j.writes.setdefault(int(obj["o"]), []).append(int(obj["w"]))
                elif "a" in obj:
                    j.acked.add(int(obj["a"]))
            if j is None:
                raise BadRequest(f"{path} is empty: not a vmemu journal")
            return j
