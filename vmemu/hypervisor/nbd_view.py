"""What `vmemu status` says of each identity's NBD service: where clients connect (TCP
address, Unix socket, URIs, TLS), and whether whoever serves the identity listens there.

The URIs are the configuration's; whether anyone listens is the serving domain's report
(its NBD server's `listeners`, carried by its heartbeat stats), so a taken address shows
here as not listening, with the error and the holder, while the identity is served anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmemu import tls
from vmemu.config import ClusterConfig, nbd_address, nbd_unix_uri, nbd_uri
from vmemu.datadir import RunDir


def node_view(cfg: ClusterConfig, rundir: RunDir, node: int, lun_ids: list[int],
              server_stats: dict[str, Any] | None, own_stats: dict[str, Any]) -> dict[str, Any]:
    """The `nbd` entry of node `node` in status. `server_stats`: the stats of the domain
    that serves the identity (None: nobody does); `own_stats`: the node's own domain's."""
    host, port = nbd_address(cfg, node)
    sock = str(rundir.nbd_socket(node)) if cfg.nbd_socket else None
    served = ((server_stats or {}).get("nbd") or {}).get("listeners") or {}
    return {
        "address": host if cfg.nbd_tcp else None,
        "port": port if cfg.nbd_tcp else None,
        "uris": [nbd_uri(cfg, node, lun) for lun in lun_ids] if cfg.nbd_tcp else [],
        "socket": sock,
        "unix_uris": [nbd_unix_uri(cfg, sock, lun) for lun in lun_ids] if sock else [],
        "tls": cfg.nbd_tls,
        # per transport ("tcp", "unix"): address, listening, error, holder, down_s, attempts
        "listening": served.get(str(node)),
        "server": own_stats.get("nbd"),  # this domain's NBD service: counts, bytes held
    }


def tls_view(cfg: ClusterConfig, data_dir: Path) -> dict[str, Any] | None:
    """Where clients find the cluster's CA (None: TLS is off)."""
    if cfg.nbd_tls == "off":
        return None
    d = tls.tls_dir(data_dir)
    return {"mode": cfg.nbd_tls, "verify_peer": cfg.nbd_tls_verify_peer,
            "certificates": str(d), "ca": str(d / tls.CA)}


def taken_lines(raw: dict[str, Any]) -> list[str]:
    """One line per identity served without one of its NBD listeners (for `vmemu status`)."""
    out = []
    for n in raw.get("nodes") or []:
        for kind, ep in (((n.get("nbd") or {}).get("listening")) or {}).items():
            if ep and not ep.get("listening"):
                out.append(f"[red]{n['name']}'s NBD {kind} address {ep['address']} is not "
                           f"listening[/]: {ep.get('error')}"
                           + (f", held by {ep['holder']}" if ep.get("holder") else "")
                           + f"; {n['name']} is served on the block protocol, retrying "
                           f"(down {ep.get('down_s')}s, {ep.get('attempts')} attempts)")
    return out
