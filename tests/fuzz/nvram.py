"""Fuzz target: an NVRAM region read back by a replaying partner.

A sample is a real region: formatted by ``storage.nvlog``, filled by the real writer
(``TwoHalfLog``, raw or lz4 records, both halves used, a CP's release in between), with the
ground truth of every record kept aside. An input is a list of mutations of its bytes
(``Mutation``: bit flips, header fields set to extremes, record fields set to extremes with
the checksum recomputed so the record still verifies, zeroed ranges, copied records,
truncation). ``check`` runs what a takeover runs -- ``nvlog_check.read_region``, then per
log and LUN ``replay.plan`` + ``replay.write_plan`` into real descriptors, and the
exactly-once table -- and returns the properties it broke:

* nothing raises, whatever the bytes;
* what was applied is exactly what an independent reference scan (google_crc32c, struct,
  lz4) verifies in the same logs: no record that did not verify is applied, every record
  before the first corruption is;
* a mutation that changes the outcome is reported (quarantine or break); one that is not
  reported leaves the disks as the unmutated region does (except a forged record, one whose
  checksum was recomputed: no checksum can tell it from the writer's);
* a single bit flip in a record the writer completed is reported as a break of that very
  record (its half, position and sequence number); one in padding, past the tail or in the
  header's reserved bytes changes nothing.

Used by ``tests/unit/test_corruption_fuzz.py`` (hypothesis, bounded) and
``python -m tests.fuzz --target nvram``.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import traceback
from dataclasses import dataclass
from types import SimpleNamespace

import google_crc32c
import lz4.block
import numpy as np

from domains.dmodule import DModule, ExactlyOnce
from storage import nvlog_check, replay
from storage import nvlog_format as F
from storage.nvlog import TwoHalfLog, format_region
from vmemu.errors import LogFull

OWNER = 1
RID = 0x5EED1
GIDS = (F.lun_gid(OWNER, 0), F.lun_gid(OWNER, 1))
REGION = 32 << 10
DISK = 64 << 10


@dataclass(frozen=True)
class Rec:
    """One record as the writer left it (current generation of its half)."""

    half: int
    pos: int  # in the region
    size: int  # crc-covered bytes + crc
    padded: int
    seq: int
    gid: int
    offset: int
    payload: bytes


@dataclass
class Sample:
    raw: bytes
    records: list[Rec]  # current records only, in sequence order
    tails: dict[int, tuple[int, int]]  # half -> (start in region, tail)
    min_seq: int  # what the disks hold from this region (a committed CP)
    baseline: dict[int, bytes] | None = None  # LUN gid -> disk after replaying `raw`


@dataclass(frozen=True)
class Mutation:
    kind: str  # flip | field | record_field | zero | copy | truncate
    a: int = 0  # byte offset / record number / length
    b: int = 0  # bit / field number / value index / source
    c: int = 0


HEADER_FIELDS = ((8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8), (64, 8),
                 (72, 8))  # (offset, size): version, node, region id, capacity, half fields
RECORD_FIELDS = ((4, 2), (6, 2), (8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (32, 8))
EXTREMES = (0, 1, 7, 8, 255, 4096, REGION - F.REGION_HEADER, 2**31, 2**32 - 1, 2**32,
            2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


def build(seed: int) -> Sample:
    """A region filled by the real writer, deterministic in `seed`."""
    rng = random.Random(seed)
    buf = mmap.mmap(-1, REGION)
    try:
        format_region(buf, OWNER, RID, halves=True)
        log = TwoHalfLog(buf, compress=rng.choice((None, "lz4")))
        current: dict[int, list[Rec]] = {0: [], 1: []}
        min_seq = 0
        for _ in range(rng.randrange(0, 90)):
            if rng.random() < 0.06 and log.can_switch():
                old = log.switch()
                current[log.active_half] = []
                if rng.random() < 0.7:  # the CP of the old half committed
                    log.release()
                    min_seq = max(min_seq, log.halves[old].last_seq)
            if rng.random() < 0.05 and log.flushing is not None:
                log.release()
            n = rng.choice((0, 1, 17, 64, 100, 512, 700, 1500))
            data = bytes([rng.randrange(4)]) * n if rng.random() < 0.5 else rng.randbytes(n)
            gid = rng.choice(GIDS)
            off = rng.randrange(0, DISK - n + 1)
            w = log.active
            pos = w.log_off + w.tail
            try:
                seq = log.append(gid, off, data, 7, rng.randrange(1 << 20))
            except LogFull:
                continue
            size = F.RECORD_HEADER + _stored(buf, pos) + F.CRC_SIZE
            current[log.active_half].append(Rec(log.active_half, pos, size,
                                                F.record_size(size - F.RECORD_HEADER - F.CRC_SIZE),
                                                seq, gid, off, data))
        tails = {h: (w.log_off, w.tail) for h, w in enumerate(log.halves) if w.generation}
        records = sorted(current[0] + current[1], key=lambda r: r.seq)
        raw = bytes(buf)
    finally:
        try:
            buf.close()
        except BufferError:
            pass  # the writer's views still hold it: it goes with them
    sample = Sample(raw, records, tails, min_seq)
    sample.baseline = run(sample, raw)[0]
    return sample


def _stored(buf: mmap.mmap, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos + F.OFF_STORED)[0]


# -- mutations --------------------------------------------------------------------------------
def random_mutations(sample: Sample, rng: random.Random) -> list[Mutation]:
    out = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("flip", "flip", "flip", "field", "record_field", "zero", "copy",
                           "truncate"))
        if kind == "flip":
            where = rng.random()
            if where < 0.25:
                off = rng.randrange(F.HALF_HEADER_END)
            elif where < 0.8 and sample.records:
                r = rng.choice(sample.records)
                off = r.pos + rng.randrange(r.padded)
            else:
                off = rng.randrange(REGION)
            out.append(Mutation("flip", off, rng.randrange(8)))
        elif kind == "field":
            out.append(Mutation("field", rng.randrange(len(HEADER_FIELDS)),
                                rng.randrange(len(EXTREMES)), rng.randrange(1 << 16)))
        elif kind == "record_field" and sample.records:
            out.append(Mutation("record_field", rng.randrange(len(sample.records)),
                                rng.randrange(len(RECORD_FIELDS)), rng.randrange(len(EXTREMES))))
        elif kind == "zero":
            out.append(Mutation("zero", rng.randrange(REGION), rng.randrange(1, 512)))
        elif kind == "copy" and sample.records:
            src = rng.choice(sample.records)
            out.append(Mutation("copy", rng.randrange(F.REGION_HEADER, REGION) & ~7,
                                src.pos, src.padded))
        elif kind == "truncate":
            out.append(Mutation("truncate", rng.randrange(REGION)))
    return out


def apply_mutations(sample: Sample, muts: list[Mutation]) -> bytes:
    buf = bytearray(sample.raw)
    for m in muts:
        if m.kind == "flip":
            if m.a < len(buf):
                buf[m.a] ^= 1 << (m.b & 7)
        elif m.kind == "field":
            off, size = HEADER_FIELDS[m.a % len(HEADER_FIELDS)]
            v = _extreme(m.b, m.c, size)
            if off + size <= len(buf):
                buf[off:off + size] = v.to_bytes(size, "little")
        elif m.kind == "record_field" and sample.records:
            r = sample.records[m.a % len(sample.records)]
            off, size = RECORD_FIELDS[m.b % len(RECORD_FIELDS)]
            if r.pos + r.size <= len(buf):
                buf[r.pos + off:r.pos + off + size] = _extreme(m.c, 0, size).to_bytes(size, "little")
                body = r.size - F.CRC_SIZE  # the checksum follows what the writer stored
                crc = google_crc32c.value(bytes(buf[r.pos:r.pos + body]))
                buf[r.pos + body:r.pos + r.size] = crc.to_bytes(4, "little")
        elif m.kind == "zero":
            buf[m.a:m.a + m.b] = bytes(len(buf[m.a:m.a + m.b]))
        elif m.kind == "copy":
            chunk = bytes(buf[m.b:m.b + m.c])
            buf[m.a:m.a + len(chunk)] = chunk
            del buf[len(sample.raw):]
        elif m.kind == "truncate":
            del buf[m.a:]
    return bytes(buf)


def _extreme(i: int, salt: int, size: int) -> int:
    v = EXTREMES[i % len(EXTREMES)]
    if i % len(EXTREMES) == 0 and salt:
        v = salt  # a small value that is neither 0 nor an edge
    return v % (1 << (8 * size))


# -- running and checking -----------------------------------------------------------------------
def run(sample: Sample, data: bytes) -> tuple[dict[int, bytes], nvlog_check.RegionRead]:
    """What a takeover does with `data` as the region: read, plan, pwrite, dedup."""
    read = nvlog_check.read_region(data, OWNER, RID, set(GIDS), sample.min_seq)
    fds = {gid: os.memfd_create(f"fuzz-lun-{gid:x}", os.MFD_CLOEXEC) for gid in GIDS}
    try:
        for fd in fds.values():
            os.ftruncate(fd, DISK)
        fake = SimpleNamespace(dedup=ExactlyOnce())
        for s in read.logs:
            for gid, fd in fds.items():
                rows, _bad = replay.plan(s.view, s.index, s.count, gid, sample.min_seq, DISK)
                replay.write_plan(s.view, s.index, rows, fd, 0, DISK)
            DModule._rebuild_dedup(fake, s.view, s.index, s.count, set(GIDS))  # type: ignore[arg-type]
        return {gid: os.pread(fd, DISK, 0) for gid, fd in fds.items()}, read
    finally:
        for fd in fds.values():
            os.close(fd)


def ref_scan(view: np.ndarray, generation: int, base_seq: int) -> list[tuple]:
    """The records that verify from position 0, written from the format alone."""
    data = view.tobytes()
    out = []
    pos, expected = 0, base_seq
    while len(data) - pos >= F.RECORD_HEADER + F.CRC_SIZE:
        magic, version, flags, gen, length, seq, lun, stored, off, _c, _r = \
            F.RECORD_STRUCT.unpack_from(data, pos)
        if version == F.RECORD_VERSION_V1 and not flags & F.FLAG_LZ4:
            stored = length
        elif version != F.RECORD_VERSION or (stored != length and not flags & F.FLAG_LZ4):
            break
        if magic != F.RECORD_MAGIC or gen != generation & 0xFFFFFFFF or seq != expected:
            break
        if F.record_size(stored) > len(data) - pos:
            break
        end = pos + F.RECORD_HEADER + stored
        if google_crc32c.value(data[pos:end]) != int.from_bytes(data[end:end + 4], "little"):
            break
        out.append((pos, seq, lun, off, length, flags, data[pos + F.RECORD_HEADER:end]))
        expected += 1
        pos += F.record_size(stored)
    return out


def ref_disks(sample: Sample, read: nvlog_check.RegionRead) -> dict[int, bytearray]:
    disks = {gid: bytearray(DISK) for gid in GIDS}
    for s in read.logs:
        for pos, seq, lun, off, length, flags, stored in ref_scan(s.view, s.area.generation,
                                                                  s.area.base_seq):
            if lun not in disks or seq <= sample.min_seq or off < 0 or off + length > DISK:
                continue
            if flags & F.FLAG_LZ4:
                if length > len(stored) * F.LZ4_MAX_RATIO + 64:
                    continue
                try:
                    payload = lz4.block.decompress(stored, uncompressed_size=length)
                except lz4.block.LZ4BlockError:
                    continue
                if len(payload) != length:
                    continue
            else:
                payload = stored
            disks[lun][off:off + length] = payload
    return disks


def check(sample: Sample, muts: list[Mutation]) -> list[str]:
    """The properties `muts` broke on `sample` (empty: all held)."""
    data = apply_mutations(sample, muts)
    try:
        disks, read = run(sample, data)
    except Exception:  # noqa: BLE001 - that is the finding
        return ["raised: " + traceback.format_exc(limit=6)]
    bad = []
    ref = ref_disks(sample, read)
    for gid in GIDS:
        if disks[gid] != bytes(ref[gid]):
            bad.append(f"{nvlog_check.lun_name(gid)}: applied differs from the reference scan")
    for s in read.logs:
        n = len(ref_scan(s.view, s.area.generation, s.area.base_seq))
        if n != s.count:
            bad.append(f"half {s.area.half}: scan verified {s.count} records, reference {n}")
    if read.quarantine is not None and any(any(d) for d in disks.values()):
        bad.append("a quarantined region had records applied")
    # A record field set with its checksum recomputed is a forgery no checksum can see (the
    # crc is not a MAC): it must not crash or escape the reference, nothing more.
    forged = any(m.kind == "record_field" for m in muts)
    if not forged and not read.problems and disks != sample.baseline:
        bad.append("the outcome changed and nothing was reported")
    if len(muts) == 1 and muts[0].kind == "flip" and len(data) == len(sample.raw):
        bad += _check_flip(sample, muts[0], read)
    return bad


def _check_flip(sample: Sample, m: Mutation, read: nvlog_check.RegionRead) -> list[str]:
    hit = next((r for r in sample.records if r.pos <= m.a < r.pos + r.size), None)
    if hit is not None:
        want = (hit.half, hit.pos - sample.tails[hit.half][0], hit.seq)
        got = [(b.half, b.position, b.expected_seq) for b in read.breaks]
        if want not in got or read.quarantine is not None:
            return [f"flip in record seq {hit.seq} (half {hit.half}) reported as {got} "
                    f"quarantine={read.quarantine}"]
        return []
    if m.a >= F.HALF_HEADER_END and read.problems:
        return [f"flip at {m.a} (outside every record and header field) reported: "
                f"{[nvlog_check.report(p)[2] for p in read.problems]}"]
    return []
