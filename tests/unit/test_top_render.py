"""`vmemu top` without a terminal: the pure frame, IOPS, the event tail, keys and actions."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from tests.top_screen import domain_rows, selected
from vmemu import top
from vmemu.errors import InvalidState
from vmemu.top import IopsMeter, Message, TopState, parse_keys, render

MiB = 1 << 20
CONFIG = {"nodes": 4, "topology": "pairs", "heartbeat_ms": 50, "heartbeat_misses": 10, "nvram_mb": 16,
          "disks": 2, "disk_mb": 32, "grant_mode": "ro", "giveback_delay_s": 0.2, "cp_interval_s": 5.0,
          "cluster_id": "c0ffee01", "ha_mode": "shm"}


def node(name: str, **kw: Any) -> dict[str, Any]:
    n = {"name": name, "pid": 1000 + int(name[4:]), "state": "serving", "partner": None,
         "takeover_possible": True, "heartbeat_age_ms": 12.0, "nvlog_used": 0,
         "nvlog_capacity": 16 * MiB, "last_cp_age_s": 1.5, "cp_count": 3, "ops": 0,
         "identity_served_by": name, "serves": [name], "region": "0x1", "endpoint": f"ipc://@x-{name}",
         "last_takeover": None}
    n.update(kw)
    return n


def status() -> dict[str, Any]:
    """The documented `vmemu status --json` shape: node1 down and taken over by node2."""
    return {
        "version": 1, "cluster_id": "c0ffee01", "hypervisor_pid": 999, "uptime_s": 83.0,
        "config": CONFIG, "regions_held": 4,
        "grants": [
            {"region": "0xaa01", "owner": "node1", "grantee": "node2", "mode": "ro", "owner_alive": False},
            {"region": "0xaa02", "owner": "node2", "grantee": "node1", "mode": "ro", "owner_alive": True},
            {"region": "0xaa03", "owner": "node3", "grantee": "node4", "mode": "ro", "owner_alive": True},
        ],
        "nodes": [
            node("node1", pid=None, state="down", partner="node2", takeover_possible=False,
                 heartbeat_age_ms=None, nvlog_used=None, nvlog_capacity=None, last_cp_age_s=None,
                 cp_count=None, ops=None, identity_served_by="node2", serves=[]),
            node("node2", partner="node1", takeover_possible=False, nvlog_used=8 * MiB,
                 ops=5000, serves=["node1", "node2"], heartbeat_age_ms=31.0),
            node("node3", partner="node4", nvlog_used=4 * MiB, ops=10),
            node("node4", partner="node3", state="booting", pid=1044, nvlog_used=None,
                 nvlog_capacity=None, last_cp_age_s=None, cp_count=None, ops=None,
                 identity_served_by=None, serves=[], heartbeat_age_ms=None),
        ],
    }


def events(n: int) -> list[dict[str, Any]]:
    return [{"t": 1_700_000_000.0 + i, "mono": 100.0 + i, "kind": f"kind{i:02d}", "node": "node1",
             "detail": f"d{i}"} for i in range(n)]


def text(renderable: Any, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_one_row_per_domain_with_state_identity_and_figures() -> None:
    screen = text(render(status(), events(3), selected=1, message=None,
                         iops={"node2": 1234.4, "node3": 0.0}))
    rows = domain_rows(screen)
    assert list(rows) == ["node1", "node2", "node3", "node4"]
    n1, n2, n3, n4 = (rows[n] for n in ("node1", "node2", "node3", "node4"))
    assert (n1["state"], n1["pid"], n1["partner"], n1["served by"], n1["serves"]) == \
        ("down", "-", "node2", "node2", "-")
    assert (n2["state"], n2["pid"], n2["served by"], n2["serves"]) == \
        ("serving", "1002", "node2", "node1,node2")
    assert n4["served by"] == "nobody" and n4["state"] == "booting"
    assert n2["heartbeat"] == "31ms" and n1["heartbeat"] == "-"
    assert n2["last CP"] == "1.5s ago" and n1["last CP"] == "-" and n4["last CP"] == "none yet"
    assert n2["takeover"] == "no" and n3["takeover"] == "yes"
    assert n2["IOPS"] == "1,234" and n3["IOPS"] == "0" and n1["IOPS"] == "-" and n4["IOPS"] == "-"


def test_nvlog_fill_is_one_labelled_bar_of_the_whole_log() -> None:
    rows = domain_rows(text(render(status(), [], 0)))
    assert rows["node2"]["NVLog fill"] == "log [" + "█" * 10 + "░" * 10 + "]  50% 8.0/16M"
    assert rows["node3"]["NVLog fill"] == "log [" + "█" * 5 + "░" * 15 + "]  25% 4.0/16M"
    assert rows["node1"]["NVLog fill"] == "-"  # a down domain: no figures, not stale ones
    empty = domain_rows(text(render({**status(), "nodes": [node("node1", nvlog_used=0)]}, [], 0)))
    assert empty["node1"]["NVLog fill"] == "log [" + "░" * 20 + "]   0% 0.0/16M"
    tiny = domain_rows(text(render({**status(), "nodes": [node("node1", nvlog_used=100)]}, [], 0)))
    assert tiny["node1"]["NVLog fill"].startswith("log [█" + "░" * 19 + "] <1%")


def test_nvlog_halves_get_a_bar_each_once_status_reports_them() -> None:
    n = node("node1", nvlog_halves=[{"used": 8 * MiB, "capacity": 8 * MiB},
                                    {"used": 0, "capacity": 8 * MiB}])
    cell = domain_rows(text(render({**status(), "nodes": [n]}, [], 0)))["node1"]["NVLog fill"]
    assert cell == "half0 [" + "█" * 10 + "] 100%  half1 [" + "░" * 10 + "]   0%"


def test_selection_marker_is_on_the_selected_row_only() -> None:
    for i, name in enumerate(["node1", "node2", "node3", "node4"]):
        assert selected(text(render(status(), [], selected=i))) == [name]


def test_grant_table_lists_owner_region_grantee_mode_and_owner_liveness() -> None:
    screen = text(render(status(), [], 0))
    assert "NVRAM regions held by the hypervisor: 4" in screen
    grant_lines = [l.split() for l in screen.splitlines() if "->" in l]
    assert grant_lines == [["node1", "0xaa01", "->", "node2", "ro", "down"],
                           ["node2", "0xaa02", "->", "node1", "ro", "alive"],
                           ["node3", "0xaa03", "->", "node4", "ro", "alive"]]
    assert "no grants" in text(render({**status(), "grants": []}, [], 0))


def test_events_legend_and_message_are_shown() -> None:
    evs = events(12)[-10:]
    screen = text(render(status(), evs, 0, Message("node1 is not running (state down)", "error", "12:00:01")))
    lines = screen.splitlines()
    shown = [l for l in lines if " kind" in l]
    assert [l.split()[2] for l in shown] == [f"kind{i:02d}" for i in range(2, 12)]  # oldest first
    assert all(l.split()[1] == "node1" and "detail=d" in l for l in shown)
    assert "12:00:01 error: node1 is not running (state down)" in screen
    assert "Traceback" not in screen
    assert "c crash" in screen and "q quit" in screen and "h hang" in screen
    assert "cluster c0ffee01 · pairs · HA shm" in screen and "3/4 serving" not in screen and "2/4 serving" in screen
    assert "no events yet" in text(render(status(), [], 0))


def test_once_frame_has_no_legend_and_no_status_shows_the_error() -> None:
    assert "q quit" not in text(render(status(), [], 0, interactive=False))
    screen = text(render(None, [], 0, None, error="status is stale: no answer"))
    assert "status is stale: no answer" in screen and "no status yet" in screen


def test_narrower_terminals_get_shorter_bars_then_fewer_columns() -> None:
    for width, bar, takeover in ((160, 20, True), (120, 10, True), (100, 6, False)):
        screen = text(render(status(), events(5), 1, Message("ok"), width=width), width=width)
        assert max(len(l) for l in screen.splitlines()) <= width
        rows = domain_rows(screen)
        assert list(rows) == ["node1", "node2", "node3", "node4"]  # names never cut
        assert rows["node1"]["served by"] == "node2" and rows["node2"]["serves"] == "node1,node2"
        full = bar // 2
        assert rows["node2"]["NVLog fill"].startswith("log [" + "█" * full + "░" * (bar - full) + "]  50%")
        assert ("takeover" in rows["node2"]) == takeover
        assert selected(screen) == ["node2"]


# -- IOPS ------------------------------------------------------------------------------------
def sample(ops: dict[str, int | None], pids: dict[str, int] | None = None) -> dict[str, Any]:
    return {"nodes": [{"name": n, "pid": (pids or {}).get(n, 1), "ops": o} for n, o in ops.items()]}


def test_iops_is_the_ops_difference_over_elapsed_time() -> None:
    m = IopsMeter(window=1.0)
    m.add(10.0, sample({"node1": 100, "node2": None}))
    assert m.rates() == {}  # one sample: nothing to tell yet
    m.add(10.5, sample({"node1": 600, "node2": None}))
    assert m.rates() == {"node1": pytest.approx(1000.0), "node2": None}
    for k in range(1, 9):  # samples every 0.25 s at 2000 ops/s: the base stays ~1 s back
        m.add(10.5 + k * 0.25, sample({"node1": 600 + 500 * k, "node2": None}))
    assert m.rates()["node1"] == pytest.approx(2000.0)
    assert m.samples[-1][0] - m.samples[0][0] <= 1.25


def test_a_restarted_domain_has_no_iops_until_two_samples_of_its_new_pid() -> None:
    m = IopsMeter()
    m.add(0.0, sample({"node1": 9000}, {"node1": 1}))
    m.add(0.25, sample({"node1": 3}, {"node1": 2}))
    assert m.rates()["node1"] is None
    assert top.iops_between({"pid": 2, "ops": 3}, {"pid": 2, "ops": 53}, 0.5) == 100.0


# -- the event tail --------------------------------------------------------------------------
def test_event_tail_reads_appended_lines_and_waits_for_unfinished_ones(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = top.EventTail(path)
    assert tail.poll() == []
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "a"}) + "\n" + '{"kind": "b"')
    assert [e["kind"] for e in tail.poll()] == ["a"]
    with open(path, "a") as f:
        f.write("}\nnot json\n" + json.dumps({"kind": "c"}) + "\n")
    assert [e["kind"] for e in tail.poll()] == ["a", "b", "c"]
    path.write_text(json.dumps({"kind": "new"}) + "\n")  # truncated and rewritten: start over
    assert [e["kind"] for e in tail.poll()] == ["new"]


def test_event_tail_of_a_big_log_starts_near_its_end(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"kind": f"k{i}", "pad": "x" * 100}) + "\n" for i in range(5000)))
    evs = top.EventTail(path, keep=100, backlog=20_000).poll()
    assert [e["kind"] for e in evs] == [f"k{i}" for i in range(4900, 5000)]  # no half line from the cut


# -- keys and actions ------------------------------------------------------------------------
def test_parse_keys_arrows_letters_and_split_sequences() -> None:
    assert parse_keys(b"jk\x1b[A\x1b[B\x1bOAq") == (["j", "k", "up", "down", "up", "q"], b"")
    assert parse_keys(b"j\x1b[") == (["j"], b"\x1b[")  # the rest may follow
    assert parse_keys(b"\x1b[15~c") == (["c"], b"")  # F5: ignored
    assert parse_keys(b"\x1bx") == (["esc", "x"], b"")


class FakeControl:
    def __init__(self, hypervisor_pid: int | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.info = {"hypervisor_pid": hypervisor_pid or os.getpid()}

    def status(self) -> Any:
        return SimpleNamespace(raw=status())

    def call(self, op: str, args: dict) -> Any:
        self.calls.append((op, args))
        if op == "restart" and args["node"] == "node2":
            raise InvalidState("node2 is serving; only a down node can be restarted")
        return {"pid": 4242, "node": args["node"]}

    def close(self) -> None:
        pass


def test_keys_move_the_selection_and_act_on_the_selected_domain(tmp_path: Path) -> None:
    st = TopState(tmp_path)
    st.raw, st.ctl = status(), FakeControl()
    for k in ("up", "j", "down", "j", "j", "j", "k"):  # clamps at both ends
        st.key(k)
    assert st.selected_node() == "node3"
    st.key("c")
    assert st.ctl.calls[-1] == ("crash", {"node": "node3", "hang": False})
    assert st.message.level == "ok" and "node3 (pid 4242) killed with SIGKILL" in st.message.text
    st.key("h")
    assert st.ctl.calls[-1] == ("crash", {"node": "node3", "hang": True})
    assert "SIGSTOP" in st.message.text and "500ms" in st.message.text
    st.key("g")
    assert st.ctl.calls[-1] == ("giveback", {"node": "node3"}) and "giveback of node3" in st.message.text
    st.key("k")
    st.key("r")
    assert st.ctl.calls[-1] == ("restart", {"node": "node2"})
    assert st.message == Message("node2 is serving; only a down node can be restarted", "error",
                                 st.message.at)
    screen = text(st.frame())
    assert "error: node2 is serving; only a down node can be restarted" in screen
    assert "Traceback" not in screen and selected(screen) == ["node2"]


def test_frame_shows_the_last_ten_events_of_the_log(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events(25)))
    st = TopState(tmp_path)
    st.raw = status()
    screen = text(st.frame())
    assert [l.split()[2] for l in screen.splitlines() if " kind" in l] == \
        [f"kind{i:02d}" for i in range(15, 25)]


def test_a_stopped_cluster_leaves_the_last_status_on_screen_marked_stale(tmp_path: Path) -> None:
    st = TopState(tmp_path)
    st.ctl = FakeControl()
    st.sample()
    assert st.raw is not None and st.error is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    st.ctl = FakeControl(hypervisor_pid=gone.pid)
    st.sample()  # no RPC timeout to wait out: the hypervisor is known to be gone
    assert st.ctl is None and st.error == f"status is stale: the cluster stopped (hypervisor pid {gone.pid} exited)"
    st.sample()  # finding the cluster afresh: there is none in this dir
    assert st.error.startswith("status is stale: no cluster is running in")
    st.key("c")
    assert st.message.level == "error" and st.message.text.startswith("cannot crash node1: status is stale")
    screen = text(st.frame())
    assert "status is stale: no cluster is running" in screen and list(domain_rows(screen)) == \
        ["node1", "node2", "node3", "node4"]
