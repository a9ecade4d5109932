"""fio over NBD: find a cluster's NBD export, run fio against it or against nbdkit's memory plugin.

The NBD export is optional (it may not exist in this tree yet): a node's status row carries
`"nbd": {"uris": ["nbd://127.0.10.1:PORT/lun0", ...]}` when it does, and the cluster config
then has an `nbd_port` field (0: pick a free port). Every function here says why it could not
run instead of raising, so a bench part can record "skipped: <reason>".
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import fields
from typing import Any

from vmemu.config import ClusterConfig

FIO = "/usr/bin/fio"


def fio_path() -> str | None:
    return FIO if os.access(FIO, os.X_OK) else None


def nbdkit_path() -> str | None:
    return shutil.which("nbdkit")


def nbd_config() -> dict[str, Any]:
    """Extra Cluster(...) keyword arguments that turn the NBD export on, if this tree has one."""
    return {"nbd_port": 0} if "nbd_port" in {f.name for f in fields(ClusterConfig)} else {}


def nbd_uri(status_raw: dict[str, Any], lun: int = 0) -> tuple[str | None, str]:
    """(URI of node1's export of `lun`, "") or (None, why there is none)."""
    if not nbd_config():
        return None, "no NBD export in this tree (ClusterConfig has no nbd_port)"
    try:
        node = status_raw["nodes"][0]
    except (KeyError, IndexError, TypeError):
        return None, "status has no nodes"
    nbd = node.get("nbd")
    if not isinstance(nbd, dict):
        return None, f"status of {node.get('name')} has no 'nbd' entry"
    uris = [u for u in (nbd.get("uris") or []) if isinstance(u, str)]
    if not uris:
        return None, f"status of {node.get('name')} lists no NBD URIs"
    for u in uris:
        if u.rstrip("/").endswith(f"/lun{lun}"):
            return u, ""
    return uris[0], ""


def fio_args(runtime_s: float, size: str = "64M") -> list[str]:
    """The fio job of every NBD figure, without --uri."""
    return ["--name=j", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16",
            f"--runtime={max(1, round(runtime_s))}", "--time_based", f"--size={size}",
            "--output-format=json"]


def parse_fio(stdout: str) -> dict[str, Any]:
    """fio's JSON (after any banner lines such as 'fio: connected to NBD server') -> summary."""
    i = stdout.find("{")
    if i < 0:
        raise ValueError(f"no JSON in fio's output: {stdout[-300:]!r}")
    doc, _ = json.JSONDecoder().raw_decode(stdout[i:])
    job = doc["jobs"][0]
    w = job["write"]
    pct = (w.get("clat_ns") or {}).get("percentile") or {}

    def us(key: str) -> float | None:
        v = pct.get(key)
        return None if v is None else round(v / 1000.0, 1)

    return {"iops": round(float(w["iops"]), 1), "clat_us": {"p50": us("50.000000"),
                                                             "p99": us("99.000000")},
            "total_ios": w.get("total_ios"), "runtime_ms": w.get("runtime"),
            "error": job.get("error", 0), "fio_version": doc.get("fio version")}


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run in a session of its own, so a timeout can stop fio and nbdkit's children with it."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the group of the process we started, nothing else
        p.communicate()
        raise RuntimeError(f"{os.path.basename(cmd[0])} did not finish within {timeout:.0f} s")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {p.returncode}: "
                           f"{(err or out).strip()[-400:]}")
    res = parse_fio(out)
    if res["error"]:
        raise RuntimeError(f"fio reported job error {res['error']}: {err.strip()[-400:]}")
    return res


def run_fio(uri: str, runtime_s: float) -> dict[str, Any]:
    fio = fio_path()
    if fio is None:
        raise RuntimeError(f"{FIO} not found")
    res = _run([fio, *fio_args(runtime_s), f"--uri={uri}"], timeout=runtime_s + 60)
    res["uri"] = uri
    return res


def run_fio_nbdkit_memory(runtime_s: float, size: str = "1G") -> dict[str, Any]:
    """The same fio job against `nbdkit -U - memory size=1G --run 'fio ... --uri="$uri"'`."""
    fio, nbdkit = fio_path(), nbdkit_path()
    if fio is None or nbdkit is None:
        raise RuntimeError("fio or nbdkit not found")
    inner = shlex.join([fio, *fio_args(runtime_s)]) + ' --uri="$uri"'
    res = _run([nbdkit, "-U", "-", "memory", f"size={size}", "--run", inner],
               timeout=runtime_s + 60)
    res["server"] = f"nbdkit -U - memory size={size}"
    return res


def skip_reason_tools(need_nbdkit: bool = False) -> str | None:
    if fio_path() is None:
        return f"{FIO} not found"
    if need_nbdkit and nbdkit_path() is None:
        return "nbdkit not found"
    return None
