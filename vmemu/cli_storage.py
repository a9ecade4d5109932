"""Storage management commands: volumes, LUNs, snapshots, consistency points, disks, fsck.

Each command is one management request that the hypervisor routes to the domain serving the
identity concerned (the node's own domain, or its partner after a takeover).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from storage.names import human_size as human
from vmemu.errors import BadRequest, Timeout

console = Console(highlight=False)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M' -> 536870912; '2G', '4096', '1.5G', '64MiB' work too; bytes, rounded to 4 KiB."""
    m = _SIZE.match(str(text))
    if not m:
        raise BadRequest(f"size {text!r} is not a size like 512M, 2G or 4096")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise BadRequest(f"size {text!r} must be positive")
    return -(-n // 4096) * 4096


def _disk_index(disk: str) -> int:
    m = re.fullmatch(r"d?(\d+)", disk)
    if not m:
        raise BadRequest(f"disk {disk!r} is not a disk name like d2")
    return int(m.group(1))


def manage(obj: Any, what: str, timeout: float = 60.0, **args: Any) -> Any:
    ctl = obj.control()
    args = {k: v for k, v in args.items() if v is not None}  # an option left out
    return ctl.call("manage", dict(args, what=what, timeout=timeout), timeout=timeout + 5)


NODE_OPT = click.option("--node", default=None,
                        help="The node whose volume is meant (needed for a root volume vol0, "
                             "which every node has; other volumes are found in the VLDB).")


def register(cli: click.Group) -> None:
    @cli.group()
    def volume() -> None:
        """Volumes: flexible volumes in a node's aggregate (RAID + write-anywhere FS)."""

    @volume.command("create")
    @click.argument("name")
    @click.option("--node", required=True, help="Node whose aggregate holds the volume.")
    @click.option("--size", required=True, help="Reserved size, e.g. 2G.")
    @click.pass_obj
    def volume_create(obj: Any, name: str, node: str, size: str) -> None:
        """Create a volume in a node's aggregate."""
        res = manage(obj, "volume_create", node=node, name=name, size=parse_size(size))
        click.echo(f"vmemu: volume {res['name']} ({human(res['size'])}) created on {node}")

    @volume.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def volume_list(obj: Any, as_json: bool) -> None:
        """Name, owner node, served by, size, used, LUNs, snapshots."""
        ctl = obj.control()
        st = ctl.status()
        rows = []
        for n in st.nodes:
            if not n["identity_served_by"] or not n.get("storage") or \
                    n["storage"].get("kind") != "wafl":
                continue
            for v in ctl.call("manage", {"what": "volume_list", "node": n["name"]}):
                rows.append(dict(v, owner=n["name"], served_by=n["identity_served_by"]))
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        t = Table(title="volumes")
        for col in ("volume", "owner", "served by", "size", "used", "LUNs", "snapshots"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["owner"], r["served_by"], human(r["size"]), human(r["used"]),
                      ", ".join(f"{l['name']} ({human(l['size'])})" for l in r["luns"]) or "-",
                      ", ".join(r["snapshots"]) or "-")
        console.print(t)

    lun_group = cli.commands["lun"]

    @lun_group.command("create")  # type: ignore[attr-defined]
    @click.argument("path")
    @click.option("--size", required=True, help="LUN size, e.g. 512M.")
    @NODE_OPT
    @click.pass_obj
    def lun_create(obj: Any, path: str, size: str, node: str | None) -> None:
        """Create a LUN (a file in a volume): VOLUME/LUN."""
        if path.count("/") != 1:
            raise BadRequest(f"LUN {path!r} must be named VOLUME/LUN, e.g. vol1/lun0")
        vol, name = path.split("/")
        res = manage(obj, "lun_create", volume=vol, name=name, size=parse_size(size), node=node)
        click.echo(f"vmemu: LUN {res['path']} ({human(res['size'])}) created, index "
                   f"{res['index']} (NBD export {res['path']} or lun{res['index']})")

    @cli.group()
    def snapshot() -> None:
        """Snapshots of a volume: saved roots of the write-anywhere file system."""

    @snapshot.command("create")
    @click.argument("volume")
    @click.argument("name")
    @NODE_OPT
    @click.pass_obj
    def snapshot_create(obj: Any, volume: str, name: str, node: str | None) -> None:
        """Take a snapshot (a consistency point holding every acknowledged write)."""
        res = manage(obj, "snapshot_create", volume=volume, name=name, node=node)
        cp = res["cp"]
        click.echo(f"vmemu: snapshot {volume}@{name} taken (CP of {cp['blocks']} blocks in "
                   f"{cp['ms']:.1f} ms)")

    @snapshot.command("list")
    @click.argument("volume")
    @click.option("--json", "as_json", is_flag=True)
    @NODE_OPT
    @click.pass_obj
    def snapshot_list(obj: Any, volume: str, as_json: bool, node: str | None) -> None:
        rows = manage(obj, "snapshot_list", volume=volume, node=node)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            click.echo(f"{volume}@{r['name']}  generation {r['generation']}  "
                       f"unique {human(r['unique_blocks'] * 4096)}")

    @snapshot.command("delete")
    @click.argument("volume")
    @click.argument("name")
    @NODE_OPT
    @click.pass_obj
    def snapshot_delete(obj: Any, volume: str, name: str, node: str | None) -> None:
        manage(obj, "snapshot_delete", volume=volume, name=name, node=node)
        click.echo(f"vmemu: snapshot {volume}@{name} deleted")

    @cli.command("cp")
    @click.argument("node")
    @click.pass_obj
    def cp(obj: Any, node: str) -> None:
        """Force a consistency point on the domain serving NODE's identity now."""
        res = manage(obj, "cp", node=node)
        click.echo(f"vmemu: CP on {node}: {res['blocks']} blocks in {res['ms']:.1f} ms "
                   f"(log up to seq {res['seq']})")

    @cli.group()
    def disk() -> None:
        """A node's disks: fail one, replace it (reconstruction runs in the background)."""

    @disk.command("fail")
    @click.argument("node")
    @click.argument("disk_name", metavar="DISK")
    @click.pass_obj
    def disk_fail(obj: Any, node: str, disk_name: str) -> None:
        res = manage(obj, "disk_fail", node=node, disk=_disk_index(disk_name))
        click.echo(f"vmemu: {node} {disk_name} failed; the {res['layout']} group is {res['state']}")

    @disk.command("replace")
    @click.argument("node")
    @click.argument("disk_name", metavar="DISK")
    @click.pass_obj
    def disk_replace(obj: Any, node: str, disk_name: str) -> None:
        manage(obj, "disk_replace", node=node, disk=_disk_index(disk_name))
        click.echo(f"vmemu: {node} {disk_name} replaced; reconstruction runs in the background "
                   "(progress in `vmemu status`)")

    @cli.command()
    @click.argument("node")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def fsck(obj: Any, node: str, as_json: bool) -> None:
        """Check NODE's file system as committed: every block accounted for, every checksum."""
        res = manage(obj, "fsck", node=node, timeout=300.0)
        if as_json:
            click.echo(json.dumps(res, indent=2))
        else:
            verdict = "clean" if res["ok"] else "ERRORS"
            click.echo(f"vmemu: fsck {node}: {verdict}: {res['blocks_checked']} blocks checked, "
                       f"{res['files']} files, generation {res['generation']}, snapshots "
                       f"{len(res['snapshots'])}")
            for e in res["errors"]:
                click.echo(f"  {e}")
        if not res["ok"]:
            raise SystemExit(1)

    @cli.command()
    @click.argument("node")
    @click.option("--wait/--no-wait", default=True, show_default=True,
                  help="Wait for the scrub to finish and print its report.")
    @click.option("--timeout", default=600.0, show_default=True)
    @click.pass_obj
    def scrub(obj: Any, node: str, wait: bool, timeout: float) -> None:
        """Verify every stripe's checksums and parity on NODE, repairing what RAID can.

        The scrub runs in the background, in slices between client requests."""
        manage(obj, "scrub", node=node)
        if not wait:
            click.echo(f"vmemu: scrub of {node} started (progress in `vmemu status --json`)")
            return
        end = time.monotonic() + timeout
        while True:
            res = manage(obj, "scrub_status", node=node)
            if res and res.get("finished"):
                break
            if time.monotonic() > end:
                raise Timeout(f"scrub of {node} still running after {timeout:.0f}s")
            time.sleep(0.2)
        res = {k: v for k, v in res.items() if k not in ("started", "finished", "total")}
        click.echo("vmemu: scrub " + ", ".join(f"{k} {v}" for k, v in res.items()))

    @snapshot.command("read")
    @click.argument("volume")
    @click.argument("name")
    @click.argument("lun")
    @click.option("--offset", default=0, show_default=True, help="Byte offset in the LUN.")
    @click.option("--length", default="4096", show_default=True, help="Bytes to read, e.g. 1M.")
    @click.option("--out", type=click.Path(dir_okay=False), required=True,
                  help="File to write the bytes to ('-' for stdout).")
    @NODE_OPT
    @click.pass_obj
    def snapshot_read(obj: Any, volume: str, name: str, lun: str, offset: int, length: str,
                      out: str, node: str | None) -> None:
        """Read a LUN as it was in a snapshot."""
        n = parse_size(length)
        if n > 1 << 20:
            raise BadRequest("read at most 1M at a time (the LUN I/O limit)")
        data = manage(obj, "snapshot_read", volume=volume, name=name, lun=lun, offset=offset,
                      length=n, node=node)
        if out == "-":
            click.get_binary_stream("stdout").write(data)
        else:
            with open(out, "wb") as f:
                f.write(data)
            click.echo(f"vmemu: {len(data)} bytes of {volume}/{lun}@{name} written to {out}")
