"""Errors the WAFL-like file system reports (all VmemuError subclasses, each with a code)."""

from __future__ import annotations

from vmemu.errors import VmemuError


class WaflError(VmemuError):
    code = "wafl_error"


class WaflChecksumError(WaflError):
    """A block read back does not match the crc32c its parent pointer recorded."""

    code = "wafl_checksum"

    def __init__(self, block: int, expected: int, actual: int, what: str = "block") -> None:
        super().__init__(
            f"checksum mismatch on {what} {block}: expected crc32c {expected:#010x}, "
            f"read {actual:#010x} (silent corruption)"
        )
        self.block = block
        self.expected = expected
        self.actual = actual


class WaflNoRoot(WaflError):
    """Neither fsinfo copy is valid: the device holds no (intact) file system."""

    code = "wafl_no_root"


class WaflNoSpace(WaflError):
    code = "wafl_no_space"


class WaflNotFound(WaflError):
    code = "wafl_not_found"


class WaflExists(WaflError):
    code = "wafl_exists"


class WaflInvalid(WaflError):
    code = "wafl_invalid"


class WaflDead(WaflError):
    """The in-memory file system crashed (fault injection); remount from the device."""

    code = "wafl_dead"


class WaflCrash(WaflError):
    """Injected crash during a consistency point (fault injection only).

    ``fsinfo_written`` tells whether the new fsinfo reached the device before the crash.
    """

    code = "wafl_crash"

    def __init__(self, writes: int, fsinfo_written: bool) -> None:
        super().__init__(f"injected crash after block write {writes} of the consistency point")
        self.writes = writes
        self.fsinfo_written = fsinfo_written
