"""NVRAM regions on real memfds: the kernel, not our code, enforces read-only grants.

Only the creator-death test starts a process (a child that makes a region and is killed).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage import region as shm
from tests.unit.conftest import Fds, memfd_label

SIZE = 64 * 1024
PATTERN = bytes(range(256)) * 16


def sealed_region(fds: Fds):  # type: ignore[no-untyped-def]
    """A region the owner mapped read-write, then sealed read-only: (fd, owner's mapping)."""
    fd = fds.memfd(SIZE)
    rw = fds.map(shm.map_read_write(fd))
    shm.seal(fd, read_only=True)
    return fd, rw


def test_allocate_gives_a_zeroed_region_of_the_size_asked(fds: Fds) -> None:
    fd = fds.memfd(SIZE)
    assert shm.size_of(fd) == SIZE
    assert bytes(fds.map(shm.map_read_only(fd))) == bytes(SIZE)
    assert shm.seals(fd) == 0 and not shm.is_write_sealed(fd)


def test_allocate_creates_no_dev_shm_entry(fds: Fds, tmp_path: Path) -> None:
    label = memfd_label(tmp_path, "nvram")
    fd = fds.memfd(SIZE)
    assert not [e for e in os.listdir("/dev/shm") if label in e]
    target = os.readlink(f"/proc/self/fd/{fd}")
    assert target.startswith("/memfd:") and label in target
    assert os.fstat(fd).st_nlink == 0  # no name anywhere: only descriptors reach it


def test_sealed_region_refuses_a_new_writable_mapping_with_eperm(fds: Fds) -> None:
    fd, _ = sealed_region(fds)
    assert shm.is_write_sealed(fd)
    assert shm.seals(fd) & shm.READ_ONLY_SEALS == shm.READ_ONLY_SEALS
    exc = shm.try_map_writable(fd)
    assert exc is not None and exc.errno == errno.EPERM and shm.refused(exc)


def test_sealed_region_refuses_pwrite_and_resize(fds: Fds) -> None:
    fd, rw = sealed_region(fds)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, SIZE * 2)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, SIZE // 2)
    assert shm.size_of(fd) == SIZE and rw[0] == 0


def test_sealed_region_reopened_read_write_through_proc_still_cannot_be_written(fds: Fds) -> None:
    fd, rw = sealed_region(fds)
    again = fds.track(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
    exc = shm.try_map_writable(again)
    assert exc is not None and exc.errno == errno.EPERM
    with pytest.raises(PermissionError):
        os.pwrite(again, b"x", 0)
    assert rw[0] == 0


def test_sealing_cannot_be_undone(fds: Fds) -> None:
    fd, _ = sealed_region(fds)
    with pytest.raises(PermissionError):
        shm.seal(fd, read_only=False)  # F_SEAL_SEAL: no more seals, and none removed


def test_read_only_descriptor_cannot_be_mapped_writable_even_unsealed(fds: Fds) -> None:
    fd = fds.memfd(SIZE)
    ro = fds.track(shm.reopen_read_only(fd))
    assert not shm.is_write_sealed(fd)
    exc = shm.try_map_writable(ro)
    assert exc is not None and exc.errno == errno.EACCES and shm.refused(exc)
    with pytest.raises(OSError) as info:
        os.pwrite(ro, b"x", 0)
    assert info.value.errno == errno.EBADF
    assert shm.try_map_writable(fd) is None  # the owner's descriptor still can


def test_owner_mapping_made_before_sealing_keeps_writing_and_readers_see_it(fds: Fds) -> None:
    fd, rw = sealed_region(fds)
    ro_fd = fds.track(shm.reopen_read_only(fd))
    ro = fds.map(shm.map_read_only(ro_fd))
    rw[100:100 + len(PATTERN)] = PATTERN
    assert ro[100:100 + len(PATTERN)] == PATTERN
    rw[0:4] = b"NEW!"
    assert ro[0:4] == b"NEW!"
    assert os.pread(fd, 4, 0) == b"NEW!"


def test_read_only_mapping_cannot_be_written_from_python(fds: Fds) -> None:
    fd, _ = sealed_region(fds)
    ro = fds.map(shm.map_read_only(fd))
    with pytest.raises(TypeError):
        ro[0:1] = b"x"


def test_resize_seal_alone_keeps_the_region_writable(fds: Fds) -> None:
    fd = fds.memfd(SIZE)
    shm.seal(fd, read_only=False)  # the read-write grant option
    assert not shm.is_write_sealed(fd)
    assert shm.try_map_writable(fd) is None
    os.pwrite(fd, b"ok", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, SIZE * 2)


_CHILD = textwrap.dedent("""
    import os, socket, sys, time
    sys.path.insert(0, sys.argv[3])
    from storage import region as shm
    sock = socket.socket(fileno=int(sys.argv[1]))
    fd = shm.allocate(sys.argv[2], {size})
    m = shm.map_read_write(fd)
    m[:{n}] = bytes(range(256)) * {reps}
    shm.seal(fd, read_only=True)
    socket.send_fds(sock, [b"fd"], [fd])
    time.sleep(60)
""")


def test_region_survives_sigkill_of_its_creator_while_another_process_holds_the_fd(
        fds: Fds, tmp_path: Path) -> None:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    root = str(Path(__file__).resolve().parents[2])
    code = _CHILD.format(size=SIZE, n=len(PATTERN), reps=len(PATTERN) // 256)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(child_end.fileno()), memfd_label(tmp_path, "child"), root],
        pass_fds=[child_end.fileno()])
    child_end.close()
    try:
        parent_end.settimeout(30)
        msg, got, _, _ = socket.recv_fds(parent_end, 16, 1)
        assert msg == b"fd" and len(got) == 1
        fd = fds.track(got[0])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        parent_end.close()
    assert proc.returncode == -signal.SIGKILL
    assert shm.is_write_sealed(fd)  # it arrived sealed: we can only read it
    assert shm.try_map_writable(fd) is not None
    m = fds.map(shm.map_read_only(fd))
    assert m[:len(PATTERN)] == PATTERN
    assert m[len(PATTERN):] == bytes(SIZE - len(PATTERN))
