"""The fd broker: holds every NVRAM region's descriptor and hands them out per the grant table.

A region is a memfd with no name, so the only way to map one is to be handed its descriptor
here, over an AF_UNIX socket (SCM_RIGHTS). The broker learns who is asking from the kernel
(SO_PEERCRED), not from the request, so a domain cannot pose as another. Holding the
descriptors is also what keeps a region alive after its owner is killed: the broker is the
battery behind the NVRAM.

Wire: one SOCK_SEQPACKET message each way, msgpack maps.
    {"op": "register", "node": N, "region": R, "sealed": bool}  + 1 fd  -> {"ok": true}
    {"op": "map", "node": N, "region": R}                             -> {"ok": true, "mode": m} + 1 fd
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

import msgpack

from storage import region as shm
from vmemu.errors import BadRequest, NotGranted, VmemuError
from vmemu.hypervisor.grants import RO, GrantTable, Region

MAX_MSG = 4096


@dataclass
class Held:
    fd: int
    ro_fd: int
    size: int


class FdBroker:
    def __init__(self, name: str, grants: GrantTable, pid_of: Callable[[int], int | None],
                 on_register: Callable[[int, int], None]) -> None:
        self.grants = grants
        self.pid_of = pid_of
        self.on_register = on_register
        self.held: dict[int, Held] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(name)
        self.sock.listen(64)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)  # a stuck client must not stall the hypervisor
            try:
                self._serve(conn)
            except (OSError, ValueError):
                pass

    def _serve(self, conn: socket.socket) -> None:
        msg, fds, _, _ = socket.recv_fds(conn, MAX_MSG, 4)
        try:
            reply, out_fd = self._handle(conn, msg, fds)
        except VmemuError as exc:
            for fd in fds:
                os.close(fd)
            reply, out_fd = {"ok": False, "error": exc.to_wire()}, None
        data = msgpack.packb(reply)
        if out_fd is None:
            conn.send(data)
        else:
            socket.send_fds(conn, [data], [out_fd])

    def _handle(self, conn: socket.socket, raw: bytes, fds: list[int]) -> tuple[dict, int | None]:
        try:
            msg = msgpack.unpackb(raw)
        except Exception:
            raise BadRequest("fd broker: request is not msgpack") from None
        if not isinstance(msg, dict):
            raise BadRequest("fd broker: request is not a map")
        op, node, region_id = msg.get("op"), msg.get("node"), msg.get("region")
        if not isinstance(node, int) or not isinstance(region_id, int):
            raise BadRequest("fd broker: node and region must be integers")
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if self.pid_of(node) != pid:
            raise NotGranted(f"fd broker: pid {pid} is not node{node}")
        if op == "register":
            return self._register(node, region_id, bool(msg.get("sealed")), fds), None
        if op == "map":
            for fd in fds:
                os.close(fd)
            return self._map(node, region_id)
        raise BadRequest(f"fd broker: unknown op {op!r}")

    def _register(self, node: int, region_id: int, sealed: bool, fds: list[int]) -> dict:
        if len(fds) != 1:
            raise BadRequest("fd broker: register needs exactly one descriptor")
        fd = fds[0]
        size = shm.size_of(fd)
        if sealed and not shm.is_write_sealed(fd):
            os.close(fd)
            raise BadRequest("fd broker: region claims to be sealed but is not")
        self.grants.register(Region(region_id, node, size, sealed))
        self.held[region_id] = Held(fd, shm.reopen_read_only(fd), size)
        self.on_register(node, region_id)
        return {"ok": True}

    def _map(self, node: int, region_id: int) -> tuple[dict, int]:
        mode = self.grants.check(region_id, node)
        held = self.held.get(region_id)
        if held is None:
            raise NotGranted(f"region {region_id:#x} is not held by the hypervisor")
        return {"ok": True, "mode": mode, "size": held.size}, (held.ro_fd if mode == RO else held.fd)

    def free(self, region_id: int) -> None:
        held = self.held.pop(region_id, None)
        if held is not None:
            os.close(held.fd)
            os.close(held.ro_fd)
        self.grants.remove(region_id)

    def close(self) -> None:
        for rid in list(self.held):
            self.free(rid)
        self.sock.close()


def request(name: str, msg: dict, fd: int | None = None, timeout: float = 5.0) -> tuple[dict, int | None]:
    """Client side: one request, one reply (and maybe one descriptor)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(name)
        data = msgpack.packb(msg)
        if fd is None:
            s.send(data)
        else:
            socket.send_fds(s, [data], [fd])
        raw, fds, _, _ = socket.recv_fds(s, MAX_MSG, 1)
    reply = msgpack.unpackb(raw)
    return reply, (fds[0] if fds else None)
