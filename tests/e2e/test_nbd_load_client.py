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
