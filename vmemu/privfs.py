"""Private files: what vmemu writes is readable by the cluster's user alone.

The data dir holds disk images (every LUN's data), the RDB, event and metrics logs and the
sockets of the run dir; another user of the host must read none of it and plant nothing in it.
So every vmemu process runs with umask 077 (directories 0700, files 0600), a data dir that
belongs to someone else or that others may write into is refused, and files with fixed names
are opened without following symlinks or are made by an atomic rename of a private temp file
(a fixed temp name is a symlink-planting target).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from vmemu.errors import BadRequest

UMASK = 0o077


def set_umask() -> None:
    """Every vmemu process calls this first: whatever it creates is its user's alone."""
    os.umask(UMASK)


def ensure_private_dir(path: Path, what: str = "data dir") -> Path:
    """Create `path` (0700) if needed; refuse it, in one line, if it is not ours to keep private.

    Refused: a symlink, not a directory, owned by another user, writable by group or others
    (anyone could plant a file there). Tightened: read or search bits for others on a
    directory that is ours (e.g. made 0755 by an older vmemu) are dropped, since the disk
    images inside would otherwise be one `ls` away from everyone.
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or dangling symlink by that name: the checks below say which
    except OSError as exc:
        raise BadRequest(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise BadRequest(f"cannot use {what} {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BadRequest(f"{what} {path} is a symlink; give its real path")
    if not stat.S_ISDIR(st.st_mode):
        raise BadRequest(f"{what} {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise BadRequest(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid "
                         f"{os.geteuid()}); choose a directory of your own")
    if st.st_mode & 0o022:
        raise BadRequest(f"{what} {path} is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); use a private directory "
                         "(chmod 700) or choose another")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a symlink at the last component, and creates files 0600."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_atomic(path: Path, data: bytes, sync: bool = False) -> None:
    """Replace `path` with `data` in one step: a private temp file beside it, then rename.

    The temp file has a random name (mkstemp: O_EXCL, 0600), so nothing planted in advance
    can be followed; a reader sees the old file or the new one, never half of one.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class LossyStream:
    """A process's stdout/stderr (its log file) that never raises: a line that cannot be
    written (the disk is full) is dropped and counted. A domain reports a problem by
    printing it; the report must not become a second, fatal, problem."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            self.dropped += 1
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def lossy_stdio() -> None:
    """stdout and stderr of this process as LossyStreams (each vmemu process calls it first)."""
    if not isinstance(sys.stdout, LossyStream):
        sys.stdout = LossyStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, LossyStream):
        sys.stderr = LossyStream(sys.stderr)  # type: ignore[assignment]
