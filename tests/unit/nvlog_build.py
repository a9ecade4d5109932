"""Build NVLog log areas for tests, independently of the real writer.

Packs records straight from ``nvlog_format`` with ``google_crc32c`` (not our own crc), so
the replay tests do not trust the code they test.
"""

from __future__ import annotations

import google_crc32c

from storage.nvlog_format import (
    CRC_SIZE,
    FLAG_WRITE,
    RECORD_MAGIC,
    RECORD_STRUCT,
    RECORD_VERSION,
    record_size,
)

Record = tuple[int, int, bytes, int, int]  # lun, offset, payload, client, request


def pack_record(
    lun: int, offset: int, payload: bytes, client: int, request: int, generation: int, seq: int
) -> bytes:
    """One record, crc and zero padding included."""
    header = RECORD_STRUCT.pack(
        RECORD_MAGIC,
        RECORD_VERSION,
        FLAG_WRITE,
        generation & 0xFFFFFFFF,
        len(payload),
        seq,
        lun,
        0,
        offset,
        client,
        request,
    )
    body = header + bytes(payload)
    crc = google_crc32c.value(body).to_bytes(CRC_SIZE, "little")
    raw = body + crc
    return raw + bytes(record_size(len(payload)) - len(raw))


def build_log(
    records: list[Record], generation: int, base_seq: int, capacity: int
) -> bytearray:
    """A zero-filled log area of `capacity` bytes holding `records` from position 0."""
    log = bytearray(capacity)
    pos = 0
    for i, (lun, offset, payload, client, request) in enumerate(records):
        rec = pack_record(lun, offset, payload, client, request, generation, base_seq + i)
        if pos + len(rec) > capacity:
            raise ValueError(f"record {i} does not fit in a {capacity}-byte log")
        log[pos : pos + len(rec)] = rec
        pos += len(rec)
    return log


def record_positions(records: list[Record]) -> list[int]:
    """Byte position of each record in a log built by `build_log` (plus the end)."""
    out = [0]
    for _, _, payload, _, _ in records:
        out.append(out[-1] + record_size(len(payload)))
    return out

