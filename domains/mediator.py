"""The mediator domain: a third domain that allocates the NVRAM regions two partners share.

The patent's alternative placement (`vmemu up --nvram-placement mediator`): instead of each guest
allocating its own NVRAM at boot, a mediator domain allocates it, and the hypervisor hands it to
the guest, which writes its NVLog there, and read-only to the partner, which replays it at a
takeover. The mediator is a real OS process (`python -m domains.mediator`), spawned and
supervised by Domain 0 like a guest; it dies with Domain 0.

Per request (one JSON line on stdin, `{"op": "allocate", "node": N}`, from Domain 0 when it
spawns guest N):

1. allocate a fresh memfd of the cluster's NVRAM size (pages reserved now),
2. map it read-write and format it as an NVLog region in two halves (what the D-module uses),
3. unmap it (the mediator never writes a region again, and keeps no writable mapping that a
   seal would not revoke),
4. deposit it with Domain 0's fd broker (SCM_RIGHTS; the broker knows the mediator by
   SO_PEERCRED), then close its own descriptor: from here on only Domain 0 holds it.

The guest then claims the region from the broker (`claim_region` below), maps it read-write,
and only then seals it (F_SEAL_FUTURE_WRITE with read-only grants) and registers it: the owner
has its writable mapping before the seal, exactly as when a guest allocates its own region.
The partner gets an O_RDONLY descriptor of the sealed region, as always.

The mediator holds nothing once a region is deposited, so its death loses no region; see
`vmemu.hypervisor.supervisor.MediatorLink` for what Domain 0 does then.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from storage import nvlog
from storage import region as shm
from vmemu import datadir
from vmemu.privfs import lossy_stdio, set_umask
from vmemu.config import ClusterConfig
from vmemu.errors import NotGranted, Unavailable, VmemuError, from_wire
from vmemu.hypervisor import fdbroker

PR_SET_PDEATHSIG = 1
CLAIM_TIMEOUT_S = 60.0


def region_size(cfg: ClusterConfig) -> int:
    # --ha-mode none has no NVRAM to speak of: a token region keeps registration uniform.
    return (1 << 20) if cfg.ha_mode == "none" else cfg.nvram_mb << 20


def make_region(node: int, size: int) -> tuple[int, int]:
    """Allocate and format node `node`'s region; (descriptor, region id). Nothing stays mapped."""
    region_id = secrets.randbits(62) | 1
    fd = shm.allocate(f"vmemu-nvram-node{node}-by-mediator", size)
    try:
        buf = shm.map_read_write(fd, size)
        try:
            nvlog.format_region(buf, node, region_id, halves=True)
        finally:
            buf.close()
    except BaseException:
        os.close(fd)
        raise
    return fd, region_id


class Mediator:
    def __init__(self, data_dir: Path) -> None:
        info = datadir.read_cluster(data_dir)
        self.cfg = ClusterConfig.from_dict(info["config"])
        self.fd_name = datadir.run_dir(info).broker()
        self.size = region_size(self.cfg)

    def allocate(self, node: int) -> int:
        t0 = time.monotonic()
        fd, region_id = make_region(node, self.size)
        try:
            reply, _ = fdbroker.request(self.fd_name, {"op": "deposit", "node": fdbroker.MEDIATOR,
                                                       "region": region_id, "for": node}, fd=fd)
        finally:
            os.close(fd)  # Domain 0 holds it now (or, refused, nobody does and it is gone)
        if not reply.get("ok"):
            raise from_wire(reply.get("error") or {})
        log(f"region {region_id:#x} for node{node}: {self.size >> 20} MiB, "
            f"{(time.monotonic() - t0) * 1000:.1f} ms")
        return region_id

    def serve(self, lines) -> None:  # type: ignore[no-untyped-def]
        for line in lines:
            try:
                msg = json.loads(line)
                if msg.get("op") != "allocate" or not isinstance(msg.get("node"), int):
                    log(f"ignored request {line.strip()!r}")
                    continue
                self.allocate(msg["node"])
            except (VmemuError, OSError, ValueError) as exc:
                # Domain 0 keeps the request wanted and asks again after a restart; a guest
                # waiting for the region times out with a clear message if it never comes.
                log(f"request {line.strip()!r} failed: {exc}")


def claim_region(fd_name: str, node: int, timeout: float = CLAIM_TIMEOUT_S) -> tuple[int, int, int]:
    """Guest side: take the region the mediator made for us; (descriptor, region id, size).

    The descriptor is read-write and not sealed yet: map it, then seal it, then register it.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        reply, fd = fdbroker.request(fd_name, {"op": "claim", "node": node, "region": 0})
        if reply.get("ok") and fd is not None:
            return fd, int(reply["region"]), int(reply["size"])
        if fd is not None:
            os.close(fd)
        err = from_wire(reply.get("error") or {})
        if not isinstance(err, Unavailable) or time.monotonic() >= deadline:
            raise NotGranted(f"node{node}: no NVRAM region from the mediator: {err.message}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def log(msg: str) -> None:
    print(f"mediator: {msg}", file=sys.stderr, flush=True)


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmemu-mediator")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--hypervisor-pid", type=int, required=True)
    args = ap.parse_args(argv)
    set_umask()  # what this domain creates is the cluster user's alone
    lossy_stdio()  # a full disk must not turn a printed report into a crash
    die_with_parent(args.hypervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; Dom0 decides
    mediator = Mediator(Path(args.data_dir))
    log(f"pid {os.getpid()}: {mediator.size >> 20} MiB regions for cluster {mediator.cfg.cluster_id}")
    mediator.serve(sys.stdin)  # until Domain 0 closes the pipe (or SIGTERM / SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
