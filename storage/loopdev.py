"""Loop devices for `--disk-backend loop`: each disk image attached to a /dev/loopN.

With the loop backend the D-module does its I/O on the block device, so disks behave like
block devices (sector-granular, O_DIRECT-able, a page cache of their own).

Resolution (how a caller finds the path to open)
    The truth is the kernel, not a file: :func:`resolve` returns the loop device that is bound
    *right now* to this very image (same st_dev/st_ino, read back with LOOP_GET_STATUS64), else
    the image itself. ``storage.disk.open_path(data_dir, node, disk)`` is that applied to
    ``disk_path``. No symlinks: a symlink (or a record) can outlive its device, and /dev/loopN
    may since back somebody else's file.

    While an image is attached, every access must go through the device: the device has its own
    page cache (and with direct I/O the loop driver bypasses the image's), so a header stamped
    through the image would not be seen through a mapping of the device, and fencing would break.
    ``Disk.open`` and ``stamp_epoch`` therefore redirect an attached image to its device.

Bookkeeping (what `down`, and the next `up` after a crash, clean up)
    ``<data-dir>/loops.json`` maps each attached image (absolute path) to its device and the
    image's identity (st_dev, st_ino). The entry is written *before* losetup runs, with no
    device yet, so a crash between attach and record still leaves something that names the
    image. :func:`detach_all` detaches every bound loop device whose backing file has a
    recorded identity -- it matches on identity, never on the recorded device name alone, so
    a /dev/loopN reused for another file after a crash is left alone. Writers of loops.json
    hold an flock on ``<data-dir>/loops.lock`` and replace the file atomically.

Autoclear
    :func:`attach` does not set LO_FLAGS_AUTOCLEAR: with nobody holding the device open the
    kernel would free it the moment losetup closes it. A process that will hold the device for
    the cluster's life may call :func:`hold`, which opens it and sets autoclear; then the kernel
    frees the device by itself once that holder and every other opener are gone (kill -9
    included). loops.json cleanup works with or without it.

Detaching a device somebody still has open is deferred by the kernel (it sets autoclear and
frees the device at the last close); :func:`detach` reports that by returning False.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmemu.privfs import open_private, write_atomic
from vmemu.errors import BadRequest, InvalidState, Unavailable

LOOPS_FILE = "loops.json"
LOCK_FILE = "loops.lock"
SECTOR = 512

# <linux/loop.h>
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number, encrypt_type,
# encrypt_key_size, flags (u32); file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64)
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
_OFF_FLAGS = 5 * 8 + 3 * 4

_DEV_RE = re.compile(r"/dev/loop(\d+)")
_DELETED = " (deleted)"
_DETACH_WAIT_S = 3.0  # a concurrent losetup holds a device open for milliseconds

_available: tuple[bool, str] | None = None


@dataclass(frozen=True)
class Status:
    """What the kernel says a bound loop device is backed by."""

    dev: str
    backing_dev: int  # st_dev of the backing file
    backing_ino: int  # st_ino of the backing file
    flags: int

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)


# -- availability -----------------------------------------------------------------------------
def _static_reason() -> str:
    """Why loop devices certainly cannot work here ("" when they might)."""
    if os.geteuid() != 0:
        return "loop devices need root (this process is not root)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (no loop driver, or a container without loop devices)"
    if shutil.which("losetup") is None:
        return "losetup is missing (install util-linux)"
    return ""


def available() -> tuple[bool, str]:
    """(True, "") if this host can attach loop devices, else (False, a one-line reason).

    Tries one real attach of a tiny temp file (then detaches it) the first time it is called in
    a process; the answer is cached, so later calls are free.
    """
    global _available
    if _available is not None:
        return _available
    reason = _static_reason()
    if not reason:
        tmp = Path(tempfile.mkdtemp(prefix="vmemu-loop-probe-"))
        try:
            img = tmp / "probe.img"
            with open(img, "wb") as f:
                f.truncate(64 * 1024)
            try:
                dev = _losetup_attach(img, direct_io=False)
            except Unavailable as e:
                reason = f"cannot attach a loop device: {e.message}"
            else:
                _losetup_detach(dev)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _available = (not reason, reason)
    return _available


# -- kernel state ------------------------------------------------------------------------------
def _check_dev_name(dev: str) -> int:
    m = _DEV_RE.fullmatch(dev)
    if m is None:
        raise BadRequest(f"{dev!r} is not a loop device path (want /dev/loopN)")
    return int(m.group(1))


def status_of_fd(fd: int, dev: str = "?") -> Status | None:
    """LOOP_GET_STATUS64 on an open loop device: None if nothing is bound to it."""
    buf = bytearray(_INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise
    fields = _INFO64.unpack(buf)
    return Status(dev, fields[0], fields[1], fields[8])


def status(dev: str) -> Status | None:
    """The backing identity of a loop device, or None if it is not bound (or does not exist)."""
    _check_dev_name(dev)
    try:
        # An unbound device opens and answers ENXIO. Our close can complete a detach that was
        # deferred while others held the device open -- which is what that detach asked for.
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or e.errno in (errno.ENXIO, errno.ENODEV):
            return None
        raise
    try:
        return status_of_fd(fd, dev)
    finally:
        os.close(fd)


def _bound() -> Iterator[tuple[str, str]]:
    """(device, backing file path as the kernel prints it) for every bound loop device.

    Reads sysfs only, never opens a device, so scanning cannot disturb devices that other
    processes (other tests, other clusters) are using.
    """
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not bound
        yield f"/dev/{name}", backing


def _strip_deleted(backing: str) -> str:
    return backing[: -len(_DELETED)] if backing.endswith(_DELETED) else backing


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def same_file(got: Status | None, ident: tuple[int, int]) -> bool:
    """Whether a loop device's backing file has identity (st_dev, st_ino).

    The inode must match. The device must too, unless either side is an anonymous device
    (major 0: btrfs subvolumes, overlayfs), where stat's st_dev and the superblock's s_dev that
    the loop driver reports legitimately differ.
    """
    if got is None or got.backing_ino != ident[1]:
        return False
    if got.backing_dev == ident[0]:
        return True
    return os.major(got.backing_dev) == 0 or os.major(ident[0]) == 0


def _devices_backing(path: str, ident: tuple[int, int]) -> list[str]:
    """Bound loop devices whose backing file is `path` (or was, now deleted) *and* has `ident`."""
    out = []
    for dev, backing in _bound():
        if _strip_deleted(backing) == path and same_file(status(dev), ident):
            out.append(dev)
    return sorted(out, key=_dev_number)


def _dev_number(dev: str) -> int:
    m = _DEV_RE.fullmatch(dev)
    return int(m.group(1)) if m else -1


def resolve(image: Path) -> Path:
    """The loop device currently bound to `image` (verified by inode), else `image` itself."""
    image = Path(image)
    try:
        st = os.stat(image)
    except OSError:
        return image
    if not stat.S_ISREG(st.st_mode):
        return image  # already a device (or something we do not redirect)
    devs = _devices_backing(os.path.realpath(image), _identity(st))
    return Path(devs[0]) if devs else image


def verify_fd(fd: int, image: Path, dev: str = "?") -> None:
    """Raise InvalidState unless the open loop device `fd` is backed by `image`.

    For use right after opening a resolved device: an open descriptor keeps the device from
    being freed, so a check made through it cannot be raced by a detach and a reuse.
    """
    if not same_file(status_of_fd(fd, dev), _identity(os.stat(image))):
        raise InvalidState(f"{dev} is no longer attached to {image}; "
                           "it was detached (or reused) while being opened")


# -- losetup -----------------------------------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def _losetup_attach(image: Path, *, direct_io: bool) -> str:
    args = ["losetup", "--find", "--show"]
    if direct_io:
        args.append("--direct-io=on")
    r = _run([*args, str(image)])
    if r.returncode != 0 and direct_io:
        # A backing filesystem without O_DIRECT (tmpfs, some overlays) refuses direct I/O:
        # a buffered loop still makes a block device of the image.
        r = _run(["losetup", "--find", "--show", str(image)])
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise Unavailable(f"losetup could not attach {image}: "
                          f"{msg[-1] if msg else f'exit {r.returncode}'}")
    dev = r.stdout.strip()
    _check_dev_name(dev)
    return dev


def _losetup_detach(dev: str) -> None:
    r = _run(["losetup", "--detach", dev])
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise InvalidState(f"losetup could not detach {dev}: "
                           f"{msg[-1] if msg else f'exit {r.returncode}'}")


# -- loops.json --------------------------------------------------------------------------------
def default_data_dir(image: Path) -> Path:
    """The data dir an image belongs to: <data-dir>/nodeN/diskD.img, else the image's folder."""
    image = Path(os.path.realpath(image))
    if re.fullmatch(r"node\d+", image.parent.name):
        return image.parent.parent
    return image.parent


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Serialize read-modify-write of loops.json across processes (flock on loops.lock)."""
    fd = open_private(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(data_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = json.loads((data_dir / LOOPS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # Written atomically, so this is damage from outside; refuse rather than forget leaks.
        raise InvalidState(f"{data_dir / LOOPS_FILE} is damaged ({e}); detach its loop devices "
                           "by hand (`losetup -a`) and remove it") from None
    loops = raw.get("loops", {}) if isinstance(raw, dict) else {}
    return {str(k): dict(v) for k, v in loops.items() if isinstance(v, dict)}


def _save(data_dir: Path, loops: dict[str, dict[str, Any]]) -> None:
    path = data_dir / LOOPS_FILE
    if not loops:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, json.dumps({"version": 1, "loops": loops}, indent=2,
                                  sort_keys=True).encode(), sync=True)


def _ident_of(entry: dict[str, Any]) -> tuple[int, int]:
    return int(entry["st_dev"]), int(entry["st_ino"])


def _live(image: str, entry: dict[str, Any]) -> list[str]:
    """Bound devices backing the recorded image identity.

    The recorded device name is informational only: a crash may have left the entry without
    one, and after a detach elsewhere the same /dev/loopN may back a different file.
    """
    return _devices_backing(image, _ident_of(entry))


# -- public API --------------------------------------------------------------------------------
def attach(image: Path, *, direct_io: bool = True, data_dir: Path | None = None) -> str:
    """Attach `image` to a free loop device and record it; returns "/dev/loopN".

    Idempotent: an image already attached returns its device. `direct_io` asks the loop driver
    to do O_DIRECT on the image (no double caching); refused by the filesystem, it falls back
    to a buffered loop. The record goes to ``<data_dir>/loops.json``; `data_dir` defaults to
    :func:`default_data_dir`. Raises BadRequest for a missing/irregular/odd-sized image,
    Unavailable when this host cannot attach loop devices.
    """
    image = Path(os.path.realpath(image))
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise BadRequest(f"cannot attach {image}: no such disk image") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"cannot attach {image}: not a regular file")
    if st.st_size == 0 or st.st_size % SECTOR:
        # A loop device is a whole number of sectors: a tail would silently vanish.
        raise BadRequest(f"cannot attach {image}: size {st.st_size} is not a positive "
                         f"multiple of {SECTOR}")
    reason = _static_reason()
    if reason:
        raise Unavailable(reason)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(image)
    key = str(image)
    with _locked(data_dir):
        loops = _load(data_dir)
        have = _devices_backing(key, _identity(st))
        if have:
            loops[key] = {"dev": have[0], "st_dev": st.st_dev, "st_ino": st.st_ino}
            _save(data_dir, loops)
            return have[0]
        # Intent first: a crash after losetup but before the record still names the image.
        loops[key] = {"dev": None, "st_dev": st.st_dev, "st_ino": st.st_ino}
        _save(data_dir, loops)
        try:
            dev = _losetup_attach(image, direct_io=direct_io)
        except BaseException:
            loops.pop(key, None)
            _save(data_dir, loops)
            raise
        got = status(dev)
        if not same_file(got, _identity(st)):
            # Someone swapped the file under us between stat and losetup: undo, refuse.
            if got is not None:
                _losetup_detach(dev)
            loops.pop(key, None)
            _save(data_dir, loops)
            raise InvalidState(f"{image} changed while it was being attached; try again")
        loops[key]["dev"] = dev
        _save(data_dir, loops)
        return dev


def detach(dev: str, *, image: Path | None = None, wait: float = _DETACH_WAIT_S) -> bool:
    """Detach a bound loop device; True once it is free, False if the kernel deferred it.

    The kernel defers the detach of a device somebody still has open (it frees it at the last
    close); up to `wait` seconds are spent waiting for that. With `image`, refuses (InvalidState) unless the device is backed by that image.
    BadRequest for a path that is not /dev/loopN, InvalidState for a device that is not bound;
    neither changes anything. Drops the device's entry from its data dir's loops.json.
    """
    _check_dev_name(dev)
    before = status(dev)
    if before is None:
        raise InvalidState(f"{dev} is not an attached loop device")
    backing = dict(_bound()).get(dev)
    if image is not None:
        try:
            ident = _identity(os.stat(image))
        except FileNotFoundError:
            raise BadRequest(f"no such disk image {image}") from None
        if not same_file(before, ident):
            raise InvalidState(f"{dev} is not attached to {image}; left alone")
    _losetup_detach(dev)
    gone = _wait_gone(dev, before, wait)
    if backing is not None:
        _forget(_strip_deleted(backing), (before.backing_dev, before.backing_ino))
    return gone


def _wait_gone(dev: str, before: Status, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        if not same_file(status(dev), (before.backing_dev, before.backing_ino)):
            return True
        if time.monotonic() >= deadline:
            return False  # still open somewhere: freed (autoclear) at its last close
        time.sleep(0.02)


def _forget(image: str, ident: tuple[int, int]) -> None:
    """Drop `image`'s loops.json entry if it records this identity and no device backs it."""
    data_dir = default_data_dir(Path(image))
    if not (data_dir / LOOPS_FILE).exists():
        return
    try:
        with _locked(data_dir):
            loops = _load(data_dir)
            entry = loops.get(image)
            if entry is None or not same_file(Status("", *ident, 0), _ident_of(entry)):
                return
            if _live(image, entry):
                return  # deferred: keep it so detach_all can check again
            loops.pop(image)
            _save(data_dir, loops)
    except (OSError, InvalidState):
        pass  # bookkeeping only; detach_all re-derives from the kernel


