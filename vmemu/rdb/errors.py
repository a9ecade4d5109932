"""Typed RDB errors. All subclass existing vmemu error classes so callers that catch
BadRequest / InvalidState / UnknownNode keep working; the codes are more specific
(vmemu.errors.from_wire knows their codes, so they cross the bus as these classes)."""

from __future__ import annotations

from vmemu.errors import BadRequest, InvalidState, Unavailable, UnknownNode, VmemuError


class UnknownVolume(BadRequest):
    code = "unknown_volume"


class UnknownRdbNode(UnknownNode):
    """A change names a node the RDB does not know (code stays `unknown_node`)."""


class AlreadyExists(BadRequest):
    code = "already_exists"


class NotEmpty(InvalidState):
    """Deleting something that still has dependents (a volume with LUNs, a node owning volumes)."""
    code = "not_empty"


class SequenceGap(InvalidState):
    """A change arrived out of order: its seq is not last_seq + 1."""
    code = "sequence_gap"


class LogDiverged(InvalidState):
    """The same seq holds a different change here than in the entry offered."""
    code = "log_diverged"


class OutcomeUnknown(Unavailable):
    """A change may or may not have been made: its sequencer went away before every live
    replica confirmed it (sequencer rule 4). Re-read before retrying; never blindly re-send."""
    code = "outcome_unknown"


# Every RDB error with a code of its own; vmemu.errors.from_wire looks codes up here.
BY_CODE: dict[str, type[VmemuError]] = {
    cls.code: cls
    for cls in (UnknownVolume, AlreadyExists, NotEmpty, SequenceGap, LogDiverged, OutcomeUnknown)
}
