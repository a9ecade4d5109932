"""The NBD transport under a flood, live: a serving process (tests/nbd_mem_server.py, the
guest's transport and loop shape over the in-memory D-module), 200 connections that never
finish the handshake and never read, then one client sending 4 MiB of options without
reading its replies. The serving process's peak RSS grows by less than the stated bound
(`Limits().bound()`, domains/nbd_server.py's docstring), and a well-behaved client connected
before keeps being answered with normal latency meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from domains.nbd_limits import Limits
from tests.nbd_flood import Prober, memory, summary


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def test_flood_of_stalled_and_non_reading_clients():
    p = subprocess.Popen([sys.executable, "-m", "tests.nbd_mem_server"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    attack = None
    prober = None
    try:
        info = json.loads(p.stdout.readline())
        addr = ("127.0.0.1", info["port"])
        prober = Prober(addr).start()
        prober.wait_for(100)
        base = summary(prober.since(0))
        reset_peak(p.pid)
        before = memory(p.pid)
        t_attack = time.monotonic()
        attack = subprocess.Popen([sys.executable, "-m", "tests.nbd_flood", *map(str, addr)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        done = json.loads(attack.stdout.readline())  # every attacker connected and sent
        sent = done["flood_sent"]
        prober.wait_for(100)  # and while they hold their sockets, the good client is answered
        during = summary(prober.since(t_attack))
        after = memory(p.pid)
        growth = after["VmHWM"] - before["VmRSS"]
        print(json.dumps({"baseline": base, "during": during, "rss_before": before["VmRSS"],
                          "peak_after": after["VmHWM"], "growth": growth, "flood_sent": sent,
                          "bound": Limits().bound()}))
        assert growth < Limits().bound(), growth
        assert during["max_ms"] < 1000, during
        assert during["median_ms"] < max(50.0, 10 * base["median_ms"]), (base, during)
    finally:
        if prober is not None:
            prober.stop()
        if attack is not None:
            attack.stdin.close()
            attack.wait(10)
        p.stdin.close()
        stats = json.loads(p.stdout.readline() or "{}")
        p.wait(10)
    assert stats["refused"] + stats["evicted"] >= 200 - Limits().max_handshakes, stats
