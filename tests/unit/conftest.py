"""Fixtures shared by the unit tests: real memfd regions and small disks, all per test.

A memfd has no name in /dev/shm; the name given to the kernel is only a label shown in
/proc/<pid>/fd, derived from the xdist worker and the test's tmp_path so two workers never
show the same one. Every descriptor a test makes through these fixtures is closed at teardown,
even when the test fails.
"""

from __future__ import annotations

import gc
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import nvlog
from storage import region as shm
from storage.disk import Disk, disk_path


def memfd_label(tmp_path: Path, tag: str) -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"vmemu-test-{worker}-{tmp_path.name}-{tag}"


class Fds:
    """Descriptors (and mappings) a test opened; closed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        self.closers: list[Callable[[], None]] = []

    def memfd(self, size: int, tag: str = "nvram") -> int:
        fd = shm.allocate(memfd_label(self.tmp_path, tag), size)
        self.fds.append(fd)
        return fd

    def track(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def map(self, m: mmap.mmap) -> mmap.mmap:
        self.maps.append(m)
        return m

    def region(self, node: int, region_id: int, size: int = 1 << 20,
               halves: bool = False) -> tuple[int, mmap.mmap]:
        """A formatted NVRAM region: (fd, read-write mapping); the D-module's is in halves."""
        fd = self.memfd(size, f"node{node}-{region_id:x}")
        buf = self.map(shm.map_read_write(fd))
        nvlog.format_region(buf, node, region_id, halves=halves)
        return fd, buf

    def close(self) -> None:
        for closer in self.closers:
            closer()
        gc.collect()  # drop numpy views of the mappings held by finished objects
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # a view still lives: the mapping goes when it does
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[Fds]:
    f = Fds(tmp_path)
    try:
        yield f
    finally:
        f.close()


DISK_SIZE = 256 * 1024


@pytest.fixture
def make_disks(tmp_path: Path) -> Callable[..., list[Path]]:
    """Create `count` disks of node `node` under tmp_path (the data dir)."""

    def make(node: int, count: int = 2, size: int = DISK_SIZE) -> list[Path]:
        paths = []
        for d in range(count):
            p = disk_path(tmp_path, node, d)
            Disk.create(p, node, d, size)
            paths.append(p)
        return paths

    return make
