"""What a farmed run sends back (vmemu/chaos/farm.py): packed on the worker within bounds, and
unpacked on the submitting host as untrusted bytes. No dask needed: these are plain tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from vmemu.chaos import farm
from vmemu.chaos.campaign import summarize


def _run_dir(root: Path) -> Path:
    d = root / "seed-7"
    (d / "cluster" / "logs").mkdir(parents=True)
    for name in farm.RECORD + ("history.jsonl", "events.jsonl"):
        (d / name).write_text(json.dumps({"name": name}) + "\n")
    (d / "cluster" / "logs" / "node1.log").write_text("booted\n")
    with open(d / "cluster" / "disk0.img", "wb") as f:  # sparse: big, but costs nothing
        f.truncate(farm.MAX_FILE + 1)
    return d


def test_a_passing_run_sends_its_record_and_a_failing_one_its_dir_without_the_disks(tmp_path):
    d = _run_dir(tmp_path)
    small, whole = tmp_path / "small", tmp_path / "whole"
    farm.unpack(farm.pack(d, whole=False), small)
    assert sorted(p.name for p in small.iterdir()) == sorted(farm.RECORD)
    farm.unpack(farm.pack(d, whole=True), whole)
    assert (whole / "history.jsonl").read_text() == (d / "history.jsonl").read_text()
    assert (whole / "cluster" / "logs" / "node1.log").read_text() == "booted\n"
    assert not (whole / "cluster" / "disk0.img").exists()
    assert "cluster/disk0.img" in (whole / farm.OMITTED).read_text()


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isfile() else None)
    return buf.getvalue()


def _file(name: str, size: int = 1) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.size = size
    return m


def _link(name: str, to: str) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = tarfile.SYMTYPE, to
    return m


@pytest.mark.parametrize("members", [
    [_file("../escaped")],
    [_file("/etc/escaped")],
    [_link("result.json", "/etc/passwd")],
])
def test_bytes_from_a_worker_cannot_write_outside_the_run_dir(tmp_path, members):
    dest = tmp_path / "run"
    dest.mkdir()
    with pytest.raises((ValueError, tarfile.TarError)):
        farm.unpack(_tar(*members), dest)
    assert not (tmp_path / "escaped").exists() and list(dest.iterdir()) == []


def test_a_run_that_could_not_run_is_an_error_and_never_a_pass(tmp_path):
    err = farm.run_error(9, tmp_path, "KilledWorker: a worker died 3 times")
    s = summarize([err, {"seed": 8, "valid": True, "availability_ok": True}])
    assert (s["valid"], s["unknown"], s["run_errors"], s["failing_seeds"]) == (1, 1, 1, [9])
    assert json.loads((tmp_path / "seed-9" / "result.json").read_text())["run_error"]


@pytest.mark.parametrize("address", ["localhost:8786", "tcp://h", "tcp://h:0", "http://h:1",
                                     "tcp://:8786", "tcp://h:99999"])
def test_a_scheduler_address_is_checked_before_anything_is_started(address):
    with pytest.raises(ValueError, match="not a scheduler address"):
        farm.check_address(address)
    assert farm.check_address("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"
