"""NVLog with lz4 payloads against the same writes logged raw: space, append and replay speed.

One sequence of 4 KiB writes from a mixed payload (see MIX) is appended into an in-memory
region (``mmap.mmap(-1, size)``, a 64 MiB log) until the log is full, once by an
``NVLogWriter(compress="lz4")`` and once by a plain one (the same-run baseline). Reported:

* ``ratio``: logical payload bytes / stored payload bytes of the lz4 log (records stored raw
  because lz4 saved under 1/8 count at 1:1); ``log_ratio``: records_per_log_lz4 /
  records_per_log_raw, i.e. with the 64-byte record header and padding counted.
* ``mbps`` / ``raw_mbps``: append throughput, MB/s (1e6) of logical payload, best of reps
  of filling the whole log (the crc, the copy into the region, and for lz4 the compression);
  ``mbps_vs_raw`` = mbps / raw_mbps.
* ``replay_mbps_lz4`` / ``replay_mbps_raw``: the domain's takeover path, scan + plan +
  write_plan (pwrite) of each full log into fresh sparse files (on /dev/shm if present); and
  ``replay_mem_mbps_*``: ``replay_region`` into in-memory disks. MB/s of logical bytes
  applied. Both logs must replay to the same disks (checked).

Run: ``python -c 'from bench import nvlog_lz4_bench as b; print(b.run(True))'``.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import MiB, best_and_median, log
from storage import nvlog, replay
from storage import nvlog_format as F
from vmemu.errors import LogFull

BLOCK = 4096
LOG_BYTES = 64 * MiB
NODE = 1
LUNS = 2
DISK_BYTES = 64 * MiB  # per LUN
POOL = 256  # distinct blocks per kind: enough that no single block dominates
SEQUENCE = 1 << 16  # writes drawn before cycling (more than either log holds)
MB = 1e6

# Share of writes per kind: what a mixed VM / database host writes, roughly.
MIX: dict[str, float] = {
    "text": 0.25,  # log files, configs, source: lines of words, numbers, timestamps
    "zero": 0.10,  # zero-filled blocks (fresh file system areas, discards written as zeros)
    "mostly_zero": 0.15,  # a few hundred bytes of data then zeros (tails of files, metadata)
    "db_page": 0.30,  # database pages: header, slot array, fixed-width rows, free space
    "random": 0.20,  # compressed media, encrypted data, archives: incompressible
}
MIX_NOTE = {
    "text": "synthetic log lines: timestamp, level, component, message words, ids",
    "zero": "4 KiB of zeros",
    "mostly_zero": "64-768 random bytes at the start, zeros after",
    "db_page": "24-byte header, slot array, 32-96-byte rows of small ints, repeated "
               "column values and short strings, free space zeroed",
    "random": "uniform random bytes",
}

_WORDS = ("request", "served", "client", "connect", "timeout", "retry", "flush", "commit",
          "volume", "snapshot", "lun", "ok", "error", "warning", "queue", "latency", "bytes",
          "session", "user", "write", "read", "cache", "miss", "hit", "node", "partner")
_LEVELS = ("INFO", "DEBUG", "WARN", "ERROR")
_COMPONENTS = ("nbd", "dmodule", "raid", "wafl", "bus", "hyp", "cp", "replay")


def _text_block(rng: np.random.Generator) -> bytes:
    out = bytearray()
    t = int(rng.integers(1_700_000_000, 1_800_000_000))
    while len(out) < BLOCK:
        t += int(rng.integers(0, 3))
        words = " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(3, 9))))
        out += (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t))}.{int(rng.integers(0, 1000)):03d} "
                f"{_LEVELS[int(rng.integers(0, 4))]} [{_COMPONENTS[int(rng.integers(0, 8))]}] "
                f"{words} id={int(rng.integers(0, 1 << 32)):x} n={int(rng.integers(0, 5000))}\n"
                ).encode()
    return bytes(out[:BLOCK])


def _db_page(rng: np.random.Generator) -> bytes:
    page = bytearray(BLOCK)
    row = int(rng.integers(32, 97))
    rows = int(rng.integers(10, (BLOCK - 24) // (row + 2)))
    page[0:24] = rng.integers(0, 256, 24, dtype=np.uint8).tobytes()
    status = [b"active", b"closed", b"pending", b"failed"]
    base_id = int(rng.integers(0, 1 << 40))
    for r in range(rows):
        page[24 + 2 * r:26 + 2 * r] = (BLOCK - (r + 1) * row).to_bytes(2, "little")
        rec = bytearray(row)
        rec[0:8] = (base_id + r).to_bytes(8, "little")  # primary key, ascending
        rec[8:12] = int(rng.integers(0, 100)).to_bytes(4, "little")  # small int column
        rec[12:16] = int(rng.integers(1_700_000_000, 1_700_100_000)).to_bytes(4, "little")
        s = status[int(rng.integers(0, 4))]
        rec[16:16 + len(s)] = s
        rec[24:32] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()  # a hash column
        start = BLOCK - (r + 1) * row
        page[start:start + row] = rec
    return bytes(page)


def _block(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "text":
        return _text_block(rng)
    if kind == "zero":
        return bytes(BLOCK)
    if kind == "mostly_zero":
        n = int(rng.integers(64, 769))
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes() + bytes(BLOCK - n)
    if kind == "db_page":
        return _db_page(rng)
    return rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def workload(seed: int = 11) -> list[tuple[int, int, bytes]]:
    """(lun gid, offset, payload) for SEQUENCE writes, drawn per MIX from per-kind pools."""
    rng = np.random.default_rng(seed)
    kinds = list(MIX)
    pools = {k: [_block(k, rng) for _ in range(POOL)] for k in kinds}
    picks = rng.choice(len(kinds), SEQUENCE, p=np.array([MIX[k] for k in kinds]))
    which = rng.integers(0, POOL, SEQUENCE)
    luns = rng.integers(0, LUNS, SEQUENCE)
    offs = rng.integers(0, DISK_BYTES // BLOCK, SEQUENCE) * BLOCK
    return [(F.lun_gid(NODE, int(luns[i])), int(offs[i]), pools[kinds[int(picks[i])]][int(which[i])])
            for i in range(SEQUENCE)]


def _fill(buf: mmap.mmap, compress: str | None, writes: list[tuple[int, int, bytes]]
          ) -> nvlog.NVLogWriter:
    """Reset the region's log and append the writes until it is full."""
    nvlog.format_region(buf, NODE, 0x1A4)
    w = nvlog.NVLogWriter(buf, compress=compress)
    append = w.append
    n = len(writes)
    i = 0
    try:
        while True:
            lun, off, data = writes[i % n]
            append(lun, off, data, 77, i + 1)
            i += 1
    except LogFull:
        pass
    return w


