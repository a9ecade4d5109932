"""Build NVLog log areas for tests, independently of the real writer.

Packs records straight from ``nvlog_format`` with ``google_crc32c`` (not our own crc), so
the replay tests do not trust the code they test. Records are raw version-2 records by
default; a per-record `compress` choice stores a payload as an lz4 block (always, even where
it does not save: readers must not care), and ``version=1`` builds a pre-lz4 log.
"""

from __future__ import annotations

from collections.abc import Sequence

import google_crc32c
import lz4.block

from storage.nvlog_format import (
    CRC_SIZE,
    FLAG_LZ4,
    FLAG_WRITE,
    RECORD_MAGIC,
    RECORD_STRUCT,
    RECORD_VERSION,
    RECORD_VERSION_V1,
    record_size,
)

Record = tuple[int, int, bytes, int, int]  # lun, offset, payload, client, request


def stored_form(payload: bytes, compress: bool) -> tuple[bytes, int]:
    """(the bytes a record stores, its flags) for `payload`."""
    if compress:
        return lz4.block.compress(bytes(payload), store_size=False), FLAG_WRITE | FLAG_LZ4
    return bytes(payload), FLAG_WRITE


def pack_raw(
    lun: int, offset: int, stored: bytes, length: int, flags: int, client: int, request: int,
    generation: int, seq: int, version: int = RECORD_VERSION,
) -> bytes:
    """One record with exactly these fields (a valid crc over whatever they say)."""
    header = RECORD_STRUCT.pack(
        RECORD_MAGIC,
        version,
        flags,
        generation & 0xFFFFFFFF,
        length,
        seq,
        lun,
        len(stored) if version != RECORD_VERSION_V1 else 0,
        offset,
        client,
        request,
    )
    body = header + bytes(stored)
    crc = google_crc32c.value(body).to_bytes(CRC_SIZE, "little")
    raw = body + crc
    return raw + bytes(record_size(len(stored)) - len(raw))


def pack_record(
    lun: int, offset: int, payload: bytes, client: int, request: int, generation: int, seq: int,
    compress: bool = False, version: int = RECORD_VERSION,
) -> bytes:
    """One record, crc and zero padding included."""
    stored, flags = stored_form(payload, compress)
    return pack_raw(lun, offset, stored, len(payload), flags, client, request, generation, seq,
                    version)


def _compress_of(records: list[Record], compress: Sequence[bool] | None) -> list[bool]:
    return list(compress) if compress is not None else [False] * len(records)


def build_log(
    records: list[Record], generation: int, base_seq: int, capacity: int,
    compress: Sequence[bool] | None = None, version: int = RECORD_VERSION,
) -> bytearray:
    """A zero-filled log area of `capacity` bytes holding `records` from position 0."""
    log = bytearray(capacity)
    pos = 0
    for i, ((lun, offset, payload, client, request), c) in enumerate(
        zip(records, _compress_of(records, compress))
    ):
        rec = pack_record(lun, offset, payload, client, request, generation, base_seq + i, c,
                          version)
        if pos + len(rec) > capacity:
            raise ValueError(f"record {i} does not fit in a {capacity}-byte log")
        log[pos : pos + len(rec)] = rec
        pos += len(rec)
    return log


def record_positions(records: list[Record], compress: Sequence[bool] | None = None) -> list[int]:
    """Byte position of each record in a log built by `build_log` (plus the end)."""
    out = [0]
    for (_, _, payload, _, _), c in zip(records, _compress_of(records, compress)):
        out.append(out[-1] + record_size(len(stored_form(payload, c)[0])))
    return out
