"""--disk-backend loop: every disk image on a Linux loop device, I/O on the block device.

Skipped, saying why, where loop devices cannot be used (not root, no /dev/loop-control).
A leaked loop device is a bug: after `down`, and after every vmemu process is killed, none of
this cluster's images may still be attached.
"""

from __future__ import annotations

import os
import signal

import pytest

from clients.load import LoadSpec
from clients.verify import verify
from storage import loopdev
from tests.e2e.conftest import LoadRun, alive, wait_until

ok, why = loopdev.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"loop devices unavailable: {why}")

LOOP = dict(disk_backend="loop", disk_mb=64, disks=3)


def test_the_cluster_runs_on_loop_devices_survives_a_crash_and_detaches_at_down(
        make_cluster, tmp_path):
    c = make_cluster(nodes=2, **LOOP)
    attached = loopdev.attached(c.dir)
    assert len(attached) == 6 and all(d.startswith("/dev/loop") for d in attached.values())
    journal = tmp_path / "w.jsonl"
    load = LoadRun(c.endpoint("node1"), LoadSpec(duration=3.0, iodepth=16, size=4 << 20), journal)
    wait_until(lambda: (c.status().node("node1")["ops"] or 0) >= 500, 30, "load on node1")
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover")
    assert load.finish(60)["errors"] == 0
    res = verify(c.endpoint("node1"), journal)
    assert res["passed"], res["problems"]
    c.stop()
    # `down` detached every device; one that another process (anyone's `losetup --find`
    # scanning) had open that moment is freed by the kernel at its last close.
    wait_until(lambda: loopdev.leaked(c.dir) == [], 20, "every loop device to be freed after down")


def test_no_loop_device_outlives_a_cluster_killed_outright(make_cluster):
    c = make_cluster(nodes=2, **LOOP)
    pids = [n["pid"] for n in c.status().nodes] + [c.proc.pid]
    assert loopdev.leaked(c.dir)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every vmemu process to die")
    # The hypervisor held each device open with autoclear: the kernel frees them itself.
    wait_until(lambda: loopdev.leaked(c.dir) == [], 20, "the kernel to free the loop devices")
