"""Fuzz target: a disk image's header as the hypervisor stamps it and a domain opens it.

A sample is a real image (``Disk.create``, then ``set_applied`` with a map of the usual
shape) whose header bytes are kept aside. An input is a list of mutations: bit flips in the
fields and the applied map, fields set to extremes, the applied map replaced by other
msgpack (wrong types, too many entries, nesting, huge integers, bytes, floats) or by random
bytes, and truncation of the file. ``check`` stamps the epoch and opens the disk, as a
takeover does, and returns the properties it broke:

* ``stamp_epoch``, ``Disk.open`` and ``applied()`` raise nothing but CorruptDisk (and
  Fenced, never expected here), and a refused stamp writes nothing;
* a disk that opens has the owner, index, a size its file holds, and an applied map of at
  most MAX_APPLIED region -> seq integers;
* a mutation that leaves every header byte the reader uses unchanged opens, with the same
  applied map.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import msgpack

from storage.disk import (HEADER, MAX_APPLIED, OFF_APPLIED, OFF_APPLIED_LEN, Disk, disk_path,
                          stamp_epoch)
from vmemu.errors import CorruptDisk

NODE, INDEX = 1, 0
SIZE = 64 << 10
FIELDS = ((8, 4), (12, 4), (16, 4), (24, 8), (32, 8), (OFF_APPLIED_LEN, 4))
EXTREMES = (0, 1, 511, 512, SIZE, SIZE + 512, 2**31, 2**32 - 1, 2**48, 2**62, 2**63, 2**64 - 1)


@dataclass(frozen=True)
class Mutation:
    kind: str  # flip | field | applied | raw_applied | truncate
    a: int = 0
    b: int = 0
    c: int = 0


class Target:
    """One image in a private directory, rewritten for every input."""

    def __init__(self, seed: int = 0) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vmemu-fuzz-disk-")
        self.path = disk_path(Path(self.tmp.name), NODE, INDEX)
        Disk.create(self.path, NODE, INDEX, SIZE)
        rng = random.Random(seed)
        self.applied = {rng.randrange(1, 1 << 62): rng.randrange(1 << 40)
                        for _ in range(rng.randrange(0, MAX_APPLIED + 1))}
        d = Disk.open(self.path, 0)
        try:
            d.set_applied(self.applied)
        finally:
            d.close()
        self.header = self.path.read_bytes()[:HEADER]
        self.used = OFF_APPLIED + struct.unpack_from("<I", self.header, OFF_APPLIED_LEN)[0]

    def close(self) -> None:
        self.tmp.cleanup()

    def random_mutations(self, rng: random.Random) -> list[Mutation]:
        out = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            kind = rng.choice(("flip", "flip", "field", "applied", "raw_applied", "truncate"))
            if kind == "flip":
                out.append(Mutation("flip", rng.randrange(self.used + 8), rng.randrange(8)))
            elif kind == "field":
                out.append(Mutation("field", rng.randrange(len(FIELDS)), rng.randrange(len(EXTREMES))))
            elif kind == "applied":
                out.append(Mutation("applied", rng.randrange(1 << 30)))
            elif kind == "raw_applied":
                out.append(Mutation("raw_applied", rng.randrange(1 << 30), rng.randrange(0, 200)))
            else:
                out.append(Mutation("truncate", rng.randrange(HEADER + SIZE)))
        return out

    def write(self, muts: list[Mutation]) -> tuple[bytes, int]:
        """Put the mutated header (and length) in place; returns (header, file size)."""
        hdr = bytearray(self.header)
        size = HEADER + SIZE
        for m in muts:
            if m.kind == "flip":
                hdr[m.a % HEADER] ^= 1 << (m.b & 7)
            elif m.kind == "field":
                off, n = FIELDS[m.a % len(FIELDS)]
                hdr[off:off + n] = (EXTREMES[m.b % len(EXTREMES)] % (1 << 8 * n)).to_bytes(n, "little")
            elif m.kind in ("applied", "raw_applied"):
                raw = (odd_applied(random.Random(m.a)) if m.kind == "applied"
                       else random.Random(m.a).randbytes(m.b))
                raw = raw[:HEADER - OFF_APPLIED]
                hdr[OFF_APPLIED_LEN:OFF_APPLIED + len(raw)] = struct.pack("<I", len(raw)) + raw
            elif m.kind == "truncate":
                size = min(size, m.a)
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.seek(0)
            f.write(bytes(hdr[:min(size, HEADER)]))
        return bytes(hdr), size

    def check(self, muts: list[Mutation]) -> list[str]:
        hdr, size = self.write(muts)
        try:
            return self._check(hdr, size)
        except Exception:  # noqa: BLE001 - that is the finding
            return ["raised: " + traceback.format_exc(limit=6)]

    def _check(self, hdr: bytes, size: int) -> list[str]:
        bad = []
        before = self.path.read_bytes()
        try:
            epoch = stamp_epoch(self.path, node=NODE, index=INDEX)
        except CorruptDisk:
            if self.path.read_bytes() != before:
                bad.append("a refused stamp wrote into the file")
            epoch = None
        try:
            disk = Disk.open(self.path, epoch if epoch is not None else 0, node=NODE, index=INDEX)
        except CorruptDisk as exc:
            if str(self.path) not in exc.message:
                bad.append(f"CorruptDisk does not name the file: {exc.message}")
            if epoch is not None:
                bad.append(f"stamped but refused at open: {exc.message}")
            opened = False
        else:
            opened = True
            try:
                applied = disk.applied()
                if disk.node_index != NODE or disk.disk_index != INDEX:
                    bad.append("opened with another owner or index")
                if HEADER + disk.size > size:
                    bad.append(f"opened with a {disk.size}-byte disk in a {size}-byte file")
                if len(applied) > MAX_APPLIED or not all(
                        type(k) is int and type(v) is int for k, v in applied.items()):
                    bad.append(f"applied map of the wrong shape: {applied!r}")
            finally:
                disk.close()
            if epoch is None:
                bad.append("refused by stamp_epoch but opened")
        same = size == HEADER + SIZE and hdr[:self.used] == self.header[:self.used]
        if same and not opened:
            bad.append("an untouched header was refused")
        if same and opened and applied != self.applied:
            bad.append("an untouched applied map read back differently")
        self.restore()
        return bad

    def restore(self) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(HEADER + SIZE)
            f.seek(0)
            f.write(self.header)


def odd_applied(rng: random.Random) -> bytes:
    """msgpack of something that is, or is close to, an applied map."""
    def scalar() -> object:
        return rng.choice((0, -1, 1, 2**63, 2**64 - 1, -2**63, 1.5, "r", b"b", None, True,
                           rng.randrange(1 << 62)))
    shape = rng.randrange(7)
    if shape == 0:
        obj: object = {rng.randrange(1, 1 << 62): rng.randrange(1 << 40)
                       for _ in range(rng.randrange(MAX_APPLIED + 1, 40))}
    elif shape == 1:
        obj = {scalar(): scalar() for _ in range(rng.randrange(1, 6))}
    elif shape == 2:
        obj = [scalar() for _ in range(rng.randrange(5))]
    elif shape == 3:
        obj = {1: {2: [3, {4: 5}]}}
    elif shape == 4:
        obj = scalar()
    elif shape == 5:
        obj = {rng.randrange(1, 1 << 62): scalar() for _ in range(rng.randrange(1, 5))}
    else:
        obj = {}
    try:
        return msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"
