"""NVRAM regions: memfd-backed shared memory with kernel-enforced read-only grants.

Why memfd and not `multiprocessing.shared_memory`: a named /dev/shm segment can be reopened
read-write by any process of the same user, and the resource tracker unlinks it when its creator
dies, which is the opposite of NVRAM. A memfd has no name to guess (a domain can map only a
descriptor it was handed), lives as long as any holder keeps it (the hypervisor, playing the
battery), and can be sealed: after F_SEAL_FUTURE_WRITE the owner's existing writable mapping keeps
working while every later writable mapping or write, by anyone, fails with EPERM from the kernel.

Seal order, whoever allocates (the guest itself, or the mediator domain with
`--nvram-placement mediator`): allocate, map read-write and format, and only then seal. With a
mediator the guest receives the unsealed descriptor from Domain 0, maps it read-write, and seals
it itself before registering it; the mediator has dropped its own mapping before the handover,
so the owner's mapping is the only writable one that can ever exist.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

# Not exported by Python's fcntl module (Linux uapi values).
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010

READ_ONLY_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL
RESIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


def allocate(name: str, size: int) -> int:
    """A fresh zero-filled memfd of `size` bytes, its pages reserved now.

    Reserving with posix_fallocate turns a full tmpfs into an error here, at boot, instead of a
    SIGBUS in the middle of an acknowledged write.
    """
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def seal(fd: int, read_only: bool) -> None:
    """Freeze the size; with read_only, also forbid every future writable mapping or write."""
    fcntl.fcntl(fd, F_ADD_SEALS, READ_ONLY_SEALS if read_only else RESIZE_SEALS)


def seals(fd: int) -> int:
    return fcntl.fcntl(fd, F_GET_SEALS)


def is_write_sealed(fd: int) -> bool:
    return bool(seals(fd) & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE))


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino): the same for every descriptor of one region, different between regions.

    How Domain 0 checks that the descriptor a guest registers is the very region the mediator
    allocated for it, not one the guest made up.
    """
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def size_of(fd: int) -> int:
    return os.fstat(fd).st_size


def reopen_read_only(fd: int) -> int:
    """A second descriptor of the same memory, opened O_RDONLY.

    Handed to read-only grantees: mmap(PROT_WRITE, MAP_SHARED) of an O_RDONLY descriptor is
    refused by the kernel (EACCES) even where the region itself is not sealed.
    """
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def map_read_write(fd: int, size: int | None = None) -> mmap.mmap:
    return mmap.mmap(fd, size or size_of(fd), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def map_read_only(fd: int, size: int | None = None) -> mmap.mmap:
    return mmap.mmap(fd, size or size_of(fd), mmap.MAP_SHARED, mmap.PROT_READ)


def try_map_writable(fd: int) -> OSError | None:
    """Attempt a writable shared mapping; return the kernel's refusal, or None if it succeeded."""
    try:
        m = map_read_write(fd)
    except OSError as exc:
        return exc
    m.close()
    return None


def refused(exc: OSError | None) -> bool:
    return exc is not None and exc.errno in (errno.EPERM, errno.EACCES)
