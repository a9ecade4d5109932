"""A hostile host: another user, poison frames, forged reports, idle connections, huge frames.

One live 2-node cluster for the module (every test leaves it as it found it, and checks so).
Its data dir sits under a directory every user may traverse, so that what stops another user
is vmemu's own 0700 directories, not pytest's private tmp tree.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from tests.e2e.conftest import TEST_DEFAULTS, alive, private_nbd_base, wait_until
from vmemu import datadir
from vmemu.bus import codec
from vmemu.cluster import Cluster
from vmemu.hypervisor import fdbroker

NOBODY_PY = "/usr/bin/python3"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(f"/tmp/vmemu-hostile-{secrets.token_hex(4)}")
    base.mkdir(mode=0o711)
    os.chmod(base, 0o711)
    c = Cluster(nodes=2, data_dir=base / "d", nbd_addr_base=private_nbd_base(), **TEST_DEFAULTS)
    pids: set[int] = set()
    try:
        c.start(timeout=240)
        pids = {c.proc.pid} | {n["pid"] for n in c.status().nodes}  # type: ignore[union-attr]
        yield c
    finally:
        c.stop()
        wait_until(lambda: not any(alive(p) for p in pids), 20, "every vmemu process to exit")
        shutil.rmtree(base, ignore_errors=True)


def snapshot(c: Cluster) -> dict[str, Any]:
    """What must not change: who runs, who serves what, that nothing failed or was taken over."""
    s = c.status()
    return {"pids": [n["pid"] for n in s.nodes], "states": [n["state"] for n in s.nodes],
            "served_by": [n["identity_served_by"] for n in s.nodes]}


def no_failures(c: Cluster) -> None:
    bad = [e for e in c.events() if e["kind"] in ("failure_detected", "heartbeat_missed",
                                                  "main_loop_stalled", "crash_requested",
                                                  "shutdown_started", "domain_exited")]
    assert bad == []


def run_dir(c: Cluster) -> datadir.RunDir:
    return datadir.run_dir(c.control.info)



def collect_replies(s: zmq.Socket, want: set[int], timeout: float = 60) -> dict[int, codec.Reply]:
    """Replies read from `s` until every id in `want` has one (or the deadline passes)."""
    replies: dict[int, codec.Reply] = {}
    end = time.monotonic() + timeout
    while want - set(replies) and time.monotonic() < end:
        if s.poll(200):
            msg = codec.decode(s.recv())
            assert isinstance(msg, codec.Reply)
            replies[msg.id] = msg
    return replies

def test_data_dir_and_sockets_are_private(cluster: Cluster) -> None:
    rd = run_dir(cluster)
    for p in (cluster.dir, rd.path, cluster.dir / "node1", datadir.logs_dir(cluster.dir)):
        assert p.stat().st_mode & 0o777 == 0o700, p
    for p in (cluster.dir / "node1" / "disk0.img", datadir.events_file(cluster.dir),
              cluster.dir / "node1" / "rdb.sqlite", datadir.logs_dir(cluster.dir) / "node1.log"):
        assert p.stat().st_mode & 0o077 == 0, p
    # No abstract socket names (listed in /proc/net/unix for everyone, without permissions).
    names = Path("/proc/net/unix").read_text()
    assert cluster.cfg.cluster_id not in names and str(rd.path) in names


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                    reason="needs root to run a probe as user nobody (runuser)")
def test_another_user_can_neither_connect_nor_bind_nor_read(cluster: Cluster) -> None:
    if subprocess.run([NOBODY_PY, "-c", "import zmq, msgpack"], capture_output=True).returncode:
        pytest.skip(f"{NOBODY_PY} has no zmq/msgpack (Debian python3-zmq python3-msgpack)")
    before = snapshot(cluster)
    rd = run_dir(cluster)
    probe = r'''
import errno, json, os, socket, sys, zmq, msgpack
run, data, control = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "allowed"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
for name in ("hv", "n1", "n1c", "n2", "n2c"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    attempt("connect " + name, lambda: s.connect(os.path.join(run, name)))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
attempt("connect fd broker", lambda: s.connect(os.path.join(run, "fd")))
b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
attempt("bind an identity name", lambda: b.bind(os.path.join(run, "n1")))
attempt("read a disk image", lambda: open(os.path.join(data, "node1", "disk0.img"), "rb").read(1))
attempt("list the data dir", lambda: os.listdir(data))
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER); d.setsockopt(zmq.LINGER, 0); d.connect(control)
for op in ("crash", "shutdown"):
    d.send(msgpack.packb({"k": "q", "id": 1, "op": op, "args": {"node": "node1"}}))
out["zmq reply"] = bool(d.poll(1000))
print(json.dumps(out))
'''
    res = subprocess.run(["runuser", "-u", "nobody", "--", NOBODY_PY, "-c", probe, str(rd.path),
                          str(cluster.dir), rd.control()], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out.pop("zmq reply") is False
    assert out and all(v == "EACCES" for v in out.values()), out
    assert snapshot(cluster) == before
    no_failures(cluster)


def poison_values() -> list[Any]:
    return [-1, -(2**63), 2**64 - 1, 2**63, "x" * 5, None, [1, 2], {"a": 1}, b"\x00\xff",
            float("nan"), 1.5, True, "", "x" * 5000]


# For each endpoint, its ops and their fields; every frame below carries one field of one op
# poisoned and every other field missing, so none of them is a valid request.
HV_OPS = {"heartbeat": ["node", "pid", "token", "stats"], "event": ["node", "kind", "token"],
          "grants": ["node", "token"], "mirror_state": ["node", "region", "token"],
          "crash": ["node", "hang"], "restart": ["node"], "giveback": ["node"],
          "probe": ["node", "what", "region", "seconds"], "manage": ["what", "node", "volume"],
          "bus_fault": ["node", "side", "clear", "direction", "drop", "delay_ms", "reorder",
                        "ops", "duration_s", "seed"]}
GUEST_OPS = {"assign": ["identity", "epoch", "reason", "chain"], "release": ["identity"],
             "map": ["region", "owner"], "mirror_request": ["region"],
             "probe_write": ["region"], "stall": ["seconds"],
             "manage": ["what", "identity", "name", "size", "volume", "disk"],
             "rdb_apply": ["entries"], "rdb_propose": ["op", "args"],
             "rdb_query": ["what", "volume"], "rdb_rebuild": ["snapshot"],
             "bus_fault": ["node", "clear", "direction", "dup", "jitter_ms", "reorder_ms",
                           "skip_ops", "duration_s", "seed"]}
BLOCK_OPS = {"write": ["lun", "offset", "data", "client", "request", "path"],
             "read": ["lun", "offset", "length", "path"], "flush": ["lun", "path"]}


# The few poison values that are in fact valid for a field (a stall of 1.5 s is one).
VALID = {("stall", "seconds"): (1.5,),
         ("bus_fault", "clear"): (True,)}  # clears every rule: there are none


def frames_for(ops: dict[str, list[str]], id0: int) -> list[tuple[int, bytes]]:
    out = []
    rid = id0
    for op, fields in ops.items():
        out.append((rid, codec.encode_request(rid, op, {})))
        rid += 1
        for f in fields:
            for v in poison_values():
                if v in VALID.get((op, f), ()):
                    continue
                out.append((rid, msgpack.packb({"k": "q", "id": rid, "op": op, "args": {f: v}})))
                rid += 1
    return out


@pytest.mark.parametrize("where", ["control", "guest", "identity"])
def test_poison_frames_get_error_replies_and_kill_nothing(cluster: Cluster, where: str) -> None:
    before = snapshot(cluster)
    rd = run_dir(cluster)
    endpoint, ops = {"control": (rd.control(), HV_OPS), "guest": (rd.guest(1), GUEST_OPS),
                     "identity": (rd.identity(1), BLOCK_OPS)}[where]
    frames = frames_for(ops, 1)
    # Garbage that is not a request at all: counted and dropped, or answered if an id survives.
    junk = [b"", b"\xc1", b"\x92\x01\x02", msgpack.packb({"k": "q", "id": -5, "op": "read"}),
            msgpack.packb({"k": "q", "id": 2**64 - 1, "op": "read"}),
            msgpack.packb({"k": "r", "id": 3, "ok": True}), b"\xdd\xff\xff\xff\xff"]
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        for f in junk:
            s.send(f)
        s.send_multipart([b"two", b"frames"])
        for _, f in frames:
            s.send(f)
        want = {rid for rid, _ in frames}
        replies = collect_replies(s, want)
        s.close()
    finally:
        ctx.term()
    assert not want - set(replies), f"{len(want - set(replies))} of {len(want)} got no reply"
    ok = [i for i, r in replies.items() if r.ok]
    assert ok == [], f"poison accepted: {[frames[i - 1][1][:80] for i in ok[:5]]}"
    codes = {r.error["code"] for r in replies.values() if r.error}
    assert "error" not in codes, [r.error for r in replies.values() if r.error["code"] == "error"][:5]
    assert snapshot(cluster) == before
    no_failures(cluster)
    with cluster.client("node1") as b:  # and it still serves
        b.write(0, 0, b"p" * 4096)
        assert b.read(0, 0, 4096) == b"p" * 4096


def test_forged_heartbeat_and_cp_report_are_refused(cluster: Cluster) -> None:
    before = snapshot(cluster)
    rd = run_dir(cluster)
    s = cluster.status()
    pid1 = s.node("node1")["pid"]
    refused0 = s.raw["refused"]["forged_reports"]
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(rd.control())
        # Accepted, this would report a main loop stuck for 1e6 s: a takeover of node1.
        stats = {"loop_age_ms": 1e9, "ops": 0}
        for token in (None, "", "0" * 32):
            d.send(codec.encode_request(0, "heartbeat", {"node": 1, "pid": pid1, "token": token,
                                                         "stats": stats}))
        d.send(codec.encode_request(0, "event", {"node": 2, "kind": "cp_done", "fields": {
            "identities": [1, 2], "region": int(s.node("node2")["region"], 16)}}))
        d.send(codec.encode_request(9, "grants", {"node": 1}))
        assert d.poll(5000)
        reply = codec.decode(d.recv())
        assert isinstance(reply, codec.Reply) and reply.error["code"] == "not_granted"
        d.close()
    finally:
        ctx.term()
    cluster.wait_for(lambda st: st.raw["refused"]["forged_reports"] >= refused0 + 5, 10,
                     "the forged reports to be counted")
    assert snapshot(cluster) == before
    no_failures(cluster)


def test_idle_connections_to_the_fd_broker_change_nothing(cluster: Cluster) -> None:
    """An idle client used to stall Domain 0 in recv_fds until every guest missed its beats."""
    before = snapshot(cluster)
    limit_s = TEST_DEFAULTS["heartbeat_ms"] * TEST_DEFAULTS["heartbeat_misses"] / 1000
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        # three waves, each held by the broker to its deadline: together an attack that lasts
        # longer than a failure detection takes, which a blocking broker would not survive
        for _ in range(3):
            wave = []
            for _ in range(fdbroker.MAX_CONNS * 2):
                x = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                x.connect(run_dir(cluster).broker())
                wave.append(x)
            socks += wave
            t_wave = time.monotonic()
            for x in wave:  # each is closed by the broker at its deadline, unanswered
                x.settimeout(max(0.1, t_wave + 3 * limit_s + 5 - time.monotonic()))
                try:
                    assert x.recv(16) == b""
                except ConnectionResetError:
                    pass
        assert time.monotonic() - t0 > limit_s
    finally:
        for x in socks:
            x.close()
    refused = cluster.status().raw["refused"]
    assert refused["timeout"] + refused["too_many"] >= len(socks)
    assert snapshot(cluster) == before
    no_failures(cluster)


def test_an_oversized_frame_is_refused_as_it_arrives(cluster: Cluster) -> None:
    before = snapshot(cluster)
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(run_dir(cluster).identity(1))
        big = codec.encode_request(1, "write", {"lun": 0, "offset": 0, "data": bytes(8 << 20),
                                                "client": 1})
        d.send(big)
        assert not d.poll(1000)  # dropped by ZeroMQ with the connection; no answer, no write
        d.close()
    finally:
        ctx.term()
    with cluster.client("node1") as b:
        b.write(0, 4096, b"q" * 4096)
        assert b.read(0, 4096, 4096) == b"q" * 4096
    assert snapshot(cluster) == before
    no_failures(cluster)


MIRROR_OPS = {"begin": ["region", "owner", "size", "session"],
              "batch": ["region", "session", "spans"]}


def test_poison_frames_on_the_mirror_receiver(make_cluster) -> None:
    """--ha-mode mirror: the partner's copy of a region is written only by valid frames."""
    c = make_cluster(nodes=2, ha_mode="mirror")
    c.wait_for(lambda s: all(n["takeover_possible"] for n in s.nodes), 30, "mirrors in sync")
    before = snapshot(c)
    region = int(c.status().node("node1")["region"], 16)
    session = c.status().raw["nodes"][0]["mirror"]["session"]
    frames: list[tuple[int, list[bytes]]] = [(rid, [f]) for rid, f in frames_for(MIRROR_OPS, 1)]
    # Valid in shape, wrong in substance: a copy for a node that does not mirror here, a size
    # that is not the cluster's, spans past the end or half bad, or not the data frame's
    # length, a batch of another session (none of them may be applied).
    top = 16 << 20
    bad = [("begin", {"region": region, "owner": 2, "size": top, "session": 99}, None),
           ("begin", {"region": region, "owner": 1, "size": 1 << 33, "session": 99}, None),
           ("batch", {"region": region, "session": session, "spans": [[0, 8], [top - 4, 8]]},
            b"x" * 16),
           ("batch", {"region": region, "session": session, "spans": [[-8, 1]]}, b"x"),
           ("batch", {"region": region, "session": session, "spans": [[0, "text"]]}, b"x"),
           ("batch", {"region": region, "session": session, "spans": [[0, 8]]}, b"x" * 9),
           ("batch", {"region": region, "session": session + 1, "spans": [[0, 1]]}, b"x"),
           ("batch", {"region": region, "session": session, "spans": [[0, 1]]}, None)]
    for op, args, data in bad:
        rid = len(frames) + 1
        frames.append((rid, [codec.encode_request(rid, op, args)] + ([data] if data else [])))
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(run_dir(c).mirror(2))
        s.send_multipart([b"three", b"frames", b"here"])  # dropped: no request in it
        for _, f in frames:
            s.send_multipart(f)
        replies = collect_replies(s, {rid for rid, _ in frames})
        s.close()
    finally:
        ctx.term()
    assert len(replies) == len(frames)
    assert not [r for r in replies.values() if r.ok]
    assert "error" not in {r.error["code"] for r in replies.values() if r.error}
    assert snapshot(c) == before
    no_failures(c)
    # The copy was not touched: a takeover replays node1's acknowledged writes from it.
    with c.client("node1") as b:
        b.write(0, 0, b"m" * 4096)
    c.crash("node1")
    c.wait_for(lambda st: st.node("node1")["identity_served_by"] == "node2", 30, "takeover")
    with c.client("node1") as b:
        assert b.read(0, 0, 4096) == b"m" * 4096
