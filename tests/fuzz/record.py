"""Re-record the fuzz seed corpora from real clients: `python -m tests.fuzz.record`.

NBD: a vmemu NBD server (domains/nbd_server.py, the guest's transport, over the in-memory
D-module) behind a recording proxy; nbdinfo, qemu-img, fio (ioengine=nbd), libnbd from
Python, and vmemu's own clients/nbd_client.py connect through the proxy, and every
connection's client-to-server bytes become one seed, trimmed (tests/fuzz/nbd_wire.trim:
the handshake whole, a few requests of each kind, WRITE payloads cut to 4 KiB) into
tests/fuzz/corpus/nbd/<client>-<n>.bin. Bus: clients/block.py's BlockClient talks to a
recording ROUTER that answers through domains/block_stream.serve_frames; the frames each
way go to tests/fuzz/corpus/bus/*.frames (4-byte length, frame). A missing client binary
is skipped and said so. MANIFEST.json lists every seed with the client that made it, its
recorded and stored sizes, and the client versions. Needs the Debian packages nbdkit libnbd-bin python3-libnbd qemu-utils
fio; takes about 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from clients.block import BlockClient
from clients.nbd_client import NbdClient
from domains.block_stream import join_frames, serve_frames
from domains.mem_dmodule import MemDModule
from domains.nbd_server import NbdServer
from tests.fuzz.nbd_wire import trim
from tests.fuzz.targets import SIZES
from tests.unit.test_nbd_server import Loop
from vmemu.bus.rpc import make_socket

MiB = 1 << 20
CORPUS = Path(__file__).resolve().parent / "corpus"
SYSTEM_PYTHON = "/usr/bin/python3"


class RecordingProxy:
    """Relays TCP connections to `upstream`, keeping what each client sent."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()
        self.label = "unlabelled"
        self.sessions: list[tuple[str, bytearray]] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            buf = bytearray()
            with self.lock:
                self.sessions.append((self.label, buf))
            t = threading.Thread(target=self._relay, args=(c, buf), daemon=True)
            t.start()
            self.threads.append(t)

    def _relay(self, c: socket.socket, buf: bytearray) -> None:
        s = socket.create_connection(self.upstream)
        open_ = {c: s, s: c}
        while open_:
            ready, _, _ = select.select(list(open_), [], [], 1.0)
            for r in ready:
                try:
                    data = r.recv(1 << 20)
                except OSError:
                    data = b""
                peer = open_.get(r)
                if peer is None:
                    continue
                if data:
                    if r is c:
                        buf += data
                    try:
                        peer.sendall(data)
                    except OSError:
                        open_.clear()
                    continue
                del open_[r]
                try:  # half-close: the other side may still answer what came before
                    peer.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        c.close()
        s.close()

    def idle(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        self.lst.close()


def run(cmd: list[str], notes: list[str], timeout: float = 60) -> bool:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        notes.append(f"skipped (not installed): {' '.join(cmd)}")
        return False
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        line = f"exit {p.returncode}: {' '.join(cmd)}: {p.stderr.strip()[:300]}"
        notes.append(re.sub(r"nbd://127\.0\.0\.1:\d+", "nbd://PROXY", line))
    return True


LIBNBD = r"""
import sys, nbd
uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
if mode == "opt":  # option haggling by hand: list, info of each, go
    h.set_opt_mode(True)
    h.connect_uri(uri)
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    for n in names[:3]:
        h.set_export_name(n)
        h.opt_info()
    h.set_export_name("nope")
    try:
        h.opt_info()
    except nbd.Error:
        pass
    h.set_export_name(names[0])
    h.opt_go()
    h.pread(512, 0)
    h.shutdown()
elif mode == "abort":
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_abort()
else:
    if mode == "simple":
        h.set_request_structured_replies(False)
    h.connect_uri(uri)
    h.set_strict_mode(0)  # let odd requests reach the server
    pattern = bytes(range(256)) * 16
    h.pwrite(pattern, 0)
    h.pwrite(pattern, 8192, nbd.CMD_FLAG_FUA)
    h.pwrite(b"unaligned!", 8195)
    h.pread(4096, 0)
    h.pread(100, 1000)
    if h.can_df():
        h.pread(4096, 0, nbd.CMD_FLAG_DF)
    h.zero(4096, 16384)
    h.zero(1000, 20000, nbd.CMD_FLAG_NO_HOLE)
    h.trim(65536, 65536)
    h.flush()
    for bad in (lambda: h.pread(4096, h.get_size() - 512), lambda: h.pwrite(b"x" * 512, h.get_size()),
                lambda: h.pread((32 << 20) + 4096, 0)):
        try:
            bad()
        except nbd.Error:
            pass
    try:
        h.pread(3 << 20, 0)  # above the advertised maximum: served from the pool
    except nbd.Error:
        pass  # lun1 is smaller than that
    h.shutdown()
"""


def record_nbd(out: Path, notes: list[str], tmp: Path) -> dict[str, Any]:
    d = MemDModule(1, SIZES)
    srv = NbdServer(d, 1, lambda ident: ("127.0.0.1", 0))
    addr = srv.bind(1)
    loop = Loop(srv)
    proxy = RecordingProxy(addr)
    base = f"nbd://{proxy.addr[0]}:{proxy.addr[1]}"
    src = tmp / "src.img"
    src.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    fio = ["fio", "--name=j", "--ioengine=nbd", f"--uri={base}/lun0", "--size=8M",
           "--buffer_pattern=0x5a5a5a5a", "--output=/dev/null"]
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("nbdinfo-list", lambda: run(["nbdinfo", "--list", base], notes)),
        ("nbdinfo-list-json", lambda: run(["nbdinfo", "--list", "--json", base], notes)),
        ("nbdinfo", lambda: run(["nbdinfo", f"{base}/lun0"], notes)),
        ("nbdinfo-json", lambda: run(["nbdinfo", "--json", f"{base}/vol0/lun1"], notes)),
        ("nbdinfo-map", lambda: run(["nbdinfo", "--map", f"{base}/lun1"], notes)),
        ("nbdinfo-unknown", lambda: run(["nbdinfo", f"{base}/nope"], notes)),
        ("qemu-img-info", lambda: run(["qemu-img", "info", f"{base}/lun0"], notes)),
        ("qemu-img-convert", lambda: run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                          str(src), f"{base}/lun0"], notes)),
        ("qemu-img-compare", lambda: run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                          str(src), f"{base}/lun0"], notes)),
        ("fio-randwrite", lambda: run(fio + ["--rw=randwrite", "--bs=4k", "--iodepth=16",
                                             "--runtime=2", "--time_based", "--fsync=32"], notes)),
        ("fio-randread", lambda: run(fio + ["--rw=randread", "--bs=4k", "--iodepth=16",
                                            "--runtime=2", "--time_based"], notes)),
        ("fio-trim-bigbs", lambda: run(fio + ["--rw=randtrim", "--bs=64k", "--iodepth=4",
                                              "--number_ios=64"], notes)
         and run(fio + ["--rw=write", "--bs=4M", "--iodepth=2", "--number_ios=4"], notes)),
        ("libnbd", lambda: run([SYSTEM_PYTHON, "-c", LIBNBD, f"{base}/lun0", "io"], notes)),
        ("libnbd-simple", lambda: run([SYSTEM_PYTHON, "-c", LIBNBD, f"{base}/lun1", "simple"], notes)),
        ("libnbd-opt", lambda: run([SYSTEM_PYTHON, "-c", LIBNBD, base, "opt"], notes)),
        ("libnbd-abort", lambda: run([SYSTEM_PYTHON, "-c", LIBNBD, base, "abort"], notes)),
        ("vmemu-nbd-client", lambda: vmemu_nbd_client(f"{base}/lun0")),
    ]
    try:
        for label, job in jobs:
            proxy.label = label
            job()
            proxy.idle()
    finally:
        proxy.close()
        loop.close()
        srv.close()
    manifest = {}
    counts: dict[str, int] = {}
    (out / "nbd").mkdir(parents=True, exist_ok=True)
    for label, buf in proxy.sessions:
        if not buf:
            continue
        counts[label] = counts.get(label, 0) + 1
        name = f"{label}-{counts[label]}.bin"
        data = trim(bytes(buf))
        (out / "nbd" / name).write_bytes(data)
        manifest[name] = {"client": label, "recorded_bytes": len(buf), "stored_bytes": len(data)}
    return manifest


