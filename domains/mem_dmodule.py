"""The D-module's client contract, in memory: what the byte-stream entries serve from.

`MemDModule` answers the calls the N-module's transports make (`served`, `write`, `read`,
`flush`) with the real D-module's checks and error types, so that a request the stream
entries (domains/nbd_stream.py, domains/block_stream.py) let through is one the real
D-module (domains/dmodule.py) would get:
- an identity this domain does not serve, or a LUN index it does not have: UnknownLun;
- `storage.lun.check_io`, the one rule of every LUN: sector-aligned, 1 MiB at most, inside
  the LUN (BadRequest, OutOfRange);
- every write is packed into an NVLog record header (`storage.nvlog_format.RECORD_STRUCT`),
  as the NVLog does before it acknowledges: a field out of that header's range fails the same
  way here as there.
What it leaves out is durability and takeover: no NVRAM, no CP, no exactly-once table.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any

from storage import nvlog_format as F
from storage.lun import check_io
from vmemu.errors import UnknownLun

MiB = 1 << 20


@dataclass
class MemLun:
    identity: int
    index: int
    size: int
    mem: mmap.mmap = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Anonymous memory: zero pages until written, so a large LUN costs what is written
        # (a bytearray would be zero-filled, all of it, at once).
        self.mem = mmap.mmap(-1, max(self.size, 1))

    @property
    def name(self) -> str:
        return f"vol0/lun{self.index}"


@dataclass
class MemServed:
    identity: int
    luns: list[MemLun]


class MemDModule:
    def __init__(self, node: int = 1, sizes: dict[int, tuple[int, ...]] | None = None) -> None:
        """`sizes`: identity -> LUN sizes (bytes, multiples of 512); default node `node`
        serving itself with a 4 MiB and a 2 MiB LUN."""
        self.node = node
        sizes = sizes if sizes is not None else {node: (4 * MiB, 2 * MiB)}
        self.served: dict[int, MemServed] = {
            ident: MemServed(ident, [MemLun(ident, i, s) for i, s in enumerate(szs)])
            for ident, szs in sizes.items()}
        self.seq = 0
        self.calls = 0

    def lun(self, identity: int, index: int) -> MemLun:
        served = self.served.get(identity)
        if served is None:
            raise UnknownLun(f"node{self.node} does not serve node{identity}")
        for lun in served.luns:
            if lun.index == index:
                return lun
        names = ", ".join(f"lun{l.index}" for l in served.luns) or "none"
        raise UnknownLun(f"node{identity} has no lun{index} (it has {names})")

    def _check(self, identity: int, index: int, offset: int, length: int) -> MemLun:
        lun = self.lun(identity, index)
        check_io(f"node{identity}/lun{index}", lun.size, offset, length)
        self.calls += 1
        return lun

    def write(self, identity: int, lun_index: int, offset: int, data: Any, client: int,
              request: int) -> int:
        lun = self._check(identity, lun_index, offset, len(data))
        self.seq += 1
        # The NVLog's record header, packed as the NVLog packs it (and failing as it fails).
        F.RECORD_STRUCT.pack(F.RECORD_MAGIC, F.RECORD_VERSION, F.FLAG_WRITE, 0, len(data),
                             self.seq, F.lun_gid(identity, lun_index), len(data), offset,
                             client, request)
        lun.mem[offset:offset + len(data)] = data
        return self.seq

    def read(self, identity: int, lun_index: int, offset: int, length: int) -> bytes:
        lun = self._check(identity, lun_index, offset, length)
        return bytes(lun.mem[offset:offset + length])

    def flush(self, identity: int, lun_index: int) -> None:
        self.lun(identity, lun_index)
