"""The load generator: pipelined block I/O against an identity, with a journal of writes.

It keeps `iodepth` requests in flight, never two writes to the same range at once (so the
journal can be verified exactly), and reports in the manner of fio: IOPS, MB/s, completion
latency percentiles. Failover is invisible to it except as latency: the block client retries.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hdrh.histogram import HdrHistogram

from clients import pattern
from clients.block import BlockClient
from clients.connect import open_client
from clients.journal import JournalWriter
from vmemu.errors import BadRequest

WORKLOADS = ("randwrite", "randread", "randrw", "seqwrite", "seqread")


@dataclass(frozen=True)
class LoadSpec:
    workload: str = "randwrite"
    bs: int = 4096
    iodepth: int = 16
    duration: float = 10.0
    size: int | None = None  # bytes of the LUN to use (default: all of it)
    lun: int = 0
    rwmixread: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise BadRequest(f"unknown workload {self.workload!r}; choose one of {', '.join(WORKLOADS)}")
        if self.bs < 512 or self.bs % 512 or self.bs > 1 << 20:
            raise BadRequest(f"--bs {self.bs} must be a multiple of 512 between 512 and 1M")
        if not 1 <= self.iodepth <= 1024:
            raise BadRequest("--iodepth must be between 1 and 1024")
        if self.duration <= 0:
            raise BadRequest("--duration must be positive")
        if not 0 <= self.rwmixread <= 100:
            raise BadRequest("--rwmixread must be between 0 and 100")


class Latency:
    """Completion latencies in an HDR histogram (1 ns .. 60 s, 3 significant digits)."""

    def __init__(self) -> None:
        self.h = HdrHistogram(1, 60_000_000_000, 3)

    def record(self, seconds: float) -> None:
        self.h.record_value(max(1, int(seconds * 1e9)))

    @property
    def count(self) -> int:
        return self.h.get_total_count()

    def us(self) -> dict[str, float]:
        """The summary's latency block, in microseconds."""
        if not self.count:
            return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "mean": 0.0}
        at = self.h.get_value_at_percentile
        return {"p50": round(at(50) / 1e3, 1), "p90": round(at(90) / 1e3, 1),
                "p99": round(at(99) / 1e3, 1), "p999": round(at(99.9) / 1e3, 1),
                "max": round(self.h.get_max_value() / 1e3, 1),
                "mean": round(self.h.get_mean_value() / 1e3, 1)}

    def fio_clat_ns(self) -> dict[str, Any]:
        """fio's `clat_ns` block, so tools that read fio JSON read ours."""
        if not self.count:
            return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0, "percentile": {}}
        pct = {f"{p:.6f}": int(self.h.get_value_at_percentile(p))
               for p in (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)}
        return {"min": int(self.h.get_min_value()), "max": int(self.h.get_max_value()),
                "mean": float(self.h.get_mean_value()), "stddev": float(self.h.get_stddev()),
                "N": self.count, "percentile": pct}


class Timeline:
    """Completions per 10 ms bucket, for throughput-over-time plots."""

    BUCKET_S = 0.01

    def __init__(self, start: float) -> None:
        self.start = start
        self.counts: dict[str, list[int]] = {"read": [], "write": []}

    def record(self, kind: str, now: float) -> None:
        i = int((now - self.start) / self.BUCKET_S)
        col = self.counts[kind]
        if i >= len(col):
            col.extend([0] * (i + 1 - len(col)))
        col[i] += 1

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "bucket_ms": int(self.BUCKET_S * 1000), "start_mono": self.start,
                "start_t": time.time() - (time.monotonic() - self.start), **self.counts}


