"""Disk I/O at the OS boundary, with faults switched on at run time (vmemu chaos, tests).

Every pread/pwrite/pwritev/fdatasync the storage OS does on a disk image goes through the
functions here (storage/disk.py, storage/raid/device.py, the replay's write_plan). With no
rule installed each is the `os` call plus one truth test of an empty list: off by default,
at no measurable cost. A rule names a disk by (identity, disk index), the key its descriptor
was registered under when the disk was opened (``register``), and says what to do to its
I/O for a while:

    eio   the call fails with EIO, nothing done            (a dead or dying disk)
    slow  the call waits ``delay_s`` first, then runs      (a disk retrying, a busy SAN)
    torn  a write stores a prefix of whole 512-byte sectors, then fails with EIO
          (power lost mid-write: a sector is written whole or not at all, as on a real drive)

each with a probability per call, until it expires on its own (``duration_s`` after it was
set: a chaos run that dies half-way leaves no fault behind in a guest that lives on). Rules
live in the process that installed them: the guest serving the identity, asked by Domain 0
(the ``disk_fault`` management request, validated by ``parse_rule``). A partner that takes
the identity over opens the disks afresh, without the failed guest's rules.

Callers must treat EIO as the disk failing (storage/raid/device.py turns it into
DeviceFailed: the RAID group fails the member and serves from the others); a torn write is
an EIO after a partial write, so the same handling covers it. (A tear is not a short return:
every writer here loops on a short pwrite, as it must for a file system that places part of
a write, so a short return is no fault to them.) Other errors (ENOSPC) keep their meaning:
the consistency point fails and is retried.

``RuleTable`` is pure apart from its random draw (seedable) and takes the clock as an
argument, so the unit tests drive it without sleeping.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

KINDS = ("eio", "slow", "torn")
OPS = ("read", "write", "sync")
DEFAULT_OPS = {"eio": OPS, "slow": OPS, "torn": ("write",)}
MAX_RULES = 64  # a flood of requests cannot grow the table without bound
MAX_DURATION_S = 600.0
MAX_DELAY_MS = 2000.0  # a slower "disk" would only trip the hypervisor's stall limit
MAX_DISKS = 64
SECTOR = 512


class RuleError(ValueError):
    """A disk_fault request that does not describe a rule (the message says which field)."""


@dataclass(frozen=True)
class Rule:
    identity: int
    disk: int
    kind: str
    probability: float
    until: float  # CLOCK_MONOTONIC seconds: the rule is gone after it
    delay_s: float = 0.0  # slow only
    ops: frozenset[str] = field(default_factory=lambda: frozenset(OPS))

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"identity": self.identity, "disk": self.disk, "kind": self.kind,
                "probability": self.probability, "left_s": round(max(0.0, self.until - now), 3),
                "delay_ms": round(self.delay_s * 1000, 3), "ops": sorted(self.ops)}


def _number(args: dict[str, Any], key: str, lo: float, hi: float, default: float | None,
            lo_open: bool = False) -> float:
    v = args.get(key, default)
    if v is None:
        raise RuleError(f"disk_fault: {key} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RuleError(f"disk_fault: {key} must be a number, not {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise RuleError(f"disk_fault: {key} {v!r} is out of range "
                        f"({'(' if lo_open else '['}{lo:g}, {hi:g}])")
    return float(v)


def parse_rule(args: dict[str, Any], identity: int, disks: int, now: float) -> Rule | None:
    """The rule a disk_fault request asks for (None for kind "clear"), or RuleError.

    Fields: disk (0 .. disks-1, or -1 with kind "clear": every disk), kind (eio, slow, torn,
    clear), probability (0 < p <= 1, default 1), duration_s (0 < d <= 600), delay_ms (slow:
    0 < ms <= 2000, default 20), ops (a list of read, write, sync; default all, torn: write).
    """
    kind = args.get("kind")
    if not isinstance(kind, str) or kind not in KINDS + ("clear",):
        raise RuleError(f"disk_fault: kind must be one of {', '.join(KINDS + ('clear',))}, "
                        f"not {kind!r}")
    if not isinstance(disks, int) or not 0 < disks <= MAX_DISKS:
        raise RuleError(f"disk_fault: node{identity} has no disks to fault")
    disk = args.get("disk")
    lowest = -1 if kind == "clear" else 0
    if isinstance(disk, bool) or not isinstance(disk, int) or not lowest <= disk < disks:
        raise RuleError(f"disk_fault: disk must be an integer from {lowest} to {disks - 1} "
                        f"(node{identity} has {disks} disks), not {disk!r}")
    if kind == "clear":
        return None
    prob = _number(args, "probability", 0.0, 1.0, 1.0, lo_open=True)
    duration = _number(args, "duration_s", 0.0, MAX_DURATION_S, None, lo_open=True)
    delay = _number(args, "delay_ms", 0.0, MAX_DELAY_MS, 20.0, lo_open=True) / 1000 \
        if kind == "slow" else 0.0
    ops = args.get("ops", list(DEFAULT_OPS[kind]))
    if not isinstance(ops, (list, tuple)) or not ops or len(ops) > len(OPS) \
            or any(not isinstance(o, str) or o not in OPS for o in ops):
        raise RuleError(f"disk_fault: ops must be a non-empty list of {', '.join(OPS)}, "
                        f"not {ops!r}")
    if kind == "torn" and set(ops) != {"write"}:
        raise RuleError("disk_fault: a torn rule tears writes only (ops [\"write\"])")
    return Rule(identity, disk, kind, prob, now + duration, delay, frozenset(ops))


class RuleTable:
    """The installed rules; which fire for one call. Thread-safe (the CP thread, the RAID
    sync pool and the serving loop all do disk I/O)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rules: list[Rule] = []  # read without the lock on the fast path: a new list on change
        self.injected = {k: 0 for k in KINDS}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, rule: Rule, now: float) -> None:
        """Install `rule`, replacing one of the same identity, disk and kind."""
        with self._lock:
            keep = [r for r in self.rules if r.until > now and
                    (r.identity, r.disk, r.kind) != (rule.identity, rule.disk, rule.kind)]
            if len(keep) >= MAX_RULES:
                raise RuleError(f"disk_fault: {MAX_RULES} rules are installed already")
            self.rules = keep + [rule]

    def clear(self, identity: int | None = None, disk: int | None = None) -> int:
        """Remove the rules of `identity` (all if None) on `disk` (all if None or -1)."""
        with self._lock:
            keep = [r for r in self.rules
                    if not ((identity is None or r.identity == identity)
                            and (disk is None or disk < 0 or r.disk == disk))]
            gone = len(self.rules) - len(keep)
            self.rules = keep
            return gone

    def active(self, now: float) -> list[Rule]:
        return [r for r in self.rules if r.until > now]

    def fire(self, key: tuple[int, int], op: str, now: float) -> list[Rule]:
        """The rules that hit this call (each drawn against its probability), slow first;
        expired ones are dropped on the way."""
        with self._lock:
            if any(r.until <= now for r in self.rules):
                self.rules = [r for r in self.rules if r.until > now]
            hit = [r for r in self.rules if (r.identity, r.disk) == key and op in r.ops
                   and (r.probability >= 1.0 or self._rng.random() < r.probability)]
            for r in hit:
                self.injected[r.kind] += 1
        return sorted(hit, key=lambda r: r.kind != "slow")

    def summary(self, now: float) -> dict[str, Any]:
        return {"rules": [r.to_dict(now) for r in self.active(now)],
                "injected": dict(self.injected)}


