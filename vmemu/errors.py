"""Typed errors with stable codes.

Errors cross the bus as data (`{"code", "message"}`) and become one clear CLI line, so every
failure a user can cause has a code here and a message that says what to do about it.
"""

from __future__ import annotations


class VmemuError(Exception):
    """Base of every error vmemu reports on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(VmemuError):
    code = "bad_request"


class BadFrame(VmemuError):
    code = "bad_frame"


class OutOfRange(VmemuError):
    code = "out_of_range"


class UnknownLun(VmemuError):
    code = "unknown_lun"


class UnknownNode(VmemuError):
    code = "unknown_node"


class NotGranted(VmemuError):
    code = "not_granted"


class Fenced(VmemuError):
    code = "fenced"


class Unavailable(VmemuError):
    code = "unavailable"


class Timeout(VmemuError):
    code = "timeout"


class NotRunning(VmemuError):
    code = "not_running"


class DataDirInUse(VmemuError):
    code = "data_dir_in_use"


class InvalidState(VmemuError):
    code = "invalid_state"


class LogFull(VmemuError):
    code = "log_full"


class NoSpace(VmemuError):
    """The NVLog is full and the consistency points that would empty it cannot write (the
    disks' file system is full, or fails writes): nothing more is acknowledged until one
    succeeds. What was acknowledged before stays in NVRAM."""

    code = "no_space"


class CorruptRegion(VmemuError, ValueError):
    """An NVRAM region whose header cannot be trusted (read back from memory another process
    wrote). Also a ValueError: the reader refuses the bytes it was given."""

    code = "corrupt_region"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class CorruptDisk(VmemuError, ValueError):
    """A disk image whose header does not parse or is out of range; the message names the file."""

    code = "corrupt_disk"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


_BY_CODE: dict[str, type[VmemuError]] = {
    cls.code: cls
    for cls in (
        VmemuError, BadRequest, BadFrame, OutOfRange, UnknownLun, UnknownNode, NotGranted,
        Fenced, Unavailable, Timeout, NotRunning, DataDirInUse, InvalidState, LogFull, NoSpace,
        CorruptRegion, CorruptDisk,
    )
}


def from_wire(err: dict) -> VmemuError:
    """Rebuild a typed error from its wire form; unknown codes keep their code and text."""
    code = str(err.get("code", "error"))
    cls = _BY_CODE.get(code) or _rdb_codes().get(code, VmemuError)
    exc = cls(str(err.get("message", "unknown error")))
    exc.code = code
    return exc


def _rdb_codes() -> dict[str, type[VmemuError]]:
    """The RDB's error codes (vmemu.rdb.errors). Imported on first use, not at the top:
    those classes subclass the ones above, so importing them here eagerly would be circular."""
    from vmemu.rdb.errors import BY_CODE

    return BY_CODE
