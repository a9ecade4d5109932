"""Histories of block reads and writes: one JSON object a line, Jepsen's shape.

    {"process": 3, "type": "invoke", "f": "write", "block": "n1/lun0/4096", "value": "c3-17-9f2a",
     "time": 81234567890}

`type` is invoke, ok (done), fail (definitely not done) or info (indeterminate: timed out or cut
by a crash). An invoke and its completion share `process`, which has at most one op open; an
invoke never completed by the end of the history counts as info. Reads carry their result in
the completion's `value` (null: the block was all zeros, never written); writes carry the
written value in both lines. `time` is CLOCK_MONOTONIC in ns. Extra keys are ignored so a client
may add its own (an error text, a node name).

A history is untrusted input: every malformed line is a HistoryError naming the line, and a line
longer than MAX_LINE bytes is refused before it is decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

MAX_LINE = 64 * 1024
TYPES = ("invoke", "ok", "fail", "info")
FUNCS = ("read", "write")


class HistoryError(ValueError):
    """A malformed history: the message names the line (1-based) at fault."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


class Event(NamedTuple):
    """One line of a history. (Named tuples, not frozen dataclasses: a history has hundreds of
    thousands of these, and a frozen dataclass costs four times as much to build.)"""

    process: int
    type: str
    f: str
    block: str
    value: str | None
    time: int

    def to_json(self) -> dict[str, Any]:
        return {"process": self.process, "type": self.type, "f": self.f, "block": self.block,
                "value": self.value, "time": self.time}


class Op(NamedTuple):
    """An invoke paired with its completion.

    `type` is the completion's (ok, fail or info); `complete` is its time, None when the op was
    never completed (then `type` is info). An info op's interval has no end whatever `complete`
    says: the client gave up then, the system may apply the write later. `value` is the written
    value of a write and the returned value of a read (None unless ok). `line` is the invoke's
    line number (0 when not parsed).
    """

    index: int
    process: int
    f: str
    block: str
    value: str | None
    type: str
    invoke: int
    complete: int | None
    line: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "line": self.line, "process": self.process, "f": self.f,
                "value": self.value, "type": self.type, "invoke": self.invoke,
                "complete": self.complete}


def _int(obj: dict[str, Any], key: str, line: int) -> int:
    v = obj.get(key)
    if type(v) is not int:  # bool is an int subclass, and never a process or a time
        raise HistoryError(line, f"{key!r} must be an integer, not {v!r:.40}")
    return v


_decode = json.JSONDecoder().decode  # json.loads re-detects the encoding of every line


