"""Bus overhead: a vmemu RPC round trip beside a bare pyzmq REQ/REP echo of the same size.

Two echo servers run in one subprocess each (as every vmemu peer is a process of its own):
- vmemu: `RpcServer` (ROUTER) answering op "echo" with its `data` argument; the client is
  `RpcClient.call("echo", {"data": 4 KiB})` (DEALER, msgpack frames, request ids, deadline);
- bare: a zmq REP socket sending back the bytes it got; the client a REQ socket.
Both on ipc:// abstract endpoints with unique names. The calls are interleaved in blocks
(vmemu, bare, bare, vmemu, ...) so that the machine's noise falls on both alike; every call is
timed alone (perf_counter_ns), after a warm-up. Figures: median and p99 in microseconds of
each, and vmemu / bare.

`python -m bench.bus_overhead --serve vmemu|bare ENDPOINT` is the server side.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import log, percentile
from vmemu.bus import codec
from vmemu.bus.rpc import RpcClient, RpcServer, make_socket

PAYLOAD = 4096
WARMUP = 200
BLOCKS = 10  # interleaved blocks per side
ROOT = Path(__file__).resolve().parent.parent


# -- servers (subprocess side) ----------------------------------------------------------------
def _serve_vmemu(endpoint: str) -> None:
    ctx = zmq.Context()
    srv = RpcServer(ctx, endpoint)
    print("ready", flush=True)
    parent = os.getppid()
    try:
        while True:
            if not srv.sock.poll(1000):
                if os.getppid() != parent:
                    return  # the bench died: do not outlive it
                continue
            inc = srv.recv()
            if inc is None:
                continue
            if inc.request.op == "stop":
                srv.reply(inc.peer, inc.request.id, True)
                return
            srv.reply(inc.peer, inc.request.id, inc.request.args.get("data"))
    finally:
        srv.close()
        ctx.term()


def _serve_bare(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.REP)
    sock.bind(endpoint)
    print("ready", flush=True)
    parent = os.getppid()
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            msg = sock.recv()
            sock.send(msg)
            if not msg:  # an empty message stops the server
                return
    finally:
        sock.close(0)
        ctx.term()


# -- bench side ---------------------------------------------------------------------------------
def _start(kind: str, endpoint: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.Popen([sys.executable, "-m", "bench.bus_overhead", "--serve", kind, endpoint],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env=env)
    r, _, _ = select.select([p.stdout], [], [], 30.0)
    line = p.stdout.readline() if r else ""
    if line.strip() != "ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"{kind} echo server did not start (got {line!r})")
    return p


def _stop(p: subprocess.Popen | None, asked: bool) -> None:
    """Reap a server: it exits by itself once asked to stop; otherwise (an error) kill it."""
    if p is None:
        return
    if not asked:
        p.kill()
    try:
        p.wait(5.0)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if p.stdout:
        p.stdout.close()


def _codec_us(payload: bytes, reps: int = 2000) -> float:
    """What msgpack framing alone costs per round trip (encode+decode request and reply)."""
    t0 = time.perf_counter_ns()
    for i in range(1, reps + 1):
        q = codec.decode(codec.encode_request(i, "echo", {"data": payload}))
        codec.decode(codec.encode_result(i, q.args["data"]))
    return (time.perf_counter_ns() - t0) / reps / 1000.0


def _stats(ns: list[int]) -> dict[str, float]:
    us = [v / 1000.0 for v in ns]
    return {"p50": round(percentile(us, 50), 2), "p99": round(percentile(us, 99), 2),
            "mean": round(statistics.fmean(us), 2), "min": round(min(us), 2), "n": len(us)}


def run(quick: bool, n: int | None = None) -> dict[str, Any]:
    n = n or (1000 if quick else 5000)
    tag = f"vmemu-bench-bus-{os.getpid()}-{secrets.token_hex(4)}"
    ep_rpc, ep_bare = f"ipc://@{tag}-rpc", f"ipc://@{tag}-bare"
    payload = np.random.default_rng(7).integers(0, 256, PAYLOAD, dtype=np.uint8).tobytes()
    log(f"bus_overhead: {n} round trips of {PAYLOAD} B each, vmemu RPC and bare REQ/REP")
    p_rpc = p_bare = None
    ctx = zmq.Context()
    cli = req = None
    asked = False
    vm: list[int] = []
    bare: list[int] = []
    try:
        p_rpc = _start("vmemu", ep_rpc)
        p_bare = _start("bare", ep_bare)
        cli = RpcClient(ctx, ep_rpc, timeout=10.0)
        req = make_socket(ctx, zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 10_000)
        req.connect(ep_bare)

        def one_vm() -> int:
            t0 = time.perf_counter_ns()
            r = cli.call("echo", {"data": payload})
            dt = time.perf_counter_ns() - t0
            if len(r) != PAYLOAD:
                raise RuntimeError(f"vmemu echo returned {len(r)} bytes")
            return dt

        def one_bare() -> int:
            t0 = time.perf_counter_ns()
            req.send(payload)
            r = req.recv()
            dt = time.perf_counter_ns() - t0
            if len(r) != PAYLOAD:
                raise RuntimeError(f"bare echo returned {len(r)} bytes")
            return dt

        for _ in range(WARMUP):
            one_vm()
            one_bare()
        per = -(-n // BLOCKS)
        for b in range(BLOCKS):
            order = (("vm", one_vm, vm), ("bare", one_bare, bare))
            for _, fn, acc in (order if b % 2 == 0 else order[::-1]):
                k = min(per, n - len(acc))
                acc.extend(fn() for _ in range(k))
        cli.call("stop")
        req.send(b"")
        req.recv()
        asked = True
    finally:
        if cli is not None:
            cli.close()
        if req is not None:
            req.close(0)
        _stop(p_rpc, asked)
        _stop(p_bare, asked)
        ctx.term()
    s_vm, s_bare = _stats(vm), _stats(bare)
    codec_us = _codec_us(payload)
    res = {
        "n": n,
        "payload_bytes": PAYLOAD,
        "vmemu_rpc_us": s_vm,
        "bare_zmq_us": s_bare,
        "ratio_p50": round(s_vm["p50"] / s_bare["p50"], 3),
        "ratio_p99": round(s_vm["p99"] / s_bare["p99"], 3),
        "added_p50_us": round(s_vm["p50"] - s_bare["p50"], 2),
        "codec_us_per_round_trip": round(codec_us, 2),
        "method": ("echo servers in subprocesses on ipc:// abstract endpoints; vmemu: "
                   "RpcClient.call('echo', {data}) against RpcServer (DEALER/ROUTER, msgpack "
                   "frames); bare: zmq REQ/REP of the raw bytes; each call timed alone, "
                   f"{WARMUP} warm-up calls each, then {BLOCKS} interleaved blocks per side; "
                   "codec_us: msgpack encode+decode of request and reply in-process"),
    }
    log(f"bus_overhead: vmemu p50 {s_vm['p50']} us, bare p50 {s_bare['p50']} us "
        f"({res['ratio_p50']}x); p99 {s_vm['p99']} / {s_bare['p99']} us")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bus_overhead")
    ap.add_argument("--serve", choices=("vmemu", "bare"), required=True)
    ap.add_argument("endpoint")
    a = ap.parse_args(argv)
    (_serve_vmemu if a.serve == "vmemu" else _serve_bare)(a.endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