def vmemu_nbd_client(uri: str) -> None:
    with NbdClient(uri) as c:
        c.write(0, 0, b"v" * 4096)
        c.read(0, 0, 4096)
        c.call("flush", {"lun": 0})
        for i in range(16):  # pipelined, as `vmemu load` drives it
            c.submit("write", {"lun": 0, "offset": i * 4096, "data": bytes([i]) * 4096})
        end = time.monotonic() + 10
        while c.pending and time.monotonic() < end:
            c.poll(0.1)


def record_bus(out: Path) -> dict[str, Any]:
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    d = MemDModule(1, SIZES)
    requests: list[bytes] = []
    replies: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            peer, frame = router.recv_multipart()
            requests.append(frame)
            reply = serve_frames([frame], d).replies[0]
            if reply is not None:
                replies.append(reply)
                router.send_multipart([peer, reply])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with BlockClient(endpoint, ctx=ctx) as c:
            c.info()
            c.write(0, 0, bytes(range(256)) * 16)
            c.read(0, 0, 4096)
            c.flush(0)
            c.write_path("vol0/lun1", 8192, b"p" * 512)
            c.read_path("vol0/lun1", 8192, 512)
            for bad in (lambda: c.read(9, 0, 512), lambda: c.write(0, 8 * MiB, b"x" * 512),
                        lambda: c.read(0, 1, 100), lambda: c.read_path("vol9/lun0", 0, 512)):
                try:
                    bad()
                except Exception:  # noqa: BLE001 - error replies are what these record
                    pass
            for i in range(8):  # pipelined, as `vmemu load` drives it
                c.submit("write", {"lun": 1, "offset": i * 4096, "data": bytes([i]) * 4096})
            end = time.monotonic() + 10
            while c.pending and time.monotonic() < end:
                c.poll(0.1)
    finally:
        stop.set()
        t.join(5)
        router.close(0)
        ctx.term()
    (out / "bus").mkdir(parents=True, exist_ok=True)
    (out / "bus" / "block-client-requests.frames").write_bytes(join_frames(requests))
    (out / "bus" / "block-client-replies.frames").write_bytes(join_frames(replies))
    return {"block-client-requests.frames": {"client": "clients/block.py", "frames": len(requests)},
            "block-client-replies.frames": {"client": "domains/block_stream.py", "frames": len(replies)}}


def versions() -> dict[str, str]:
    out = {}
    for tool, args in (("nbdinfo", ["--version"]), ("qemu-img", ["--version"]), ("fio", ["--version"])):
        try:
            p = subprocess.run([tool, *args], capture_output=True, text=True, timeout=10)
            out[tool] = p.stdout.splitlines()[0] if p.stdout else "?"
        except (OSError, subprocess.SubprocessError):
            out[tool] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.record", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CORPUS)
    args = ap.parse_args(argv)
    notes: list[str] = []
    for sub in ("nbd", "bus"):
        if (args.out / sub).exists():
            shutil.rmtree(args.out / sub)
    with tempfile.TemporaryDirectory() as tmp:
        seeds = record_nbd(args.out, notes, Path(tmp))
    seeds.update(record_bus(args.out))
    manifest = {"recorded": time.strftime("%Y-%m-%d"), "versions": versions(), "notes": notes,
                "seeds": seeds}
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(seeds)} seeds in {args.out}")
    for n in notes:
        print(" ", n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
