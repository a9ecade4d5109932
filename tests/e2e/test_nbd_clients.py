"""Real NBD clients against a live cluster: nbdinfo, libnbd (python3-libnbd), qemu-img, fio.

Every cluster comes from make_cluster with nbd_port=0 (the hypervisor picks a free port and
writes it into cluster.json) on a loopback block of its own, so parallel tests never share an
NBD address and port. A test whose client binary is missing is skipped, saying which.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from domains import nbd_proto as P
from domains.nbd_limits import Limits
from tests.e2e.conftest import BOOT_S, served_by, wait_until
from tests.nbd_flood import Prober, memory, summary
from tests.unit.test_nbd_proto import info_data, opt, req
from tests.unit.test_nbd_server import Client
from vmemu.config import nbd_address, nbd_uri

MiB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd belongs to the system interpreter


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: nbdkit libnbd-bin python3-libnbd "
                    "qemu-utils fio)")
    return path


@functools.lru_cache(maxsize=1)
def _libnbd_python() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0


def need_libnbd_python() -> None:
    if not _libnbd_python():
        pytest.skip(f"{SYSTEM_PYTHON} cannot import nbd (python3-libnbd is not installed)")


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def uri(c, node: int = 1, lun: int = 0) -> str:
    return nbd_uri(c.control.config, node, lun)


@pytest.fixture
def cluster(make_cluster):
    c = make_cluster(nodes=2, nbd_port=0, disk_mb=256, lun_mb=32)  # 32 MiB LUNs in vol0
    assert c.control.config.nbd_port != 0  # the real port, read back from cluster.json
    return c


def vmemu_cli(c, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMEMU_DATA_DIR=str(c.dir))
    return run([sys.executable, "-m", "vmemu.cli", *args], env=env)


def test_status_and_lun_list_name_every_uri(cluster):
    c = cluster
    cfg = c.control.config
    # each guest reports its NBD service's counts with its first heartbeats after boot
    st = c.wait_for(lambda st: all(st.node(f"node{n}")["nbd"]["server"] for n in (1, 2)), 30,
                    "both guests to report their NBD service")
    for n in (1, 2):
        host, port = nbd_address(cfg, n)  # base + N (the default base: test_cli's story)
        assert host == str(ipaddress.IPv4Address(cfg.nbd_addr_base) + n)
        nbd = st.node(f"node{n}")["nbd"]
        assert {k: nbd[k] for k in ("address", "port", "uris")} == {
            "address": host, "port": port, "uris": [uri(c, n, 0), uri(c, n, 1)]}
        assert nbd["server"]["connections"] == 0 and nbd["server"]["refused"] == 0
    p = vmemu_cli(c, "lun", "list", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [(r["identity"], r["lun"], r["size"], r["served_by"], r["uri"]) for r in rows] == [
        (f"node{n}", f"lun{l}", 32 * MiB, f"node{n}", uri(c, n, l)) for n in (1, 2) for l in (0, 1)]
    p = vmemu_cli(c, "lun", "list")
    assert p.returncode == 0 and uri(c, 2, 1) in p.stdout and "32 MiB" in p.stdout
    p = vmemu_cli(c, "status")
    assert p.returncode == 0 and all(uri(c, n, l) in p.stdout for n in (1, 2) for l in (0, 1))


def test_nbdinfo_lists_luns_and_survives_an_unknown_export(cluster):
    nbdinfo = need("nbdinfo")
    c = cluster
    host, port = nbd_address(c.control.config, 1)
    p = run([nbdinfo, "--list", "--json", f"nbd://{host}:{port}"])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"lun0", "lun1", "vol0/lun0", "vol0/lun1"}  # index and path names
    for e in exports.values():
        assert e["export-size"] == 32 * MiB
        assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
        assert e["can_multi_conn"] and not e["is_read_only"]
        assert (e["block_size_minimum"], e["block_size_preferred"],
                e["block_size_maximum"]) == (512, 4096, MiB)
        assert "served by node1" in e["description"]
    bad = run([nbdinfo, f"nbd://{host}:{port}/nope"])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "nope" in bad.stderr or "No such file" in bad.stderr, bad.stderr
    ok = run([nbdinfo, "--size", uri(c, 1, 1)])
    assert ok.returncode == 0 and ok.stdout.strip() == str(32 * MiB)
    # "" is the default export: lun0
    assert run([nbdinfo, "--size", f"nbd://{host}:{port}/"]).stdout.strip() == str(32 * MiB)


LIBNBD_SCRIPT = r"""
import errno, json, sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = {"size": h.get_size(), "multi_conn": h.can_multi_conn(), "fua": h.can_fua(),
       "trim": h.can_trim(), "zero": h.can_zero(), "df": h.can_df(),
       "structured": h.get_structured_replies_negotiated(),
       "block": [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
                 h.get_block_size(nbd.SIZE_MAXIMUM)]}
