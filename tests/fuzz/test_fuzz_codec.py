"""Bus codec + block protocol fuzzing in CI: a bounded hypothesis run of serve-frames over
the recorded block-client frames (mutated as msgpack and as bytes) and generated frames,
through tests/fuzz/targets.frames (no exception past the typed errors, one well-formed reply
per request with the request's id); plus the kept reproducers, and proof that the checks
fail. The long run is `python -m tests.fuzz --target codec`."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains.block_stream import serve_frames, split_frames
from domains.mem_dmodule import MemDModule
from tests.fuzz import mutate, seeds, targets
from vmemu.bus import codec
from vmemu.errors import BadRequest

CI = settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_timed(frames: list[bytes]) -> None:
    t0 = time.process_time()
    targets.frames(frames)
    assert time.process_time() - t0 < 1.0


def test_the_corpus_is_there_and_every_seed_passes():
    pool = seeds.frame_seeds()
    ops = {codec.decode(f).op for name, fs in pool if name == "block-client-requests.frames"
           for f in fs}
    assert {"info", "read", "write", "flush"} <= ops
    for _, frames in pool:
        targets.frames(list(frames))


@CI
@given(st.integers(0, 10**6), st.randoms(use_true_random=False))
def test_mutated_frames(i, rnd):
    pool = seeds.frame_seeds()
    frames = mutate.mutate_frames(rnd, list(pool[i % len(pool)][1]), list(pool[(i // 5) % len(pool)][1]))
    run_timed(frames)


@CI
@given(st.randoms(use_true_random=False))
def test_generated_frames(rnd):
    run_timed(mutate.generate_frames(rnd))


@CI
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_random_bytes(frames):
    run_timed(frames)


@pytest.mark.parametrize("name,data,opts", seeds.regressions("codec"))
def test_kept_reproducers(name, data, opts):
    targets.frames(split_frames(data))


def test_a_write_with_an_out_of_range_request_id_is_a_clear_error():
    # The reproducer kept above, spelled out: it killed a guest with struct.error.
    for bad in (-1, -2**63, 2**63, 2**64 - 1):
        frame = msgpack.packb({"k": "q", "id": 5, "op": "write", "args": {
            "lun": 0, "offset": 0, "data": b"x" * 512, "request": bad}}, use_bin_type=True)
        res = serve_frames([frame])
        assert not res.internal
        reply = codec.decode(res.replies[0])
        assert not reply.ok and reply.error["code"] == "bad_request"
        assert "request" in reply.error["message"]


# -- the checks can fail ----------------------------------------------------------------------
class Broken:
    """A protocol with a bug, and one that answers with the wrong id."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def handle(self, identity, req):
        if self.kind == "bug":
            return {}["missing"]
        raise BadRequest("typed errors are fine")


def test_the_target_fails_on_an_untyped_exception(monkeypatch):
    frame = codec.encode_request(3, "info")
    monkeypatch.setattr(targets, "serve_frames",
                        lambda fr, d: serve_frames(fr, d, protocol=Broken("bug")))
    with pytest.raises(targets.Finding, match="KeyError"):
        targets.frames([frame])
    monkeypatch.setattr(targets, "serve_frames",
                        lambda fr, d: serve_frames(fr, d, protocol=Broken("typed")))
    targets.frames([frame])  # a typed error reply is what should happen


def test_the_target_fails_on_a_reply_with_another_id(monkeypatch):
    def wrong_id(fr, d):
        res = serve_frames(fr, d)
        res.replies = [codec.encode_result(99, {}) if r else r for r in res.replies]
        return res

    monkeypatch.setattr(targets, "serve_frames", wrong_id)
    with pytest.raises(targets.Finding, match="reply id 99"):
        targets.frames([codec.encode_request(3, "info")])


def test_a_notification_gets_no_reply():
    res = serve_frames([codec.encode_request(0, "read", {"lun": 0, "offset": 0, "length": 512}),
                        b"\xc1"], MemDModule(1))
    assert res.replies == [None, None] and res.bad_frames == 1
