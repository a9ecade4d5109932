"""The CLI as a user meets it: one clear line on a mistake, and the README's story."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import wait_until
from vmemu.cluster import Control, wait_for


def vmemu(data_dir, *args, check=False, timeout=120):
    env = dict(os.environ, VMEMU_DATA_DIR=str(data_dir))
    p = subprocess.run([sys.executable, "-m", "vmemu.cli", *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr + p.stdout
    return p


def wait_cluster(data_dir, pred, what, timeout=30.0):
    ctl = Control(data_dir)
    try:
        wait_for(ctl, pred, timeout, what)
    finally:
        ctl.close()


def assert_one_line_error(p, needle):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]


def test_commands_without_a_cluster_say_so_in_one_line(tmp_path):
    for cmd in (["status"], ["crash", "node1"], ["down"], ["load", "--duration", "1s"]):
        assert_one_line_error(vmemu(tmp_path / "none", *cmd), "no cluster is running")


def test_bad_arguments_are_one_line(tmp_path):
    assert_one_line_error(vmemu(tmp_path, "up", "--nodes", "3"), "odd")
    assert_one_line_error(vmemu(tmp_path, "load", "--bs", "banana"), "size")
    assert_one_line_error(vmemu(tmp_path, "verify", "--journal", str(tmp_path / "nope.jsonl")),
                          "cannot read journal")


def test_readme_story_on_the_command_line(tmp_path):
    d = tmp_path / "d"
    common = ["--disk-mb", "32", "--nvram-mb", "16", "--heartbeat-ms", "50",
              "--heartbeat-misses", "10", "--giveback-delay", "0.2", "--nbd-port", "0"]
    vmemu(d, "up", "--nodes", "2", "--detach", *common, check=True)
    try:
        assert_one_line_error(vmemu(d, "up", "--nodes", "2", "--detach"), "in use")
        assert_one_line_error(vmemu(d, "crash", "node7"), "unknown node")
        st = json.loads(vmemu(d, "status", "--json", check=True).stdout)
        assert [n["state"] for n in st["nodes"]] == ["serving", "serving"]
        assert [n["nbd"]["address"] for n in st["nodes"]] == ["127.0.10.1", "127.0.10.2"]  # default
        journal = tmp_path / "w.jsonl"
        load = subprocess.Popen([sys.executable, "-m", "vmemu.cli", "load", "--target", "node1",
                                 "--duration", "3s", "--size", "4M", "--journal", str(journal), "--json"],
                                env=dict(os.environ, VMEMU_DATA_DIR=str(d)), stdout=subprocess.PIPE,
                                text=True)
        # Crash once the load has acknowledged something (poll the journal, no sleeping).
        wait_until(lambda: journal.exists() and '"a"' in journal.read_text(), 30,
                   "the load's first acknowledged write in its journal")
        vmemu(d, "crash", "node1", check=True)
        out, _ = load.communicate(timeout=120)
        summary = json.loads(out)
        assert summary["version"] == 1 and summary["errors"] == 0 and summary["write"]["ops"] > 0
        assert "p99" in summary["write"]["clat_us"]
        # The load may have ended before the takeover did (the crash is a process of its own,
        # slow to start on a busy host): wait for it, then ask the CLI.
        wait_cluster(d, lambda s: s.node("node1")["identity_served_by"] == "node2", "takeover")
        st = json.loads(vmemu(d, "status", "--json", check=True).stdout)
        n1 = st["nodes"][0]
        assert n1["state"] == "down" and n1["identity_served_by"] == "node2"
        v = vmemu(d, "verify", "--journal", str(journal), check=True)
        assert "PASSED" in v.stdout
        vmemu(d, "restart", "node1", check=True)
        st = json.loads(vmemu(d, "status", "--json", check=True).stdout)
        assert st["nodes"][0]["identity_served_by"] == "node1"
        assert "PASSED" in vmemu(d, "verify", "--journal", str(journal), check=True).stdout
        ev = vmemu(d, "events", check=True).stdout
        for kind in ("failure_detected", "fenced", "replay_done", "identity_assumed", "giveback_started"):
            assert kind in ev
    finally:
        vmemu(d, "down", timeout=120)
    assert not (d / "cluster.json").exists()


def test_clean_down_then_up_keeps_every_write(tmp_path):
    d = tmp_path / "d"
    from vmemu.cluster import Cluster

    with Cluster(nodes=2, data_dir=d, disk_mb=32, nvram_mb=16, nbd_port=0) as c:
        with c.client("node2") as b:
            for i in range(16):
                b.write(1, i * 4096, bytes([0x40 + i]) * 4096)
    # The NVRAM is gone with the cluster: the final CP must have put everything on disk.
    with Cluster(nodes=2, data_dir=d, disk_mb=32, nvram_mb=16, nbd_port=0) as c:
        with c.client("node2") as b:
            for i in range(16):
                assert b.read(1, i * 4096, 4096) == bytes([0x40 + i]) * 4096
