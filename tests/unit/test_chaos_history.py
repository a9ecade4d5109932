"""Chaos histories: parsing, validation (every error names its line), pairing, round trip."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmemu.chaos.history import (MAX_LINE, Event, HistoryError, Op, dump_event, load, pair,
                                 read_events, to_events, write_events)


def lines(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def ev(process: int, type_: str, f: str, value: str | None, time: int, block: str = "n1/0/0"
       ) -> dict:
    return {"process": process, "type": type_, "f": f, "block": block, "value": value,
            "time": time}


def test_pairs_invokes_with_completions_in_invoke_order() -> None:
    ops = load(io.BytesIO(lines(
        ev(0, "invoke", "write", "a", 10), ev(1, "invoke", "read", None, 11),
        ev(1, "ok", "read", "a", 20), ev(0, "ok", "write", "a", 21),
        ev(1, "invoke", "read", None, 22), ev(1, "fail", "read", None, 23),
        ev(2, "invoke", "write", "b", 24), ev(2, "info", "write", None, 30),
        ev(3, "invoke", "write", "c", 31))))
    assert [(o.index, o.process, o.f, o.value, o.type, o.invoke, o.complete, o.line)
            for o in ops] == [
        (0, 0, "write", "a", "ok", 10, 21, 1),
        (1, 1, "read", "a", "ok", 11, 20, 2),
        (2, 1, "read", None, "fail", 22, 23, 5),
        (3, 2, "write", "b", "info", 24, 30, 7),
        (4, 3, "write", "c", "info", 31, None, 9),  # never completed: indeterminate
    ]


def test_blank_lines_are_skipped_but_counted_and_extra_keys_ignored() -> None:
    data = b"\n" + lines(dict(ev(0, "invoke", "read", None, 1), node="n2")) + b"  \n" + \
        lines(dict(ev(0, "ok", "read", None, 2), error=None))
    (op,) = load(io.BytesIO(data))
    assert (op.line, op.type, op.value) == (2, "ok", None)


@pytest.mark.parametrize("bad,message", [
    (b"{not json", "line 2: not JSON"),
    (b"[1, 2]", "line 2: not a JSON object"),
    (b'"\xff\xfe"', "line 2: not JSON"),
    (json.dumps(dict(ev(0, "invoke", "read", None, 1), process=True)).encode(),
     "line 2: 'process' must be an integer"),
    (json.dumps(dict(ev(0, "invoke", "read", None, 1), process="0")).encode(),
     "line 2: 'process' must be an integer"),
    (json.dumps(dict(ev(0, "invoke", "read", None, 1), time=1.5)).encode(),
     "line 2: 'time' must be an integer"),
    (json.dumps(ev(0, "invoke", "read", None, -1)).encode(), "line 2: time -1 is negative"),
    (json.dumps(ev(0, "begin", "read", None, 1)).encode(), "line 2: type must be one of"),
    (json.dumps(ev(0, "invoke", "cas", None, 1)).encode(), "line 2: f must be read or write"),
    (json.dumps(dict(ev(0, "invoke", "read", None, 1), block="")).encode(),
     "line 2: block must be a non-empty string"),
    (json.dumps(ev(0, "invoke", "write", 7, 1)).encode(), "line 2: value must be a string"),
    (json.dumps(ev(0, "invoke", "write", None, 1)).encode(), "line 2: a write must carry"),
])
def test_malformed_line_is_named(bad: bytes, message: str) -> None:
    data = lines(ev(9, "invoke", "read", None, 0), bad)
    with pytest.raises(HistoryError) as exc:
        load(io.BytesIO(data))
    assert str(exc.value).startswith(message)
    assert exc.value.line == 2
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("events,message", [
    ([ev(0, "ok", "read", None, 1)], "line 1: ok completion of process 0 with no open invoke"),
    ([ev(0, "invoke", "read", None, 1), ev(0, "invoke", "read", None, 2)],
     "line 2: process 0 invokes while its op from line 1 is still open"),
    ([ev(0, "invoke", "read", None, 1), ev(0, "ok", "write", "a", 2)],
     "line 2: completion is write"),
    ([ev(0, "invoke", "read", None, 1), ev(0, "ok", "read", None, 2, block="other")],
     "line 2: completion is read 'other'"),
    ([ev(0, "invoke", "read", None, 5), ev(0, "ok", "read", None, 4)],
     "line 2: completes at 4, before its invoke on line 1"),
    ([ev(0, "invoke", "write", "a", 1), ev(0, "ok", "write", "b", 2)],
     "line 2: write completion value 'b' differs"),
    ([ev(0, "invoke", "read", None, 1), ev(0, "ok", "read", None, 2),
      ev(0, "fail", "read", None, 3)], "line 3: fail completion of process 0"),
])
def test_unpaired_or_inconsistent_events_are_named(events: list[dict], message: str) -> None:
    with pytest.raises(HistoryError) as exc:
        load(io.BytesIO(lines(*events)))
    assert str(exc.value).startswith(message)


def test_a_line_over_64_kib_is_refused_before_decoding() -> None:
    big = ev(0, "invoke", "write", "x" * MAX_LINE, 1)
    with pytest.raises(HistoryError, match=r"^line 2: line longer than 65536 bytes"):
        load(io.BytesIO(lines(ev(1, "invoke", "read", None, 0), big)))
    # exactly at the limit is fine (padding the value brings the line to MAX_LINE bytes)
    base = len(json.dumps(ev(0, "invoke", "write", "", 1)).encode())
    exact = ev(0, "invoke", "write", "x" * (MAX_LINE - base), 1)
    assert len(json.dumps(exact).encode()) == MAX_LINE
    (op,) = load(io.BytesIO(lines(exact)))
    assert op.type == "info" and len(op.value or "") == MAX_LINE - base


def test_a_long_line_without_a_newline_at_the_end_is_refused() -> None:
    data = lines(ev(1, "invoke", "read", None, 0)) + b"x" * (3 * MAX_LINE)
    with pytest.raises(HistoryError, match=r"^line 2: line longer"):
        list(read_events(io.BytesIO(data)))


def test_info_after_a_crash_frees_the_process_id() -> None:
    # Jepsen retires a crashed process; a client that reuses the id must still pair properly.
    ops = pair(enumerate([Event(0, "invoke", "write", "b", "a", 1),
                          Event(0, "info", "write", "b", None, 2),
                          Event(0, "invoke", "read", "b", None, 3),
                          Event(0, "ok", "read", "b", "a", 4)], start=1))
    assert [(o.type, o.value) for o in ops] == [("info", "a"), ("ok", "a")]


def test_dump_is_one_compact_line() -> None:
    text = dump_event(Event(3, "invoke", "write", "n1/lun0/4096", "c3-17-9f2a", 81234567890))
    assert text == ('{"process":3,"type":"invoke","f":"write","block":"n1/lun0/4096",'
                    '"value":"c3-17-9f2a","time":81234567890}')


@st.composite
def op_lists(draw: st.DrawFn) -> list[Op]:
    """Ops as a client makes them: per process sequential, values unique."""
    ops: list[Op] = []
    free_at = {p: 0 for p in range(3)}
    for i in range(draw(st.integers(0, 12))):
        p = draw(st.integers(0, 2))
        start = free_at[p] + draw(st.integers(0, 3))
        f = draw(st.sampled_from(["read", "write"]))
        kind = draw(st.sampled_from(["ok", "fail", "info"]))
        end = start + draw(st.integers(0, 3))
        value = f"v{i}" if f == "write" else (draw(st.sampled_from([None, "v0", "v1"]))
                                              if kind == "ok" else None)
        never = kind == "info" and draw(st.booleans())
        ops.append(Op(i, p, f, draw(st.sampled_from(["a", "b/0/4096"])), value, kind, start,
                      None if never else end))
        # a process that never completed stays open: it can invoke nothing more
        free_at[p] = 1 << 40 if never else end
    ops = [op for op in ops if op.invoke < 1 << 40]
    return ops


@settings(max_examples=150, deadline=None)
@given(op_lists())
def test_ops_round_trip_through_json_lines(ops: list[Op]) -> None:
    buf = io.StringIO()
    write_events(to_events(ops), buf)
    back = load(io.BytesIO(buf.getvalue().encode()))
    strip = [(o.process, o.f, o.block, o.value, o.type, o.invoke, o.complete) for o in ops]
    # load orders by invoke line; to_events orders lines by time, so compare as multisets
    assert sorted(strip, key=repr) == sorted(
        [(o.process, o.f, o.block, o.value, o.type, o.invoke, o.complete) for o in back],
        key=repr)
    assert [o.index for o in back] == list(range(len(back)))
