"""`vmemu chaos check`: exit 0 valid, 1 not, 2 unknown, 3 bad input (one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmemu import cli as vcli
from vmemu.chaos.history import Op, to_events, write_events

ROOT = Path(__file__).resolve().parents[2]


def chaos(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", "check", *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def history(path: Path, ops: list[tuple[str, str | None, int, int]]) -> Path:
    """(f, value, invoke, complete) ops on one block, each by its own process."""
    made = [Op(i, i, f, "n1/lun0/0", v, "ok", a, b) for i, (f, v, a, b) in enumerate(ops)]
    with path.open("w") as fp:
        write_events(to_events(made), fp)
    return path


def test_valid_history_exits_0(tmp_path: Path) -> None:
    p = chaos(str(history(tmp_path / "h.jsonl", [("write", "a", 0, 10), ("read", "a", 11, 12)])))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["valid: linearizable (2 ops over 1 block)"]


def test_invalid_history_exits_1_and_names_the_anomaly(tmp_path: Path) -> None:
    h = history(tmp_path / "h.jsonl", [("write", "a", 0, 10), ("write", "b", 11, 20),
                                       ("read", "a", 21, 22)])
    p = chaos(str(h))
    assert p.returncode == 1, p.stderr
    assert p.stdout.startswith("NOT linearizable: 1 anomaly in 1 of 1 block")
    assert "lost on n1/lun0/0" in p.stdout
    j = chaos("--json", str(h))
    assert j.returncode == 1
    verdict = json.loads(j.stdout)
    assert (verdict["valid"], verdict["blocks"], verdict["ops"]) == (False, 1, 3)
    (a,) = verdict["anomalies"]
    assert a["kind"] == "lost" and a["block"] == "n1/lun0/0"
    assert [op["line"] for op in a["ops"]] == [3, 1, 5]  # b (lost), a, then the read


def test_out_of_budget_exits_2(tmp_path: Path) -> None:
    # 22 concurrent writes, then two reads that no order of them explains: far more search
    # than a microsecond allows
    ops = [("write", f"w{k}", 0, 100) for k in range(22)]
    h = history(tmp_path / "h.jsonl", ops + [("read", "w0", 200, 210), ("read", "w1", 220, 230)])
    p = chaos("--budget", "0.000001", "--json", str(h))
    assert p.returncode == 2, p.stderr
    verdict = json.loads(p.stdout)
    assert verdict["valid"] == "unknown" and verdict["unknown_blocks"] == ["n1/lun0/0"]


def test_malformed_history_exits_3_with_one_line(tmp_path: Path) -> None:
    h = tmp_path / "h.jsonl"
    history(h, [("write", "a", 0, 10)])
    with h.open("a") as fp:
        fp.write('{"process": 1, "type": "ok", "f": "read", "block": "x", "value": null, '
                 '"time": 5}\n')
    p = chaos(str(h))
    assert p.returncode == 3
    assert p.stdout == ""
    assert p.stderr.splitlines() == [
        f"vmemu: {h}: line 3: ok completion of process 1 with no open invoke"]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["vmemu", "chaos", "check", *args])
    code = 0
    try:
        vcli.main()  # --help returns (click's standalone mode is off); everything else exits
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/h.jsonl"], "vmemu: /nonexistent/h.jsonl: No such file or directory"),
    (["--bogus", "h.jsonl"], "vmemu: No such option"),
    (["--budget", "0", "h.jsonl"], "vmemu: Invalid value for '--budget'"),
    ([], "vmemu: Missing argument 'HISTORY'."),
])
def test_bad_invocations_exit_3(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], args: list[str],
                                message: str) -> None:
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and err.startswith(message)
    assert "Traceback" not in err


def test_binary_garbage_is_bad_input(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    h = tmp_path / "h.jsonl"
    h.write_bytes(b"\x00\xff\xfe garbage\n")
    code, _, err = run_main(monkeypatch, capsys, str(h))
    assert code == 3 and err.startswith(f"vmemu: {h}: line 1: not JSON")


def test_help_documents_the_exit_codes(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(monkeypatch, capsys, "--help")
    assert code == 0
    for line in ("0  valid", "1  not linearizable", "2  unknown", "3  bad input"):
        assert line in out
