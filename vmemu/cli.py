"""The `vmemu` command line: a thin layer over vmemu.cluster.

Every command finds the running cluster through --data-dir (default ./.vmemu, or
$VMEMU_DATA_DIR). A mistake is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from vmemu import datadir
from vmemu.cluster import Control, Status, launch, wait_for, wait_started
from storage import loopdev
from vmemu import cli_chaos, cli_storage
from vmemu.config import ClusterConfig
from vmemu.errors import BadRequest, InvalidState, VmemuError
from vmemu.hypervisor import nbd_view
from vmemu.hypervisor.events import read_events
from vmemu.privfs import set_umask

console = Console(width=None if sys.stdout.isatty() else 200)

SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*$")
DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text)
    if not m:
        raise BadRequest(f"cannot read size {text!r} (examples: 4096, 4k, 1M)")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def parse_duration(text: str) -> float:
    m = DUR_RE.match(text)
    if not m:
        raise BadRequest(f"cannot read duration {text!r} (examples: 20s, 500ms, 2m)")
    return float(m.group(1)) * {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Ctx:
    def __init__(self, data_dir: str | None) -> None:
        self.dir = datadir.resolve(data_dir)

    def control(self) -> Control:
        return Control(self.dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", envvar=datadir.ENV, default=None,
              help="Cluster data dir (default ./.vmemu; env VMEMU_DATA_DIR).")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None) -> None:
    """vmemu: a clustered storage system with virtual-machine failover, on one host."""
    ctx.obj = Ctx(data_dir)


# -- up / down -------------------------------------------------------------------------------
@cli.command()
@click.option("--nodes", default=4, show_default=True, help="Guest domains in the cluster.")
@click.option("--topology", type=click.Choice(["pairs", "ring"]), default="pairs", show_default=True)
@click.option("--detach", is_flag=True, help="Return once every domain is serving.")
@click.option("--heartbeat-ms", default=100, show_default=True)
@click.option("--heartbeat-misses", default=5, show_default=True)
@click.option("--nvram-mb", default=64, show_default=True, help="NVRAM region per domain.")
@click.option("--disks", default=4, show_default=True,
              help="Disks per node: one RAID group under the node's file system.")
@click.option("--disk-mb", default=1024, show_default=True, help="Size of each (sparse) disk.")
@click.option("--raid", type=click.Choice(["raid4", "raid1", "none"]), default="raid4",
              show_default=True, help="RAID layout of each node's aggregate; none: the flat "
              "path (one LUN per disk, no file system).")
@click.option("--nvlog-compress", type=click.Choice(["none", "lz4"]), default="none",
              show_default=True, help="Store NVLog payloads lz4-compressed when that saves 1/8.")
@click.option("--disk-backend", type=click.Choice(["file", "loop"]), default="file",
              show_default=True, help="file: sparse image files; loop: each image attached to "
              "a Linux loop device (root only), I/O on the block device.")
@click.option("--lun-mb", default=256, show_default=True,
              help="Size of each of those LUNs (at most half the aggregate in all).")
@click.option("--luns", default=2, show_default=True,
              help="LUNs lun0.. made in volume vol0 when an aggregate is first formatted.")
@click.option("--grant-mode", type=click.Choice(["ro", "rw"]), default="ro", show_default=True)
@click.option("--ha-mode", type=click.Choice(["shm", "mirror", "none"]), default="shm",
              show_default=True, help="shm: partner maps the NVLog (the patent); mirror: every "
              "record copied to the partner before the ack; none: no NVRAM, fdatasync per write.")
@click.option("--mirror-resync-rate", default=0.0, show_default=True,
              help="--ha-mode mirror: MiB/s at most for copying the log to a partner that "
              "(re)joins, in the background (0: no cap).")
@click.option("--nvram-placement", type=click.Choice(["own", "mediator"]), default="own",
              show_default=True, help="own: each guest allocates its NVRAM region; mediator: a "
              "third domain allocates every region, handed out by Domain 0.")
@click.option("--giveback-delay", default=2.0, show_default=True,
              help="Seconds before automatic giveback; negative for manual only.")
@click.option("--cp-interval", default=10.0, show_default=True, help="Seconds between timer CPs.")
@click.option("--nbd-port", default=10809, show_default=True,
              help="TCP port of every node's NBD export (0: any free port).")
@click.option("--nbd-addr", default="127.0.10.0", show_default=True,
              help="NBD address base: node N serves its LUNs on base + N (127.0.10.N).")
@click.option("--nbd-socket", is_flag=True,
              help="Also serve each identity's LUNs on a Unix socket in the private run dir "
              "(nbd+unix:///lun0?socket=...): only the cluster's user can connect.")
@click.option("--nbd-tcp", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="off: no NBD on TCP (with --nbd-socket: Unix sockets only, as nbdkit -U "
              "and qemu-nbd -k serve).")
@click.option("--nbd-tls", type=click.Choice(["off", "on", "require"]), default="off",
              show_default=True, help="NBD over TLS with the cluster's certificate "
              "(<data-dir>/tls): on offers it, require refuses clients without it (nbds://).")
@click.option("--nbd-tls-verify-peer", is_flag=True,
              help="With --nbd-tls: clients must also present the cluster's client "
              "certificate (<data-dir>/tls/client-cert.pem, readable by the cluster's user only).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for serving.")
@click.pass_obj
def up(obj: Ctx, nodes: int, topology: str, detach: bool, heartbeat_ms: int, heartbeat_misses: int,
       nvram_mb: int, disks: int, disk_mb: int, raid: str, nvlog_compress: str,
       disk_backend: str, lun_mb: int,
       luns: int,
       grant_mode: str,
       ha_mode: str, giveback_delay: float, cp_interval: float, timeout: float,
       nbd_port: int = 10809, nbd_addr: str = "127.0.10.0", nvram_placement: str = "own",
       mirror_resync_rate: float = 0.0,
       nbd_socket: bool = False, nbd_tcp: str = "on", nbd_tls: str = "off",
       nbd_tls_verify_peer: bool = False) -> None:
    """Start a cluster (foreground with a live view; Ctrl-C stops it cleanly)."""
    cfg = ClusterConfig(nodes=nodes, topology=topology, heartbeat_ms=heartbeat_ms,
                        heartbeat_misses=heartbeat_misses, nvram_mb=nvram_mb, disks=disks,
                        disk_mb=disk_mb, raid=raid, luns=luns, lun_mb=lun_mb,
                        disk_backend=disk_backend,
                        grant_mode=grant_mode,
                        nvlog_compress="" if nvlog_compress == "none" else nvlog_compress,
                        ha_mode=ha_mode, nvram_placement=nvram_placement,
                        giveback_delay_s=giveback_delay,
                        cp_interval_s=cp_interval, nbd_port=nbd_port, nbd_addr_base=nbd_addr,
                        mirror_resync_mb_s=mirror_resync_rate,
                        nbd_socket=nbd_socket, nbd_tcp=nbd_tcp == "on", nbd_tls=nbd_tls,
                        nbd_tls_verify_peer=nbd_tls_verify_peer)
    if disk_backend == "loop":
        ok, why = loopdev.available()
        if not ok:  # before anything is made: nothing changes
            raise BadRequest(f"--disk-backend loop is not available here: {why}")
    t0 = time.monotonic()
    proc = launch(obj.dir, cfg, detach)
    try:
        ctl = wait_started(obj.dir, proc, timeout)
        wait_for(ctl, Status.all_serving, timeout, "every domain to serve")
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    took = time.monotonic() - t0
    if detach:
        console.print(f"vmemu: {nodes} nodes serving in {took:.1f}s (data dir {obj.dir}); "
                      "`vmemu status` to look, `vmemu down` to stop")
        return
    def view(caption: str) -> Group:
        evs = read_events(datadir.events_file(obj.dir))[-8:]
        lines = [f"[dim]{time.strftime('%H:%M:%S', time.localtime(e['t']))}[/] "
                 f"{e.get('node', ''):<10} {e['kind']}" for e in evs]
        return Group(render_status(ctl.status().raw, caption), *lines)

    try:
        with Live(view(f"serving in {took:.1f}s · Ctrl-C stops the cluster"), console=console,
                  refresh_per_second=4) as live:
            while proc.poll() is None:
                time.sleep(0.25)
                try:
                    live.update(view("Ctrl-C stops the cluster"))
                except VmemuError:
                    pass
    except KeyboardInterrupt:
        pass
    if proc.poll() is None:
        console.print("vmemu: stopping (final consistency point)...")
        try:
            ctl.call("shutdown", timeout=60)
        except VmemuError:
            pass
        proc.wait(60)
    console.print("vmemu: stopped")


@cli.command()
@click.pass_obj
def down(obj: Ctx) -> None:
    """Stop the cluster cleanly: a final consistency point on every domain."""
    ctl = obj.control()
    res = ctl.call("shutdown", timeout=60) or {}
    end = time.monotonic() + 30
    while time.monotonic() < end and datadir.cluster_file(obj.dir).exists():
        time.sleep(0.05)
    kept = res.get("kept") or []
    if kept:
        idents = sorted({i for k in kept for i in k["identities"]})
        click.echo(f"vmemu: cluster stopped, but the final consistency point of "
                   f"{', '.join(idents)} did not complete: their NVRAM ({len(kept)} region"
                   f"{'s' if len(kept) > 1 else ''}) is kept in {Path(kept[0]['file']).parent} "
                   "and the next `vmemu up` replays it")
        sys.exit(3)
    click.echo("vmemu: cluster stopped, every domain ended with a consistency point")


# -- looking ---------------------------------------------------------------------------------
def _age(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.0f}ms" if unit == "ms" else f"{v:.1f}s"


def _cp_cell(n: dict[str, Any]) -> str:
    if n.get("last_cp_age_s") is None:
        return "none yet"
    cp = n.get("cp") or {}
    text = f"{_age(n['last_cp_age_s'])} ago"
    if cp:
        text += f" · {cp.get('reason')} {cp.get('ms', 0):.0f}ms {cp.get('blocks', 0)} blk"
    if n.get("cp_stalls"):
        text += f" · [red]{n['cp_stalls']} stalls[/]"
    return text


def _raid_cell(n: dict[str, Any]) -> str:
    raid = (n.get("storage") or {}).get("raid")
    if not raid:
        return "flat" if n.get("storage") else "-"
    state = raid["state"]
    color = {"normal": "green", "degraded": "yellow", "offline": "red"}.get(state, "")
    text = f"{raid['layout']} [{color}]{state}[/]"
    rb = raid.get("rebuild")
    if rb and not rb.get("finished") and rb.get("total"):
        text += f" rebuild {rb['disk']} {100 * rb['done'] / rb['total']:.0f}% {rb['rate_mbps']} MB/s"
    return text


def render_status(raw: dict[str, Any], caption: str = "") -> Table:
    t = Table(title=f"vmemu cluster {raw['cluster_id']} · {raw['config']['topology']}",
              caption=caption or None)
    for col in ("domain", "pid", "state", "partner", "takeover possible", "heartbeat age",
                "NVLog half used", "last CP", "RAID", "identity served by", "serves"):
        t.add_column(col)
    for n in raw["nodes"]:
        used, cap = n.get("nvlog_used"), n.get("nvlog_capacity")
        nv = "-" if used is None or not cap else f"{used / 2**20:.1f}/{cap / 2**20:.0f} MiB ({100 * used / cap:.0f}%)"
        state = n["state"]
        style = {"serving": "green", "down": "red", "up": "yellow", "booting": "cyan"}.get(state, "")
        t.add_row(n["name"], str(n["pid"] or "-"), f"[{style}]{state}[/]" if style else state,
                  n["partner"] or "-", "yes" if n["takeover_possible"] else "no",
                  _age(n["heartbeat_age_ms"], "ms"), nv, _cp_cell(n), _raid_cell(n),
                  n["identity_served_by"] or "[red]nobody[/]", ",".join(n["serves"]) or "-")
    return t


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable (stable, version 1).")
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """Domains, their states, partners, NVLog use and who serves each identity."""
    raw = obj.control().status().raw
    if as_json:
        click.echo(json.dumps(raw, indent=2))
        return
    console.print(render_status(raw))
    for n in raw["nodes"]:
        lt = n.get("last_takeover")
        if lt:
            stages = ", ".join(f"{k} {v:.1f}ms" for k, v in lt["stages"].items())
            console.print(f"last takeover of {n['name']}: by {lt.get('server', '?')} after "
                          f"{lt['reason']}: {stages}")
    for line in corruption_lines(raw):
        console.print(line, highlight=False)
    if raw["grants"]:
        console.print("grants: " + "; ".join(f"{g['owner']}'s {g['region']} -> {g['grantee']} ({g['mode']})"
                                             for g in raw["grants"]))
    rows = _lun_rows(raw)
    if rows:
        console.print("NBD exports (each identity's own address; whoever serves it answers there):")
        for r in rows:
            console.print(f"  {r['identity']:<7} {r['lun']:<5} {r['uri']:<34} served by "
                          f"{r['served_by'] or 'nobody'}", highlight=False)
            if r.get("unix_uri") and r["unix_uri"] != r["uri"]:
                console.print(f"  {'':<13} {r['unix_uri']}", highlight=False)
        for line in _tls_lines(raw):
            console.print(line, highlight=False)
    for line in nbd_view.taken_lines(raw):
        console.print(line, highlight=False)


def _tls_lines(raw: dict[str, Any]) -> list[str]:
    t = raw.get("nbd_tls")
    if not t:
        return []
    d = t["certificates"]
    return [f"NBD TLS {t['mode']}" + (" (client certificates verified)" if t["verify_peer"]
                                       else "") + f": the cluster's CA is {t['ca']}",
            f"  nbdinfo, nbdcopy, nbdsh: add ?tls-certificates={d} to the URI "
            "(&tls-certificates=... after ?socket=)",
            # fio's nbd engine does not let libnbd read local files named in a URI: it finds
            # the CA in libnbd's default directory only.
            f"  fio (ioengine=nbd): no tls-certificates= in its URI; libnbd reads "
            f"~/.pki/libnbd (root: /etc/pki/libnbd): ln -s {d} ~/.pki/libnbd",
            f"  qemu: --object tls-creds-x509,id=tls0,endpoint=client,dir={d} and "
            "tls-creds=tls0 (on a Unix socket also tls-hostname=localhost)"]


def corruption_lines(raw: dict[str, Any]) -> list[str]:
    """One loud line per quarantined NVRAM region, corrupt NVLog record, or identity whose
    assigns keep failing (a corrupt disk header, say)."""
    out = []
    nv = raw.get("nvram") or {}
    for q in nv.get("quarantined") or []:
        what = "region" if q.get("half") is None else f"half {q['half']} of region"
        out.append(f"[red]NVRAM {what} {q.get('region')} of {q.get('owner')} quarantined[/] "
                   f"(replay of node{q.get('identity')} by {q.get('reported_by')}): "
                   f"{q.get('reason')}; "
                   + _lost_text(q) + _copy_text(q))
    for b in nv.get("corrupt_records") or []:
        out.append(f"[red]corrupt NVLog record[/] in region {b.get('region')} of {b.get('owner')}, "
                   f"half {b.get('half')} byte {b.get('position')}: {b.get('why')}; expected seq "
                   f"{b.get('expected_seq')}, tail {b.get('tail')}, {b.get('verified_after')} "
                   "records after it verify; " + _lost_text(b) + _copy_text(b))
    for n in raw.get("nodes") or []:
        bo = n.get("assign_backoff")
        if bo:
            out.append(f"[red]{n['name']} cannot be served[/]: {bo['failures']} assigns failed, "
                       f"last: {bo['error']}; next try in {bo['retry_in_s']}s")
    return out


def _lost_text(r: dict[str, Any]) -> str:
    if not r.get("data_loss"):
        return "no acknowledged write lost"
    seq = r.get("lost_seq")
    n = r.get("lost_records") or 0
    text = (("up to " if r.get("estimate") else "") + f"{n} acknowledged writes LOST"
            + (f" (seq {seq[0]}..{seq[1]})" if seq else ""))
    if r.get("unverifiable_records") is None or r.get("unverifiable_records"):
        text += ", and records that no longer verify"
    return text


def _copy_text(r: dict[str, Any]) -> str:
    if r.get("copy"):
        return f"; copy in {r['copy']}"
    return f"; no copy: {r['copy_error']}" if r.get("copy_error") else ""


def _lun_rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per LUN of every identity: path, size, who serves it, its URI."""
    disk = int(raw["config"].get("disk_mb", 0)) << 20
    rows = []
    for n in raw["nodes"]:
        luns = (n.get("storage") or {}).get("luns") or []
        nbd = n.get("nbd") or {}
        tcp, unix = nbd.get("uris") or [], nbd.get("unix_uris") or []
        for i in range(max(len(tcp), len(unix))):
            index, path, size = luns[i] if i < len(luns) else (i, f"lun{i}", disk)
            uri = tcp[i] if i < len(tcp) else unix[i]  # TCP's when there is one
            rows.append({"identity": n["name"], "lun": f"lun{index}", "path": path, "size": size,
                         "served_by": n["identity_served_by"], "uri": uri,
                         "unix_uri": unix[i] if i < len(unix) else None})
    return rows


