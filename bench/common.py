"""Shared helpers: timing, memcpy bandwidth, machine facts, leak checks."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

GB = 1e9
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best_and_median(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """Run `fn` `reps` times; (best seconds, median seconds, last result)."""
    times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def memcpy_gbps(nbytes: int, reps: int = 9) -> dict[str, Any]:
    """numpy copy bandwidth (bytes copied per second) between two prefaulted buffers."""
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)  # written once: every page is faulted in
    np.copyto(dst, src)
    best, median, _ = best_and_median(lambda: np.copyto(dst, src), reps)
    return {"bytes": nbytes, "gbps": nbytes / best / GB, "gbps_median": nbytes / median / GB,
            "reps": reps, "method": "np.copyto, best of reps"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def machine_facts() -> dict[str, Any]:
    cpu = "?"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    import numba
    import zmq

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "sse4_2": "sse4_2" in flags,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "numba": numba.__version__,
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "git": _git_rev(),
    }


def _git_rev() -> dict[str, Any]:
    """The commit measured: `git rev-parse HEAD`, and whether the tree differs from it (then
    "commit" ends in "-dirty": the figures are of that commit plus uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        full = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return {"rev": full[:7] or None, "commit": f"{full}{'-dirty' if dirty else ''}" or None,
                "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"rev": None, "commit": None, "dirty": None}


# -- hygiene: nothing may be left behind ----------------------------------------------------
def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def processes_mentioning(text: str) -> list[dict[str, Any]]:
    """Live processes whose command line contains `text` (e.g. a temp data dir)."""
    out = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append({"pid": int(d.name), "cmd": cmd.strip()[:200]})
    return out


def wait_no_processes(text: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    left = processes_mentioning(text)
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = processes_mentioning(text)
    return left
