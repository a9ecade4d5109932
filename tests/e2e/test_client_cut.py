"""Clients that hang up mid-request (the chaos fault `client_cut`), against real guests.

The server must survive half frames, must not apply a write whose payload never fully
arrived, and a write whose reply was lost is applied once or not at all (the checker judges
the chaos run; the half frame is checked here directly, byte for byte on the LUN)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.block import BlockClient
from clients.nbd_client import NbdClient
from tests.e2e.conftest import wait_until
from tests.e2e.test_chaos import SLACK
from vmemu.config import nbd_uri

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def test_a_half_sent_nbd_write_changes_nothing_and_a_resent_write_applies_once(make_cluster):
    c = make_cluster(nodes=2)
    pid = c.status().node("node1")["pid"]
    before = {0: b"\x41" * 4096, MiB: bytes(range(256)) * 4096}  # 4 KiB and 1 MiB
    with c.client("node1") as blk:
        for off, data in before.items():
            blk.write(0, off, data)
    uri = nbd_uri(c.control.config, 1, 0)
    for off, data in before.items():  # header and half the payload, then the line drops
        cl = NbdClient(uri, give_up_after=20)
        new = b"\xee" * len(data)
        frame = cl.frame("write", {"offset": off, "data": new}, cl.next_id())
        cl.send_bytes(frame[:len(frame) - len(new) // 2])
        cl.hang_up()
    cl = NbdClient(uri, give_up_after=20)  # a header alone, then the same
    cl.send_bytes(cl.frame("write", {"offset": 0, "data": b"\xee" * 4096}, 1)[:28])
    cl.hang_up()
    # Each connection is gone from the guest's view: it saw every hang-up, and went on.
    c.wait_for(lambda st: st.node("node1")["nbd"]["server"]["connections"] == 0, 30,
               "the guest to drop the cut connections")
    with NbdClient(uri, give_up_after=20) as cl, c.client("node1") as blk:
        for off, data in before.items():
            assert cl.read(0, off, len(data)) == data  # over NBD
            assert blk.read(0, off, len(data)) == data  # and the block protocol
        cl.write(0, 8192, b"\x42" * 4096)  # and it still takes writes
        assert blk.read(0, 8192, 4096) == b"\x42" * 4096
    st = c.status().node("node1")
    assert st["pid"] == pid and st["state"] == "serving"
    _a_write_whose_reply_was_lost_is_applied_once_when_resent(c)


def _a_write_whose_reply_was_lost_is_applied_once_when_resent(c) -> None:
    """A block write applied, its reply never read, the connection dropped; another client
    then writes the block; the first client resends its write on a new connection with the
    same (client, request) ids: acknowledged, and not applied a second time."""
    first, second, off = b"\x01" * 4096, b"\x02" * 4096, 3 * 4096
    cl = BlockClient(c.endpoint("node1"), give_up_after=20)
    args = {"lun": 0, "offset": off, "data": first}
    rid = cl.submit("write", args)
    with c.client("node1") as other:
        wait_until(lambda: other.read(0, off, 4096) == first, 20, "the first write to land")
        cl.close()  # its reply unread
        other.write(0, off, second)
        again = BlockClient(c.endpoint("node1"), client_id=cl.client_id, give_up_after=20,
                            first_id=rid + 1)
        try:
            again.submit("write", args, req_id=rid)
            done = []
            wait_until(lambda: bool(done.extend(again.poll(0.1)) or done), 20,
                       "the resent write's reply")
            assert [(d.req_id, d.ok) for d in done] == [(rid, True)]
        finally:
            again.close()
        assert other.read(0, off, 4096) == second


def test_a_chaos_run_whose_clients_hang_up_mid_request_is_linearizable(tmp_path: Path):
    """Seed 31: node2's clients cut half their ops for 2.3 s from 2.0 s in, of every kind
    (block protocol, a block write resent by the same client on a new connection, NBD after
    the request, NBD after half a write's payload)."""
    p = subprocess.run([sys.executable, "-m", "vmemu.cli", "chaos", "--seed", "31",
                        "--duration", "5s", "--faults", "client_cut", "--availability-slack",
                        SLACK, "--json", "--out", "runs"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["valid"] is True and res["faults"] == {"client_cut": 1}, res
    (rec,) = [json.loads(x) for x in (tmp_path / "runs" / "seed-31" / "faults.jsonl")
              .read_text().splitlines()]
    assert rec["cut"] == "node2" and set(rec["cuts"]) >= {"block", "block_resent", "nbd",
                                                          "nbd_half_frame"}
    lost = sum(n for how, n in rec["cuts"].items() if how != "block_resent")
    assert res["ops"]["info"] >= lost > 20
    judged = [(o["identity"], o["what"]) for o in res["outages"] if "budget_s" in o]
    assert judged == [("node2", "cut")] and res["availability_ok"] is True
