"""A serving process for the NBD transport's live tests: `python -m tests.nbd_mem_server`.

The guest's NBD transport (domains/nbd_server.py, default `Limits` unless a JSON object of
overrides is given as the first argument) over the in-memory D-module, turned by a loop of
the guest's shape (domains/guest.py: a control socket always polled, NBD descriptors added,
no sleep while `busy()`). Prints {"port", "pid"} as one JSON line, serves until its stdin
closes, then prints its NBD stats as one JSON line. Its RSS is what the tests measure.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import asdict, replace

import zmq

from domains.mem_dmodule import MemDModule
from domains.nbd_limits import Limits
from domains.nbd_server import NbdServer

MiB = 1 << 20


def main() -> int:
    overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    srv = NbdServer(MemDModule(1, {1: (64 * MiB, 16 * MiB)}), 1, lambda ident: ("127.0.0.1", 0),
                    limits=replace(Limits(), **overrides))
    host, port = srv.bind(1)
    control, wake = socket.socketpair()  # the guest always polls its control socket
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()
        wake.send(b"x")

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    while not stop.is_set():
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        for fd, ev in srv.poll_fds().items():
            poller.register(fd, ev)
        ready = dict(poller.poll(0 if srv.busy() else 100))
        srv.service(ready)
    print(json.dumps(asdict(srv.stats)), flush=True)
    srv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
