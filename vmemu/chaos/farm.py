"""A campaign farmed out to a dask.distributed cluster (`vmemu chaos --scheduler tcp://...`).

Runs are independent, so each is one dask task: a worker runs it on its own host, in a
scratch directory there (a cluster of its own, like a `--jobs` run), and sends back its
result. A passing run sends back its record (result, verdict, schedule, spec, faults); a
failing one its whole run directory, as a gzipped tar in the task's result, bounded
(`MAX_FILE`, `MAX_BACK`: a cluster's disk images do not travel, and what was left out is
named in `farm-omitted.txt`). The submitting host writes each under `--out/seed-N` as a
local campaign would, and sums them up with the same `summarize`: progress, summary.json,
`--json` and the exit status are those of a local campaign.

A worker that dies mid-task is dask's business: the scheduler gives the task to another
worker (up to its `allowed-failures`). A run that raises (it could not even be run, as
opposed to failing its verdict) is retried `RETRIES` times; one that keeps failing to run
comes back as an error result, `valid: "unknown"` with `run_error` set, which counts as a
failing seed, never as a pass.

dask is imported here only, and only when a scheduler is given: `--jobs` alone runs without
it (the `farm` extra: pip install 'vmemu[farm]').
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from vmemu.chaos.campaign import spec_from_dict, spec_to_dict, summarize
from vmemu.chaos.run import RunSpec, failed, run
from vmemu.privfs import ensure_private_dir

RETRIES = 2  # a run that raised is run again this many times before it is an error
MAX_FILE = 16 << 20  # one file of a failing run's directory sent back, at most
MAX_BACK = 64 << 20  # all of them, before compression
MAX_MEMBERS = 10_000
RECORD = ("result.json", "verdict.json", "schedule.json", "spec.json", "faults.jsonl")
OMITTED = "farm-omitted.txt"


class FarmUnavailable(Exception):
    """The farm cannot be used: dask is not installed, or the scheduler cannot be reached."""


def require() -> Any:
    """The `distributed` module, or FarmUnavailable saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise FarmUnavailable("--scheduler needs dask.distributed, which is not installed "
                              "(pip install 'vmemu[farm]')") from None
    return distributed


def check_address(address: str) -> str:
    """A scheduler address as `dask scheduler` prints it: tcp://host:port (or tls://)."""
    scheme, sep, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if not sep or scheme not in ("tcp", "tls") or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"--scheduler {address!r} is not a scheduler address "
                         "(e.g. tcp://10.0.0.1:8786)")
    return address


# -- on the worker ---------------------------------------------------------------------------
def pack(run_dir: Path, whole: bool) -> bytes:
    """The run's files as a gzipped tar: its record, or (`whole`) everything within bounds,
    top-level files first; a file left out is named in farm-omitted.txt."""
    files = sorted((p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: (len(p.relative_to(run_dir).parts), str(p)))
    if not whole:
        files = [p for p in files if p.parent == run_dir and p.name in RECORD]
    buf = io.BytesIO()
    total = 0
    omitted: list[str] = []
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for p in files:
            rel = str(p.relative_to(run_dir))
            size = p.stat().st_size
            if size > MAX_FILE or total + size > MAX_BACK or len(tar.getmembers()) >= \
                    MAX_MEMBERS - 1:
                omitted.append(f"{rel}\t{size} bytes")
                continue
            total += size
            tar.add(p, arcname=rel, recursive=False)
        if omitted:
            note = ("not sent back, over the farm's bounds (vmemu/chaos/farm.py, MAX_FILE and "
                    "MAX_BACK); the worker's copy is removed with its scratch dir:\n"
                    + "\n".join(omitted) + "\n").encode()
            info = tarfile.TarInfo(OMITTED)
            info.size = len(note)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(note))
    return buf.getvalue()


def run_on_worker(spec_d: dict[str, Any]) -> dict[str, Any]:
    """The task: one run in a scratch directory of this host, then its files, packed."""
    spec = spec_from_dict(spec_d)
    scratch = Path(tempfile.mkdtemp(prefix=f"vmemu-farm-{spec.seed}-"))
    try:
        run_dir = scratch / f"seed-{spec.seed}"
        res = run(spec, run_dir)
        return {"result": res, "files": pack(run_dir, whole=failed(res)),
                "host": socket.gethostname()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- on the submitting host ------------------------------------------------------------------
def unpack(data: bytes, dest: Path) -> None:
    """A worker's tar into `dest`: regular files and directories only, within bounds (the
    bytes crossed a network; tarfile's `data` filter refuses absolute paths, `..` and
    links that leave `dest`)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = []
        total = 0
        for m in tar:
            parts = Path(m.name).parts
            if len(members) >= MAX_MEMBERS or not (m.isfile() or m.isdir()) or not parts \
                    or m.name.startswith("/") or ".." in parts:
                raise ValueError(f"not a run directory: member {m.name!r}")
            total += m.size
            if total > MAX_BACK + (1 << 20):
                raise ValueError("a run directory over the farm's bound")
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def receive(reply: dict[str, Any], out: Path) -> dict[str, Any]:
    """A task's reply written under `out/seed-N`, as a local run would have left it."""
    res = dict(reply["result"])
    dest = ensure_private_dir(out / f"seed-{res['seed']}", "chaos run dir")
    unpack(reply["files"], dest)
    res["ran_on"] = f"{reply.get('host', '?')}:{res.get('out')}"
    res["out"] = str(dest)  # where --replay finds it now
    (dest / "result.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


def run_error(seed: int, out: Path, why: str) -> dict[str, Any]:
    """A run that could not be run (raised each time, or its workers kept dying)."""
    dest = ensure_private_dir(out / f"seed-{seed}", "chaos run dir")
    res = {"seed": seed, "valid": "unknown", "out": str(dest), "ops": {}, "faults": {},
           "nemesis_error": f"the run failed to run on the farm: {why}", "run_error": why}
    (dest / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def farm_campaign(base: RunSpec, runs: int, out: Path, scheduler: str,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  task: Callable[[dict[str, Any]], dict[str, Any]] = run_on_worker,
                  connect_timeout: float = 10.0) -> dict[str, Any]:
    """`campaign`'s twin: the same seeds, the same summary, the runs done by dask workers."""
    distributed = require()
    check_address(scheduler)
    t0 = time.monotonic()
    try:
        client = distributed.Client(scheduler, timeout=connect_timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise FarmUnavailable(f"cannot reach the dask scheduler at {scheduler}: {exc}") \
            from None
    out = ensure_private_dir(out, "campaign dir")
    tag = uuid.uuid4().hex[:8]  # keys unique to this campaign on a shared scheduler
    results: list[dict[str, Any]] = []
    try:
        seeds: dict[Any, int] = {}
        for i in range(runs):
            spec_d = dict(spec_to_dict(base), seed=base.seed + i)
            fut = client.submit(task, spec_d, key=f"vmemu-chaos-{tag}-seed-{spec_d['seed']}",
                                retries=RETRIES, pure=False)
            seeds[fut] = spec_d["seed"]
        for fut in distributed.as_completed(list(seeds), loop=client.loop):
            seed = seeds.pop(fut)
            try:
                r = receive(fut.result(), out)
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a raising run, bad bytes
                r = run_error(seed, out, f"{type(exc).__name__}: {exc}")
            fut.release()  # its bytes need not stay on a worker
            results.append(r)
            if progress:
                progress(r)
    finally:
        client.close()
    summary = summarize(results)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