TABLE = RuleTable()
_keys: dict[int, tuple[int, int]] = {}  # fd -> (identity, disk)


def register(fd: int, identity: int, disk: int) -> None:
    _keys[fd] = (identity, disk)


def unregister(fd: int) -> None:
    _keys.pop(fd, None)


def _eio(fd: int, op: str) -> OSError:
    ident, disk = _keys.get(fd, (0, 0))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected: {op} on node{ident} d{disk})")


def _before(fd: int, op: str) -> Rule | None:
    """Apply the rules that fire for this call: sleep for slow ones, raise for eio; return a
    torn rule for the caller to carry out (it needs the data), else None."""
    key = _keys.get(fd)
    if key is None:
        return None
    for r in TABLE.fire(key, op, time.monotonic()):
        if r.kind == "slow":
            time.sleep(r.delay_s)
        elif r.kind == "eio":
            raise _eio(fd, op)
        elif r.kind == "torn":
            return r
    return None


def _tear(fd: int, data: memoryview, pos: int) -> OSError:
    """Write the whole sectors of the first half of `data`, and return the EIO to raise."""
    end = (pos + len(data) // 2) // SECTOR * SECTOR
    if end > pos:
        try:
            os.pwrite(fd, data[:end - pos], pos)
        except OSError:
            pass  # (O_DIRECT may refuse the odd length): the write failed either way
    return _eio(fd, "torn write")


def pread(fd: int, length: int, pos: int) -> bytes:
    if TABLE.rules:
        _before(fd, "read")
    return os.pread(fd, length, pos)


def preadv(fd: int, bufs: Sequence[Any], pos: int) -> int:
    if TABLE.rules:
        _before(fd, "read")
    return os.preadv(fd, bufs, pos)


def pwrite(fd: int, data: Any, pos: int) -> int:
    if TABLE.rules and _before(fd, "write") is not None:
        raise _tear(fd, memoryview(data).cast("B"), pos)
    return os.pwrite(fd, data, pos)


def pwritev(fd: int, bufs: Sequence[Any], pos: int) -> int:
    if TABLE.rules and _before(fd, "write") is not None:
        raise _tear(fd, memoryview(b"".join(bytes(b) for b in bufs)), pos)
    return os.pwritev(fd, bufs, pos)


def fdatasync(fd: int) -> None:
    if TABLE.rules:
        _before(fd, "sync")
    os.fdatasync(fd)
