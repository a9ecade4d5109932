"""Cluster configuration: one dataclass, written to cluster.json at `up`, read by every process."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vmemu.errors import BadRequest

TOPOLOGIES = ("pairs", "ring")
HA_MODES = ("shm", "mirror", "none")
RAID_LAYOUTS = ("raid4", "raid1", "none")  # none: the flat LUN path (one LUN per disk, no FS)
GRANT_MODES = ("ro", "rw")
NVRAM_PLACEMENTS = ("own", "mediator")  # who allocates a guest's NVRAM region
NBD_TLS_MODES = ("off", "on", "require")  # domains/nbd_proto.py: NOTLS, SELECTIVETLS, FORCEDTLS


@dataclass(frozen=True)
class ClusterConfig:
    nodes: int = 4
    topology: str = "pairs"
    heartbeat_ms: int = 100
    heartbeat_misses: int = 5  # a guest silent for misses x interval is declared failed
    nvram_mb: int = 64
    disks: int = 4  # per node: one RAID group (the aggregate), or with raid none one LUN per disk
    disk_mb: int = 1024  # sparse image files: only written blocks take space
    raid: str = "raid4"
    luns: int = 2  # LUNs lun0..lun{n-1} of volume vol0, made when an aggregate is first formatted
    disk_backend: str = "file"  # loop: each image attached to a loop device (root only)
    nvlog_compress: str = ""  # "lz4": NVLog payloads stored lz4-compressed when that saves 1/8
    lun_mb: int = 256  # their size (capped so that vol0 takes at most half of the aggregate)
    grant_mode: str = "ro"
    giveback_delay_s: float = 2.0  # negative: manual giveback only
    cp_interval_s: float = 10.0
    stall_limit_s: float = 10.0  # a main loop silent this long is a failure, heartbeats or not
    # A guest told to take (assign) or give back (release) an identity that does not answer
    # in this long: an assign fences it (it may serve the identity already), a release is
    # asked again (vmemu/hypervisor/main.py).
    move_timeout_s: float = 60.0
    ha_mode: str = "shm"  # shm: the patent; mirror: copy every record to the partner; none: no NVRAM
    nvram_placement: str = "own"  # own: each guest allocates its region; mediator: a third domain does
    nbd_addr_base: str = "127.0.10.0"  # node N serves NBD on base + N (127.0.10.N)
    nbd_port: int = 10809  # 0: the hypervisor picks a free port at boot (cluster.json has the real one)
    mirror_resync_mb_s: float = 0.0  # --ha-mode mirror: resync bandwidth cap (0: none)
    nbd_tcp: bool = True  # serve NBD on 127.0.10.N:port (reachable by every local user)
    nbd_socket: bool = False  # serve NBD on <run-dir>/n<N>.nbd.s too (the cluster's user only)
    nbd_tls: str = "off"  # on: STARTTLS offered; require: nothing without it (<data-dir>/tls)
    nbd_tls_verify_peer: bool = False  # clients must present a certificate of the cluster's CA
    cluster_id: str = field(default_factory=lambda: secrets.token_hex(4))

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise BadRequest(f"--nodes must be between 1 and 64, not {self.nodes}")
        if self.topology not in TOPOLOGIES:
            raise BadRequest(f"unknown topology {self.topology!r}; choose pairs or ring")
        if self.topology == "pairs" and self.nodes % 2:
            raise BadRequest(f"--nodes {self.nodes} is odd: HA pairs need an even count "
                             "(use --topology ring)")
        if self.ha_mode not in HA_MODES:
            raise BadRequest(f"unknown HA mode {self.ha_mode!r}; choose shm, mirror or none")
        if self.nvram_placement not in NVRAM_PLACEMENTS:
            raise BadRequest(f"unknown NVRAM placement {self.nvram_placement!r}; choose own or mediator")
        if self.raid not in RAID_LAYOUTS:
            raise BadRequest(f"unknown RAID layout {self.raid!r}; choose raid4, raid1 or none")
        if self.raid == "raid4" and self.disks < 2:
            raise BadRequest("raid4 needs at least 2 disks per node (data and parity)")
        if self.raid == "raid1" and self.disks < 2:
            raise BadRequest("raid1 needs at least 2 disks per node (two mirrors)")
        if self.disk_backend not in ("file", "loop"):
            raise BadRequest(f"unknown disk backend {self.disk_backend!r}; choose file or loop")
        if self.nvlog_compress not in ("", "lz4"):
            raise BadRequest(f"unknown NVLog compression {self.nvlog_compress!r}; choose lz4")
        if not 0 <= self.luns <= 64:
            raise BadRequest("default LUNs per node must be between 0 and 64")
        if self.grant_mode not in GRANT_MODES:
            raise BadRequest(f"unknown grant mode {self.grant_mode!r}; choose ro or rw")
        if not 5 <= self.heartbeat_ms <= 10_000:
            raise BadRequest("heartbeat interval must be between 5 and 10000 ms")
        if self.heartbeat_misses < 2:
            raise BadRequest("heartbeat misses must be at least 2")
        if not 1 <= self.nvram_mb <= 4096:
            raise BadRequest("NVRAM size must be between 1 and 4096 MiB")
        if not 1 <= self.disks <= 16:
            raise BadRequest("disks per node must be between 1 and 16")
        if not 1 <= self.disk_mb <= 1 << 20:
            raise BadRequest("disk size must be between 1 MiB and 1 TiB")
        if self.stall_limit_s <= 0:
            raise BadRequest("stall limit must be positive")
        if not 1.0 <= self.move_timeout_s <= 3600.0:
            raise BadRequest("the identity move timeout must be between 1 and 3600 s")
        if self.cp_interval_s <= 0:
            raise BadRequest("CP interval must be positive")
        if not 0 <= self.mirror_resync_mb_s <= 1 << 20:
            raise BadRequest("mirror resync rate must be between 0 (no cap) and 1048576 MB/s")
        if self.nbd_tls not in NBD_TLS_MODES:
            raise BadRequest(f"unknown NBD TLS mode {self.nbd_tls!r}; choose off, on or require")
        if not self.nbd_tcp and not self.nbd_socket:
            raise BadRequest("--nbd-tcp off needs --nbd-socket: NBD would be served nowhere")
        if self.nbd_tls_verify_peer and self.nbd_tls == "off":
            raise BadRequest("--nbd-tls-verify-peer needs --nbd-tls on or require")
        if not 0 <= self.nbd_port <= 65535:
            raise BadRequest(f"NBD port {self.nbd_port} is not between 0 and 65535 (0: any free port)")
        try:
            base = ipaddress.IPv4Address(self.nbd_addr_base)
        except ValueError:
            raise BadRequest(f"NBD address base {self.nbd_addr_base!r} is not an IPv4 address "
                             "(example: 127.0.10.0)") from None
        last = int(base) + self.nodes
        if not base.is_loopback or last > int(ipaddress.IPv4Address("127.255.255.254")):
            raise BadRequest(f"NBD address base {self.nbd_addr_base} + {self.nodes} nodes must stay "
                             "inside 127.0.0.0/8 (each node gets its own loopback address)")

    @property
    def node_names(self) -> list[str]:
        return [node_name(i) for i in range(1, self.nodes + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ClusterConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def node_name(index: int) -> str:
    return f"node{index}"


def node_index(name: str, nodes: int) -> int:
    """'node3' -> 3, or UnknownNode naming the valid choices."""
    from vmemu.errors import UnknownNode

    if name.startswith("node") and name[4:].isdigit():
        idx = int(name[4:])
        if 1 <= idx <= nodes:
            return idx
    raise UnknownNode(f"unknown node {name!r}: this cluster has node1..node{nodes}")


def partner_of(index: int, nodes: int, topology: str) -> int | None:
    """The node that maps `index`'s NVRAM and takes it over (None for a one-node cluster)."""
    if nodes < 2:
        return None
    if topology == "pairs":
        return index + 1 if index % 2 else index - 1
    return index % nodes + 1


