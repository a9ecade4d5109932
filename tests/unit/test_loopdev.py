"""Loop-device disks: attach/detach bookkeeping, crash cleanup, and Disk I/O on /dev/loopN.

Every test works on images under its own tmp_path and only ever detaches devices backed by
those images (found by backing file, verified by inode), so it is safe under pytest-xdist
next to other tests -- and other users -- attaching loop devices at the same time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import loopdev
from storage.disk import HEADER, Disk, disk_path, open_path, stamp_epoch
from vmemu.errors import BadRequest, Fenced, InvalidState

SIZE = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _cleanup(data_dir: Path) -> None:
    """Detach whatever this test left: only devices whose backing file is under its dir."""
    try:
        loopdev.detach_all(data_dir)
    except Exception:
        pass
    for dev in loopdev.leaked(data_dir):
        try:
            loopdev.detach(dev)
        except Exception:
            pass


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    ok, reason = loopdev.available()
    if not ok:
        pytest.skip(f"loop devices unavailable: {reason}")
    d = tmp_path / "data"
    d.mkdir()
    try:
        yield d
    finally:
        _cleanup(d)


def make_disk(data_dir: Path, node: int = 1, disk: int = 0, size: int = SIZE) -> Path:
    p = disk_path(data_dir, node, disk)
    Disk.create(p, node, disk, size)
    return p


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def released(data_dir: Path, timeout: float = 10.0) -> list[str]:
    """leaked(data_dir) once it is empty, or as it is at the timeout.

    The kernel frees an autoclear device at its last close, and anyone's `losetup --find` may
    hold any bound device open for a moment (it looks for overlaps), so the release can lag.
    """
    deadline = time.monotonic() + timeout
    while (left := loopdev.leaked(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


# -- availability -------------------------------------------------------------------------------
def test_available_answers_a_bool_and_a_reason() -> None:
    ok, reason = loopdev.available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert (reason == "") == ok
    assert "\n" not in reason
    assert loopdev.available() == (ok, reason)  # cached


# -- attach / resolve / detach ------------------------------------------------------------------
def test_attach_records_the_image_and_open_path_resolves_to_the_device(data_dir: Path) -> None:
    img = make_disk(data_dir)
    assert open_path(data_dir, 1, 0) == img  # not attached: the image
    dev = loopdev.attach(img)
    assert open_path(data_dir, 1, 0) == Path(dev)
    assert loopdev.resolve(img) == Path(dev)
    assert loopdev.attach(img) == dev  # idempotent: no second device
    assert loopdev.attached(data_dir) == {str(img.resolve()): dev}
    assert loopdev.leaked(data_dir) == [dev]
    entry = json.loads((data_dir / loopdev.LOOPS_FILE).read_text())["loops"][str(img.resolve())]
    st = img.stat()
    assert entry == {"dev": dev, "st_dev": st.st_dev, "st_ino": st.st_ino}
    assert loopdev.detach(dev) is True
    assert loopdev.leaked(data_dir) == []
    assert loopdev.attached(data_dir) == {}
    assert open_path(data_dir, 1, 0) == img
    assert not (data_dir / loopdev.LOOPS_FILE).exists()  # the entry went with the device


def test_write_through_the_device_reads_back_from_the_image_after_detach(data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    disk = Disk.open(open_path(data_dir, 1, 0), 0)
    try:
        assert disk.path == Path(dev) and (disk.node_index, disk.size) == (1, SIZE)
        disk.write(0, pattern(4 * 4096, 1))         # aligned: O_DIRECT
        disk.write(3 * 4096 + 100, b"unaligned")    # buffered, overlapping the direct write
        disk.write(SIZE - 4096, pattern(4096, 2))   # the last page of the device
        disk.set_applied({7: 3})
        disk.sync()
    finally:
        disk.close()
    assert loopdev.detach_all(data_dir) == [dev]
    assert loopdev.leaked(data_dir) == []
    raw = img.read_bytes()
    want = bytearray(pattern(4 * 4096, 1))
    want[3 * 4096 + 100:3 * 4096 + 109] = b"unaligned"
    assert raw[HEADER:HEADER + 4 * 4096] == bytes(want)
    assert raw[HEADER + SIZE - 4096:] == pattern(4096, 2)
    reopened = Disk.open(img, 0)  # as a plain file again
    try:
        assert reopened.applied() == {7: 3}
        assert reopened.read(3 * 4096 + 100, 9) == b"unaligned"
    finally:
        reopened.close()


def test_direct_io_for_aligned_pages_stays_coherent_with_buffered_io(data_dir: Path) -> None:
    img = make_disk(data_dir)
    loopdev.attach(img)
    disk = Disk.open(open_path(data_dir, 1, 0), 0)
    try:
        assert disk.direct_fd is not None
        assert fd_flags(disk.direct_fd) & os.O_DIRECT
        assert not fd_flags(disk.fd) & os.O_DIRECT  # replay and header stay buffered
        os.pwrite(disk.fd, b"replayed", HEADER + 8192)  # what replay.write_plan does
        assert disk.read(8192, 4096)[:8] == b"replayed"  # a direct read sees the cached write
        disk.write(8192, pattern(4096, 5))
        assert os.pread(disk.fd, 4096, HEADER + 8192) == pattern(4096, 5)
        arr = disk.data_array()  # a shared mapping of the device works too
        arr[0:4] = list(b"mmap")
        arr.flush()
        assert disk.read(0, 4096)[:4] == b"mmap"
        del arr
    finally:
        disk.close()
    plain = Disk.open(open_path(data_dir, 1, 0), 0, direct=False)
    try:
        assert plain.direct_fd is None
        assert plain.read(8192, 4096) == pattern(4096, 5)
    finally:
        plain.close()


def test_epoch_fencing_works_on_the_device_whichever_path_stamps_it(data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    holder = Disk.open(Path(dev), 0)
    try:
        holder.write(0, b"before")
        assert stamp_epoch(Path(dev)) == 1
        with pytest.raises(Fenced, match="epoch 1"):
            holder.write(0, pattern(4096))
        # The image of an attached disk is stamped through its device, where the mapping is.
        assert stamp_epoch(img) == 2
        assert holder.current_epoch() == 2
        with pytest.raises(Fenced):
            Disk.open(Path(dev), 1)
        successor = Disk.open(img, 2)  # redirected to the device as well
        try:
            assert successor.path == Path(dev)
            successor.write(0, b"theirs")
            assert holder.read(0, 6) == b"theirs"
        finally:
            successor.close()
    finally:
        holder.close()


def test_detach_all_detaches_every_disk_and_leaks_nothing(data_dir: Path) -> None:
    imgs = [make_disk(data_dir, n, d) for n in (1, 2) for d in (0, 1)]
    devs = sorted((loopdev.attach(p) for p in imgs), key=lambda s: int(s[9:]))
    assert loopdev.leaked(data_dir) == devs
    assert sorted(loopdev.attached(data_dir).values()) == sorted(devs)
    assert loopdev.detach_all(data_dir) == devs
    assert loopdev.leaked(data_dir) == []
    assert loopdev.attached(data_dir) == {}
    assert loopdev.detach_all(data_dir) == []  # nothing left to do


def test_detach_all_of_a_device_still_open_is_deferred_to_its_last_close(data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    disk = Disk.open(open_path(data_dir, 1, 0), 0)
    try:
        assert loopdev.detach_all(data_dir, wait=0.2) == [dev]
        assert loopdev.leaked(data_dir) == [dev]  # still open: the kernel set autoclear
        disk.write(0, b"still works")
    finally:
        disk.close()
    assert released(data_dir) == []
    assert loopdev.detach_all(data_dir) == []  # and the kept entry is dropped now
    assert not (data_dir / loopdev.LOOPS_FILE).exists()


# -- crashes ------------------------------------------------------------------------------------
def test_after_a_kill_9_detach_all_cleans_up_the_leftovers(data_dir: Path) -> None:
    imgs = [make_disk(data_dir, 1, d) for d in (0, 1)]
    proc = spawn("""
        import sys, time
        from pathlib import Path
        from storage import loopdev
        from storage.disk import Disk
        devs = [loopdev.attach(Path(p)) for p in sys.argv[1:]]
        disk = Disk.open(Path(devs[0]), 0)   # holding it open, as a D-module would
        disk.write(0, b"crashed")
        print(" ".join(devs), flush=True)
        time.sleep(60)
    """, *map(str, imgs))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, proc.stderr.read() if proc.stderr else ""
        devs = line.split()
    finally:
        kill9(proc)
    assert sorted(loopdev.leaked(data_dir)) == sorted(devs)
    assert sorted(loopdev.attached(data_dir).values()) == sorted(devs)
    assert sorted(loopdev.detach_all(data_dir)) == sorted(devs)
    assert loopdev.leaked(data_dir) == []
    disk = Disk.open(imgs[0], 0)
    try:
        assert disk.read(0, 7) == b"crashed"
    finally:
        disk.close()


def test_a_crash_between_losetup_and_the_record_is_still_cleaned_up(data_dir: Path) -> None:
    img = make_disk(data_dir)
    # Die right after losetup attached, before the device is written into loops.json.
    proc = spawn("""
        import os, sys
        from pathlib import Path
        from storage import loopdev
        loopdev.status = lambda dev: os.kill(os.getpid(), 9)
        loopdev.attach(Path(sys.argv[1]))
    """, str(img))
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    [dev] = loopdev.leaked(data_dir)
    entry = json.loads((data_dir / loopdev.LOOPS_FILE).read_text())["loops"][str(img.resolve())]
    assert entry["dev"] is None  # only the intent made it to disk
    assert loopdev.detach_all(data_dir) == [dev]
    assert loopdev.leaked(data_dir) == []


def test_a_recorded_device_now_backing_another_file_is_left_alone(data_dir: Path,
                                                                  tmp_path: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    record = json.loads((data_dir / loopdev.LOOPS_FILE).read_text())
    # Detached behind the record's back (as autoclear would), then some other file attached.
    subprocess.run(["losetup", "--detach", dev], check=True)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    try:
        other = make_disk(other_dir)
        other_dev = loopdev.attach(other)
        record["loops"][str(img.resolve())]["dev"] = other_dev  # as if it got the same number
        (data_dir / loopdev.LOOPS_FILE).write_text(json.dumps(record))
        assert loopdev.attached(data_dir) == {}
        assert open_path(data_dir, 1, 0) == img
        assert loopdev.detach_all(data_dir) == []
        assert loopdev.leaked(other_dir) == [other_dev]  # untouched
        with pytest.raises(InvalidState, match="not attached to"):
            loopdev.detach(other_dev, image=img)
        assert loopdev.leaked(other_dir) == [other_dev]
    finally:
        _cleanup(other_dir)
    assert released(other_dir) == []


def test_hold_sets_autoclear_so_the_kernel_frees_the_device_when_holders_die(
        data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    fd = loopdev.hold(dev, img)
    st = loopdev.status(dev)
    assert st is not None and st.autoclear
    assert loopdev.leaked(data_dir) == [dev]
    os.close(fd)
    assert released(data_dir) == []
    img2 = make_disk(data_dir, 2, 0)
    proc = spawn("""
        import sys, time
        from pathlib import Path
        from storage import loopdev
        dev = loopdev.attach(Path(sys.argv[1]))
        fd = loopdev.hold(dev)
        print(dev, flush=True)
        time.sleep(60)
    """, str(img2))
    try:
        dev2 = proc.stdout.readline().strip() if proc.stdout else ""
        assert dev2, proc.stderr.read() if proc.stderr else ""
        assert dev2 in loopdev.leaked(data_dir)
    finally:
        kill9(proc)
    assert released(data_dir) == []  # no detach_all needed
    assert loopdev.detach_all(data_dir) == []  # and the stale record is just dropped


# -- bad inputs ---------------------------------------------------------------------------------
def test_attach_of_a_missing_odd_or_irregular_image_is_refused_and_changes_nothing(
        data_dir: Path) -> None:
    with pytest.raises(BadRequest, match="no such disk image"):
        loopdev.attach(data_dir / "node1" / "disk0.img")
    odd = data_dir / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(BadRequest, match="multiple of 512"):
        loopdev.attach(odd)
    with pytest.raises(BadRequest, match="not a regular file"):
        loopdev.attach(data_dir)
    assert loopdev.leaked(data_dir) == []
    assert sorted(os.listdir(data_dir)) == ["odd.img"]  # no loops.json, no lock file


def test_detach_of_an_unknown_device_is_refused_and_changes_nothing(data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    before = (data_dir / loopdev.LOOPS_FILE).read_text()
    with pytest.raises(BadRequest, match="not a loop device"):
        loopdev.detach("/dev/sda")
    with pytest.raises(BadRequest, match="not a loop device"):
        loopdev.detach(str(img))
    with pytest.raises(InvalidState, match="not an attached loop device"):
        loopdev.detach("/dev/loop987654")  # no such device: never someone else's
    with pytest.raises(InvalidState, match="not an attached loop device"):
        loopdev.hold("/dev/loop987654")
    with pytest.raises(BadRequest, match="no such disk image"):
        loopdev.detach(dev, image=data_dir / "missing.img")
    assert loopdev.leaked(data_dir) == [dev]
    assert (data_dir / loopdev.LOOPS_FILE).read_text() == before


def test_damaged_loops_json_is_reported_not_forgotten(data_dir: Path) -> None:
    img = make_disk(data_dir)
    dev = loopdev.attach(img)
    (data_dir / loopdev.LOOPS_FILE).write_text("{not json")
    with pytest.raises(InvalidState, match="damaged"):
        loopdev.detach_all(data_dir)
    assert loopdev.leaked(data_dir) == [dev]