# Replay files on tmpfs where there is one: the figure is the replay path's CPU cost, not
# this machine's disk (unlinking the sparse images on the shared disk alone took seconds).
_REPLAY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _replay_files(log_: np.ndarray, gen: int, base: int, tmp: str) -> tuple[int, float]:
    """scan + plan + write_plan into fresh sparse files: (bytes written, seconds)."""
    paths = [os.path.join(tmp, f"lun{j}.img") for j in range(LUNS)]
    fds = []
    for p in paths:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, DISK_BYTES)
        fds.append(fd)
    try:
        t0 = time.perf_counter()
        index, count, _ = replay.scan(log_, gen, base)
        nbytes = 0
        for j, fd in enumerate(fds):
            rows, _bad = replay.plan(log_, index, count, F.lun_gid(NODE, j), -1, DISK_BYTES)
            nbytes += replay.write_plan(log_, index, rows, fd, 0, DISK_BYTES)[0]
        return nbytes, time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)


def run(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 7
    log(f"nvlog_lz4: building the {SEQUENCE}-write workload")
    writes = workload()
    replay.warm()
    out: dict[str, Any] = {
        "block": BLOCK, "log_bytes": LOG_BYTES, "replay_dir": _REPLAY_DIR or tempfile.gettempdir(),
        "mix": {k: {"share": MIX[k], "what": MIX_NOTE[k]} for k in MIX},
    }
    bufs = {c: mmap.mmap(-1, F.REGION_HEADER + LOG_BYTES) for c in ("lz4", "raw")}
    filled: dict[str, nvlog.NVLogWriter] = {}
    for name in ("raw", "lz4"):
        compress = "lz4" if name == "lz4" else None
        _fill(bufs[name], compress, writes[:256])  # page the region in, warm the code
        best, median, w = best_and_median(lambda: _fill(bufs[name], compress, writes), reps)
        logical = w.records * BLOCK
        filled[name] = w
        key = "mbps" if name == "lz4" else "raw_mbps"
        out[key] = round(logical / best / MB, 1)
        out[key + "_median"] = round(logical / median / MB, 1)
        out[f"records_per_log_{name}"] = w.records
        out[f"append_us_{name}"] = round(best / w.records * 1e6, 3)
        log(f"nvlog_lz4: {name}: {w.records} records, {out[key]} MB/s")
    lz = filled["lz4"]
    out["mbps_vs_raw"] = round(out["mbps"] / out["raw_mbps"], 3) if out["raw_mbps"] else None
    out["ratio"] = round(lz.lz4_in / lz.lz4_out, 3) if lz.lz4_out else 1.0
    out["log_ratio"] = round(out["records_per_log_lz4"] / out["records_per_log_raw"], 3)
    out["compressed_share"] = round(lz.lz4_records / lz.records, 3)

    # Replay, the takeover path: pwrite into sparse files; and in memory (replay_region).
    disks_after: dict[str, list[np.ndarray]] = {}
    for name in ("raw", "lz4"):
        w = filled[name]
        view = nvlog.log_view(bufs[name])
        hdr = nvlog.RegionHeader.read(bufs[name])
        with tempfile.TemporaryDirectory(prefix="vmemu-lz4-bench-", dir=_REPLAY_DIR) as tmp:
            times = []
            nbytes = 0
            for _ in range(max(2, reps // 2)):
                nbytes, secs = _replay_files(view, hdr.generation, hdr.base_seq, tmp)
                times.append(secs)
        logical = w.records * BLOCK
        out[f"replay_mbps_{name}"] = round(logical / min(times) / MB, 1)
        out[f"replay_written_bytes_{name}"] = int(nbytes)
        disks = {F.lun_gid(NODE, j): np.zeros(DISK_BYTES, np.uint8) for j in range(LUNS)}
        best, _, res = best_and_median(
            lambda: replay.replay_region(view, hdr.generation, hdr.base_seq, disks, {}), reps)
        assert res.scanned == w.records and res.bad == 0, res
        out[f"replay_mem_mbps_{name}"] = round(res.bytes / best / MB, 1)
        disks_after[name] = list(disks.values())
    # The two logs hold different numbers of records (the lz4 one more), so check the lz4
    # log's replay against a raw log of exactly its writes.
    check = mmap.mmap(-1, F.REGION_HEADER + lz.records * F.record_size(BLOCK) + 4096)
    nvlog.format_region(check, NODE, 0x1A5)
    cw = nvlog.NVLogWriter(check)
    for i in range(lz.records):
        lun, off, data = writes[i % len(writes)]
        cw.append(lun, off, data, 77, i + 1)
    hdr = nvlog.RegionHeader.read(check)
    ref = {F.lun_gid(NODE, j): np.zeros(DISK_BYTES, np.uint8) for j in range(LUNS)}
    replay.replay_region(nvlog.log_view(check), hdr.generation, hdr.base_seq, ref, {})
    same = all(np.array_equal(a, b) for a, b in zip(disks_after["lz4"], ref.values()))
    out["replay_matches_raw"] = bool(same)
    # The regions are left to the garbage collector: numpy views (the writers', log_view)
    # still export their buffers, and mmap.close() refuses while they do.
    out["note"] = ("ratio = logical/stored payload bytes; MB/s = 1e6 logical bytes/s; "
                   "append = best of reps filling the 64 MiB log; replay_mbps = scan+plan+"
                   "pwrite into fresh sparse files, replay_mem = replay_region into memory")
    return out


if __name__ == "__main__":
    print(run(True))
