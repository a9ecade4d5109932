"""The fd broker: holds every NVRAM region's descriptor and hands them out per the grant table.

A region is a memfd with no name, so the only way to map one is to be handed its descriptor
here, over an AF_UNIX socket (SCM_RIGHTS). The broker learns who is asking from the kernel
(SO_PEERCRED), not from the request, so a domain cannot pose as another. Holding the
descriptors is also what keeps a region alive after its owner is killed: the broker is the
battery behind the NVRAM.

Wire: one SOCK_SEQPACKET message each way, msgpack maps.
    {"op": "register", "node": N, "region": R, "sealed": bool}  + 1 fd  -> {"ok": true}
    {"op": "map", "node": N, "region": R}                             -> {"ok": true, "mode": m} + 1 fd

With `--nvram-placement mediator` a third domain, the mediator (node 0 on this wire), allocates
every region, and two more operations hand it from the mediator to its owner through here:
    {"op": "deposit", "node": 0, "region": R, "for": N}  + 1 fd  -> {"ok": true}
        the mediator made region R for node N (formatted, unmapped, not sealed); the broker
        holds it from now on, the mediator closes its descriptor.
    {"op": "claim", "node": N, "region": 0}                      -> {"ok": true, "region": R,
                                                                      "size": S} + 1 fd
        node N (SO_PEERCRED: its current incarnation) takes the newest region deposited for it,
        read-write; "unavailable" while there is none yet (the guest retries). Each region is
        handed to one incarnation only. The guest maps it, seals it, and registers it as above;
        the broker checks that the registered descriptor is that very region (st_dev, st_ino).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import msgpack

from storage import region as shm
from vmemu.errors import BadRequest, NotGranted, Unavailable, VmemuError
from vmemu.hypervisor.grants import RO, GrantTable, Region

MAX_MSG = 4096
MEDIATOR = 0  # the mediator's index on the broker wire (guests are 1..N)


@dataclass
class Held:
    fd: int
    ro_fd: int
    size: int


@dataclass
class Pending:
    """A region the mediator deposited for `node` that its owner has not registered yet."""

    node: int
    region_id: int
    fd: int  # read-write, not sealed: the owner must map it before anyone seals it
    size: int
    ident: tuple[int, int]  # (st_dev, st_ino)
    deposited: float
    claimed_by: int | None = None  # pid of the incarnation it was handed to


class MediatorSide(Protocol):
    """What the broker needs of the mediator's supervision (supervisor.MediatorLink)."""

    @property
    def pid(self) -> int | None: ...

    def deposited(self, node: int) -> None: ...

    def bind(self, broker: "FdBroker") -> None: ...

    def view(self) -> dict[str, Any]: ...


Emit = Callable[..., Any]


