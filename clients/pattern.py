"""Self-describing write payloads: every block says which write put it there.

A payload of `length` bytes starts with a 32-byte tag (magic, client id, request id, offset)
and is filled with bytes derived from that tag. Reading a block back tells which write is on
the disk, and whether its bytes are intact, without storing any data in the journal.
"""

from __future__ import annotations

import random
import struct

MAGIC = b"VMEMUPAT"
_TAG = struct.Struct("<8sQQQ")
TAG = _TAG.size


def make(client: int, request: int, offset: int, length: int) -> bytes:
    tag = _TAG.pack(MAGIC, client, request, offset)
    body = random.Random(client * 1_000_003 + request).randbytes(length - TAG)
    return tag + body


def identify(data: bytes) -> tuple[int, int, int] | None:
    """(client, request, offset) of the write that produced `data`, or None if untagged."""
    if len(data) < TAG:
        return None
    magic, client, request, offset = _TAG.unpack_from(data)
    if magic != MAGIC:
        return None
    return client, request, offset


def intact(data: bytes) -> bool:
    ident = identify(data)
    return ident is not None and make(ident[0], ident[1], ident[2], len(data)) == data
