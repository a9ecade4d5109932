"""NBD serve-stream fuzzing in CI: a bounded hypothesis run over the recorded seeds (mutated)
and generated streams, through tests/fuzz/targets.nbd (no exception, well-formed replies,
bounded buffering and output); plus the kept reproducers, and proof that the checks fail
when the server misbehaves. The long run is `python -m tests.fuzz --target nbd`."""

from __future__ import annotations

import struct
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains import nbd_proto as P
from domains.nbd_stream import serve_stream
from tests.fuzz import mutate, seeds, targets
from tests.fuzz.nbd_wire import Malformed, check_replies, split, trim
from tests.unit.test_nbd_proto import info_data, opt, req

CI = settings(max_examples=40, deadline=None, derandomize=False, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CPU_S = 1.0  # per input; CPU time, so that a loaded machine does not fail the test


def run_timed(data: bytes, peer_reads: bool) -> None:
    t0 = time.process_time()
    targets.nbd(data, peer_reads)
    assert time.process_time() - t0 < CPU_S


def test_the_corpus_is_there_and_every_seed_passes():
    pool = seeds.nbd_seeds()
    names = {n.rsplit("-", 1)[0] for n, _ in pool}
    assert {"nbdinfo-list", "qemu-img-convert", "fio-randwrite", "libnbd",
            "vmemu-nbd-client"} <= names
    for _, data in pool:
        for peer_reads in (True, False):
            targets.nbd(data, peer_reads)


@CI
@given(st.integers(0, 10**6), st.randoms(use_true_random=False), st.booleans())
def test_mutated_seeds(i, rnd, peer_reads):
    pool = seeds.nbd_seeds()
    data = mutate.mutate_stream(rnd, pool[i % len(pool)][1], pool[(i // 7) % len(pool)][1])
    run_timed(data, peer_reads)


@CI
@given(st.randoms(use_true_random=False), st.booleans())
def test_generated_streams(rnd, peer_reads):
    run_timed(mutate.generate_stream(rnd), peer_reads)


@settings(max_examples=60, deadline=None, database=None)
@given(st.binary(max_size=600))
def test_raw_bytes_after_a_good_handshake(tail):
    head = struct.pack(">I", 3) + opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_GO, info_data("lun0"))
    run_timed(head + tail, True)


@pytest.mark.parametrize("name,data,opts", seeds.regressions("nbd") or [("none", b"", {})])
def test_kept_reproducers(name, data, opts):
    targets.nbd(data, opts.get("peer_reads", True))


# -- the checks can fail ----------------------------------------------------------------------
GOOD = (struct.pack(">I", 3) + opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_GO, info_data("lun0"))
        + req(P.CMD_WRITE, 0, 512, cookie=5, data=b"w" * 512) + req(P.CMD_READ, 0, 512, cookie=6)
        + req(99, cookie=7) + req(P.CMD_DISC))


def corrupt(output: bytes, at: int, byte: int) -> bytes:
    b = bytearray(output)
    b[at] ^= byte
    return bytes(b)


def test_check_replies_fails_on_bad_output():
    res = serve_stream(GOOD)
    assert check_replies(GOOD, res) == 3
    first = res.output.index(struct.pack(">I", P.STRUCTURED_REPLY_MAGIC))  # the first reply
    broken = [
        replace(res, output=res.output[:-1]),  # truncated
        replace(res, output=corrupt(res.output, first, 0xFF)),  # bad magic
        replace(res, output=corrupt(res.output, first + 15, 0x01)),  # a cookie never sent
        replace(res, output=res.output[:18]),  # replies missing
        replace(res, replies=res.replies[:1]),  # more replies than made
        replace(res, requests=res.requests + res.requests[:1]),  # one accepted, unanswered
    ]
    for r in broken:
        with pytest.raises(Malformed):
            check_replies(GOOD, r)


def test_the_target_fails_when_a_server_buffers_past_its_caps(monkeypatch):
    loose = replace(targets.LIMITS, hs_in=4 << 20, hs_out=4 << 20)  # a server without them

    def serve_loose(data, d, limits, **kw):
        return serve_stream(data, d, limits=loose, **kw)

    flood = struct.pack(">I", 3) + opt(P.OPT_LIST) * 4000  # 64 KiB: twice the input cap
    targets.nbd(flood, peer_reads=False)  # the real caps pass
    monkeypatch.setattr(targets, "serve_stream", serve_loose)
    with pytest.raises(targets.Finding, match="buffered"):
        targets.nbd(flood, peer_reads=False)


def test_split_and_trim_keep_the_shape():
    msgs = split(GOOD)
    assert [m.kind for m in msgs] == ["flags", "option", "option", "request", "request",
                                      "request", "request"]
    big = GOOD[:-28] + req(P.CMD_WRITE, 0, 65536, cookie=9, data=b"z" * 65536) + req(P.CMD_DISC)
    small = trim(big, max_payload=4096)
    assert [m.kind for m in split(small)] == [m.kind for m in split(big)]
    assert len(small) < 5000 and check_replies(small, serve_stream(small)) == 4
