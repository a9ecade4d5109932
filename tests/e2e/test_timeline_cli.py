"""`vmemu events --plot`: the timeline of a real run, drawn after the cluster has stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from clients.load import LoadSpec
from tests.e2e.conftest import LoadRun, wait_until


def test_timeline_of_a_takeover_under_load(make_cluster, tmp_path):
    c = make_cluster(nodes=2)
    load = LoadRun(c.endpoint("node1"), LoadSpec(duration=3.0, iodepth=8, size=4 << 20), None)
    wait_until(lambda: (c.status().node("node1")["ops"] or 0) >= 500, 30, "load on node1")
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "takeover by node2")
    wait_until(lambda: any(e["kind"] == "takeover_complete" for e in c.events()), 30,
               "the takeover's first answered request")
    assert load.finish(60)["errors"] == 0
    c.stop()  # the picture is drawn from the data dir's files alone

    png = tmp_path / "out.png"
    p = subprocess.run([sys.executable, "-m", "vmemu.cli", "--data-dir", str(c.dir), "events",
                        "--plot", str(png)], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "VMEMU_DATA_DIR"})
    assert p.returncode == 0, p.stderr + p.stdout
    m = re.fullmatch(r"vmemu: timeline written to (.+) \((\d+) events, lanes: (.+)\)", p.stdout.strip())
    assert m, p.stdout
    assert m.group(1) == str(png)
    assert int(m.group(2)) == len(c.events())
    assert m.group(3) == "hypervisor, node1, node2"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