def parse_event(text: str | bytes, line: int) -> Event:
    """One line -> Event, or HistoryError naming `line`."""
    try:
        obj = _decode(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers both bad JSON and bytes that are not UTF-8
        raise HistoryError(line, f"not JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(obj, dict):
        raise HistoryError(line, "not a JSON object")
    process, time = obj.get("process"), obj.get("time")
    if type(process) is not int or type(time) is not int:  # inline: this runs 100k times
        process = _int(obj, "process", line)
        time = _int(obj, "time", line)
    if time < 0:
        raise HistoryError(line, f"time {time} is negative")
    kind, f, block = obj.get("type"), obj.get("f"), obj.get("block")
    if kind not in TYPES:
        raise HistoryError(line, f"type must be one of {', '.join(TYPES)}, not {kind!r:.40}")
    if f not in FUNCS:
        raise HistoryError(line, f"f must be read or write, not {f!r:.40}")
    if not isinstance(block, str) or not block:
        raise HistoryError(line, f"block must be a non-empty string, not {block!r:.40}")
    value = obj.get("value")
    if value is not None and not isinstance(value, str):
        raise HistoryError(line, f"value must be a string or null, not {value!r:.40}")
    if f == "write" and kind == "invoke" and value is None:
        # null is what a read of a never-written block returns: a write of it would be ambiguous
        raise HistoryError(line, "a write must carry its value")
    return Event(process, kind, f, block, value, time)


def read_events(stream: IO[bytes]) -> Iterator[tuple[int, Event]]:
    """(line number, Event) for each non-blank line of a binary stream, bounded per line."""
    n = 0
    while True:
        raw = stream.readline(MAX_LINE + 2)  # room for the newline (and a CR) of a full line
        if not raw:
            return
        n += 1
        if len(raw) > MAX_LINE and (len(raw.rstrip(b"\r\n")) > MAX_LINE
                                    or not raw.endswith(b"\n")):
            raise HistoryError(n, f"line longer than {MAX_LINE} bytes")
        if not raw.isspace():
            yield n, parse_event(raw, n)  # JSON allows the trailing newline


def pair(events: Iterable[tuple[int, Event]]) -> list[Op]:
    """Pair each invoke with its process's next completion, in line order, into Ops.

    Ops come in the order of their invokes. An invoke still open at the end is info.
    """
    ops: list[Op | None] = []
    open_: dict[int, tuple[int, int, Event]] = {}  # process -> (op slot, invoke line, invoke)
    for line, ev in events:
        if ev.type == "invoke":
            if ev.process in open_:
                raise HistoryError(line, f"process {ev.process} invokes while its op from line "
                                         f"{open_[ev.process][1]} is still open")
            open_[ev.process] = (len(ops), line, ev)
            ops.append(None)
            continue
        if ev.process not in open_:
            raise HistoryError(line, f"{ev.type} completion of process {ev.process} with no "
                                     "open invoke")
        slot, inv_line, inv = open_.pop(ev.process)
        if (ev.f, ev.block) != (inv.f, inv.block):
            raise HistoryError(line, f"completion is {ev.f} {ev.block!r} but the invoke on line "
                                     f"{inv_line} is {inv.f} {inv.block!r}")
        if ev.time < inv.time:
            raise HistoryError(line, f"completes at {ev.time}, before its invoke on line "
                                     f"{inv_line} at {inv.time}")
        if inv.f == "write" and ev.value is not None and ev.value != inv.value:
            raise HistoryError(line, f"write completion value {ev.value!r:.40} differs from the "
                                     f"invoke's on line {inv_line}")
        value = inv.value if inv.f == "write" else (ev.value if ev.type == "ok" else None)
        ops[slot] = Op(slot, ev.process, inv.f, inv.block, value, ev.type, inv.time, ev.time,
                       inv_line)
    for slot, inv_line, inv in open_.values():
        ops[slot] = Op(slot, inv.process, inv.f, inv.block, inv.value, "info", inv.time, None,
                       inv_line)
    return [op for op in ops if op is not None]


def load(stream: IO[bytes]) -> list[Op]:
    """A whole history from a binary stream -> Ops, or HistoryError."""
    return pair(read_events(stream))


def load_path(path: str) -> list[Op]:
    with open(path, "rb") as f:
        return load(f)


def dump_event(ev: Event) -> str:
    """One line (without its newline); compact, so hot paths write less."""
    return json.dumps(ev.to_json(), separators=(",", ":"))


def write_events(events: Iterable[Event], stream: IO[str]) -> None:
    for ev in events:
        stream.write(dump_event(ev) + "\n")


def to_events(ops: Iterable[Op]) -> list[Event]:
    """Ops -> the lines of a history, ordered by time (an invoke before its own completion).

    An op whose `complete` is None gets no completion line: it stays open to the end, which
    parses back as info. Used to write histories made by hand or by generators.
    """
    keyed: list[tuple[int, int, int, Event]] = []
    for op in ops:
        inv = Event(op.process, "invoke", op.f, op.block, op.value if op.f == "write" else None,
                    op.invoke)
        keyed.append((op.invoke, op.index, 0, inv))
        if op.complete is not None:
            value = op.value if (op.f == "write" or op.type == "ok") else None
            keyed.append((op.complete, op.index, 1,
                          Event(op.process, op.type, op.f, op.block, value, op.complete)))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]
