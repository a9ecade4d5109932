"""Serve vmemu's block protocol from raw bus frames: frames in, reply frames out.

The bus side of what domains/nbd_stream.py is for NBD: no sockets, the real frame decode
(vmemu.bus.codec.decode) with the live server's rule for a bad frame (vmemu.bus.rpc.RpcServer:
answered with an error when a request id could be recovered, dropped otherwise), then the
real `BlockProtocol` of domains/nmodule.py over the in-memory D-module of
domains/mem_dmodule.py. Every frame is served inside a boundary: a typed error (VmemuError)
is an error reply, as on the live path; any other exception is a bug, and still becomes an
error reply (never a crash of the caller) but is recorded in `FramesResult.internal` with
its traceback, for the fuzzers to report. What tests/fuzz drives; also a command, on a file
of frames (each a 4-byte big-endian length, then the frame):

    python -m domains.block_stream < frames > replies
"""

from __future__ import annotations

import struct
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

from domains.mem_dmodule import MemDModule
from vmemu.bus import codec
from vmemu.errors import VmemuError

_LEN = struct.Struct(">I")


@dataclass
class FramesResult:
    replies: list[bytes | None] = field(default_factory=list)  # one per frame; None: no reply
    internal: list[tuple[int, str, str]] = field(default_factory=list)  # (frame, where, traceback)
    bad_frames: int = 0
    forwards: int = 0  # requests the N-module would forward to another domain


def serve_frames(frames: Iterable[bytes], dmodule: Any | None = None, identity: int = 1,
                 protocol: Any | None = None) -> FramesResult:
    from domains.nmodule import BlockProtocol, Forward  # numba comes with it: import late

    d = dmodule if dmodule is not None else MemDModule(identity)
    proto = protocol if protocol is not None else BlockProtocol(d, identity)
    res = FramesResult()
    for i, frame in enumerate(frames):
        try:
            msg = codec.decode(frame)
        except codec.FrameError as exc:
            res.bad_frames += 1
            res.replies.append(None if not exc.request_id else codec.encode_error(exc.request_id, exc))
            continue
        except Exception as exc:  # noqa: BLE001 - decode must only ever raise FrameError
            res.internal.append((i, _where(exc), traceback.format_exc()))
            res.replies.append(None)
            continue
        if not isinstance(msg, codec.Request):
            res.bad_frames += 1  # a reply sent to a server: dropped, as RpcServer drops it
            res.replies.append(None)
            continue
        res.replies.append(_answer(proto, identity, msg, res, i, Forward))
    return res


def _answer(proto: Any, identity: int, req: codec.Request, res: FramesResult, i: int,
            forward: type) -> bytes | None:
    """The per-request boundary: whatever happens, a reply (or none for a notification)."""
    try:
        result = proto.handle(identity, req)
        reply = codec.encode_result(req.id, result)
    except forward:
        res.forwards += 1
        return None
    except VmemuError as exc:
        reply = codec.encode_error(req.id, exc)
    except Exception as exc:  # noqa: BLE001 - a bug: answer it, and say so
        res.internal.append((i, _where(exc), traceback.format_exc()))
        reply = codec.encode_error(req.id, VmemuError(f"internal error: {type(exc).__name__}"))
    return reply if req.id else None


def _where(exc: BaseException) -> str:
    """Exception type and innermost frame: what tells one bug from another."""
    tb = traceback.extract_tb(exc.__traceback__)
    last = tb[-1] if tb else None
    kind = type(exc).__qualname__ if type(exc).__module__ == "builtins" else \
        f"{type(exc).__module__}.{type(exc).__qualname__}"
    return f"{kind} at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}" if last else kind


def split_frames(blob: bytes) -> list[bytes]:
    """Frames from the length-prefixed form (a short tail is dropped)."""
    frames, pos = [], 0
    while pos + 4 <= len(blob):
        (n,) = _LEN.unpack_from(blob, pos)
        if pos + 4 + n > len(blob):
            break
        frames.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames


def join_frames(frames: Iterable[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def main() -> int:
    res = serve_frames(split_frames(sys.stdin.buffer.read()))
    sys.stdout.buffer.write(join_frames(r for r in res.replies if r is not None))
    for i, _, tb in res.internal:
        print(f"frame {i}: {tb}", file=sys.stderr)
    return 1 if res.internal else 0


if __name__ == "__main__":
    raise SystemExit(main())
