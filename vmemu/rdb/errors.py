"""Typed RDB errors. All subclass existing vmemu error classes so callers that catch
BadRequest / InvalidState / UnknownNode keep working; the codes are more specific
(the lead may register them in vmemu.errors._BY_CODE; unknown codes already survive the wire)."""

from __future__ import annotations

from vmemu.errors import BadRequest, InvalidState, UnknownNode


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
