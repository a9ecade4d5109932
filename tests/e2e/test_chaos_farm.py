"""A chaos campaign farmed out to dask.distributed (vmemu/chaos/farm.py), on a real LocalCluster
of two worker processes: the same summary as a local `--jobs` campaign of the same seeds, a
failing seed's run directory back on the submitting host, a worker that dies mid-task retried,
a run that keeps failing to run counted as an error, never as a pass.

A passing campaign is farmed and done locally side by side, and compared; a failing run (the
broken build) is farmed beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")  # the `test` extra installs it

pytestmark = pytest.mark.e2e

# Passing runs: seeds 31-32 draw a short SIGSTOP each, 2.0 and 2.2 s into 3.5 s of clients
# (cheap: nothing to restart). Budgets x50, as in test_chaos.py: on two loaded cores a guest
# once missed its heartbeats and was taken over, which a campaign must survive.
CAMPAIGN = ["--runs", "2", "--seed", "31", "--duration", "3.5s", "--faults", "pause_short",
            "--availability-slack", "50", "--json"]
# A failing run: seed 31 with kills is a kill -9 of node2 2.04 s in; on the broken build
# (acknowledged writes never put in NVRAM) the takeover loses writes, judged not
# linearizable. (A failover the host's load causes loses them too: it fails either way.)
BROKEN = ["--runs", "1", "--seed", "31", "--duration", "3.5s", "--faults", "kill",
          "--broken", "unlogged_ack", "--availability-slack", "50", "--json"]
# What a campaign on a loaded host reports alike, farmed or not (a fault may be skipped when
# its target is not serving at its time, so `faults` may differ; the verdicts may not).
SAME = ("runs", "valid", "invalid", "unknown", "failing_seeds", "run_errors")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """Two worker processes whose scratch dirs (TMPDIR) are the test's: what a run leaves
    there is seen by the leak checks, and the workers are gone once the module is done."""
    scratch = tmp_path_factory.mktemp("farm-scratch")
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, env={"TMPDIR": str(scratch)})
    with distributed.Client(lc, set_as_default=False) as c:
        pids = list(c.run(os.getpid).values())
    try:
        yield lc.scheduler_address, scratch
    finally:
        lc.close()
        end = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.1)
        left = [p for p in pids if _alive(p)]
        for p in left:
            os.kill(p, 9)
        assert not left, f"dask workers left running: {left}"


def chaos(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmemu.cli", "chaos", *args], cwd=cwd,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_farmed_campaign_sums_up_like_a_local_one_and_brings_back_the_failing_run(
        dask_cluster, tmp_path):
    address, scratch = dask_cluster
    # All three side by side: on two cores a run spends most of itself booting guests, and
    # the farm's two workers take the broken run when one of the others is done.
    procs = {"local": _start(tmp_path, *CAMPAIGN, "--out", "local", "--jobs", "2"),
             "farm": _start(tmp_path, *CAMPAIGN, "--out", "farm", "--scheduler", address),
             "broken": _start(tmp_path, *BROKEN, "--out", "broken", "--scheduler", address)}
    done: dict[str, tuple[int, str, str]] = {}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=400)
            done[name] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for name, (code, out, err) in done.items():
        assert code == (1 if name == "broken" else 0), (name, out + err)
    local, farmed, broken = (json.loads(done[n][1]) for n in ("local", "farm", "broken"))

    assert farmed.keys() == local.keys()
    assert {k: farmed[k] for k in SAME} == {k: local[k] for k in SAME} == \
        {"runs": 2, "valid": 2, "invalid": 0, "unknown": 0, "failing_seeds": [],
         "run_errors": 0}
    assert set(farmed["faults"]) <= {"pause_short"} and farmed["ops"] > 100
    assert json.loads((tmp_path / "farm" / "summary.json").read_text()) == farmed
    for seed in (31, 32):  # a pass sends back its record only
        good = tmp_path / "farm" / f"seed-{seed}"
        assert json.loads((good / "result.json").read_text())["valid"] is True
        assert (good / "verdict.json").exists() and not (good / "history.jsonl").exists()

    assert (broken["runs"], broken["invalid"], broken["failing_seeds"]) == (1, 1, [31])
    bad = tmp_path / "broken" / "seed-31"
    for name in ("schedule.json", "spec.json", "history.jsonl", "events.jsonl",
                 "faults.jsonl", "verdict.json", "result.json"):
        assert (bad / name).stat().st_size > 0, name
    res = json.loads((bad / "result.json").read_text())
    assert (tmp_path / res["out"]).resolve() == bad.resolve() and res["valid"] is False
    assert res["ran_on"].split(":", 1)[1].startswith(str(scratch))  # run on a worker
    assert {a["kind"] for a in json.loads((bad / "verdict.json").read_text())["anomalies"]} \
        & {"lost", "stale"}
    assert (bad / "cluster" / "logs").is_dir()  # the cluster's logs came back too
    check = subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", "check",
                            str(bad / "history.jsonl")], capture_output=True, text=True)
    assert check.returncode == 1  # the history that came back is the failing one
    assert not list(scratch.glob("vmemu-farm-*"))  # the workers cleaned up after themselves


def _reply(spec_d: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from vmemu.chaos.farm import pack

    d = Path(tempfile.mkdtemp(prefix=f"fake-{spec_d['seed']}-"))
    res = {"seed": spec_d["seed"], "valid": True, "ops": {"ok": 1}, "faults": {},
           "availability_ok": True, "out": str(d)}
    (d / "result.json").write_text(json.dumps(res))
    return {"result": res, "files": pack(d, whole=False), "host": "worker"}


def dies_once(spec_d: dict[str, Any]) -> dict[str, Any]:
    """Kills its worker process the first time it runs seed 1 (a host lost mid-run)."""
    mark = Path(os.environ["TMPDIR"]) / f"died-{spec_d['seed']}"
    if spec_d["seed"] == 1 and not mark.exists():
        mark.write_text(str(os.getpid()))
        os._exit(9)
    return _reply(spec_d)


def never_runs(spec_d: dict[str, Any]) -> dict[str, Any]:
    if spec_d["seed"] == 2:
        raise RuntimeError("no cluster can boot here")
    return _reply(spec_d)


def test_a_worker_lost_mid_run_is_retried_and_a_run_that_cannot_run_is_an_error(
        dask_cluster, tmp_path):
    from vmemu.chaos.farm import farm_campaign
    from vmemu.chaos.run import RunSpec

    address, scratch = dask_cluster
    seen: list[dict[str, Any]] = []
    s = farm_campaign(RunSpec(seed=1), 2, tmp_path / "a", address, seen.append, task=dies_once)
    assert (scratch / "died-1").exists()  # it did die once
    assert (s["runs"], s["valid"], s["failing_seeds"], s["run_errors"]) == (2, 2, [], 0)
    assert sorted(r["seed"] for r in seen) == [1, 2]

    s = farm_campaign(RunSpec(seed=1), 2, tmp_path / "b", address, task=never_runs)
    assert (s["runs"], s["valid"], s["unknown"], s["failing_seeds"], s["run_errors"]) == \
        (2, 1, 1, [2], 1)
    res = json.loads((tmp_path / "b" / "seed-2" / "result.json").read_text())
    assert "no cluster can boot here" in res["run_error"]


def test_without_dask_the_scheduler_option_is_one_line_and_exit_2(tmp_path):
    hide = ("import sys; sys.modules['distributed'] = None; from vmemu.cli import main; "
            "sys.argv[0] = 'vmemu'; main()")
    p = subprocess.run([sys.executable, "-c", hide, "chaos", "--runs", "2", "--scheduler",
                        "tcp://127.0.0.1:1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "pip install 'vmemu[farm]'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "chaos-runs").exists()


@pytest.mark.parametrize("address,code,says", [
    ("localhost:8786", 3, "is not a scheduler address"),
    ("tcp://127.0.0.1:1", 2, "cannot reach the dask scheduler"),
])
def test_a_bad_or_unreachable_scheduler_is_one_line(tmp_path, address, code, says):
    p = chaos(tmp_path, "--runs", "2", "--scheduler", address)
    assert p.returncode == code, p.stdout + p.stderr
    assert says in p.stderr and "Traceback" not in p.stderr
