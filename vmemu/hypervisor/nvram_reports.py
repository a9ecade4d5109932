"""Corrupt NVRAM as Domain 0 sees it: what guests reported, kept for `status`, and a copy.

A replaying guest reports a quarantined region (``nvram_region_quarantined``) or a log that
ends at a corrupt record (``nvlog_corrupt_record``) as events; Domain 0 logs them like any
event, counts them, lists the latest ones under ``status["nvram"]``, and keeps the evidence.

Evidence: the region's bytes are copied once into ``<data-dir>/quarantine/`` (0600, at most
MAX_COPIES files), by a thread from a duplicate of the region's descriptor, so the copy
neither stalls the main loop nor races the region being freed. Then the region follows its
usual life (freed when no chain needs it). Chosen over holding the memory until `down`: a
file survives `down` and a crash of Domain 0, can be read with any tool (``xxd -s <region
offset>``), and costs no RAM; a region held in memory is gone at `down` anyway and is
reachable only through /proc of Domain 0. If the copy cannot be written (a full disk), that
is said in the entry (``copy_error``); the report and the event stand without it.

Everything in a report crossed a process boundary: fields are bounded and typed before they
are kept (``_clean``), and only a region Domain 0 holds is ever copied.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

KINDS = ("nvram_region_quarantined", "nvlog_corrupt_record")
KEEP = 32  # entries listed per kind (the counters cover all of them)
MAX_COPIES = 8
_CHUNK = 1 << 20


def _clean(v: Any, depth: int = 0) -> Any:
    """A JSON-able copy of `v` with bounded strings, lists, maps and nesting."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v if -(1 << 63) <= v < 1 << 64 else None
    if isinstance(v, float):
        return v
    if isinstance(v, (str, bytes)):
        s = v if isinstance(v, str) else v.hex()
        return s[:300]
    if depth >= 4:
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x, depth + 1) for x in list(v)[:64]]
    if isinstance(v, dict):
        return {str(k)[:40]: _clean(x, depth + 1) for k, x in list(v.items())[:32]}
    return None


class NvramReports:
    def __init__(self, data_dir: Path, held_fd: Callable[[int], int | None],
                 emit: Callable[..., Any]) -> None:
        self.dir = data_dir / "quarantine"
        self.held_fd = held_fd  # region id -> the descriptor Domain 0 holds (None: not held)
        self.emit = emit
        self.lists: dict[str, deque[dict[str, Any]]] = {k: deque(maxlen=KEEP) for k in KINDS}
        self.counts = {"quarantined": 0, "corrupt_records": 0, "lost_records": 0}
        self.copies: dict[int, dict[str, Any]] = {}  # region -> {"path" | "error"}
        self.threads: list[threading.Thread] = []
        self.finished: deque[dict[str, Any]] = deque()  # copies done, to announce (main thread)

    def note(self, kind: str, node: int, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Record one guest report; start the copy of its region. None if not ours."""
        if kind not in KINDS or not isinstance(fields, dict):
            return None
        entry = _clean(fields)
        entry.pop("message", None)  # in the event log; the status row stays short
        region = fields.get("region")
        entry["region"] = f"{region:#x}" if isinstance(region, int) and region >= 0 else None
        entry["reported_by"] = f"node{node}"
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if isinstance(region, int):
            entry["copy"] = self._preserve(region, str(fields.get("owner", "unknown"))[:16])
        self.lists[kind].append(entry)
        self.counts["quarantined" if kind == KINDS[0] else "corrupt_records"] += 1
        lost = fields.get("lost_records")
        if isinstance(lost, int) and 0 < lost < 1 << 40:
            self.counts["lost_records"] += lost
        return entry

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quarantined": list(self.lists[KINDS[0]]),
                               "corrupt_records": list(self.lists[KINDS[1]]),
                               "corruption": dict(self.counts)}
        for rows in (out["quarantined"], out["corrupt_records"]):
            for r in rows:  # the copy runs in a thread: show where it is now
                c = self.copies.get(int(r["region"], 16)) if r.get("region") else None
                if c is not None:
                    r["copy"] = c.get("path")
                    r["copy_error"] = c.get("error")
        return out

    # -- the copy ---------------------------------------------------------------------------
    def _preserve(self, region: int, owner: str) -> str | None:
        if region in self.copies:
            return self.copies[region].get("path")
        fd = self.held_fd(region)
        state: dict[str, Any] = {"path": None, "error": None}
        self.copies[region] = state
        if fd is None:
            state["error"] = "region not held by Domain 0 (already freed, or a mirror copy)"
            return None
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            kept = len(list(self.dir.glob("*.nvram")))
        except OSError as exc:
            state["error"] = f"cannot make {self.dir}: {exc.strerror}"
            return None
        if kept >= MAX_COPIES:
            state["error"] = f"{kept} copies kept already in {self.dir}; delete some"
            return None
        path = self.dir / f"{owner}-region-{region:#x}.nvram"
        dup = os.dup(fd)  # ours: the region may be freed while we copy
        t = threading.Thread(target=self._copy, args=(dup, path, state, region, owner),
                             name=f"nvram-copy-{region:#x}", daemon=True)
        self.threads.append(t)
        t.start()
        return str(path)

    def _copy(self, src: int, path: Path, state: dict[str, Any], region: int, owner: str) -> None:
        try:
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
            try:
                pos = 0
                while chunk := os.pread(src, _CHUNK, pos):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                    pos += len(chunk)
                os.fsync(out)
            finally:
                os.close(out)
            state["path"] = str(path)
            self.finished.append({"region": f"{region:#x}", "owner": owner, "path": str(path),
                                  "bytes": pos})
        except OSError as exc:
            state["error"] = f"copy to {path} failed: {exc.strerror or exc}"
            try:
                path.unlink()
            except OSError:
                pass
        finally:
            os.close(src)

    def poll(self) -> None:
        """From the main loop: an event for each copy finished since (the event log is the
        main thread's)."""
        while self.finished:
            self.emit("nvram_region_copied", "hypervisor", **self.finished.popleft())

    def join(self, timeout: float = 5.0) -> None:
        for t in self.threads:
            t.join(timeout)