pattern = bytes(range(256)) * 16
h.pwrite(pattern, 0)
h.pwrite(pattern * 64, 1 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x5a" * (3 << 20), 4 << 20)  # 3 MiB: three D-module writes
h.set_strict_mode(0)  # let unaligned and out-of-range requests reach the server
h.pwrite(b"unaligned!", 8195)
h.zero(10000, 100)  # libnbd: (count, offset)
h.trim(65536, 3 << 20)
h.zero(4096, 5 << 20, nbd.CMD_FLAG_NO_HOLE)
h.flush()
out["read_back"] = h.pread(20, 8190).hex()
out["big_read_ok"] = h.pread(3 << 20, 4 << 20)[:4096 * 256] == b"\x5a" * (4096 * 256)
errors = {}
for name, fn in [("read_past_end", lambda: h.pread(4096, h.get_size() - 512)),
                 ("write_past_end", lambda: h.pwrite(b"x" * 4096, h.get_size())),
                 ("read_too_big", lambda: h.pread((32 << 20) + 4096, 0))]:
    try:
        fn()
        errors[name] = 0
    except nbd.Error as e:  # errno is a name or a number, by libnbd version
        errors[name] = e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno)
out["errors"] = errors
out["after_errors"] = h.pread(16, 0).hex()
h.shutdown()
print(json.dumps(out))
"""


def test_libnbd_writes_and_reads_match_the_native_protocol(cluster):
    need_libnbd_python()
    c = cluster
    p = run([SYSTEM_PYTHON, "-c", LIBNBD_SCRIPT, uri(c, 1, 0)])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["size"] == 32 * MiB and out["multi_conn"] and out["fua"] and out["trim"]
    assert out["zero"] and out["df"] and out["structured"]
    assert out["block"] == [512, 4096, MiB]  # the advertised maximum (domains/nbd_proto.py)
    assert out["errors"] == {"read_past_end": "EINVAL", "write_past_end": "ENOSPC",
                             "read_too_big": "EINVAL"}
    # The model of what was written, checked through vmemu's own protocol.
    pattern = bytes(range(256)) * 16
    model = bytearray(8 * MiB)
    model[0:4096] = pattern
    model[MiB:MiB + 256 * 1024] = pattern * 64
    model[4 * MiB:7 * MiB] = b"\x5a" * (3 * MiB)
    model[8195:8205] = b"unaligned!"
    model[100:10100] = bytes(10000)
    model[3 * MiB:3 * MiB + 65536] = bytes(65536)
    model[5 * MiB:5 * MiB + 4096] = bytes(4096)
    assert out["read_back"] == bytes(model[8190:8210]).hex()
    assert out["big_read_ok"] and out["after_errors"] == bytes(model[:16]).hex()
    with c.client("node1") as blk:
        for off in range(0, 8 * MiB, MiB):
            assert blk.read(0, off, MiB) == bytes(model[off:off + MiB]), f"MiB at {off}"


def test_qemu_img_copy_survives_takeover_and_giveback(cluster, tmp_path):
    qemu_img = need("qemu-img")
    c = cluster
    target = uri(c, 1, 0)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    p = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), target])
    assert p.returncode == 0, p.stderr

    def compare() -> None:
        # The LUN is 32 MiB, the image 8: compare also checks that the rest reads as zeros.
        p = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), target])
        assert p.returncode == 0 and "identical" in p.stdout, p.stdout + p.stderr

    compare()
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "node2 to take over")
    compare()  # the SAME URI: node2 now listens on node1's address
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", BOOT_S, "node1 to boot")
    c.giveback("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 60, "giveback")
    compare()


def _capped(proc: subprocess.Popen, limit: int = 64 << 10) -> dict[str, bytes]:
    """Read a process's stdout and stderr in threads, keeping only the first `limit` bytes of
    each (a misbehaving client must not fill the disk with its complaints)."""
    got = {"stdout": b"", "stderr": b""}

    def pump(name: str) -> None:
        stream = getattr(proc, name)
        while chunk := stream.read(65536):
            if len(got[name]) < limit:
                got[name] += chunk[:limit - len(got[name])]

    threads = [threading.Thread(target=pump, args=(n,), daemon=True) for n in got]
    for t in threads:
        t.start()
    got["threads"] = threads  # type: ignore[assignment]
    return got


def _run_fio(args: list[str], cwd: Path, timeout: float,
             during: Callable[[], None] | None = None) -> tuple[int, str]:
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = _capped(proc)
    try:
        if during is not None:
            during()
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fio did not finish within {timeout}s: {' '.join(args)}") from None
    finally:
        if proc.poll() is None:  # timed out, or `during` failed: fio must not outlive the test
            proc.kill()
            proc.wait()
        for t in out["threads"]:  # type: ignore[union-attr]
            t.join(5)
    return rc, (out["stdout"] + out["stderr"]).decode(errors="replace")  # type: ignore[operator]


def _fio_json(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("{"):])


def test_fio_verify_after_the_owner_crashes_mid_run(make_cluster, tmp_path):
    """fio writes with crc32c verify headers, node1 is killed mid-run, node2 takes over the
    address, and a verify-only fio pass reads back everything fio saw acknowledged.

    How, and why not the obvious job:
    - fio's nbd engine cannot reconnect: its libnbd handle dies with the connection and the
      job ends with an error, saving its verify state (--verify_state_save). The verify pass
      is a second fio run with the same job and seed, --verify_only --verify_state_load.
    - No --time_based: a wrapping write pass overwrites blocks, and fio's verify then accepts
      an older generation of a block (tried: restoring a stale image still "verified"). So the
      pass must write each block once and still be running at the crash: a 512 MiB LUN.
    - No --rate_iops: with rate limiting, fio's nbd engine spins forever on the dead handle.
    - fio counts the writes that were in flight when the connection broke, and failed, as
      issued; its verify then flags the ones that never reached node1 (at most iodepth).
      So the judge is stricter than fio's exit code: the completion log (--write_lat_log
      --log_offset) lists every write fio saw acknowledged, and not one of those may fail
      verification; failures are allowed only at offsets never acknowledged, at most 16.
    """
    fio = need("fio")
    c = make_cluster(nodes=2, nbd_port=0, disk_mb=512, raid="none")  # 512M LUNs: the flat path
    target = uri(c, 1, 0)

    def crash_after_writes() -> None:
        # Mid-run by what node1 has done, not by the clock: fio and the guests may start slowly
        # on a busy host. 3000 writes logged: fio has seen at least 3000 - iodepth acknowledged.
        c.wait_for(lambda s: (s.node("node1")["ops"] or 0) >= 3000, 60, "fio's writes on node1")
        c.crash("node1")

    job = ["--name=vw", "--ioengine=nbd", f"--uri={target}", "--rw=randwrite", "--bs=4k",
           "--iodepth=16", "--size=512M", "--verify=crc32c", "--randseed=4242"]
    rc, text = _run_fio([fio, *job, "--do_verify=0", "--verify_state_save=1",
                         "--write_lat_log=acked", "--log_offset=1", "--log_avg_msec=0",
                         "--output-format=json", "--output=write.json"], tmp_path, 120,
                        during=crash_after_writes)
    assert rc != 0, f"the write pass ended before the crash (make the LUN bigger): {text[-2000:]}"
    acked_log = [l.split(",") for l in (tmp_path / "acked_clat.1.log").read_text().splitlines()]
    acked = {int(f[4]) for f in acked_log if f[2].strip() == "1"}
    assert len(acked) == len(acked_log)  # each block written once, each write logged once
    assert len(acked) >= 1000, f"only {len(acked)} writes acknowledged before the crash"
    assert len(acked) < 512 * MiB // 4096
    assert (tmp_path / "local-vw-0-verify.state").exists()
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "node2 to take over")

    rc, text = _run_fio([fio, *job, "--do_verify=1", "--verify_only=1", "--verify_state_load=1",
                         "--output-format=json", "--output=verify.json"], tmp_path, 180)
    bad = {int(m) for m in re.findall(r"verify: .*? offset (\d+), length", text)}
    verified = _fio_json(tmp_path / "verify.json")["jobs"][0]["read"]["total_ios"]
    assert verified >= len(acked), (verified, len(acked))
    assert not bad & acked, f"acknowledged writes lost or corrupt at {sorted(bad & acked)[:10]}"
    assert len(bad) <= 16, sorted(bad)[:20]
    assert rc == 0 or bad, f"verify pass failed for another reason: {text[-2000:]}"
    print(f"fio: {len(acked)} writes acknowledged before the crash, {verified} verified after "
          f"takeover, {len(bad)} never-acknowledged in-flight writes not on the LUN")
    assert served_by(c, "node1") == "node2"


def _handshake(sock: socket.socket, export: str = "lun0") -> None:
    sock.settimeout(10)
    greeting = b""
    while len(greeting) < 18:
        greeting += sock.recv(18 - len(greeting))
    assert greeting[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3) + opt(P.OPT_GO, info_data(export)))


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def _flood_leaves_the_guest_serving(c) -> None:
    """200 connections that never finish the handshake nor read, then 4 MiB of options
    without reading (tests/nbd_flood.py, in a process of its own), against a real guest: its
    RSS grows by less than the stated bound, a client connected before is answered with
    normal latency throughout, and the guest stays the one serving (its loop never stalled
    long enough for a takeover)."""
    host, port = nbd_address(c.control.config, 1)
    pid = c.status().node("node1")["pid"]
    prober = Prober((host, port)).start()
    attack = None
    try:
        prober.wait_for(100)
        base = summary(prober.since(0))
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = memory(pid)
        t_attack = time.monotonic()
        attack = subprocess.Popen([sys.executable, "-m", "tests.nbd_flood", host, str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(attack.stdout.readline())  # every attacker connected and sent
        prober.wait_for(100)
        during = summary(prober.since(t_attack))
        growth = memory(pid)["VmHWM"] - before["VmRSS"]
        print(json.dumps({"baseline": base, "during": during, "rss_before": before["VmRSS"],
                          "growth": growth, "bound": Limits().bound()}))
        assert growth < Limits().bound(), growth
        # The median, not the maximum: a real guest has pauses of its own (CPs, a loaded host).
        assert during["median_ms"] < max(50.0, 10 * base["median_ms"]), (base, during)
    finally:
        prober.stop()
        if attack is not None:
            attack.stdin.close()
            attack.wait(10)
    st = c.status().node("node1")
    assert st["pid"] == pid and st["state"] == "serving" and served_by(c, "node1") == "node1"
    # The caps engaged, and the status says so (the figures ride on heartbeats).
    wait_until(lambda: (s := c.status().node("node1")["nbd"]["server"])["refused"]
               + s["evicted"] >= 200 - Limits().max_handshakes, 10, "the refusals in status")


def test_raw_protocol_errors_and_floods_leave_the_server_serving(cluster):
    c = cluster
    host, port = nbd_address(c.control.config, 1)
    pid = c.status().node("node1")["pid"]
    # malformed handshake: bad client flags, then bad option magic -> connection closed
    for junk in (b"\xff\xff\xff\xff", struct.pack(">I", 1) + b"IHAVEOPX" + bytes(8),
                 b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, port)) as s:
            s.settimeout(10)
            s.recv(18)
            s.sendall(junk)
            assert _closed(s)
    # oversized and out-of-range requests get errors; the connection goes on
    cl = Client((host, port), structured=False)
    cl.send(req(P.CMD_READ, 0, 64 * MiB, cookie=1))
    assert cl.reply()[:2] == (P.EINVAL, 1)
    cl.send(req(P.CMD_READ, 32 * MiB - 512, 4096, cookie=2))
    assert cl.reply()[:2] == (P.EINVAL, 2)
    cl.send(req(P.CMD_WRITE, 32 * MiB, 512, cookie=3, data=b"w" * 512))
    assert cl.reply()[:2] == (P.ENOSPC, 3)
    cl.send(req(P.CMD_WRITE, 0, 33 * MiB, cookie=4) + b"\xee" * (33 * MiB))  # read and dropped
    assert cl.reply()[:2] == (P.EINVAL, 4)
    cl.send(req(P.CMD_WRITE, 0, 4096, cookie=5, data=b"\x42" * 4096) + req(P.CMD_READ, 0, 4096,
                                                                           cookie=6))
    assert cl.reply()[:2] == (0, 5) and cl.reply(4096) == (0, 6, b"\x42" * 4096)
    # an absurd write length and a bad request magic close the connection
    cl.send(req(P.CMD_WRITE, 0, 0xFFFFFFF0, cookie=7))
    assert _closed(cl.s)
    cl.close()
    with socket.create_connection((host, port)) as s:
        _handshake(s)
        s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        assert _closed(s)
    # and the domain still serves, the same process
    cl = Client((host, port), structured=True)
    cl.send(req(P.CMD_READ, 0, 4096, cookie=8))
    assert cl.reply(4096) == (0, 8, b"\x42" * 4096)
    cl.close()
    st = c.status().node("node1")
    assert st["pid"] == pid and st["state"] == "serving"
    with c.client("node1") as blk:
        assert blk.read(0, 0, 4096) == b"\x42" * 4096
    _flood_leaves_the_guest_serving(c)  # on the same cluster: one boot for both


def test_up_refuses_a_taken_nbd_port_in_one_line(tmp_path):
    with socket.socket() as holder:  # someone else's NBD server on node2's address
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.10.2", 0))
        holder.listen()
        port = holder.getsockname()[1]
        p = run([sys.executable, "-m", "vmemu.cli", "--data-dir", str(tmp_path / "d"), "up",
                 "--nodes", "2", "--detach", "--disk-mb", "32", "--nvram-mb", "16",
                 "--nbd-port", str(port)])
    lines = [l for l in p.stderr.strip().splitlines() if l]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(lines) == 1 and f"NBD port {port} is in use on 127.0.10.2" in lines[0], p.stderr