@cli.group()
def lun() -> None:
    """The LUNs of every identity, and where NBD clients reach them."""


@lun.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: a list of rows.")
@click.pass_obj
def lun_list(obj: Ctx, as_json: bool) -> None:
    """Identity, LUN, size, served by, nbd:// URI (and nbd+unix:// with --nbd-socket)."""
    raw = obj.control().status().raw
    rows = _lun_rows(raw)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    unix = any(r["unix_uri"] and r["unix_uri"] != r["uri"] for r in rows)
    t = Table(title="vmemu LUNs")
    for col in ("identity", "LUN", "size", "served by", "URI") + (("Unix socket URI",) if unix
                                                                   else ()):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["identity"], r["lun"], f"{r['size'] / 2**20:.0f} MiB",
                  r["served_by"] or "[red]nobody[/]", r["uri"],
                  *((r["unix_uri"] or "",) if unix else ()))
    console.print(t)
    for line in _tls_lines(raw):
        console.print(line, highlight=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON lines, as stored.")
@click.option("--last", default=0, help="Only the last N events.")
@click.option("--kind", multiple=True, help="Only events of this kind (repeatable).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw the events and client throughput on one time axis into this PNG.")
@click.pass_obj
def events(obj: Ctx, as_json: bool, last: int, kind: tuple[str, ...], plot: str | None) -> None:
    """The cluster's event log (also <data-dir>/events.jsonl)."""
    path = datadir.events_file(obj.dir)
    if not path.exists():
        raise BadRequest(f"no event log in {obj.dir}; has a cluster run there?")
    evs = read_events(path)
    if kind:
        evs = [e for e in evs if e["kind"] in kind]
    if last:
        evs = evs[-last:]
    if plot:
        from vmemu.timeline import plot_timeline, read_metrics

        res = plot_timeline(evs, read_metrics(datadir.metrics_file(obj.dir)), Path(plot),
                            title=f"vmemu timeline · {obj.dir}")
        click.echo(f"vmemu: timeline written to {plot} ({res['events']} events, "
                   f"lanes: {', '.join(res['lanes'])})")
        return
    t0 = evs[0]["t"] if evs else 0
    for e in evs:
        if as_json:
            click.echo(json.dumps(e))
            continue
        rest = {k: v for k, v in e.items() if k not in ("t", "mono", "kind", "node")}
        stamp = time.strftime("%H:%M:%S", time.localtime(e["t"])) + f".{int(e['t'] % 1 * 1000):03d}"
        fields = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in rest.items())
        click.echo(f"{stamp} +{e['t'] - t0:8.3f}s {e.get('node', ''):<10} {e['kind']:<20} {fields}")


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (no terminal needed).")
@click.pass_obj
def top(obj: Ctx, once: bool) -> None:
    """Live full-screen view; keys: up/down j/k select, c crash, h hang, r restart, g giveback, q quit."""
    from vmemu import top as topview

    if once:
        topview.once(obj.dir, topview.make_console())
    else:
        topview.run(obj.dir)


