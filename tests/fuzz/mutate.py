"""Mutations of recorded seeds, and generated inputs, driven by one `random.Random`.

The same functions feed hypothesis (which hands in a `Random` it can replay and shrink) and
the long runs of `python -m tests.fuzz` (a seeded `Random`), so a reproducer of either is
one seed index and one random state away. NBD streams are mutated as bytes (bit flips,
interesting values, inserts, deletes, truncations, splices of two seeds) and as messages
(tests/fuzz/nbd_wire.split: length and offset fields set to boundary values, commands and
options changed, a message repeated many times). Bus frames are mutated as msgpack objects
(fields set to out-of-range, wrong-typed or missing values) and as bytes, and frame lists
are spliced, repeated and reordered.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack

from domains import nbd_proto as P
from tests.fuzz.nbd_wire import split

MiB = 1 << 20
U32_EDGES = [0, 1, 511, 512, 513, 4095, 4096, P.MAX_BLOCK - 1, P.MAX_BLOCK, P.MAX_BLOCK + 1,
             P.MAX_OPTION, P.MAX_OPTION + 1, P.MAX_REQUEST, P.MAX_REQUEST + 1, P.DOS_PAYLOAD,
             P.DOS_PAYLOAD + 1, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 512, 4096, 2 * MiB - 512, 2 * MiB, 16 * MiB - 512, 16 * MiB, 64 * MiB - 512,
             64 * MiB, 2**32, 2**63 - 1, 2**63, 2**64 - 512, 2**64 - 1]
MAX_STREAM = 1 << 20  # mutated streams are cut here: larger ones only cost time (the server
# stops reading a handshake at 32 KiB and a request at 32 MiB either way)
INT_EDGES = [-1, -2**63, 0, 1, 511, 512, 4096, MiB, MiB + 1, 2**31, 2**32, 2**63 - 1, 2**63,
             2**64 - 1, 64 * MiB]


def _u32(rnd: random.Random, old: int) -> int:
    r = rnd.random()
    if r < 0.6:
        return rnd.choice(U32_EDGES)
    if r < 0.8:
        return max(0, min(2**32 - 1, old + rnd.randint(-16, 16)))
    return rnd.getrandbits(32)


def _u64(rnd: random.Random) -> int:
    return rnd.choice(U64_EDGES) if rnd.random() < 0.7 else rnd.getrandbits(64)


# -- NBD streams ---------------------------------------------------------------------------------
def mutate_stream(rnd: random.Random, data: bytes, other: bytes) -> bytes:
    """1 to 4 mutations of `data`; `other` is another seed, for splices."""
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(12)
        if op <= 3:
            _message_edit(rnd, buf)
        elif op == 4:
            _repeat_message(rnd, buf)
        elif op == 5 and buf:
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 6 and buf:
            i = rnd.randrange(len(buf))
            buf[i] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op == 7:
            i = rnd.randrange(len(buf) + 1)
            buf[i:i] = rnd.randbytes(rnd.randint(1, 32))
        elif op == 8 and buf:
            i = rnd.randrange(len(buf))
            del buf[i:i + rnd.randint(1, 64)]
        elif op == 9 and buf:
            del buf[rnd.randrange(len(buf)):]  # truncation
        elif op == 10 and other:
            i, j = rnd.randrange(len(buf) + 1), rnd.randrange(len(other))
            buf[i:] = other[j:]  # splice: our head, its tail
        elif op == 11 and buf:
            i = rnd.randrange(len(buf))
            n = rnd.randint(1, min(256, len(buf) - i))
            buf[i:i] = buf[i:i + n] * rnd.randint(1, 8)
        del buf[MAX_STREAM:]
    return bytes(buf)


def _message_edit(rnd: random.Random, buf: bytearray) -> None:
    msgs = [m for m in split(bytes(buf)) if m.kind in ("option", "request")]
    if not msgs:
        return
    m = rnd.choice(msgs)
    r = rnd.random()
    if r < 0.4 and m.length_at >= 0:
        old = struct.unpack_from(">I", buf, m.length_at)[0]
        struct.pack_into(">I", buf, m.length_at, _u32(rnd, old))
    elif m.kind == "request" and r < 0.6:
        struct.pack_into(">Q", buf, m.start + 16, _u64(rnd))  # offset
    elif m.kind == "request" and r < 0.8:
        if rnd.random() < 0.5:
            struct.pack_into(">H", buf, m.start + 6, rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 99]))
        else:
            struct.pack_into(">H", buf, m.start + 4, rnd.choice([0, 1, 2, 3, 4, 8, 16, 0xFFFF]))
    elif m.kind == "request":
        struct.pack_into(">Q", buf, m.start + 8, rnd.choice([0, 1, 2**64 - 1]))  # cookie
    elif r < 0.8:
        struct.pack_into(">I", buf, m.start + 8, rnd.choice(
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 2**31, 2**32 - 1]))
    elif m.end - m.start >= 20 and rnd.random() < 0.5:
        # INFO/GO: the export name length inside the option data
        struct.pack_into(">I", buf, m.start + 16, _u32(rnd, 4))
    else:
        buf[m.start + 16:m.end] = rnd.choice([b"", b"lun0", b"vol0/lun1", b"\xff\xfe",
                                              rnd.randbytes(rnd.randint(0, 40))])


def _repeat_message(rnd: random.Random, buf: bytearray) -> None:
    msgs = [m for m in split(bytes(buf)) if m.kind in ("option", "request")]
    if msgs:
        m = rnd.choice(msgs)
        times = rnd.choice([1, 2, 10, 100, 1000])
        buf[m.end:m.end] = bytes(buf[m.start:m.end]) * min(times, MAX_STREAM // (m.end - m.start))


def generate_stream(rnd: random.Random) -> bytes:
    """A stream built from scratch: random handshake, then random requests."""
    out = bytearray(struct.pack(">I", rnd.choice([0, 1, 2, 3, 3, 3, 4])))
    names = [b"", b"lun0", b"lun1", b"vol0/lun0", b"vol0/lun1", b"nope"]
    for _ in range(rnd.randint(0, 6)):
        opt = rnd.choice([P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_INFO, P.OPT_GO, P.OPT_ABORT,
                          P.OPT_STARTTLS, P.OPT_SET_META_CONTEXT, 42])
        data = b""
        if opt in (P.OPT_INFO, P.OPT_GO):
            name = rnd.choice(names)
            infos = [rnd.randrange(5) for _ in range(rnd.randint(0, 4))]
            data = (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                    + b"".join(struct.pack(">H", i) for i in infos))
        out += struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data
    end = rnd.choice([P.OPT_GO, P.OPT_GO, P.OPT_EXPORT_NAME])
    name = rnd.choice(names)
    if end == P.OPT_GO:
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    else:
        data = name
    out += struct.pack(">QII", P.IHAVEOPT, end, len(data)) + data
    for i in range(rnd.randint(0, 24)):
        cmd = rnd.choice([P.CMD_READ, P.CMD_READ, P.CMD_WRITE, P.CMD_WRITE, P.CMD_FLUSH,
                          P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_CACHE, P.CMD_BLOCK_STATUS])
        length = rnd.choice([0, 1, 512, 4096, 10000, MiB, MiB + 512, 3 * MiB]) \
            if rnd.random() < 0.8 else rnd.getrandbits(32)
        offset = rnd.choice([0, 1, 512, 4096, 8191, 2 * MiB - 512, 16 * MiB - 4096]) \
            if rnd.random() < 0.8 else _u64(rnd)
        flags = rnd.choice([0, 0, 0, P.CMD_FLAG_FUA, P.CMD_FLAG_DF, P.CMD_FLAG_NO_HOLE, 0xFF])
        out += struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, i, offset, length)
        if cmd == P.CMD_WRITE:
            out += bytes([i & 0xFF]) * min(length, 64 * 1024)  # often short: a partial write
    if rnd.random() < 0.5:
        out += struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_DISC, 999, 0, 0)
    return bytes(out)


# -- bus frames ----------------------------------------------------------------------------------
def _weird(rnd: random.Random) -> Any:
    return rnd.choice([None, True, False, -1, 2**63, 2**64 - 1, -2**63, 1.5, float("nan"), "x",
                       "", b"", b"\0" * 513, [], {}, [1, 2], {"a": 1}, rnd.choice(INT_EDGES),
                       "vol0/lun0", "a/b/c", "/", "vol9/lun0", "é"])


def _mutate_obj(rnd: random.Random, obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, dict) and obj and depth < 4:
        obj = dict(obj)
        key = rnd.choice(list(obj))
        r = rnd.random()
        if r < 0.15:
            del obj[key]
        elif r < 0.25:
            obj[rnd.choice(["lun", "offset", "length", "data", "client", "request", "path",
                            "forwarded", "id", "op", "k", "args", "zz"])] = _weird(rnd)
        else:
            obj[key] = _mutate_obj(rnd, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 4:
        obj = list(obj)
        i = rnd.randrange(len(obj))
        obj[i] = _mutate_obj(rnd, obj[i], depth + 1)
        return obj
    if isinstance(obj, bool) or obj is None:
        return _weird(rnd)
    if isinstance(obj, int):
        return rnd.choice(INT_EDGES) if rnd.random() < 0.8 else _weird(rnd)
    if isinstance(obj, str):
        return rnd.choice(["read", "write", "flush", "info", "", "READ", "nope", obj + "x",
                           "vol0/lun1", "vol0/lun9", _weird(rnd)])
    if isinstance(obj, bytes):
        return rnd.choice([b"", obj[:rnd.randint(0, len(obj))], obj * 2, b"\1" * rnd.choice(
            [1, 511, 512, 4096, MiB, MiB + 512])])
    return _weird(rnd)


ARG_KEYS = ["lun", "offset", "length", "data", "client", "request", "path", "forwarded"]


def _mutate_args(rnd: random.Random, msg: dict) -> dict:
    """A request's arguments, where the ranges are checked: one set to an edge value, a
    wrong type, or removed."""
    args = dict(msg["args"])
    key = rnd.choice(ARG_KEYS)
    r = rnd.random()
    if r < 0.15:
        args.pop(key, None)
    elif r < 0.7 and key not in ("data", "path"):
        args[key] = rnd.choice(INT_EDGES)
    else:
        args[key] = _weird(rnd)
    return dict(msg, args=args)


def mutate_frame(rnd: random.Random, frame: bytes) -> bytes:
    if rnd.random() < 0.7:
        try:
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            if isinstance(obj, dict) and isinstance(obj.get("args"), dict) and rnd.random() < 0.6:
                obj = _mutate_args(rnd, obj)
            else:
                obj = _mutate_obj(rnd, obj)
            return msgpack.packb(obj, use_bin_type=True)
        except Exception:  # noqa: BLE001 - not msgpack (any more): mutate its bytes
            pass
    buf = bytearray(frame)
    for _ in range(rnd.randint(1, 3)):
        if buf and rnd.random() < 0.5:
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        elif buf and rnd.random() < 0.5:
            del buf[rnd.randrange(len(buf)):]
        else:
            i = rnd.randrange(len(buf) + 1)
            buf[i:i] = rnd.randbytes(rnd.randint(1, 8))
    return bytes(buf)


def mutate_frames(rnd: random.Random, frames: list[bytes], other: list[bytes]) -> list[bytes]:
    out = list(frames)
    for _ in range(rnd.randint(1, 4)):
        r = rnd.random()
        if out and r < 0.6:
            i = rnd.randrange(len(out))
            out[i] = mutate_frame(rnd, out[i])
        elif out and r < 0.7:
            i = rnd.randrange(len(out))
            out[i:i] = [out[i]] * rnd.randint(1, 20)
        elif out and r < 0.8:
            del out[rnd.randrange(len(out))]
        elif other and r < 0.9:
            out.insert(rnd.randrange(len(out) + 1), rnd.choice(other))
        else:
            rnd.shuffle(out)
    return out[:200]


def generate_frames(rnd: random.Random) -> list[bytes]:
    frames = []
    for i in range(rnd.randint(1, 12)):
        op = rnd.choice(["read", "write", "flush", "info", "nope", ""])
        args: dict[str, Any] = {}
        for key in rnd.sample(["lun", "offset", "length", "data", "client", "request", "path",
                               "forwarded"], rnd.randint(0, 6)):
            args[key] = _weird(rnd) if rnd.random() < 0.5 else {
                "lun": 0, "offset": 4096, "length": 512, "data": b"d" * 512, "client": 7,
                "request": i, "path": "vol0/lun1", "forwarded": True}[key]
        msg = {"k": rnd.choice(["q", "q", "q", "r", "z"]), "id": rnd.choice([i, 0, -1, 2**63]),
               "op": op, "args": args}
        if rnd.random() < 0.2:
            del msg[rnd.choice(list(msg))]
        frames.append(msgpack.packb(msg, use_bin_type=True))
    return frames
