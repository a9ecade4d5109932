"""Verify a journal: every range holds its last acknowledged write, or a later issued one.

For each range the journal lists its writes in issue order (one in flight at a time). If the
k-th was the last acknowledged, the range may hold write k or any write issued after it (those
were in flight, or unacknowledged, when something failed) and nothing else: older data means
an acknowledged write was lost; bytes that do not match their tag mean corruption. A range
with no acknowledged write is not judged (it may hold whatever was there before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients import pattern
from clients.connect import open_client
from clients.journal import Journal


def verify(endpoint: str, journal_path: Path, depth: int = 32) -> dict[str, Any]:
    j = Journal.load(journal_path)
    bs, lun, client_id = int(j.header["bs"]), int(j.header["lun"]), int(j.header["client"])
    todo = [(off, reqs) for off, reqs in sorted(j.writes.items())]
    result = {"version": 1, "journal": str(journal_path), "identity": j.header.get("identity"),
              "ranges": len(todo), "acked_writes": len(j.acked), "ok": 0, "lost": 0,
              "corrupt": 0, "unjudged": 0, "problems": []}
    with open_client(endpoint) as client:
        it = iter(todo)
        inflight = 0

        def send_next() -> bool:
            try:
                off, reqs = next(it)
            except StopIteration:
                return False
            client.submit("read", {"lun": lun, "offset": off, "length": bs}, (off, reqs))
            return True

        for _ in range(depth):
            if send_next():
                inflight += 1
        while inflight:
            for c in client.poll(0.1):
                inflight -= 1
                off, reqs = c.tag
                if not c.ok:
                    result["problems"].append({"offset": off, "error": c.error.message if c.error else "?"})
                    result["lost"] += 1
                else:
                    _judge(result, off, reqs, j.acked, client_id, bytes(c.result))
                if send_next():
                    inflight += 1
    result["problems"] = result["problems"][:20]
    result["passed"] = result["lost"] == 0 and result["corrupt"] == 0
    return result


def _judge(result: dict[str, Any], off: int, reqs: list[int], acked: set[int], client_id: int,
           data: bytes) -> None:
    last_acked = max((i for i, r in enumerate(reqs) if r in acked), default=None)
    if last_acked is None:
        result["unjudged"] += 1
        return
    allowed = set(reqs[last_acked:])
    tag = pattern.identify(data)
    if tag is None or tag[0] != client_id or tag[2] != off:
        result["lost"] += 1
        result["problems"].append({"offset": off, "expected_request": reqs[last_acked],
                                   "found": "untagged or another range's data"})
        return
    if tag[1] not in allowed:
        result["lost"] += 1
        result["problems"].append({"offset": off, "expected_request": reqs[last_acked],
                                   "found_request": tag[1]})
        return
    if not pattern.intact(data):
        result["corrupt"] += 1
        result["problems"].append({"offset": off, "request": tag[1], "found": "damaged bytes"})
        return
    result["ok"] += 1