# -- breaking and mending --------------------------------------------------------------------
@cli.command()
@click.argument("node")
@click.option("--hang", is_flag=True, help="SIGSTOP instead of kill -9: only the heartbeat can tell.")
@click.pass_obj
def crash(obj: Ctx, node: str, hang: bool) -> None:
    """Kill a guest domain with SIGKILL (or hang it with SIGSTOP)."""
    res = obj.control().call("crash", {"node": node, "hang": hang})
    click.echo(f"vmemu: {node} (pid {res['pid']}) {'stopped with SIGSTOP' if hang else 'killed with SIGKILL'}")


@cli.command()
@click.argument("node")
@click.option("--wait/--no-wait", default=True, help="Wait until the node serves its identity again.")
@click.option("--timeout", default=60.0, show_default=True)
@click.pass_obj
def restart(obj: Ctx, node: str, wait: bool, timeout: float) -> None:
    """Boot a down domain again; giveback follows (automatic after the configured delay)."""
    ctl = obj.control()
    ctl.call("restart", {"node": node})
    click.echo(f"vmemu: {node} booting")
    if wait:
        delay = ctl.config.giveback_delay_s
        if delay < 0:
            wait_for(ctl, lambda s: s.node(node)["state"] in ("up", "serving"), timeout, f"{node} to boot")
            click.echo(f"vmemu: {node} is up; give its identity back with `vmemu giveback {node}`")
            return
        wait_for(ctl, lambda s: s.node(node)["identity_served_by"] == node, timeout + max(delay, 0),
                 f"{node} to serve its identity")
        click.echo(f"vmemu: {node} serves its identity again")


