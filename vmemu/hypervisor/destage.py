"""NVRAM kept across `vmemu down`: regions whose writes are not all on disk when a cluster stops.

A clean stop ends with a consistency point on every domain, after which no region holds
anything the disks lack, and Domain 0 lets them all go. When a final CP fails (the disks'
file system is full, say) or an identity had no server left at the stop, its regions still
hold acknowledged writes. A memfd dies with Domain 0, so those regions are destaged, as a
storage controller destages NVRAM to its boot media: written to `<data-dir>/nvram/`, and the
next `vmemu up` loads them back and puts them at the head of every identity's chain, where
the first assignment replays them like any region of a failed node.

The space is reserved at `up` (one slot a node, the size of a region, allocated with
posix_fallocate), because the failure that makes a region worth keeping is most often the
very one that leaves no room to keep it. A slot is taken by renaming it, and the region is
written into blocks that are already allocated. A file is

    <order>-<region id, 16 hex digits>.nvram     the region's bytes, as they were

`order` keeps the chain order (older regions first) between regions that hold records of the
same identity. A file whose region header does not parse is set aside as `.bad` and reported.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from storage import region as shm
from storage.disk import pwrite_all
from storage.nvlog import RegionHeader
from vmemu.privfs import ensure_private_dir, open_private

_SAVED = re.compile(r"^(\d{3})-([0-9a-f]{16})\.nvram$")
_CHUNK = 8 << 20


def _chunks(fd: int, size: int, short: Callable[[int], Exception]) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) read from `fd` up to `size`, _CHUNK at a time; `short(pos)` is raised
    if the file ends first (a region or a saved file cut short)."""
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(_CHUNK, size - pos), pos)
        if not chunk:
            raise short(pos)
        yield pos, chunk
        pos += len(chunk)


@dataclass
class Loaded:
    region_id: int
    owner: int
    fd: int  # a sealed memfd holding the region
    size: int
    path: Path


