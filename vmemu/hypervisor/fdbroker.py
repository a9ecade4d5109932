"""The fd broker: holds every NVRAM region's descriptor and hands them out per the grant table.

A region is a memfd with no name, so the only way to map one is to be handed its descriptor
here, over an AF_UNIX socket (SCM_RIGHTS). The broker learns who is asking from the kernel
(SO_PEERCRED), not from the request, so a domain cannot pose as another. Holding the
descriptors is also what keeps a region alive after its owner is killed: the broker is the
battery behind the NVRAM.

Wire: one SOCK_SEQPACKET message each way, msgpack maps, one request per connection.
    {"op": "register", "node": N, "region": R, "sealed": bool}  + 1 fd  -> {"ok": true,
                                                                      "token": T}
        T is this incarnation's token: its heartbeats and reports to Domain 0 carry it, so
        a frame claiming to come from node N without it is known to be forged.
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

import errno
import os
import secrets
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
MAX_FDS = 4  # descriptors taken with one message (more are cut by the kernel: MSG_CTRUNC)
MAX_CONNS = 32  # connections waiting for their request; more are closed at once
CONN_DEADLINE_S = 0.5  # a connection that has not sent its request by then is closed
ACCEPT_PER_TURN = 16
ACCEPT_BACKOFF_S = 0.1  # out of descriptors (EMFILE): stop accepting this long, do not spin


@dataclass
class _Conn:
    """An accepted connection waiting for its one request (never waited for: see _accept)."""

    sock: socket.socket
    pid: int  # the kernel's word (SO_PEERCRED at connect time), not the request's
    deadline: float


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
                 mediator: MediatorSide | None = None, emit: Emit | None = None,
                 region_size: int | None = None, require_sealed: bool = False) -> None:
        """`region_size`: the only size a region may have (None: any); `require_sealed`:
        refuse a region that is not write-sealed (a read-only grant of an unsealed memfd
        could be reopened read-write through /proc)."""
        self.grants = grants
        self.region_size = region_size
        self.require_sealed = require_sealed
        self.tokens: dict[int, str] = {}  # node -> token of its registered incarnation
        self.registered_by: dict[int, int] = {}  # node -> pid that registered its region
        self.conns: dict[int, _Conn] = {}
        self.refused = {"foreign_uid": 0, "too_many": 0, "timeout": 0, "bad": 0}
        self.accept_paused_until = 0.0
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
            elif fd in self.conns:
                self._serve(self.conns[fd])
            elif fd in self.watched:
                self.watched[fd]()

    def tick(self, now: float) -> None:
        """From the hypervisor's loop: close connections past their deadline; resume
        accepting after an EMFILE pause."""
        for c in [c for c in self.conns.values() if now >= c.deadline]:
            self.refused["timeout"] += 1
            self._close(c)
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.ep.register(self.sock.fileno(), select.EPOLLIN)

    def _accept(self) -> None:
        """Take new connections without ever waiting on one: the request is read when it
        arrives (epoll), so an idle or slow client (anyone's: the socket's directory keeps
        out other users, and the uid is checked here too) cannot stall Domain 0."""
        for _ in range(ACCEPT_PER_TURN):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection stays in the backlog; polling the listener now
                    # would report it again at once, for ever: pause instead.
                    self.ep.unregister(self.sock.fileno())
                    self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF_S
                    self.emit("broker_accept_paused", "hypervisor", error=exc.strerror)
                return
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                                 socket.SO_PEERCRED, 12))
            if uid != os.geteuid():
                self.refused["foreign_uid"] += 1
                conn.close()
                continue
            if len(self.conns) >= MAX_CONNS:
                self.refused["too_many"] += 1
                conn.close()
                continue
            conn.setblocking(False)
            c = _Conn(conn, pid, time.monotonic() + CONN_DEADLINE_S)
            self.conns[conn.fileno()] = c
            self.ep.register(conn.fileno(), select.EPOLLIN)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        self.conns.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def _serve(self, c: _Conn) -> None:
        """Read the connection's one request, answer it, close it; never blocks."""
        try:
            msg, fds, flags, _ = socket.recv_fds(c.sock, MAX_MSG, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        try:
            if not msg and not fds:
                return  # the client went away
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                fds = []
                raise BadRequest(f"fd broker: request over {MAX_MSG} bytes or "
                                 f"{MAX_FDS} descriptors")
            reply, out_fd = self._handle(c.pid, msg, fds)
        except VmemuError as exc:
            for fd in fds:
                _close_quietly(fd)
            self.refused["bad"] += 1
            reply, out_fd = {"ok": False, "error": exc.to_wire()}, None
        except Exception as exc:  # noqa: BLE001 - a bug here must not take Domain 0 down
            for fd in fds:
                _close_quietly(fd)
            self.refused["bad"] += 1
            reply, out_fd = {"ok": False, "error": VmemuError(
                f"fd broker: internal error: {exc!r}").to_wire()}, None
        try:
            data = msgpack.packb(reply)
            if out_fd is None:
                c.sock.send(data, socket.MSG_DONTWAIT)
            else:
                socket.send_fds(c.sock, [data], [out_fd], socket.MSG_DONTWAIT)
        except OSError:
            pass  # a client that cannot take its answer at once does not get one
        finally:
            self._close(c)

    def _handle(self, pid: int, raw: bytes, fds: list[int]) -> tuple[dict, int | None]:
        try:
            msg = msgpack.unpackb(raw)
        except Exception:
            raise BadRequest("fd broker: request is not msgpack") from None
        if not isinstance(msg, dict):
            raise BadRequest("fd broker: request is not a map")
        op, node, region_id = msg.get("op"), msg.get("node"), msg.get("region")
        if not isinstance(node, int) or not isinstance(region_id, int) \
                or not 0 <= region_id < 2**63:
            raise BadRequest("fd broker: node and region must be integers (region below 2**63)")
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
        if self.registered_by.get(node) == pid:
            raise NotGranted(f"fd broker: node{node} (pid {pid}) has registered its region "
                             "already; one region per incarnation")
        if self.region_size is not None and size != self.region_size:
            raise BadRequest(f"fd broker: a region is {self.region_size} bytes, not {size}")
        if sealed != shm.is_write_sealed(fd):
            raise BadRequest(f"fd broker: region claims to be {'' if sealed else 'not '}"
                             f"sealed but is {'not ' if sealed else ''}")
        if self.require_sealed and not sealed:
            raise NotGranted("fd broker: this cluster grants read-only access, which needs a "
                             "write-sealed region; seal it before registering")
        if region_id in self.held or region_id == 0:
            raise BadRequest(f"fd broker: region id {region_id:#x} is taken")
        if self.placement != "mediator":
            self.grants.register(Region(region_id, node, size, sealed))
            self.held[region_id] = Held(fd, shm.reopen_read_only(fd), size)
            return self._registered(node, region_id, pid)
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
        return self._registered(node, region_id, pid)

    def _registered(self, node: int, region_id: int, pid: int) -> dict:
        token = secrets.token_hex(16)
        self.tokens[node] = token
        self.registered_by[node] = pid
        self.on_register(node, region_id)
        return {"ok": True, "token": token}

    def forget(self, node: int) -> None:
        """Node `node`'s incarnation is gone: its token proves nothing any more."""
        self.tokens.pop(node, None)
        self.registered_by.pop(node, None)

    def token_ok(self, node: int, token: object) -> bool:
        want = self.tokens.get(node)
        return want is not None and isinstance(token, str) and secrets.compare_digest(want, token)

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
        if mode == RO and not shm.is_write_sealed(held.fd):
            # The grant table refuses this too; checked again on the memory itself, since an
            # O_RDONLY descriptor of an unsealed memfd reopens read-write through /proc.
            raise NotGranted(f"region {region_id:#x} is not write-sealed: no read-only grant")
        return {"ok": True, "mode": mode, "size": held.size}, (held.ro_fd if mode == RO else held.fd)

    def hold_restored(self, region_id: int, owner: int, fd: int, size: int) -> None:
        """A region destaged at the last stop, loaded back (sealed) before any domain runs:
        held and granted like the region of a node that died."""
        self.grants.register(Region(region_id, owner, size, sealed=True, owner_alive=False,
                                    allocator="destage"))
        self.held[region_id] = Held(fd, shm.reopen_read_only(fd), size)

    def free(self, region_id: int) -> None:
        held = self.held.pop(region_id, None)
        if held is not None:
            os.close(held.fd)
            os.close(held.ro_fd)
        self.grants.remove(region_id)

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._close(c)
        for rid in list(self.held):
            self.free(rid)
        for p in self.pending.values():
            os.close(p.fd)
        self.pending.clear()
        self.ep.close()
        self.sock.close()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def request(name: str, msg: dict, fd: int | None = None, timeout: float = 5.0) -> tuple[dict, int | None]:
    """Client side: one request, one reply (and maybe one descriptor).

    A connection the broker closed before answering (it was full of others' idle
    connections, which it closes at their deadline) is tried again until `timeout`.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            return _request_once(name, msg, fd, max(0.05, end - time.monotonic()))
        except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
            if time.monotonic() >= end:
                raise
            time.sleep(0.01)


def _request_once(name: str, msg: dict, fd: int | None, timeout: float) -> tuple[dict, int | None]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(name)
        data = msgpack.packb(msg)
        if fd is None:
            s.send(data)
        else:
            socket.send_fds(s, [data], [fd])
        raw, fds, _, _ = socket.recv_fds(s, MAX_MSG, 1)
    if not raw:
        raise ConnectionResetError("the fd broker closed the connection without an answer")
    reply = msgpack.unpackb(raw)
    return reply, (fds[0] if fds else None)