@cli.command()
@click.argument("node")
@click.option("--timeout", default=60.0, show_default=True)
@click.pass_obj
def giveback(obj: Ctx, node: str, timeout: float) -> None:
    """Return a node's identity and disks from its partner now."""
    ctl = obj.control()
    ctl.call("giveback", {"node": node})
    # Done when it serves its identity, or over when it died meanwhile (the cluster has
    # already moved on: waiting out the timeout would only hide that).
    st = wait_for(ctl, lambda s: s.node(node)["identity_served_by"] == node
                  or s.node(node)["state"] in ("down", "stopped"), timeout, f"giveback of {node}")
    n = st.node(node)
    if n["identity_served_by"] != node:
        raise InvalidState(f"{node} went {n['state']} during the giveback; its identity is "
                           f"served by {n['identity_served_by'] or 'nobody'}")
    click.echo(f"vmemu: {node} serves its identity again")


# -- load and verify -------------------------------------------------------------------------
@cli.command()
@click.option("--target", default="node1", show_default=True,
              help="Node identity to load, or an nbd:// URI (any NBD server).")
@click.option("--workload", type=click.Choice(["randwrite", "randread", "randrw", "seqwrite", "seqread"]),
              default="randwrite", show_default=True)
@click.option("--bs", default="4k", show_default=True)
@click.option("--iodepth", default=16, show_default=True)
@click.option("--duration", default="10s", show_default=True)
@click.option("--size", default=None, help="Bytes of the LUN to use (default: all).")
@click.option("--lun", default=0, show_default=True)
@click.option("--rwmixread", default=50, show_default=True)
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="Record issued/acknowledged writes here for `vmemu verify`.")
@click.option("--timeline", type=click.Path(dir_okay=False), default=None,
              help="Write completions per 10 ms bucket here (JSON).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (stable, version 1; `jobs` follows fio's JSON).")
