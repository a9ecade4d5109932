"""The fuzz targets: one input in, every property checked; a finding is an exception.

`nbd(data, peer_reads)` serves a client byte stream through domains/nbd_stream.py and
checks: no exception escapes, the output parses as the protocol says (tests/fuzz/nbd_wire:
valid magics, option replies for options sent, reply cookies that were sent, every request
let through answered exactly once), the connection never stalls while its peer reads, what
it buffered stays within its caps (domains/nbd_limits.Limits), and the output is bounded by
the input (READ data aside). `frames(frames)` serves bus frames through
domains/block_stream.py and checks: no exception anywhere (an exception the boundary
caught that is not a VmemuError is a finding too), one reply per request with an id and
none for a notification, each reply a well-formed frame with the request's id, and bounded
in size. Both run on a fresh in-memory D-module with the LUN sizes the seeds were recorded
with, so a reproducer replays the same way.
"""

from __future__ import annotations

from typing import Any

import msgpack

from domains import nbd_proto as P
from domains.block_stream import serve_frames
from domains.mem_dmodule import MemDModule
from domains.nbd_limits import Limits
from domains.nbd_stream import serve_stream
from tests.fuzz.nbd_wire import check_replies
from vmemu.bus import codec

MiB = 1 << 20
# What tests/fuzz/record.py serves the clients, so the seeds' offsets fit: LUNs larger than
# the advertised maximum block (requests served from the pool are reached) and small enough
# that one input's work stays well under a second.
SIZES = {1: (8 * MiB, 2 * MiB)}
# A READ is 28 bytes asking for up to 8 MiB here: a client that reads 16 MiB of replies and
# hangs up keeps an input's work (and its time) bounded without making reads less deep.
MAX_OUTPUT = 16 * MiB
LIMITS = Limits()
_HS_OUT = LIMITS.hs_out + P.MAX_LIST_REPLY + 16 * 1024  # the cap plus one option's replies


class Finding(AssertionError):
    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # groups findings of one bug (the runner's report)


def nbd(data: bytes, peer_reads: bool = True) -> Any:
    res = serve_stream(data, MemDModule(1, SIZES), limits=LIMITS, peer_reads=peer_reads,
                       max_output=MAX_OUTPUT)
    check_replies(data, res)
    if res.stats.internal:
        raise Finding(f"{res.stats.internal} exceptions caught at the connection's boundary")
    if res.stalled and peer_reads and not res.hung_up:
        raise Finding("the connection stalled although its peer reads everything")
    lim = LIMITS
    if res.hs_peak_in > lim.hs_in or res.hs_peak_out > _HS_OUT:
        raise Finding(f"buffered {res.hs_peak_in} in / {res.hs_peak_out} out in the handshake, "
                      f"caps {lim.hs_in} / {_HS_OUT}")
    max_in = min(lim.conn_max, lim.res_in + lim.shared)
    max_out = min(lim.conn_max, lim.res_out + lim.shared)
    if res.peak_in > max_in or res.peak_out > max_out:
        raise Finding(f"buffered {res.peak_in} in / {res.peak_out} out, caps {max_in} / {max_out}")
    if res.peak_pool > lim.shared:
        raise Finding(f"pool use {res.peak_pool} over its {lim.shared} bytes")
    read_data = sum(r.read_length for r in res.replies)
    if len(res.output) > 18 + read_data + 300 * len(data) + 64 * 1024:
        raise Finding(f"{len(res.output)} bytes out for {len(data)} in ({read_data} read data)")
    return res


def _request_id(frame: bytes) -> int | None:
    """The id a client put in a request frame, read leniently (None: not a request with an
    int id)."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - garbage has no id
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), int) or isinstance(msg.get("id"), bool):
        return None
    return msg["id"]


def frames(frames_in: list[bytes]) -> Any:
    res = serve_frames(frames_in, MemDModule(1, SIZES))
    if res.internal:
        i, where, tb = res.internal[0]
        raise Finding(f"frame {i} raised past the typed errors:\n{tb}", where)
    if len(res.replies) != len(frames_in):
        raise Finding(f"{len(res.replies)} results for {len(frames_in)} frames")
    for frame, reply in zip(frames_in, res.replies):
        if reply is None:
            continue
        msg = codec.decode(reply)  # raises FrameError: a malformed reply is a finding too
        if not isinstance(msg, codec.Reply):
            raise Finding("a reply frame that decodes as a request")
        rid = _request_id(frame)
        if msg.id == 0 or msg.id != rid:
            raise Finding(f"reply id {msg.id} for a frame whose id is {rid}")
        if not msg.ok and not isinstance((msg.error or {}).get("message"), str):
            raise Finding("an error reply without a message")
        if len(reply) > max(len(frame), MiB) + 16 * 1024:
            raise Finding(f"a {len(reply)}-byte reply to a {len(frame)}-byte frame")
    return res
