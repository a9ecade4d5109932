"""The NVRAM region header, read back as untrusted bytes: every field checked before use.

A partner maps memory another process wrote, and that process may have had a bug; the
hypervisor's word (which region of which node this is) and the mapping's size are the only
facts the reader brings. ``check_region`` compares the header with them and range-checks
every field; it raises ``CorruptRegion`` (with a one-line reason) or returns the logs to scan.

Two levels of trust, on purpose:

* Fields that say *where* the logs are (magic, version, owner node, region id, capacity):
  if one fails, nothing in the region can be located with confidence, and the whole region
  is refused (the caller quarantines it).
* Fields of one log (a half's generation, base_seq, tail): if one is absurd, that log alone
  is marked with a ``problem`` and not scanned; the other half still is. Its records verify
  against its own fields (magic, generation, sequence, crc), so a bad neighbour does not
  make them wrong, and refusing them too would only lose more acknowledged writes.

What is *not* a problem here: a generation or base_seq in range that does not match the
records (the scan finds none, and the tail comparison in ``nvlog_check`` reports it), or a
tail smaller than the records (advisory: the writer updates it after each record).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np

from storage import nvlog_format as F
from vmemu.errors import CorruptRegion

MAX_NODE = 0xFFFF  # a LUN's global id is node << 16 | lun in 32 bits
# Past these a value is absurd rather than merely unexpected: a generation is bumped once per
# CP (2**48 is 9 years at a million CPs a second), and sequence numbers must stay well inside
# the replay kernels' int64 (at 2**63 they raise instead of scanning).
GENERATION_LIMIT = 1 << 48
SEQ_LIMIT = 1 << 62
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class LogArea:
    """One log of a region, as its header describes it (offsets are in the region)."""

    half: int  # 0 or 1; a version-1 region has one log, half 0
    start: int  # byte offset of the log's first record in the region
    size: int
    generation: int
    base_seq: int
    tail: int
    fields: tuple[int, int, int]  # header offsets of (generation, base_seq, tail)
    problem: str | None = None  # why this log is not to be scanned

    def reread(self, buf: object) -> tuple[int, int, int]:
        """(generation, base_seq, tail) as the header says now."""
        return tuple(_U64.unpack_from(buf, off)[0] for off in self.fields)  # type: ignore[return-value]


@dataclass(frozen=True)
class Header:
    version: int
    node_index: int
    region_id: int
    capacity: int
    logs: tuple[LogArea, ...]  # the logs in use, oldest first (by base_seq)


def nbytes(buf: object) -> int:
    if isinstance(buf, (np.ndarray, memoryview)):
        return int(buf.nbytes)
    return len(buf)  # type: ignore[arg-type]


def check_region(buf: object, owner: int | None = None,
                 region_id: int | None = None) -> Header:
    """The header of `buf` (a whole region), or CorruptRegion saying what is wrong with it.

    `owner` and `region_id`, when given, are what the reader knows from elsewhere (the
    hypervisor's chain): the header must name the same.
    """
    size = nbytes(buf)
    if size < F.REGION_HEADER:
        _bad(f"not an NVRAM region ({size} bytes, shorter than its {F.REGION_HEADER}-byte "
             "header)")
    magic, version, node, rid, cap, _gen, _base, _tail = F.REGION_STRUCT.unpack_from(buf, 0)
    if magic != F.REGION_MAGIC:
        _bad(f"not an NVRAM region (bad magic {magic!r})")
    if version not in (F.REGION_VERSION, F.REGION_VERSION_HALVES):
        _bad(f"not an NVRAM region (bad version {version})")
    if not 1 <= node <= MAX_NODE:
        _bad(f"owner node {node} out of range 1..{MAX_NODE}")
    if owner is not None and node != owner:
        _bad(f"header names node{node}, but the region is node{owner}'s")
    if rid == 0:
        _bad("region id 0")
    if region_id is not None and rid != region_id:
        _bad(f"header names region {rid:#x}, expected {region_id:#x}")
    if cap != size - F.REGION_HEADER:
        _bad(f"capacity {cap} does not match the {size - F.REGION_HEADER}-byte log area")
    if version == F.REGION_VERSION:
        # Bytes 56..80 are half 1's fields in version 2 and stay zero in version 1: set, they
        # say this is a version-2 region whose version field was hit.
        if any(_U64.unpack_from(buf, off)[0] for off in F.HALF_FIELDS[1]):
            _bad("version 1, but half 1's fields are set (a version-2 region?)")
        if cap < F.record_size(0):
            _bad(f"capacity {cap} too small for a record")
        logs = [_area(buf, 0, F.REGION_HEADER, cap, F.HALF_FIELDS[0], halves=False)]
    else:
        half = (cap // 2) // 8 * 8
        if half < F.record_size(0):
            _bad(f"capacity {cap} too small for two log halves")
        logs = [_area(buf, h, F.REGION_HEADER + h * half, half, F.HALF_FIELDS[h], halves=True)
                for h in (0, 1)]
        h0, h1 = logs
        if h1.generation == 0 and h1.problem is None:
            # "Unused" fields that were hit would make half 1's records vanish in silence.
            # Each half bumps its own generation once per reset, alternating, so half 1 is at
            # half 0's generation or one below: half 0 past 1 means half 1 has been used. And
            # a half never used was never written: a record magic at its start says it was.
            if h0.generation >= 2:
                why = f"half 0 is at generation {h0.generation}"
            elif struct.unpack_from("<I", buf, h1.start)[0] == F.RECORD_MAGIC:
                why = "it holds records"
            else:
                why = ""
            if why:
                logs[1] = replace(h1, problem=f"half 1: generation 0 (unused), but {why}: its "
                                              "fields were hit")
        # Half 1 before its first use: generation 0 (never matches a record). Not a log yet.
        logs = [a for a in logs if a.generation or a.half == 0 or a.problem]
    logs.sort(key=lambda a: a.base_seq)  # oldest first: records apply in sequence order
    return Header(version, node, rid, cap, tuple(logs))


def _bad(reason: str) -> None:
    raise CorruptRegion(f"corrupt NVRAM region header: {reason}", reason)


def _area(buf: object, half: int, start: int, size: int, fields: tuple[int, int, int],
          halves: bool) -> LogArea:
    gen, base, tail = (_U64.unpack_from(buf, off)[0] for off in fields)
    return LogArea(half, start, size, gen, base, tail, fields,
                   _log_problem(half, gen, base, tail, size, halves))


def _log_problem(half: int, gen: int, base: int, tail: int, size: int,
                 halves: bool) -> str | None:
    name = f"half {half}" if halves else "the log"
    if gen >= GENERATION_LIMIT:
        return f"{name}: generation {gen} is absurd (limit 2**48)"
    if base >= SEQ_LIMIT:
        return f"{name}: base_seq {base} is absurd (limit 2**62)"
    if tail > size:
        return f"{name}: tail {tail} is beyond its {size} bytes"
    if tail % F.ALIGN:
        return f"{name}: tail {tail} is not {F.ALIGN}-byte aligned"
    if gen == 0:
        if half == 0:
            return f"{name}: generation 0 (a log in use starts at 1)"
        if tail:
            return f"{name}: unused (generation 0) but its tail is {tail}"
    elif base == 0:
        return f"{name}: base_seq 0 (sequence numbers start at 1)"
    return None