@click.pass_obj
def load(obj: Ctx, target: str, workload: str, bs: str, iodepth: int, duration: str, size: str | None,
         lun: int, rwmixread: int, journal: str | None, timeline: str | None, as_json: bool) -> None:
    """Drive pipelined block I/O at a node's identity; survives takeover and giveback."""
    from clients.load import LoadSpec, run_load

    spec = LoadSpec(workload=workload, bs=parse_size(bs), iodepth=iodepth,
                    duration=parse_duration(duration), size=parse_size(size) if size else None,
                    lun=lun, rwmixread=rwmixread)
    # An nbd:// target needs no cluster at all: any NBD server will do (nbdkit, for a baseline).
    endpoint = target if target.startswith("nbd://") else obj.control().endpoint(target)

    def progress(p: dict[str, Any]) -> None:
        if not as_json and sys.stderr.isatty():
            console.print(f"[dim]{p['elapsed']:5.1f}s {p['ops']:>9} ops {p['iops']:>9.0f} IOPS "
                          f"retries {p['retries']} errors {p['errors']}[/]", end="\r")

    summary = run_load(endpoint, spec, Path(journal) if journal else None, target, progress,
                       Path(timeline) if timeline else None)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for side in ("write", "read"):
        s = summary[side]
        if s["ops"]:
            c = s["clat_us"]
            click.echo(f"{side:>5}: IOPS={s['iops']:.0f}, BW={s['bw_mbps']:.1f}MB/s, ops={s['ops']}")
            click.echo(f"       clat (us): p50={c['p50']:.0f} p90={c['p90']:.0f} p99={c['p99']:.0f} "
                       f"p99.9={c['p999']:.0f} max={c['max']:.0f}")
    click.echo(f"total: {summary['ops']} ops in {summary['runtime_s']:.1f}s, retries {summary['retries']}, "
               f"reconnects {summary['reconnects']}, errors {summary['errors']}")
    if summary["errors"]:
        sys.exit(1)


