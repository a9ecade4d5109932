"""The demo runs end to end, and every figure it narrates is the one in the event log."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from vmemu.demo import run_demo
from vmemu.hypervisor.events import read_events


@pytest.mark.parametrize("scenario", ["failover", "hang", "double-failure", "ring"])
def test_demo_narration_matches_the_event_log(scenario, tmp_path):
    out = io.StringIO()
    lines = run_demo(scenario, data_dir=tmp_path, fast=True, console=Console(file=out, width=200),
                     plot=None)
    text = out.getvalue()
    events = read_events(tmp_path / "cluster" / "events.jsonl")
    # A line that cites an event cites it as logged: same kind, same figures.
    for line in lines:
        if line.event is not None:
            assert line.event in events, line.text
    by_step = {l.step: l for l in lines}
    assert by_step["verify"].figures["lost"] == 0 and by_step["verify"].figures["corrupt"] == 0
    assert by_step["verify"].figures["acked"] > 0
    if scenario != "ring":
        takeover = [l for l in lines if l.step == "takeover"]
        replay = next(l for l in takeover if "records" in l.figures)
        assert replay.figures["records"] == replay.event["records"]
        assert f"replayed {replay.event['records']} records" in text
        done = takeover[-1].event
        assert done["kind"] == "takeover_complete"
        assert takeover[-1].figures["first_request_ms"] == done["stages_ms"]["first_request_served"]
    if scenario == "hang":
        assert "heartbeat" in text and by_step["crash"].event["kind"] == "heartbeat_missed"
    if scenario == "failover":
        grant = next(l for l in lines if "mmap_read_write" in l.figures)
        assert grant.figures["mmap_read_write"] in ("EACCES", "EPERM")
