"""The NVRAM region and NVLog record formats, declared once.

Region (one per domain incarnation, a memfd; all integers little endian)::

    offset  size  field
    0       8     magic        b"VMNVRAM1"
    8       4     version      REGION_VERSION
    12      4     node_index   owner's node number (1-based)
    16      8     region_id    unique per incarnation (random 63-bit)
    24      8     capacity     bytes of log area
    32      8     generation   current log generation (bumped by every log reset)
    40      8     base_seq     sequence number of the first record of this generation
    48      8     tail         bytes of log area in use (advisory: readers scan, never trust it)
    56      ...   reserved up to REGION_HEADER (4096)
    4096    capacity  log area: records, back to back, 8-byte aligned

Record (RECORD_HEADER bytes, payload, then crc32c over header+payload)::

    offset  size  field
    0       4     magic        RECORD_MAGIC
    4       2     version      RECORD_VERSION (readers also take RECORD_VERSION_V1)
    6       2     flags        FLAG_* (FLAG_LZ4 is a bit or-ed into the others)
    8       4     generation   must equal the region's generation
    12      4     length       LOGICAL payload bytes: what the record writes on its disk
    16      8     seq          must be base_seq for the first record, then +1 each
    24      4     lun          global LUN id (node_index << 16 | lun_index)
    28      4     stored       payload bytes in the log (v1: pad, always 0; read as `length`)
    32      8     offset       byte offset in the LUN
    40      8     client       client id (exactly-once table)
    48      8     request      client request id
    56      stored  payload    the data; with FLAG_LZ4 one lz4 block (no size prefix)
                               that decompresses to exactly `length` bytes
    56+st   4     crc32c       over bytes [0, 56+stored)
    ...           zero pad to a multiple of 8

A record walks and verifies on `stored` alone, so a scan never decompresses. Without
FLAG_LZ4 `stored` must equal `length`. FLAG_LZ4 is only valid in a version-2 record.

A reader stops at the first record with a bad magic, version, generation, sequence,
stored size or checksum: everything before it is what was acknowledged (the writer
acknowledges only after the whole record, checksum included, is in the region). Where it
stops is then compared with the header's tail: short of it, the record there was corrupted
after the writer finished it, and what follows is reported lost (storage/nvlog_check.py). A record
that verifies but whose lz4 block does not decompress to `length` bytes cannot come from
the writer; it does not end the log (what follows was acknowledged), it is a *bad* record,
skipped and counted like one that falls outside its disk.

Version 2 (lz4) gave the v1 pad its meaning; a v1 record (pad 0, never compressed) reads
as before, so logs written before the change still replay.
"""

from __future__ import annotations

import struct

REGION_MAGIC = b"VMNVRAM1"
REGION_VERSION = 1
# Version 2: the log area is used in two halves (while a CP flushes one, writes go to the
# other). Half 0 keeps the version-1 fields (generation, base_seq, tail at 32/40/48); half 1
# has its own three at 56/64/72. Each half is capacity // 2 rounded down to 8 bytes; half 1
# starts right after half 0.
REGION_VERSION_HALVES = 2
HALF_FIELDS = ((32, 40, 48), (56, 64, 72))  # (generation, base_seq, tail) per half
HALF_HEADER_END = 80
REGION_HEADER = 4096
REGION_STRUCT = struct.Struct("<8sIIQQQQQ")  # magic, version, node, region_id, capacity, gen, base_seq, tail
OFF_GENERATION = 32
OFF_BASE_SEQ = 40
OFF_TAIL = 48

RECORD_MAGIC = 0x474F4C4E  # "NLOG" little endian
RECORD_VERSION = 2  # written; 2 = the `stored` field at offset 28 (lz4 payloads)
RECORD_VERSION_V1 = 1  # still read: `stored` was pad, the payload is `length` raw bytes
# magic, version, flags, generation, length, seq, lun, stored, offset, client, request
RECORD_STRUCT = struct.Struct("<IHHIIQIIQQQ")
OFF_FLAGS = 6
OFF_LENGTH = 12
OFF_STORED = 28
RECORD_HEADER = RECORD_STRUCT.size  # 56
CRC_SIZE = 4
ALIGN = 8

FLAG_WRITE = 0
FLAG_ZERO = 1  # payload empty: write `offset..offset+pad` as zeros (reserved for later protocols)
FLAG_DEDUP = 2  # payload: (client u64, request u64) pairs of the exactly-once table
FLAG_LZ4 = 4  # payload is one lz4 block of `stored` bytes; decompressed it is `length` bytes

# An lz4 block expands at most ~255x (a 15-bit token run plus 255-byte length extensions):
# a `length` above this bound for its `stored` size is corrupt, refused before allocating.
LZ4_MAX_RATIO = 255

# Global LUN id 0 names no LUN (node indexes start at 1): records on it are never applied to a
# disk. The first record of every log generation is one, carrying the exactly-once table across
# the CP that emptied the log.
DEDUP_LUN = 0

# Columns of the index that scan() returns, one row per valid record.
IDX_POS = 0  # byte position of the record in the log area
IDX_SEQ = 1
IDX_LUN = 2
IDX_OFFSET = 3
IDX_LENGTH = 4
IDX_CLIENT = 5
IDX_REQUEST = 6
IDX_FLAGS = 7  # the record's flags (FLAG_LZ4: apply decompresses, never copies)
IDX_STORED = 8  # payload bytes in the log at IDX_POS + RECORD_HEADER (== IDX_LENGTH raw)
IDX_COLUMNS = 9

assert RECORD_HEADER == 56


def record_size(length: int) -> int:
    """Bytes a record with `length` payload bytes occupies in the log, padding included.

    `length` is the *stored* payload size: for an lz4 record, the compressed size.
    """
    raw = RECORD_HEADER + length + CRC_SIZE
    return (raw + ALIGN - 1) // ALIGN * ALIGN


def lun_gid(node_index: int, lun_index: int) -> int:
    return (node_index << 16) | lun_index


def lun_owner(gid: int) -> int:
    return gid >> 16