@cli.command()
@click.option("--journal", type=click.Path(dir_okay=False), required=True)
@click.option("--target", default=None, help="Identity to read through (default: the journal's).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def verify(obj: Ctx, journal: str, target: str | None, as_json: bool) -> None:
    """Read back every acknowledged write in a load journal; exit 1 if any is missing."""
    from clients.journal import Journal
    from clients.verify import verify as run_verify

    header = Journal.load(Path(journal)).header
    target = target or header.get("identity") or "node1"
    endpoint = target if target.startswith("nbd://") else obj.control().endpoint(target)
    res = run_verify(endpoint, Path(journal))
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"verify: {res['ranges']} ranges, {res['acked_writes']} acknowledged writes: "
                   f"{res['ok']} ok, {res['lost']} lost, {res['corrupt']} corrupt, "
                   f"{res['unjudged']} never acknowledged (not judged)")
        for p in res["problems"]:
            click.echo(f"  problem: {p}")
        click.echo("verify: PASSED, no acknowledged write lost" if res["passed"] else "verify: FAILED")
    if not res["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("scenario", type=click.Choice(["failover", "hang", "double-failure", "ring",
                                               "chaos"]), default="failover")
@click.option("--step", "step_mode", is_flag=True, help="Wait for Enter between steps (lectures).")
@click.option("--speed", default=1.0, show_default=True,
              help="Slow heartbeats, CPs and pauses down by this factor so people can follow.")
