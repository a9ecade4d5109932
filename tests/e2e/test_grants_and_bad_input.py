"""Grants enforced by the kernel, and hostile input that changes nothing."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest
import zmq

from clients.block import BlockClient
from tests.e2e.conftest import BOOT_S
from vmemu import datadir
from vmemu.bus import codec
from vmemu.errors import BadRequest, NotGranted, OutOfRange, UnknownLun, UnknownNode
from vmemu.hypervisor import fdbroker


def test_partner_cannot_write_read_only_grant(make_cluster):
    c = make_cluster(nodes=2)
    res = c.control.call("probe", {"node": "node2", "what": "write_partner"})
    assert res["grant_mode"] == "ro"
    # Each refusal comes from the kernel: an O_RDONLY descriptor, a write-sealed memfd.
    assert res["mmap_read_write"] in ("EACCES", "EPERM")
    assert res["pwrite"] == "EBADF"
    assert res["reopen_read_write_and_pwrite"] == "EPERM"


def test_read_write_grant_option_allows_partner_writes(make_cluster):
    c = make_cluster(nodes=2, grant_mode="rw")
    res = c.control.call("probe", {"node": "node2", "what": "write_partner"})
    assert res["grant_mode"] == "rw"
    assert res["mmap_read_write"] == "allowed"


def test_domain_cannot_map_a_region_it_was_not_granted(make_cluster):
    c = make_cluster(nodes=4)
    s = c.status()
    node3_region = int(s.node("node3")["region"], 16)
    with pytest.raises(NotGranted):
        c.control.call("probe", {"node": "node1", "what": "map", "region": node3_region})
    assert c.status().node("node1")["state"] == "serving"


def test_fd_broker_refuses_a_process_posing_as_a_domain(make_cluster):
    c = make_cluster(nodes=2)
    region = int(c.status().node("node1")["region"], 16)
    reply, fd = fdbroker.request(datadir.run_dir(c.control.info).broker(),
                                 {"op": "map", "node": 2, "region": region})
    assert fd is None and not reply["ok"]
    assert reply["error"]["code"] == "not_granted" and f"pid {os.getpid()}" in reply["error"]["message"]


def test_fd_broker_survives_garbage(make_cluster):
    c = make_cluster(nodes=2)
    name = datadir.run_dir(c.control.info).broker()
    for junk in (b"", b"\xc1\xff\x00garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"op": "map"})):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(name)
            s.send(junk)
            try:
                s.recv(4096)
            except (socket.timeout, ConnectionError):
                pass
    assert c.status().all_serving()


def test_block_protocol_rejects_bad_requests_and_stays_up(make_cluster):
    c = make_cluster(nodes=2)
    with c.client("node1") as b:
        b.write(0, 0, b"k" * 4096)
        lun_size = b.info()["luns"][0]["size"]
        with pytest.raises(OutOfRange):
            b.read(0, lun_size, 4096)
        with pytest.raises(OutOfRange):
            b.write(0, lun_size - 512, b"x" * 1024)
        with pytest.raises(BadRequest):
            b.write(0, 100, b"x" * 512)  # not sector aligned
        with pytest.raises(BadRequest):
            b.read(0, 0, 3 << 20)  # too large
        with pytest.raises(UnknownLun):
            b.read(7, 0, 4096)
        with pytest.raises(BadRequest):
            b.call("format_everything", {})
        with pytest.raises(BadRequest):
            b.call("read", {"lun": "zero", "offset": 0, "length": 4096})
        assert b.read(0, 0, 4096) == b"k" * 4096  # nothing changed


def test_garbage_frames_on_client_and_control_sockets(make_cluster):
    c = make_cluster(nodes=2)
    ctx = zmq.Context()
    try:
        for endpoint in (c.endpoint("node1"), c.control.info["control"]):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            s.send(b"\xc1not msgpack")
            s.send_multipart([b"two", b"frames"])
            s.send(msgpack.packb({"k": "q", "id": 7, "op": 5}))  # id recoverable: answered
            assert s.poll(5000)
            reply = codec.decode(s.recv())
            assert isinstance(reply, codec.Reply) and reply.id == 7 and not reply.ok
            assert reply.error["code"] == "bad_frame"
            s.close()
    finally:
        ctx.term()
    assert c.status().all_serving()
    with c.client("node1") as b:
        b.write(0, 0, b"z" * 4096)


def test_unknown_node_in_control_requests(make_cluster):
    c = make_cluster(nodes=2)
    with pytest.raises(UnknownNode):
        c.crash("node9")
    with pytest.raises(UnknownNode):
        c.control.call("restart", {"node": "banana"})
    assert c.status().all_serving()


def test_exactly_once_for_a_retried_write(make_cluster):
    c = make_cluster(nodes=2)
    with c.client("node1") as first, c.client("node1") as second:
        req = first.next_id()
        args = {"lun": 0, "offset": 0, "data": b"1" * 4096}
        first.submit("write", args, req_id=req)
        while not first.poll(1.0):
            pass
        second.write(0, 0, b"2" * 4096)
        # The same (client, request) again, as a retry would send it: acknowledged, not applied.
        first.submit("write", args, req_id=req)
        done = []
        while not done:
            done = first.poll(1.0)
        assert done[0].ok and done[0].result["seq"] == 0
        assert second.read(0, 0, 4096) == b"2" * 4096


def test_exactly_once_across_takeover_and_giveback(make_cluster):
    c = make_cluster(nodes=2)
    with c.client("node1") as retrier, c.client("node1") as other:
        args = {"lun": 0, "offset": 8192, "data": b"1" * 4096}
        req = retrier.next_id()
        retrier.submit("write", args, req_id=req)
        while not retrier.poll(1.0):
            pass
        c.crash("node1")
        c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 20, "takeover")
        other.write(0, 8192, b"2" * 4096)
        c.restart("node1")
        c.wait_for(lambda s: s.node("node1")["state"] == "up", BOOT_S, "node1 to boot")
        c.giveback("node1")
        c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 20, "giveback")
        retrier.submit("write", args, req_id=req)  # the retry arrives at the owner, after all that
        done = []
        while not done:
            done = retrier.poll(1.0)
        assert done[0].ok and done[0].result["seq"] == 0
        assert other.read(0, 8192, 4096) == b"2" * 4096
