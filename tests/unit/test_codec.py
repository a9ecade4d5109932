"""The bus frame codec: round trips, and every malformed frame becomes a FrameError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmemu.bus import codec
from vmemu.bus.codec import FrameError, Reply, Request, decode
from vmemu.errors import BadFrame, BadRequest, NotGranted, VmemuError, from_wire

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_error(frame: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(frame)
    return info.value


# -- round trips -------------------------------------------------------------------------------
def test_request_round_trips_with_binary_and_nested_args() -> None:
    args = {"lun": 1, "offset": 4096, "data": b"\x00\xffpayload", "opts": {"fua": True},
            "list": [1, "two", None]}
    assert decode(codec.encode_request(42, "write", args)) == Request(42, "write", args)


def test_notification_has_id_zero_and_empty_args_by_default() -> None:
    assert decode(codec.encode_request(0, "heartbeat")) == Request(0, "heartbeat", {})


def test_largest_request_id_round_trips() -> None:
    assert decode(codec.encode_request(2**63 - 1, "ping")).id == 2**63 - 1


def test_result_round_trips() -> None:
    result = {"seq": 3, "b": b"x"}
    assert decode(codec.encode_result(7, result)) == Reply(7, True, result)
    assert decode(codec.encode_result(8, None)) == Reply(8, True, None)


def test_typed_error_round_trips_to_the_same_type_code_and_message() -> None:
    reply = decode(codec.encode_error(9, NotGranted("node3 has no grant")))
    assert isinstance(reply, Reply) and reply.id == 9 and not reply.ok
    assert reply.error == {"code": "not_granted", "message": "node3 has no grant"}
    err = from_wire(reply.error)
    assert isinstance(err, NotGranted) and err.message == "node3 has no grant"


def test_error_given_as_a_wire_dict_round_trips_and_keeps_an_unknown_code() -> None:
    reply = decode(codec.encode_error(1, {"code": "from_the_future", "message": "hm"}))
    assert reply.error == {"code": "from_the_future", "message": "hm"}
    err = from_wire(reply.error)  # type: ignore[arg-type]
    assert type(err) is VmemuError and err.code == "from_the_future"


# -- malformed frames --------------------------------------------------------------------------
def test_frame_error_is_a_bad_frame_with_a_stable_code() -> None:
    err = frame_error(b"\xc1")  # never used in msgpack
    assert isinstance(err, BadFrame) and isinstance(err, VmemuError)
    assert err.to_wire()["code"] == "bad_frame"
    assert err.request_id is None


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x92\x01", pack({"k": "q"}) + b"\x00",
                                   pack({1: "int key"}), b"\xdb\xff\xff\xff\xff"],
                         ids=["empty", "reserved_byte", "truncated", "trailing_bytes",
                              "non_string_key", "str_longer_than_frame"])
def test_bytes_that_are_not_one_msgpack_map_raise_frame_error(frame: bytes) -> None:
    assert frame_error(frame).request_id is None


@pytest.mark.parametrize("obj", [[1, 2], "q", 5, None, b"map"])
def test_msgpack_that_is_not_a_map_raises_frame_error(obj: object) -> None:
    err = frame_error(pack(obj))
    assert "not a map" in err.message and err.request_id is None


@pytest.mark.parametrize("rid", [None, "7", -1, 2**63, True, 1.0])
def test_frame_without_a_valid_id_raises_frame_error_without_request_id(rid: object) -> None:
    msg = {"k": "q", "op": "ping", "args": {}}
    if rid is not None:
        msg["id"] = rid
    err = frame_error(pack(msg))
    assert "no valid id" in err.message and err.request_id is None


@pytest.mark.parametrize("kind", [None, "x", "Q", 1, b"q"])
def test_unknown_frame_kind_raises_frame_error_carrying_the_request_id(kind: object) -> None:
    msg: dict = {"id": 31, "op": "ping"}
    if kind is not None:
        msg["k"] = kind
    err = frame_error(pack(msg))
    assert "neither request nor reply" in err.message and err.request_id == 31


@pytest.mark.parametrize("msg,text", [
    ({"k": "q", "id": 5}, "no op"),
    ({"k": "q", "id": 5, "op": ""}, "no op"),
    ({"k": "q", "id": 5, "op": 3}, "no op"),
    ({"k": "q", "id": 5, "op": "write", "args": [1]}, "args is not a map"),
    ({"k": "q", "id": 5, "op": "write", "args": None}, "args is not a map"),
    ({"k": "r", "id": 5}, "no ok flag"),
    ({"k": "r", "id": 5, "ok": 1}, "no ok flag"),
    ({"k": "r", "id": 5, "ok": False}, "no error code"),
    ({"k": "r", "id": 5, "ok": False, "error": "bad"}, "no error code"),
    ({"k": "r", "id": 5, "ok": False, "error": {"message": "no code"}}, "no error code"),
    ({"k": "r", "id": 5, "ok": False, "error": {"code": 17}}, "no error code"),
])
def test_malformed_frame_with_an_id_raises_frame_error_carrying_it(msg: dict, text: str) -> None:
    err = frame_error(pack(msg))
    assert text in err.message
    assert err.request_id == 5  # the receiver can still answer request 5


def test_frame_over_the_size_limit_is_refused_before_parsing() -> None:
    err = frame_error(bytes(codec.MAX_FRAME + 1))
    assert "exceeds" in err.message and err.request_id is None


def test_valid_frame_of_exactly_the_size_limit_is_accepted() -> None:
    overhead = len(codec.encode_request(1, "w", {"d": bytes(70_000)})) - 70_000
    frame = codec.encode_request(1, "w", {"d": bytes(codec.MAX_FRAME - overhead)})
    assert len(frame) == codec.MAX_FRAME
    req = decode(frame)
    assert isinstance(req, Request) and len(req.args["d"]) == codec.MAX_FRAME - overhead


# -- fuzzing -----------------------------------------------------------------------------------
def decode_or_frame_error(frame: bytes) -> Request | Reply | None:
    try:
        out = decode(frame)
    except FrameError as exc:
        assert exc.request_id is None or (isinstance(exc.request_id, int)
                                          and 0 <= exc.request_id < 2**63)
        return None
    assert isinstance(out, (Request, Reply))
    assert isinstance(out.id, int) and not isinstance(out.id, bool) and 0 <= out.id < 2**63
    if isinstance(out, Request):
        assert isinstance(out.op, str) and out.op and isinstance(out.args, dict)
    else:
        assert isinstance(out.ok, bool)
        if not out.ok:
            assert isinstance(out.error, dict) and isinstance(out.error["code"], str)
    return out


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_frame_error_only(frame: bytes) -> None:
    decode_or_frame_error(frame)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                    st.text(max_size=8), st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
FIELDS = st.sampled_from(["k", "id", "op", "args", "ok", "result", "error", "code", "message"])


@FUZZ
@given(st.dictionaries(FIELDS, st.one_of(VALUES, st.sampled_from(["q", "r", 0, 1])), max_size=7))
def test_random_maps_with_frame_like_keys_decode_or_raise_frame_error_only(msg: dict) -> None:
    decode_or_frame_error(pack(msg))


@FUZZ
@given(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=10), st.binary(max_size=64),
       st.data())
def test_corrupted_valid_frames_decode_or_raise_frame_error_only(rid: int, op: str,
                                                                 payload: bytes,
                                                                 data: st.DataObject) -> None:
    frame = bytearray(codec.encode_request(rid, op, {"data": payload}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    decode_or_frame_error(bytes(frame[:cut]))


# -- typed arguments ---------------------------------------------------------------------------
def test_arg_returns_typed_values_and_defaults() -> None:
    req = Request(1, "write", {"lun": 2, "node": "node1", "flag": True})
    assert codec.arg(req, "lun", int) == 2
    assert codec.arg(req, "node", (str, int)) == "node1"
    assert codec.arg(req, "flag", bool) is True
    assert codec.arg(req, "missing", int, 9) == 9


@pytest.mark.parametrize("name,kind", [("missing", int), ("lun", str), ("flag", int)])
def test_arg_missing_or_of_the_wrong_type_raises_bad_request_naming_it(name: str,
                                                                       kind: type) -> None:
    req = Request(1, "write", {"lun": 2, "flag": True})
    with pytest.raises(BadRequest, match=repr(name)):
        codec.arg(req, name, kind)
