"""Replicated management database (RDB + VLDB): one SQLite replica per domain, one sequencer.

`replica.Replica` is one node's copy; `sequencer.Sequencer` orders changes; `sequencer.elect`
and `sequencer.sync` are the failover and catch-up rules; `cluster_model.ClusterModel` runs
N replicas in one process for tests. See `sequencer.py` for the design rules.
"""

from vmemu.rdb.errors import (
    AlreadyExists, LogDiverged, NotEmpty, OutcomeUnknown, SequenceGap, UnknownRdbNode,
    UnknownVolume,
)
from vmemu.rdb.replica import OPS, Entry, Replica
from vmemu.rdb.sequencer import CatchUp, Sequencer, elect, sync

__all__ = [
    "OPS", "AlreadyExists", "CatchUp", "Entry", "LogDiverged", "NotEmpty", "OutcomeUnknown",
    "Replica", "SequenceGap", "Sequencer", "UnknownRdbNode", "UnknownVolume", "elect", "sync",
]
