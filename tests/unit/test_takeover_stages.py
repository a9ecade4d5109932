"""A takeover's stages in Domain 0, on a real hypervisor object (its sockets, its event log) with
no guest: the serving partner's two reports -- the assign reply (replay done, identity assumed)
and its first request served, a message of its own -- may reach Domain 0 in either order, and
takeover_complete must name every stage either way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmemu import datadir
from vmemu.bus import codec
from vmemu.config import ClusterConfig
from vmemu.hypervisor import failover as fo
from vmemu.hypervisor.events import read_events
from vmemu.hypervisor.main import Hypervisor

STAGES = ["failure_detected", "fenced", "partner_alerted", "replay_done", "identity_assumed",
          "first_request_served"]


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    h = Hypervisor(tmp_path, ClusterConfig(nodes=2, nbd_port=0), None)
    try:
        yield h
    finally:
        h.close()


def taken_over(hv: Hypervisor) -> float:
    """node1 failed and node2 was alerted, as _fail, _fence and _assign record it."""
    t0 = time.monotonic() - 1.0
    hv.takeovers[1] = {"failed": "node1", "reason": "exit", "detected": t0, "server": "node2",
                       "stages": {"failure_detected": 0.0, "fenced": 10.0, "partner_alerted": 20.0}}
    return t0


def first_request(hv: Hypervisor, mono: float) -> None:
    hv.broker.tokens[2] = "node2-token"  # as if node2 had registered its region
    hv._control(b"peer", codec.Request(1, "event", {"node": 2, "kind": "first_request",
                                                    "token": "node2-token",
                                                    "fields": {"identity": 1}, "mono": mono}))


def assign_reply(hv: Hypervisor, t0: float) -> None:
    hv._record_assign(fo.Assign(2, 1, (), "takeover"),
                      {"replay_done": t0 + 0.030, "assumed": t0 + 0.031, "replay": {"records": 5}})


def completions(hv: Hypervisor) -> list[dict]:
    return [e for e in read_events(datadir.events_file(hv.dir)) if e["kind"] == "takeover_complete"]


@pytest.mark.parametrize("first_request_first", [False, True])
def test_takeover_complete_names_every_stage_whichever_report_comes_first(
        hv: Hypervisor, first_request_first: bool) -> None:
    t0 = taken_over(hv)
    if first_request_first:
        first_request(hv, t0 + 0.040)
        # Not complete yet, and status shows no stage out of order meanwhile.
        assert completions(hv) == []
        view = hv.status()["nodes"][0]["last_takeover"]
        assert list(view["stages"]) == STAGES[:3] and "first_request" not in view
        assign_reply(hv, t0)
    else:
        assign_reply(hv, t0)
        assert completions(hv) == []
        first_request(hv, t0 + 0.040)
    [done] = completions(hv)
    assert done["node"] == "node2" and done["identity"] == "node1" and done["failed"] == "node1"
    assert list(done["stages_ms"]) == STAGES
    assert done["stages_ms"]["identity_assumed"] == pytest.approx(31.0)
    assert done["stages_ms"]["first_request_served"] == pytest.approx(40.0)
    assert hv.status()["nodes"][0]["last_takeover"]["stages"] == done["stages_ms"]
    first_request(hv, t0 + 0.050)  # a later first request (another bind) completes nothing again
    assert len(completions(hv)) == 1
