"""vmemu's load generator and verify speak NBD too: here against nbdkit's memory plugin."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from clients.load import LoadSpec, run_load
from clients.nbd_client import NbdClient
from clients.verify import verify

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed")


@pytest.fixture
def nbdkit_uri():
    """nbdkit's memory plugin on a socket this test already listens on, handed over by socket
    activation (fd 3, LISTEN_PID, LISTEN_FDS, as systemd does it): no port is picked, freed
    and bound again, which another test could take in between, and nothing to wait for."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port, fd = listener.getsockname()[1], listener.fileno()
        move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "  # bash: any fd number
        proc = subprocess.Popen(
            ["bash", "-c", f"{move}LISTEN_PID=$$ LISTEN_FDS=1 exec nbdkit -f memory size=32M"],
            pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


def test_load_and_verify_over_nbd(nbdkit_uri, tmp_path: Path):
    journal = tmp_path / "w.jsonl"
    summary = run_load(nbdkit_uri, LoadSpec(duration=1.0, iodepth=8), journal, nbdkit_uri)
    assert summary["errors"] == 0 and summary["write"]["ops"] > 100
    res = verify(nbdkit_uri, journal)
    assert res["passed"] and res["ok"] > 0


def test_nbd_client_reads_back_and_reports_size(nbdkit_uri):
    with NbdClient(nbdkit_uri) as c:
        assert c.info()["luns"][0]["size"] == 32 << 20
        c.write(0, 8192, b"\x5a" * 4096)
        assert c.read(0, 8192, 4096) == b"\x5a" * 4096


def test_a_held_load_runs_past_its_duration_until_released(nbdkit_uri):
    until = threading.Event()
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(summary=run_load(
        nbdkit_uri, LoadSpec(duration=0.2, iodepth=4), None, nbdkit_uri, until=until)), daemon=True)
    t.start()
    try:
        t.join(1.5)  # over seven times its duration
        assert t.is_alive(), "the load ended at its duration although it was held"
    finally:
        until.set()
    t.join(30)
    assert not t.is_alive(), "the load did not end once released"
    assert box["summary"]["runtime_s"] > 1.0 and box["summary"]["errors"] == 0
