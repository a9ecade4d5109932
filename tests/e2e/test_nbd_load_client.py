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


def _journal_with_history(uri: str, tmp_path: Path) -> Path:
    """A load over a small range, so that ranges are written several times each."""
    journal = tmp_path / "w.jsonl"
    summary = run_load(uri, LoadSpec(duration=1.0, iodepth=8, size=256 << 10), journal, uri)
    assert summary["errors"] == 0
    return journal


def _verify_cli(uri: str, journal: Path) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "vmemu.cli", "verify", "--journal", str(journal),
                           "--target", uri], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["lose", "corrupt", "revert"])
def test_verify_fails_naming_the_block_damaged_behind_its_back(nbdkit_uri, tmp_path: Path, damage):
    """A checker that cannot fail proves nothing: damage one acknowledged block, see it named."""
    from clients import pattern
    from clients.journal import Journal

    journal = _journal_with_history(nbdkit_uri, tmp_path)
    assert _verify_cli(nbdkit_uri, journal).returncode == 0
    j = Journal.load(journal)
    client_id, bs = int(j.header["client"]), int(j.header["bs"])
    # A range written more than once, every write acknowledged: "revert" has a past to restore.
    off, reqs = next((o, r) for o, r in sorted(j.writes.items())
                     if len(r) >= 2 and all(x in j.acked for x in r))
    with NbdClient(nbdkit_uri) as c:
        if damage == "lose":
            c.write(0, off, bytes(bs))
        elif damage == "corrupt":
            data = bytearray(c.read(0, off, bs))
            data[bs // 2] ^= 0x01
            c.write(0, off, bytes(data))
        else:
            c.write(0, off, pattern.make(client_id, reqs[-2], off, bs))
    res = _verify_cli(nbdkit_uri, journal)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "verify: FAILED" in res.stdout
    problems = [l for l in res.stdout.splitlines() if "problem:" in l]
    assert len(problems) == 1 and f"'offset': {off}" in problems[0], res.stdout
    word = {"lose": "1 lost", "corrupt": "1 corrupt", "revert": "1 lost"}[damage]
    assert word in res.stdout
