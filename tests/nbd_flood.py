"""Hostile and slow NBD clients, for the live tests of the transport's bounds (a serving
process of tests/nbd_mem_server.py, or a real guest): connections that never finish the
handshake and never read, a client that sends megabytes of options without reading, and a
well-behaved client whose latency is measured meanwhile."""

from __future__ import annotations

import errno
import socket
import statistics
import struct
import threading
import time

from domains import nbd_proto as P
from tests.unit.test_nbd_proto import opt, req
from tests.unit.test_nbd_server import Client

KiB = 1 << 10
MiB = 1 << 20
_LIST = opt(P.OPT_LIST)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * KiB
    return out


def _push(s: socket.socket, data: memoryview) -> int:
    """Send what the kernel takes now, without blocking; bytes sent."""
    sent = 0
    while sent < len(data):
        try:
            sent += s.send(data[sent:sent + 64 * KiB])
        except BlockingIOError:
            break
        except OSError as exc:  # refused, evicted or timed out by the server: it is gone
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                break
            raise
    return sent


def stalled_handshakes(addr: tuple[str, int], n: int = 200,
                       each: int = 256 * KiB) -> list[socket.socket]:
    """`n` connections that send client flags and options (up to `each` bytes, as much as the
    kernel takes at once) and then nothing more, and never read."""
    data = memoryview(struct.pack(">I", 3) + _LIST * (each // len(_LIST)))
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=10)
        s.setblocking(False)
        _push(s, data)
        socks.append(s)
    return socks


def option_flood(addr: tuple[str, int], total: int = 4 * MiB,
                 stuck_s: float = 1.0) -> tuple[socket.socket, int]:
    """One client that sends `total` bytes of options and never reads: sends until all went
    or nothing more has gone for `stuck_s` (the server stopped reading it)."""
    data = memoryview(struct.pack(">I", 3) + _LIST * (total // len(_LIST)))
    s = socket.create_connection(addr, timeout=10)
    s.setblocking(False)
    sent = 0
    last = time.monotonic()
    while sent < len(data) and time.monotonic() - last < stuck_s:
        n = _push(s, data[sent:])
        if n:
            sent += n
            last = time.monotonic()
        else:
            time.sleep(0.01)
    return s, sent


class Prober:
    """A well-behaved client in a thread: one 4 KiB WRITE then READ at a time, each timed."""

    def __init__(self, addr: tuple[str, int], export: str = "lun0") -> None:
        self.client = Client(addr, export)
        self.samples: list[tuple[float, float]] = []  # (when, seconds)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                payload = bytes([i & 0xFF]) * 4096
                t0 = time.monotonic()
                self.client.send(req(P.CMD_WRITE, (i % 256) * 4096, 4096, cookie=2 * i,
                                     data=payload))
                assert self.client.reply()[:2] == (0, 2 * i)
                self.client.send(req(P.CMD_READ, (i % 256) * 4096, 4096, cookie=2 * i + 1))
                assert self.client.reply(4096) == (0, 2 * i + 1, payload)
                self.samples.append((t0, time.monotonic() - t0))
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> "Prober":
        self._t.start()
        return self

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        target = len(self.samples) + n
        while len(self.samples) < target and self.error is None:
            if time.monotonic() > end:
                raise AssertionError(f"the good client got {len(self.samples)} answers, "
                                     f"wanted {target}, in {timeout}s")
            time.sleep(0.005)
        if self.error is not None:
            raise AssertionError(f"the good client failed: {self.error!r}")

    def since(self, t: float) -> list[float]:
        return [dt for when, dt in self.samples if when >= t]

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)
        self.client.close()


def summary(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"n": len(lat), "median_ms": round(1000 * statistics.median(lat), 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "max_ms": round(1000 * lat[-1], 2)}


def main() -> int:
    """`python -m tests.nbd_flood HOST PORT`: the attack from a process of its own (so that the
    prober measuring latency does not share a GIL with it): 200 stalled handshakes, then a
    4 MiB option flood; prints one JSON line when done, holds every socket until stdin
    closes."""
    import json
    import sys

    addr = (sys.argv[1], int(sys.argv[2]))
    t0 = time.monotonic()
    socks = stalled_handshakes(addr, 200)
    flood, sent = option_flood(addr, 4 * MiB)
    print(json.dumps({"connections": len(socks) + 1, "flood_sent": sent,
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)
    sys.stdin.read()
    for s in [*socks, flood]:
        s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