class FdBroker:
    def __init__(self, name: str, grants: GrantTable, pid_of: Callable[[int], int | None],
                 on_register: Callable[[int, int], None], placement: str = "own",
                 mediator: MediatorSide | None = None, emit: Emit | None = None) -> None:
        self.grants = grants
        self.pid_of = pid_of
        self.on_register = on_register
        self.placement = placement
        self.mediator = mediator
        self.emit: Emit = emit or (lambda *a, **k: None)
        self.held: dict[int, Held] = {}
        self.pending: dict[int, Pending] = {}  # region id -> deposited, not yet registered
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(name)
        self.sock.listen(64)
        self.sock.setblocking(False)
        # One descriptor for the hypervisor's poll loop: the socket and whatever else the
        # broker's side watches (the mediator's pidfd), so the loop needs no mediator wiring.
        self.ep = select.epoll()
        self.ep.register(self.sock.fileno(), select.EPOLLIN)
        self.watched: dict[int, Callable[[], None]] = {}
        if mediator is not None:
            mediator.bind(self)

    def fileno(self) -> int:
        return self.ep.fileno()

    def watch(self, fd: int, on_ready: Callable[[], None]) -> None:
        """Call `on_ready` from the poll loop when `fd` is readable (a pidfd: the process exited)."""
        self.ep.register(fd, select.EPOLLIN)
        self.watched[fd] = on_ready

    def unwatch(self, fd: int) -> None:
        if self.watched.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    def on_readable(self) -> None:
        for fd, _ in self.ep.poll(0):
            if fd == self.sock.fileno():
                self._accept()
            elif fd in self.watched:
                self.watched[fd]()

    def _accept(self) -> None:
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
        if node == MEDIATOR:
            if self.mediator is None or self.mediator.pid != pid:
                raise NotGranted(f"fd broker: pid {pid} is not the mediator")
        elif self.pid_of(node) != pid:
            raise NotGranted(f"fd broker: pid {pid} is not node{node}")
        if op == "deposit":
            return self._deposit(node, region_id, msg.get("for"), fds), None
        if op == "register":
            return self._register(node, region_id, bool(msg.get("sealed")), fds, pid), None
        if op == "claim":
            out = self._claim(node, pid)
        elif op == "map":
            out = self._map(node, region_id)
        else:
            raise BadRequest(f"fd broker: unknown op {op!r}")
        for fd in fds:  # nothing to receive with these: close what came anyway
            os.close(fd)
        return out

    def _register(self, node: int, region_id: int, sealed: bool, fds: list[int],
                  pid: int = 0) -> dict:
        if node == MEDIATOR:
            raise BadRequest("fd broker: the mediator deposits regions, it does not own one")
        if len(fds) != 1:
            raise BadRequest("fd broker: register needs exactly one descriptor")
        fd = fds[0]
        size = shm.size_of(fd)
        if sealed and not shm.is_write_sealed(fd):
            raise BadRequest("fd broker: region claims to be sealed but is not")
        if self.placement != "mediator":
            self.grants.register(Region(region_id, node, size, sealed))
            self.held[region_id] = Held(fd, shm.reopen_read_only(fd), size)
            self.on_register(node, region_id)
            return {"ok": True}
        # Mediator placement: only the region the mediator made for this node, handed to this
        # very incarnation, may be registered; we keep our own descriptor of it.
        p = self.pending.get(region_id)
        if p is None or p.node != node or p.claimed_by != pid:
            raise NotGranted(f"fd broker: region {region_id:#x} was not handed to node{node} "
                             "by the mediator (--nvram-placement mediator)")
        if shm.identity(fd) != p.ident:
            raise NotGranted(f"fd broker: the descriptor node{node} registers is not region "
                             f"{region_id:#x}")
        self.grants.register(Region(region_id, node, p.size, sealed, allocator="mediator"))
        os.close(fd)  # the same memory as p.fd, which we keep
        del self.pending[region_id]
        self.held[region_id] = Held(p.fd, shm.reopen_read_only(p.fd), p.size)
        self._discard(lambda q: q.node == node and q.claimed_by is None, "superseded")
        self.on_register(node, region_id)
        return {"ok": True}

    # -- mediator placement --------------------------------------------------------------------
    def _deposit(self, node: int, region_id: int, owner: Any, fds: list[int]) -> dict:
        # (On an error the received descriptors are closed by _serve.)
        if node != MEDIATOR or self.placement != "mediator":
            raise NotGranted("fd broker: only the mediator deposits regions")
        if len(fds) != 1:
            raise BadRequest("fd broker: deposit needs exactly one descriptor")
        if not isinstance(owner, int) or owner < 1:
            raise BadRequest("fd broker: deposit needs the owner's node index in 'for'")
        if region_id in self.pending or region_id in self.grants.regions or region_id == 0:
            raise BadRequest(f"fd broker: region id {region_id:#x} is taken")
        fd = fds[0]
        if shm.is_write_sealed(fd):
            raise BadRequest("fd broker: a deposited region must not be write-sealed yet "
                             "(its owner has not mapped it)")
        size = shm.size_of(fd)
        if size <= 0:
            raise BadRequest("fd broker: a deposited region must not be empty")
        # What no incarnation can use any more: unclaimed ones are superseded by this one, and
        # one handed to an incarnation that is gone will never be registered.
        live = self.pid_of(owner)
        self._discard(lambda q: q.node == owner and (q.claimed_by is None or q.claimed_by != live),
                      "superseded")
        self.pending[region_id] = Pending(owner, region_id, fd, size, shm.identity(fd),
                                          time.monotonic())
        self.emit("region_allocated", "mediator", region=f"{region_id:#x}", owner=f"node{owner}",
                  allocator="mediator", size=size,
                  mediator_pid=self.mediator.pid if self.mediator else None)
        if self.mediator is not None:
            self.mediator.deposited(owner)
        return {"ok": True}

    def _claim(self, node: int, pid: int) -> tuple[dict, int]:
        if self.placement != "mediator":
            raise BadRequest("fd broker: claim is for --nvram-placement mediator; "
                             "this cluster's guests allocate their own regions")
        mine = [p for p in self.pending.values() if p.node == node and p.claimed_by == pid]
        if not mine:
            mine = [p for p in self.pending.values() if p.node == node and p.claimed_by is None]
        if not mine:
            raise Unavailable(f"fd broker: the mediator has not allocated node{node}'s region yet")
        p = max(mine, key=lambda q: q.deposited)
        if p.claimed_by is None:
            p.claimed_by = pid
            self.emit("region_handed", node, region=f"{p.region_id:#x}", allocator="mediator",
                      pid=pid)
        return {"ok": True, "region": p.region_id, "size": p.size, "mode": "rw"}, p.fd

    def _discard(self, pred: Callable[[Pending], bool], why: str) -> None:
        for rid in [r for r, p in self.pending.items() if pred(p)]:
            p = self.pending.pop(rid)
            os.close(p.fd)
            self.emit("region_discarded", "hypervisor", region=f"{rid:#x}",
                      owner=f"node{p.node}", reason=why)

    def view(self) -> dict[str, Any]:
        """For `vmemu status`: where regions come from, and every region held."""
        return {
            "placement": self.placement,
            "mediator": self.mediator.view() if self.mediator is not None else None,
            "regions": self.grants.region_rows(),
            "pending": [{"region": f"{p.region_id:#x}", "owner": f"node{p.node}",
                         "allocator": "mediator", "size": p.size,
                         "claimed": p.claimed_by is not None}
                        for p in sorted(self.pending.values(), key=lambda q: q.deposited)],
        }

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
        for p in self.pending.values():
            os.close(p.fd)
        self.pending.clear()
        self.ep.close()
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