def nbd_address(cfg: ClusterConfig, node: int) -> tuple[str, int]:
    """Where node `node`'s identity serves NBD: (base + node, port), e.g. ("127.0.10.1", 10809).

    The address belongs to the identity, not to the process: whoever serves the identity
    (the node, or its partner after a takeover) listens there.
    """
    return str(ipaddress.IPv4Address(cfg.nbd_addr_base) + node), cfg.nbd_port


def nbd_uri(cfg: ClusterConfig, node: int, lun: int) -> str:
    """"nbd://127.0.10.1:10809/lun0": node `node`'s LUN `lun` on TCP as NBD clients name it
    ("nbds://" with --nbd-tls on or require; libnbd's tools add
    "?tls-certificates=<data-dir>/tls" to trust the cluster's CA)."""
    host, port = nbd_address(cfg, node)
    return f"nbd{'s' if cfg.nbd_tls != 'off' else ''}://{host}:{port}/lun{lun}"


def nbd_unix_uri(cfg: ClusterConfig, socket_path: str, lun: int) -> str:
    """"nbd+unix:///lun0?socket=<run-dir>/n1.nbd.s": the same LUN on the identity's Unix
    socket ("nbds+unix://" with TLS)."""
    return f"nbd{'s' if cfg.nbd_tls != 'off' else ''}+unix:///lun{lun}?socket={socket_path}"