@click.option("--fast", is_flag=True, help="No pauses, short load (for CI).")
@click.option("--plot", type=click.Path(dir_okay=False), default="vmemu-demo-timeline.png",
              show_default=True, help="Where to write the run's timeline picture.")
@click.option("--transcript", type=click.Path(dir_okay=False), default=None,
              help="Also write the narration, with the figures it cites, as JSON.")
def demo(scenario: str, step_mode: bool, speed: float, fast: bool, plot: str,
         transcript: str | None) -> None:
    """Narrated failover on a live cluster of its own (in a temporary data dir)."""
    from vmemu.demo import run_demo, transcript_json

    if not 0.1 <= speed <= 20:
        raise BadRequest("--speed must be between 0.1 and 20")
    console.print(f"[bold]vmemu demo {scenario}[/]: a cluster of its own, narrated as it runs")
    if scenario == "chaos":  # a seeded chaos run and the checker's verdict, as a lesson
        from vmemu.chaos.lesson import lesson_failed, run_lesson

        if lesson_failed(run_lesson(console, fast=fast)):
            sys.exit(1)
        return
    lines = run_demo(scenario, fast=fast, speed=speed, step_mode=step_mode, console=console,
                     plot=Path(plot) if plot else None)
    if transcript:
        Path(transcript).write_text(transcript_json(lines))
    console.print("\n[bold green]demo complete[/]: every acknowledged write survived")


cli_storage.register(cli)
cli_chaos.register(cli)


def main() -> None:
    set_umask()  # journals, plots, snapshot reads: the user's alone, like the data dir
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vmemu: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"vmemu: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 2)
    except VmemuError as exc:
        click.echo(f"vmemu: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("vmemu: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        click.echo(f"vmemu: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
