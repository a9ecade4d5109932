"""Bus frame codec: one msgpack map per ZeroMQ frame.

    request: {"k": "q", "id": int, "op": str, "args": map}      id 0 = notification, no reply
    reply:   {"k": "r", "id": int, "ok": true,  "result": any}
             {"k": "r", "id": int, "ok": false, "error": {"code": str, "message": str}}

Parsing and validation live here, alone, so they can be fuzzed without sockets: a frame that
does not decode raises BadFrame, carrying the request id when one could be recovered so the
receiver can still answer it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from vmemu.errors import BadFrame, VmemuError

MAX_FRAME = 64 * 1024 * 1024
U63 = 2**63 - 1  # ids, offsets: what both msgpack and the NVLog's u64 fields carry safely


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    result: Any = None
    error: dict[str, str] | None = None


class FrameError(BadFrame):
    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def encode_request(req_id: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb({"k": "q", "id": req_id, "op": op, "args": args or {}}, use_bin_type=True)


def encode_result(req_id: int, result: Any) -> bytes:
    return msgpack.packb({"k": "r", "id": req_id, "ok": True, "result": result}, use_bin_type=True)


def encode_error(req_id: int, err: VmemuError | dict[str, str]) -> bytes:
    wire = err.to_wire() if isinstance(err, VmemuError) else err
    return msgpack.packb({"k": "r", "id": req_id, "ok": False, "error": wire}, use_bin_type=True)


def decode(frame: bytes, max_frame: int = MAX_FRAME) -> Request | Reply:
    if len(frame) > max_frame:
        raise FrameError(f"frame of {len(frame)} bytes exceeds the {max_frame}-byte limit")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise FrameError("frame is not a map")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0 or rid >= 2**63:
        raise FrameError("frame has no valid id")
    kind = msg.get("k")
    if kind == "q":
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not op:
            raise FrameError("request has no op", rid)
        if not isinstance(args, dict):
            raise FrameError("request args is not a map", rid)
        return Request(rid, op, args)
    if kind == "r":
        ok = msg.get("ok")
        if not isinstance(ok, bool):
            raise FrameError("reply has no ok flag", rid)
        err = msg.get("error")
        if not ok and not (isinstance(err, dict) and isinstance(err.get("code"), str)):
            raise FrameError("error reply has no error code", rid)
        return Reply(rid, ok, msg.get("result"), err)
    raise FrameError("frame kind is neither request nor reply", rid)


def arg(req: Request, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Fetch a typed argument or raise a BadRequest-class error naming it."""
    from vmemu.errors import BadRequest

    if name not in req.args:
        if default is ...:
            raise BadRequest(f"{req.op}: missing argument {name!r}")
        return default
    value = req.args[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(f"{req.op}: argument {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise BadRequest(f"{req.op}: argument {name!r} has the wrong type")
    return value


def int_arg(req: Request, name: str, lo: int, hi: int, default: Any = ...) -> int:
    """An integer argument inside [lo, hi], or BadRequest naming it and the range.

    Every integer a peer sends is checked here, at the edge: msgpack carries anything from
    -2**63 to 2**64-1, and the value may end up in a fixed-width field further in (the
    NVLog's u64 request id, a u16 LUN index) where an out-of-range one would raise deep
    inside the storage code instead of coming back as an answer.
    """
    value = req.args.get(name)
    if type(value) is int and lo <= value <= hi:  # the common case, on every request's path
        return value
    value = arg(req, name, int, default)
    if not lo <= value <= hi:
        from vmemu.errors import BadRequest

        raise BadRequest(f"{req.op}: argument {name!r} is {value}, outside {lo}..{hi}")
    return value