class Destage:
    def __init__(self, data_dir: Path, region_size: int, slots: int) -> None:
        self.dir = data_dir / "nvram"
        self.region_size = region_size
        self.slots = slots

    def _slot_paths(self) -> list[Path]:
        return sorted(self.dir.glob("slot*"))

    def saved(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.nvram") if _SAVED.match(p.name))

    def reserve(self) -> int:
        """Allocate the missing slots (a node each, less the saved regions already holding
        space); returns how many were made. Raises OSError when there is no room."""
        ensure_private_dir(self.dir, "NVRAM destage dir")
        want = self.slots - len(self.saved()) - len(self._slot_paths())
        made = 0
        n = 0
        while made < want:
            n += 1
            p = self.dir / f"slot{n}"
            if p.exists():
                continue
            fd = open_private(p, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                os.posix_fallocate(fd, 0, self.region_size)
                os.fsync(fd)
            except OSError:
                os.close(fd)
                p.unlink(missing_ok=True)
                raise
            os.close(fd)
            made += 1
        return made

    def save(self, order: int, region_id: int, fd: int, size: int) -> Path:
        """Write region `region_id` (its memfd `fd`) into a reserved slot, durably."""
        ensure_private_dir(self.dir, "NVRAM destage dir")
        path = self.dir / f"{order:03d}-{region_id:016x}.nvram"
        slots = self._slot_paths()
        if slots:
            os.replace(slots[0], path)  # its blocks are allocated: the writes need no room
        out = open_private(path, os.O_WRONLY | os.O_CREAT)
        try:
            for pos, chunk in _chunks(fd, size, lambda pos: OSError(
                    f"region {region_id:#x} ended at {pos} of {size} bytes")):
                pwrite_all(out, chunk, pos)
            os.ftruncate(out, size)
            os.fsync(out)
        except BaseException:
            os.close(out)
            raise
        os.close(out)
        return path

    def load(self) -> tuple[list[Loaded], list[tuple[Path, str]]]:
        """Every saved region, into a fresh sealed memfd, in chain order; and the files set
        aside (renamed .bad) with the reason."""
        loaded: list[Loaded] = []
        bad: list[tuple[Path, str]] = []
        if not self.dir.is_dir():
            return loaded, bad
        for path in self.saved():
            rid = int(_SAVED.match(path.name).group(2), 16)  # type: ignore[union-attr]
            try:
                fd, owner, size = self._load_one(path, rid)
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with it: set aside
                aside = path.with_suffix(".bad")
                os.replace(path, aside)
                bad.append((aside, str(exc)))
                continue
            loaded.append(Loaded(rid, owner, fd, size, path))
        return loaded, bad

    def _load_one(self, path: Path, rid: int) -> tuple[int, int, int]:
        src = open_private(path, os.O_RDONLY)
        try:
            size = os.fstat(src).st_size
            if size != self.region_size:
                raise ValueError(f"{size} bytes, not the cluster's {self.region_size}-byte regions")
            fd = shm.allocate(f"vmemu-destaged-{rid:x}", size)
            try:
                m = shm.map_read_write(fd, size)
                try:
                    for pos, chunk in _chunks(src, size, lambda pos: ValueError(
                            f"ends at {pos} of {size} bytes")):
                        m[pos:pos + len(chunk)] = chunk
                    hdr = RegionHeader.read(m)
                finally:
                    m.close()
                if hdr.region_id != rid:
                    raise ValueError(f"holds region {hdr.region_id:#x}, not {rid:#x}")
                shm.seal(fd, read_only=True)
            except BaseException:
                os.close(fd)
                raise
            return fd, hdr.node_index, size
        finally:
            os.close(src)

    def release(self, path: Path) -> None:
        """A loaded region was replayed and made durable: its file becomes a free slot."""
        if not path.exists():
            return
        n = 1
        while (self.dir / f"slot{n}").exists():
            n += 1
        if len(self._slot_paths()) < self.slots:
            os.replace(path, self.dir / f"slot{n}")
        else:
            path.unlink()


class Keeper:
    """Domain 0's side of destaging: restore at boot, keep at stop, free after replay.

    `final_durable` collects the identities whose server reported a successful final CP
    (domains/guest.py `shutdown`); at stop, every region in the chain of any other identity
    is destaged, in chain order.
    """

    def __init__(self, destage: Destage, broker: Any, coord: Any, emit: Any) -> None:
        self.destage = destage
        self.broker = broker
        self.coord = coord
        self.emit = emit
        self.restored: dict[int, Path] = {}  # region -> its file, until replayed and freed
        self.final_durable: set[int] = set()
        self.kept: list[dict[str, Any]] = []

    def restore(self) -> None:
        """Before any domain starts: saved regions into memfds, at the head of every chain."""
        loaded, bad = self.destage.load()
        for path, why in bad:
            self.emit("nvram_restore_failed", "hypervisor", file=str(path), reason=why,
                      data_loss="the writes in that region cannot be replayed")
        for r in loaded:
            self.broker.hold_restored(r.region_id, r.owner, r.fd, r.size)
            for ident in self.coord.identities.values():
                ident.chain.append(r.region_id)
            self.coord.dead_regions.add(r.region_id)
            self.restored[r.region_id] = r.path
            self.emit("nvram_restored", "hypervisor", region=f"{r.region_id:#x}",
                      owner=f"node{r.owner}", file=str(r.path))
        try:
            self.destage.reserve()
        except OSError as exc:
            self.emit("nvram_reserve_failed", "hypervisor", dir=str(self.destage.dir),
                      error=exc.strerror or str(exc),
                      effect="a final CP that fails at `down` may find no room to keep NVRAM")

    def freed(self, region_id: int) -> None:
        path = self.restored.pop(region_id, None)
        if path is not None:
            try:
                self.destage.release(path)
            except OSError as exc:
                self.emit("nvram_release_failed", "hypervisor", file=str(path),
                          error=exc.strerror or str(exc))

    def keep_unsaved(self) -> list[dict[str, Any]]:
        """At stop: destage what is not durable. Raises OSError if it cannot be written."""
        order: list[int] = []
        for ident in sorted(self.coord.identities.values(), key=lambda i: i.index):
            if ident.index in self.final_durable:
                continue
            for r in ident.chain:
                if r not in order and r in self.broker.held:
                    order.append(r)
        kept = []
        for n, r in enumerate(order):
            held = self.broker.held[r]
            path = self.destage.save(n, r, held.fd, held.size)
            owner = self.broker.grants.regions[r].owner if r in self.broker.grants.regions else 0
            idents = sorted(i.index for i in self.coord.identities.values()
                            if r in i.chain and i.index not in self.final_durable)
            kept.append({"region": f"{r:#x}", "owner": f"node{owner}", "file": str(path),
                         "identities": [f"node{i}" for i in idents]})
            self.emit("nvram_kept", "hypervisor", region=f"{r:#x}", owner=f"node{owner}",
                      file=str(path), identities=[f"node{i}" for i in idents])
        for r in list(self.restored):
            if r not in order:
                self.freed(r)  # replayed and durable by now: the file becomes a slot again
        self.kept = kept
        return kept
