"""Reading a region that may be corrupt: quarantine, log breaks, and what they cost.

``read_region`` is what a replay runs instead of trusting a region: it checks the header
(``nvlog_header``), scans every log (``replay.scan``, which stops at the first record that
does not verify), and explains every place where a log ends short of what the writer wrote.

The header's ``tail`` is advisory (the writer stores it after each record), so after a scan
the clean path makes one comparison per log:

* scan end == tail: clean (for an empty log: unless position 0 holds a current record and
  the owner is dead: a live owner may be writing that very record).
* scan end > tail, the last record starting at the tail: the writer died between that
  record and its tail update: benign, every record that verifies is replayed. Past the tail
  by more than that, the tail cannot vouch for the end (it was hit, or the region is a mirror
  copy, whose tails are not mirrored): the rest of the log is resynced, and records that
  verify after the end are reported as below; if none does, it is a note, not a loss.
* scan end < tail: the scan stopped at a record the writer had finished. What follows it
  cannot be trusted *in order* (a record is missing), so replay of that log stops there, as
  before; but now ``diagnose`` says why that record failed (magic, generation, sequence,
  size or checksum), re-reads the header (a live writer that reset the log under the scan is
  not corruption), and resyncs: every 8-aligned position after it with the record magic, the
  log's generation and a valid checksum is a record that verifies on its own. Those with a
  sequence number at or above the expected one are acknowledged writes that are now lost;
  they are reported with their sequence range and LUN ranges (``LogBreak``), never dropped
  in silence.

One break is not corruption: a crash between the two header stores of a log reset (base_seq
written, then generation, then tail) leaves the half's old records under its new base_seq.
Recognised exactly: the record at position 0 verifies on its own and is older than base_seq,
and the other half ends right where this base_seq starts. Anything else is reported.

The resync is a numba kernel with a bounded checksum budget (``nvlog_resync``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage import nvlog_format as F
from storage import replay
from storage.nvlog_header import LogArea, check_region, nbytes
from storage.nvlog_resync import budget, resync, warm
from vmemu.errors import CorruptRegion

__all__ = ["LogBreak", "Loss", "Quarantine", "RegionRead", "ScannedLog", "diagnose",
           "budget", "lun_ranges", "read_region", "report", "resync", "warm"]
_MAGIC = F.RECORD_MAGIC
_HDR = F.RECORD_HEADER
_CRC = F.CRC_SIZE
_VERSION = F.RECORD_VERSION
_VERSION_V1 = F.RECORD_VERSION_V1
_LZ4 = F.FLAG_LZ4

MAX_EXTENTS = 8  # per LUN in a report: enough to act on, bounded for an event line


# -- reports ----------------------------------------------------------------------------------
def lun_name(gid: int) -> str:
    if gid == F.DEDUP_LUN:
        return "exactly-once table"
    return f"node{F.lun_owner(gid)}/lun{gid & 0xFFFF}"


def lun_ranges(rows: np.ndarray) -> list[dict[str, Any]]:
    """Per LUN: records, bytes, and the byte ranges they wrote (merged, at most MAX_EXTENTS)."""
    out = []
    for gid in sorted(set(rows[:, F.IDX_LUN].tolist())):
        mine = rows[rows[:, F.IDX_LUN] == gid]
        spans = sorted(zip(mine[:, F.IDX_OFFSET].tolist(), mine[:, F.IDX_LENGTH].tolist()))
        merged: list[list[int]] = []
        for off, length in spans:
            if merged and off <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + length - merged[-1][0])
            else:
                merged.append([off, length])
        out.append({"lun": lun_name(gid), "records": int(mine.shape[0]),
                    "bytes": int(mine[:, F.IDX_LENGTH].sum()),
                    "extents": merged[:MAX_EXTENTS], "more_extents": max(0, len(merged) - MAX_EXTENTS)})
    return out


@dataclass(frozen=True)
class Loss:
    """Acknowledged writes that a replay cannot apply, as far as the bytes can tell."""

    records: int  # records that verify on their own and are above what the disks hold
    seq: tuple[int, int] | None  # their sequence range
    luns: list[dict[str, Any]]  # lun_ranges of them
    unknown: int | None  # records in a gap that do not verify at all (None: count unknown)
    gave_up: bool = False  # the resync hit its budget: a lower bound
    upper_bound: bool = False  # an estimate over a log not replayed (stale records count too)

    @property
    def any(self) -> bool:
        return self.records > 0 or self.unknown is None or self.unknown > 0

    def sentence(self) -> str:
        parts = []
        if self.records:
            assert self.seq is not None
            parts.append(("up to " if self.upper_bound else "")
                         + f"{self.records} acknowledged writes (seq {self.seq[0]}..{self.seq[1]}; "
                         + ", ".join(f"{l['lun']} {l['records']}" for l in self.luns)
                         + ") are LOST" + (" at least" if self.gave_up else ""))
        if self.unknown is None:
            parts.append("an unknown number of records that no longer verify are LOST")
        elif self.unknown:
            parts.append(f"{self.unknown} records that do not verify are LOST")
        return "; ".join(parts) if parts else "no acknowledged write is lost"

    def fields(self) -> dict[str, Any]:
        return {"data_loss": self.any, "lost_records": self.records,
                "lost_seq": list(self.seq) if self.seq else None, "lost_luns": self.luns,
                "unverifiable_records": self.unknown, "resync_gave_up": self.gave_up,
                "estimate": self.upper_bound}


def _loss(rows: np.ndarray, gids: set[int] | None, min_seq: int, unknown: int | None,
          gave_up: bool, upper_bound: bool = False) -> Loss:
    keep = rows[:, F.IDX_SEQ] > min_seq
    if gids is not None:
        keep &= np.isin(rows[:, F.IDX_LUN], np.fromiter(gids, np.int64, len(gids)))
    lost = rows[keep]
    seq = (int(lost[:, F.IDX_SEQ].min()), int(lost[:, F.IDX_SEQ].max())) if lost.shape[0] else None
    return Loss(int(lost.shape[0]), seq, lun_ranges(lost), unknown, gave_up, upper_bound)


@dataclass(frozen=True)
class LogBreak:
    """Where and why a log ends short of its tail, and what follows the bad record."""

    half: int
    position: int  # byte offset of the bad record in its log
    region_offset: int  # the same, in the region (what a hex dump shows)
    why: str
    expected_seq: int
    tail: int
    bytes_after: int  # tail - position
    verified_after: int  # records after it that verify on their own (seq >= expected)
    stale_after: int  # ones that verify but are older than expected (not lost)
    seq_after: tuple[int, int] | None
    loss: Loss

    def fields(self) -> dict[str, Any]:
        return {"half": self.half, "position": self.position, "region_offset": self.region_offset,
                "why": self.why, "expected_seq": self.expected_seq, "tail": self.tail,
                "bytes_after": self.bytes_after, "verified_after": self.verified_after,
                "stale_after": self.stale_after,
                "seq_after": list(self.seq_after) if self.seq_after else None,
                **self.loss.fields()}

    def message(self) -> str:
        text = (f"corrupt NVLog record at half {self.half} byte {self.position} (region offset "
                f"{self.region_offset}): {self.why}; expected seq {self.expected_seq}, tail "
                f"{self.tail}, {self.bytes_after} bytes after it, {self.verified_after} records "
                "after it still verify")
        return text + "; " + self.loss.sentence()


@dataclass(frozen=True)
class Quarantine:
    """A region (half None) or one log of it not replayed, and what that may lose."""

    reason: str
    half: int | None
    loss: Loss  # records in the area that still verify on their own: an upper bound

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "half": self.half, **self.loss.fields()}

    def message(self) -> str:
        what = "region" if self.half is None else f"half {self.half}"
        return f"NVRAM {what} quarantined, not replayed: {self.reason}; " + self.loss.sentence()


@dataclass
class ScannedLog:
    area: LogArea
    view: np.ndarray
    index: np.ndarray
    count: int
    end: int


@dataclass
class RegionRead:
    """What a replay may apply (``logs``, oldest first) and what it must report."""

    logs: list[ScannedLog] = field(default_factory=list)
    quarantine: Quarantine | None = None  # the whole region
    skipped: list[Quarantine] = field(default_factory=list)  # single logs
    breaks: list[LogBreak] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # benign findings, for the replay figures

    @property
    def problems(self) -> list[Quarantine | LogBreak]:
        q: list[Quarantine | LogBreak] = [self.quarantine] if self.quarantine else []
        return q + self.skipped + self.breaks


def report(p: Quarantine | LogBreak) -> tuple[str, dict[str, Any], str]:
    """(event kind, fields, one loud line) for a problem of ``read_region``."""
    kind = "nvram_region_quarantined" if isinstance(p, Quarantine) else "nvlog_corrupt_record"
    return kind, p.fields(), p.message()


# -- reading a region ---------------------------------------------------------------------------
def read_region(buf: Any, owner: int | None = None, region_id: int | None = None,
                gids: set[int] | None = None, min_seq: int = 0, live: bool = False) -> RegionRead:
    """Check, scan and diagnose a whole region; raises nothing for any bytes in `buf`.

    `gids` are the LUNs the caller replays and `min_seq` what their disks already hold from
    this region: losses are counted for those (all LUNs if `gids` is None). `live`: its owner
    is still writing it (a giveback's releaser), so a record at the end may be half written.
    """
    try:
        hdr = check_region(buf, owner, region_id)
    except CorruptRegion as exc:
        return RegionRead(quarantine=Quarantine(exc.reason, None,
                                                _estimate(_log_area(buf), gids, min_seq)))
    whole = _log_area(buf)
    out = RegionRead()
    for area in hdr.logs:
        view = whole[area.start - F.REGION_HEADER:area.start - F.REGION_HEADER + area.size]
        if area.problem is not None:
            out.skipped.append(Quarantine(area.problem, area.half, _estimate(view, gids, min_seq)))
            continue
        index, count, end = replay.scan(view, area.generation, area.base_seq)
        out.logs.append(ScannedLog(area, view, index, int(count), int(end)))
    used = [s for s in out.logs if s.count]
    for a, b in zip(used, used[1:]):
        if a.area.base_seq + a.count > b.area.base_seq:
            # Both halves verify records of the same sequence numbers: no order to apply
            # them in is known to be right.
            reason = (f"halves {a.area.half} and {b.area.half} both hold records of seq "
                      f"{b.area.base_seq}..{a.area.base_seq + a.count - 1}")
            return RegionRead(quarantine=Quarantine(reason, None, _estimate(whole, gids, min_seq)))
    for i, s in enumerate(out.logs):
        if s.end == s.area.tail and (s.count or live or not _current_at_0(s)):  # clean path
            continue
        if s.end > s.area.tail and s.count and s.index[s.count - 1, F.IDX_POS] == s.area.tail:
            continue  # the writer died between its last record and the tail update: benign
        brk = diagnose(buf, s, out.logs[:i] + out.logs[i + 1:], gids, min_seq)
        if isinstance(brk, LogBreak):
            out.breaks.append(brk)
        elif brk:
            out.notes.append(brk)
    _check_seams(buf, out, gids, min_seq)
    return out


def _log_area(buf: Any) -> np.ndarray:
    if nbytes(buf) <= F.REGION_HEADER:
        return np.zeros(0, dtype=np.uint8)
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)[F.REGION_HEADER:]
    return np.frombuffer(buf, dtype=np.uint8, offset=F.REGION_HEADER)


def _estimate(view: np.ndarray, gids: set[int] | None, min_seq: int) -> Loss:
    """Records of any generation that still verify in a log not replayed: an upper bound of
    what it held (stale records of older generations verify too)."""
    rows, _n, _spent, gave_up = resync(view, 0, view.size, -1, budget(view.size))
    return _loss(rows, gids, min_seq, None, bool(gave_up), upper_bound=True)


def _why(view: np.ndarray, pos: int, generation: int, expected: int) -> str:
    """Why the record at `pos` fails the scan (the checks in ``replay.scan``'s order)."""
    if view.size - pos < _HDR + _CRC:
        return f"only {view.size - pos} bytes left in the log, less than a record"
    (magic, version, flags, gen, length, seq, _lun, stored, _off, _cl, _rq) = \
        F.RECORD_STRUCT.unpack(view[pos:pos + _HDR].tobytes())
    if magic != _MAGIC:
        return f"bad record magic {magic:#010x}"
    if gen != generation & 0xFFFFFFFF:
        return f"record generation {gen}, the log is at {generation & 0xFFFFFFFF}"
    if seq != expected:
        return f"record seq {seq}, expected {expected}"
    if version == _VERSION_V1 and not flags & _LZ4:
        stored = length
    elif version != _VERSION or (stored != length and not flags & _LZ4):
        return f"record version {version}, flags {flags:#x}, stored {stored}, length {length}"
    if F.record_size(stored) > view.size - pos:
        return f"a {F.record_size(stored)}-byte record runs past the end of the log"
    return "checksum mismatch"


def diagnose(buf: Any, s: ScannedLog, others: list[ScannedLog], gids: set[int] | None,
             min_seq: int) -> LogBreak | str | None:
    """Explain a log whose scan ended before its tail: a LogBreak, or a note if benign."""
    area = s.area
    if area.reread(buf) != (area.generation, area.base_seq, area.tail):
        return f"half {area.half} changed while it was read (a live writer): not corruption"
    pos = s.end
    expected = area.base_seq + s.count
    gen32 = area.generation & 0xFFFFFFFF
    if pos == 0 and _interrupted_reset(s, others, gids, min_seq):
        return f"half {area.half}: a log reset interrupted by a crash (older records under a new base_seq)"
    why = _why(s.view, pos, area.generation, expected)
    # From the next 8 bytes on, not past the size the bad record claims: that size may be
    # the very field that was hit (a payload holding a record image with our generation and
    # a valid checksum is the lesser risk). Up to the tail; past it too if the tail lags the
    # scan by more than the one record a writer dying before its tail update explains (the
    # tail itself was hit, or this is a mirror copy, whose tails are not mirrored).
    start = pos + 8
    lags = pos >= area.tail  # (equal: an empty log whose first record is current after all)
    stop = s.view.size if lags else area.tail
    rows, n, _spent, gave_up = resync(s.view, start, stop, gen32, budget(stop - start))
    after = rows[rows[:, F.IDX_SEQ] >= expected]
    if pos > area.tail and not after.shape[0]:
        return (f"half {area.half}: tail {area.tail} lags the scan end {pos} and nothing "
                "verifies after it: the advisory tail is stale, no record is missing")
    seq_after = (int(after[0, F.IDX_SEQ]), int(after[-1, F.IDX_SEQ])) if after.shape[0] else None
    # Records between the bad one and the first that verifies again: their LUNs are unknown.
    if seq_after is not None:
        unknown: int | None = max(0, seq_after[0] - max(expected, min_seq + 1))
    else:
        unknown = None if expected > min_seq else 0
    last = (int(after[-1, F.IDX_POS] + F.record_size(after[-1, F.IDX_STORED]))
            if lags and after.shape[0] else max(area.tail, pos))
    return LogBreak(area.half, pos, area.start + pos, why, expected, area.tail, last - pos,
                    int(after.shape[0]), int(n) - int(after.shape[0]), seq_after,
                    _loss(after, gids, min_seq, unknown, bool(gave_up)))


def _current_at_0(s: ScannedLog) -> bool:
    """An empty log (nothing verified, tail 0) whose position 0 holds a record of this
    generation, or one that verifies on its own and is not older than base_seq: the record,
    the generation or the tail was hit. (After an honest reset, position 0 holds zeros or a
    record of the half's previous generation, with an older seq.)"""
    v = s.view
    if v.size >= _HDR and int.from_bytes(v[0:4].tobytes(), "little") == _MAGIC and \
            int.from_bytes(v[8:12].tobytes(), "little") == s.area.generation & 0xFFFFFFFF:
        return True
    rows, n, _spent, _gave_up = resync(v, 0, 8, -1, budget(v.size))
    return bool(n) and rows[0, F.IDX_SEQ] >= s.area.base_seq


def _interrupted_reset(s: ScannedLog, others: list[ScannedLog], gids: set[int] | None,
                       min_seq: int) -> bool:
    """A crash between a reset's header stores: the record at 0 is of the half's previous
    generation (older than base_seq, and on the disks already: the CP that let the half be
    reset made it durable, so it is at or below min_seq unless it is another identity's), and
    the other half ends right where this base_seq starts."""
    rows, n, _spent, _gave_up = resync(s.view, 0, 8, -1, budget(s.view.size))
    if n != 1 or rows[0, F.IDX_SEQ] >= s.area.base_seq or rows[0, F.IDX_SEQ] < 0:
        return False
    if rows[0, F.IDX_SEQ] > min_seq and (gids is None or int(rows[0, F.IDX_LUN]) in gids):
        return False
    return any(o.end >= o.area.tail and o.area.base_seq + o.count == s.area.base_seq
               for o in others)


def _check_seams(buf: Any, out: RegionRead, gids: set[int] | None, min_seq: int) -> None:
    """Two halves in use: the newer starts where the older ends. A clean older half that
    ends short of that lost its last records along with its tail (or the tail was hit)."""
    broken = {b.half for b in out.breaks}
    for a, b in zip(out.logs, out.logs[1:]):
        end_seq = a.area.base_seq + a.count
        if a.area.half in broken or not b.count or end_seq >= b.area.base_seq:
            continue
        if a.area.reread(buf) != (a.area.generation, a.area.base_seq, a.area.tail):
            continue
        missing = b.area.base_seq - end_seq
        why = (f"half {b.area.half} starts at seq {b.area.base_seq}: {missing} records "
               f"from seq {end_seq} are missing")
        unknown = max(0, b.area.base_seq - max(end_seq, min_seq + 1))
        empty = np.zeros((0, F.IDX_COLUMNS), dtype=np.int64)
        out.breaks.append(LogBreak(a.area.half, a.end, a.area.start + a.end, why, end_seq,
                                   a.area.tail, a.area.tail - a.end, 0, 0, None,
                                   _loss(empty, gids, min_seq, unknown, False)))
