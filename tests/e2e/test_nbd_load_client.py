"""vmemu's load generator and verify speak NBD too: here against nbdkit's memory plugin."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from clients.load import LoadSpec, run_load
from clients.nbd_client import NbdClient
from clients.verify import verify

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nbdkit_uri():
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "memory",
                             "size=32M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"nbd://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.02)
        yield uri
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