def run_load(endpoint: str, spec: LoadSpec, journal: Path | None = None, target: str = "",
             progress: Callable[[dict[str, Any]], None] | None = None,
             timeline: Path | None = None,
             until: threading.Event | None = None) -> dict[str, Any]:
    """Run `spec` against `endpoint`; its summary. With `until`, the load also goes on past its
    duration until that event is set: for a caller that needs it running until something it
    waits for has happened (a crash and a takeover), however slow the host."""
    rng = random.Random(spec.seed)
    with open_client(endpoint) as client:
        info = client.info()
        luns = {l["lun"]: l["size"] for l in info["luns"]}
        if spec.lun not in luns:
            raise BadRequest(f"{target or endpoint} has no lun{spec.lun}")
        size = min(spec.size or luns[spec.lun], luns[spec.lun])
        nblocks = size // spec.bs
        if nblocks < spec.iodepth:
            raise BadRequest(f"--size {size} holds fewer than --iodepth {spec.iodepth} blocks")
        jw = JournalWriter(journal, {"client": client.client_id, "identity": target,
                                     "lun": spec.lun, "bs": spec.bs,
                                     "workload": spec.workload}) if journal else None
        inflight: set[int] = set()
        seq_next = 0
        lat = {"read": Latency(), "write": Latency()}
        counts = {"read": 0, "write": 0}
        errors: list[str] = []
        start = time.monotonic()
        end = start + spec.duration
        tl = Timeline(start)
        last_progress = start

        def pick() -> int:
            nonlocal seq_next
            if spec.workload.startswith("seq"):
                for _ in range(nblocks):
                    b = seq_next % nblocks
                    seq_next += 1
                    if b not in inflight:
                        return b
            while True:
                b = rng.randrange(nblocks)
                if b not in inflight:
                    return b

        def is_write() -> bool:
            if spec.workload in ("randwrite", "seqwrite"):
                return True
            if spec.workload == "randrw":
                return rng.randrange(100) >= spec.rwmixread
            return False

        def issue() -> None:
            b = pick()
            off = b * spec.bs
            inflight.add(b)
            if is_write():
                req = client.next_id()  # the request id is also the payload's tag
                data = pattern.make(client.client_id, req, off, spec.bs)
                if jw:
                    jw.issued(req, off)
                client.submit("write", {"lun": spec.lun, "offset": off, "data": data},
                              ("write", b), req_id=req)
            else:
                client.submit("read", {"lun": spec.lun, "offset": off, "length": spec.bs}, ("read", b))

        for _ in range(spec.iodepth):
            issue()
        while client.pending:
            for c in client.poll(0.05):
                kind, b = c.tag
                inflight.discard(b)
                if c.ok:
                    counts[kind] += 1
                    lat[kind].record(c.latency)
                    tl.record(kind, time.monotonic())
                    if kind == "write" and jw:
                        jw.acked(c.req_id)
                else:
                    errors.append(c.error.message if c.error else "error")
                if time.monotonic() < end or (until is not None and not until.is_set()):
                    issue()
            now = time.monotonic()
            if progress and now - last_progress >= 0.5:
                last_progress = now
                done = counts["read"] + counts["write"]
                progress({"elapsed": now - start, "ops": done, "iops": done / (now - start),
                          "retries": client.retries, "errors": len(errors)})
        elapsed = time.monotonic() - start
        summary = _summary(spec, target, endpoint, elapsed, counts, lat, errors, client)
        if timeline is not None:
            timeline.write_text(json.dumps(tl.to_json()))
            summary["timeline"] = str(timeline)
        if jw:
            jw.close(summary)
            summary["journal"] = str(journal)
        return summary


def _summary(spec: LoadSpec, target: str, endpoint: str, elapsed: float, counts: dict[str, int],
             lat: dict[str, Latency], errors: list[str], client: BlockClient) -> dict[str, Any]:
    """The stable summary (version 1), plus a `jobs` list shaped like fio's JSON output."""
    def side(kind: str) -> dict[str, Any]:
        n = counts[kind]
        return {"ops": n, "iops": round(n / elapsed, 1), "bw_mbps": round(n * spec.bs / elapsed / 1e6, 2),
                "clat_us": lat[kind].us()}

    def fio_side(kind: str) -> dict[str, Any]:
        n = counts[kind]
        return {"io_bytes": n * spec.bs, "io_kbytes": n * spec.bs // 1024,
                "bw": int(n * spec.bs / 1024 / elapsed), "iops": n / elapsed,
                "runtime": int(elapsed * 1000), "total_ios": n, "clat_ns": lat[kind].fio_clat_ns()}

    total = counts["read"] + counts["write"]
    return {
        "version": 1, "target": target, "endpoint": endpoint, "workload": spec.workload,
        "bs": spec.bs, "iodepth": spec.iodepth, "lun": spec.lun, "runtime_s": round(elapsed, 3),
        "ops": total, "iops": round(total / elapsed, 1),
        "mbps": round(total * spec.bs / elapsed / 1e6, 2),
        "read": side("read"), "write": side("write"),
        "retries": client.retries, "reconnects": client.reconnects,
        "errors": len(errors), "first_errors": errors[:5],
        "fio version": "vmemu-load-1",
        "jobs": [{"jobname": f"vmemu-{spec.workload}", "error": 1 if errors else 0,
                  "job options": {"rw": spec.workload, "bs": str(spec.bs),
                                  "iodepth": str(spec.iodepth)},
                  "read": fio_side("read"), "write": fio_side("write")}],
    }
