"""CLI argument handling of the storage commands, without a cluster: one line, non-zero exit."""

from __future__ import annotations

import sys

import pytest

from storage import loopdev
from vmemu import cli as vcli
from vmemu.cli_storage import parse_size
from vmemu.errors import BadRequest


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["vmemu", *args])
    with pytest.raises(SystemExit) as exc:
        vcli.main()
    return int(exc.value.code or 0), capsys.readouterr().err


def test_up_with_loop_devices_unavailable_is_one_line_and_makes_nothing(monkeypatch, capsys,
                                                                        tmp_path):
    monkeypatch.setattr(loopdev, "available", lambda: (False, "not root"))
    d = tmp_path / "never"
    code, err = run_main(monkeypatch, capsys, "--data-dir", str(d), "up", "--detach",
                         "--disk-backend", "loop")
    assert code != 0
    assert err.strip().splitlines() == ["vmemu: --disk-backend loop is not available here: not root"]
    assert not d.exists()  # nothing was changed


@pytest.mark.parametrize("text,want", [("4096", 4096), ("512M", 512 << 20), ("2G", 2 << 30),
                                       ("1.5G", 3 << 29), ("64MiB", 64 << 20), ("1k", 4096),
                                       ("10", 4096)])
def test_sizes_parse_and_round_up_to_4k(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1M", "0", "12X", "1e9", "lots"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_size(text)


@pytest.mark.parametrize("args,needle", [
    (["disk", "fail", "node1", "dX"], "not a disk name"),
    (["lun", "create", "novolume", "--size", "1M"], "must be named VOLUME/LUN"),
    (["volume", "create", "v", "--node", "node1", "--size", "huge"], "is not a size"),
])
def test_argument_mistakes_are_one_line_before_any_cluster_is_asked(monkeypatch, capsys,
                                                                    tmp_path, args, needle):
    code, err = run_main(monkeypatch, capsys, "--data-dir", str(tmp_path), *args)
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