def attached(data_dir: Path) -> dict[str, str]:
    """{image path: /dev/loopN} for the recorded images that are attached now (verified)."""
    data_dir = Path(os.path.realpath(data_dir))
    out = {}
    for image, entry in _load(data_dir).items():
        devs = _live(image, entry)
        if devs:
            out[image] = devs[0]
    return out


def detach_all(data_dir: Path, *, wait: float = _DETACH_WAIT_S) -> list[str]:
    """Detach every loop device this data dir attached (per loops.json, verified by inode).

    For `vmemu down`, and for `up`/`down` after a crash. Devices whose backing file is not a
    recorded image identity -- e.g. a /dev/loopN reused for another file -- are left alone.
    Returns the devices detached, including ones still open somewhere, which the kernel frees
    at their last close; their entries are kept (up to `wait` seconds are spent waiting for
    them) so that a later call checks again.
    """
    data_dir = Path(os.path.realpath(data_dir))
    if not (data_dir / LOOPS_FILE).exists():
        return []
    done: list[str] = []
    with _locked(data_dir):
        loops = _load(data_dir)
        for image, entry in loops.items():
            for dev in _live(image, entry):
                try:
                    _losetup_detach(dev)
                except InvalidState:
                    if same_file(status(dev), _ident_of(entry)):
                        raise
                    continue  # freed between the scan and losetup: nothing to do
                done.append(dev)
        # One deadline for all: anyone's `losetup --find` briefly opens every bound device (to
        # look for overlaps), which defers a release by a moment.
        deadline = time.monotonic() + wait
        pending = dict(loops)
        while True:
            pending = {i: e for i, e in pending.items() if _live(i, e)}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        _save(data_dir, pending)
    return sorted(done, key=_dev_number)


def leaked(data_dir: Path) -> list[str]:
    """Bound loop devices whose backing file is under `data_dir` (a test helper)."""
    root = os.path.realpath(data_dir).rstrip("/") + "/"
    return sorted((dev for dev, backing in _bound() if _strip_deleted(backing).startswith(root)),
                  key=_dev_number)


def hold(dev: str, image: Path | None = None) -> int:
    """Open `dev`, set LO_FLAGS_AUTOCLEAR on it, and return the descriptor.

    Keep the descriptor for as long as the device should live: once it and every other opener
    are closed (a kill -9 closes them too) the kernel frees the device by itself. With `image`,
    refuses (InvalidState) a device not backed by it.
    """
    _check_dev_name(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidState(f"{dev} is not an attached loop device") from None
    try:
        if image is not None:
            verify_fd(fd, Path(image), dev)
        buf = bytearray(_INFO64.size)
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise InvalidState(f"{dev} is not an attached loop device") from None
            raise
        flags = struct.unpack_from("=I", buf, _OFF_FLAGS)[0]
        struct.pack_into("=I", buf, _OFF_FLAGS, flags | LO_FLAGS_AUTOCLEAR)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(buf))
    except BaseException:
        os.close(fd)
        raise
    return fd
