"""The chaos driver's pure parts: schedules, block values, durations (availability:
test_chaos_availability.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from vmemu.chaos import schedule
from vmemu.chaos.cli_run import parse_duration
from vmemu.chaos.workload import BLOCK, decode_value, encode_value


def test_a_seed_draws_the_same_schedule_every_time_and_another_seed_another():
    a = schedule.generate(42, 120, 4)
    assert a == schedule.generate(42, 120, 4)
    assert a.faults and a != schedule.generate(43, 120, 4)
    assert all(1 <= int(f.target[4:]) <= 4 and f.kind in schedule.KINDS for f in a.faults)
    gaps = [y.at - x.at for x, y in zip(a.faults, a.faults[1:])]
    assert min(gaps) >= 12.0  # room for a restart and a giveback between faults


def test_a_schedule_survives_its_file(tmp_path: Path):
    s = schedule.generate(7, 60, 2, ("pause_short", "kill_in_giveback"))
    schedule.save(s, tmp_path / "schedule.json")
    assert schedule.load(tmp_path / "schedule.json") == s
    assert schedule.load(tmp_path / "schedule.json").without({0}).faults == s.faults[1:]


@pytest.mark.parametrize("doc", [
    "not json", "{}", '{"seed": 1, "duration": 5, "nodes": 2, "faults": 3}',
    '{"seed": 1, "duration": 5, "nodes": 2, "faults": [{"at": 1, "kind": "nuke", "target": "node1"}]}',
    '{"seed": 1, "duration": 5, "nodes": 2, "faults": [{"at": 1, "kind": "kill", "target": "node9"}]}',
    '{"seed": 1, "duration": 5, "nodes": 2, "faults": [{"at": -1, "kind": "kill", "target": "node1"}]}',
    '{"seed": 1, "duration": 5, "nodes": 1, "faults": []}',
])
def test_a_file_that_is_no_schedule_is_refused_with_its_name(tmp_path: Path, doc: str):
    p = tmp_path / "schedule.json"
    p.write_text(doc)
    with pytest.raises(schedule.ScheduleError, match="schedule.json"):
        schedule.load(p)


def test_unknown_fault_kinds_are_refused():
    with pytest.raises(schedule.ScheduleError, match="nuke"):
        schedule.generate(1, 60, 2, ("kill", "nuke"))


def test_a_block_names_its_write_or_says_it_was_never_written_or_is_no_write_at_all():
    v = encode_value("12.345")
    assert len(v) == BLOCK and decode_value(v) == "12.345"
    assert decode_value(bytes(BLOCK)) is None
    flipped = bytearray(v)
    flipped[20] ^= 1
    assert decode_value(bytes(flipped)).startswith("corrupt:")
    torn = v[:2048] + bytes(2048)
    assert decode_value(torn) == "12.345"  # the value sits in the first sector
    assert decode_value(b"\x01" + bytes(BLOCK - 1)).startswith("corrupt:")
    assert decode_value(v[:100] + b"x" + v[101:]).startswith("corrupt:")  # junk after it


@pytest.mark.parametrize("text,seconds", [("20s", 20), ("2m", 120), ("90", 90), ("1.5h", 5400)])
def test_durations(text: str, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "20x", "0s", "-5s", "8d"])
def test_bad_durations_are_refused(text: str):
    with pytest.raises(click.BadParameter):
        parse_duration(text)
