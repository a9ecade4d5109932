"""Where an identity's NBD clients connect, and who listens there.

Per identity a domain serves, up to two listeners: its TCP address (`tcp_of(identity)`,
127.0.10.N:port, reachable by every local user) and its Unix socket (`unix_of(identity)`, in
the cluster's private run dir, reachable by the cluster's user only). Whoever serves the
identity binds both, so a takeover keeps every URI.

A listener that cannot be bound does not keep the identity from being served (on the block
protocol, and on its other listener): with `retry`, a failed bind is retried in the
background every `RETRY_S` (one bind call a second: bounded), reported once as an
`nbd_address_taken` event naming the address, the error and, for a TCP address held by a
listener of another uid, that uid (from /proc/net/tcp), and once more as `nbd_address_bound`
when it succeeds. The classic case: while an identity has no server (boot, replay,
giveback), another local user binds 127.0.10.N:port first. Clients that verify the server
(`--nbd-tls require`, the cluster's CA) refuse such a squatter; plaintext TCP clients cannot
tell it apart, which is what docs/security.md says.

A Unix socket's path is replaced at bind (a socket left by a server that died there): the
identity's flock (domains/nmodule.py `take_lock`, taken before) already makes this process
the identity's only server. It is unlinked at unbind only if it is still the one bound here.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmemu.errors import VmemuError

RETRY_S = 1.0
BACKLOG = 128


@dataclass
class Endpoint:
    """One listener of one identity, bound or waiting to be."""

    identity: int
    kind: str  # "tcp" or "unix"
    where: Any  # (host, port) or a Path
    sock: socket.socket | None = None
    error: str = ""  # why the last attempt failed
    holder: str = ""  # who holds a taken TCP address, when that can be told
    holder_uid: int | None = None
    failed_at: float = 0.0  # monotonic time of the first failed attempt (0: none pending)
    next_try: float = 0.0
    attempts: int = 0
    ino: int = 0  # a Unix socket's inode: unlink only our own

    @property
    def name(self) -> str:
        return f"{self.where[0]}:{self.where[1]}" if self.kind == "tcp" else str(self.where)

    def view(self, now: float) -> dict[str, Any]:
        return {"address": self.name, "listening": self.sock is not None,
                "error": self.error or None, "holder": self.holder or None,
                "down_s": round(now - self.failed_at, 1) if self.failed_at else None,
                "attempts": self.attempts}


class Listeners:
    def __init__(self, node: int, tcp_of: Callable[[int], tuple[str, int]] | None,
                 unix_of: Callable[[int], Path] | None = None,
                 log: Callable[[str], None] | None = None,
                 emit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.node = node
        self.tcp_of = tcp_of
        self.unix_of = unix_of
        self.log = log or (lambda msg: None)
        self.emit = emit or (lambda kind, fields: None)
        self.served: dict[int, list[Endpoint]] = {}  # identity -> its endpoints
        self.by_fd: dict[int, Endpoint] = {}  # listening fd -> endpoint
        self.pending: list[Endpoint] = []  # endpoints waiting for a retry

    # -- binding -------------------------------------------------------------------------------
    def bind(self, identity: int, deadline_s: float = 5.0, retry: bool = False) -> None:
        """Listen for the identity. EADDRINUSE is retried until the deadline (an old holder's
        socket may take an instant to go; not when another user's listener holds it); then,
        with `retry`, in the background, else VmemuError (and nothing stays bound)."""
        if identity in self.served:
            return
        eps = []
        if self.tcp_of is not None:
            eps.append(Endpoint(identity, "tcp", self.tcp_of(identity)))
        if self.unix_of is not None:
            eps.append(Endpoint(identity, "unix", Path(self.unix_of(identity))))
        end = time.monotonic() + deadline_s
        for ep in eps:
            # Waiting is worth it for a socket of ours on its way out, not for another user's
            # listener: that one is there to stay, and the takeover should not wait for it.
            while not self._try(ep) and ep.error.startswith("[EADDRINUSE]") \
                    and ep.holder_uid in (None, os.geteuid()) and time.monotonic() < end:
                time.sleep(0.005)
            if ep.sock is None and not retry:
                for other in eps:
                    self._close(other)
                raise VmemuError(f"node{self.node}: cannot serve NBD for node{identity} on "
                                 f"{ep.name}: {ep.error.split('] ', 1)[-1]}")
        self.served[identity] = eps
        now = time.monotonic()
        for ep in eps:
            if ep.sock is None:
                ep.failed_at, ep.next_try = now, now + RETRY_S
                self.pending.append(ep)
                self.log(f"nbd: node{identity}'s {ep.name} is not ours ({ep.error}"
                         + (f", held by {ep.holder}" if ep.holder else "")
                         + f"); serving node{identity} without it, retrying every {RETRY_S:g}s")
                self.emit("nbd_address_taken", {
                    "identity": f"node{identity}", "transport": ep.kind, "address": ep.name,
                    "error": ep.error, "holder": ep.holder or None, "holder_uid": ep.holder_uid,
                    "retry_s": RETRY_S})

    def retry(self, now: float) -> None:
        """Try the pending endpoints whose time has come (called every loop turn: cheap)."""
        if not self.pending:
            return
        for ep in list(self.pending):
            if now < ep.next_try:
                continue
            if self._try(ep):
                self.pending.remove(ep)
                self.emit("nbd_address_bound", {
                    "identity": f"node{ep.identity}", "transport": ep.kind, "address": ep.name,
                    "after_s": round(now - ep.failed_at, 2), "attempts": ep.attempts})
                self.log(f"nbd: node{ep.identity}'s {ep.name} bound after "
                         f"{now - ep.failed_at:.1f}s")
                ep.failed_at = 0.0
                ep.error = ep.holder = ""
                ep.holder_uid = None
            else:
                ep.next_try = now + RETRY_S

    def unbind(self, identity: int) -> None:
        for ep in self.served.pop(identity, []):
            if ep in self.pending:
                self.pending.remove(ep)
            self._close(ep)

    def close(self) -> None:
        for ident in list(self.served):
            self.unbind(ident)

    # -- what the server looks at --------------------------------------------------------------
    def tcp_socket(self, identity: int) -> socket.socket | None:
        for ep in self.served.get(identity, []):
            if ep.kind == "tcp":
                return ep.sock
        return None

    def view(self) -> dict[str, dict[str, Any]]:
        """Per identity served, per transport: where, listening or why not (for status)."""
        now = time.monotonic()
        return {str(ident): {ep.kind: ep.view(now) for ep in eps}
                for ident, eps in self.served.items()}

    # -- sockets -------------------------------------------------------------------------------
    def _try(self, ep: Endpoint) -> bool:
        ep.attempts += 1
        try:
            ep.sock = self._open(ep)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            ep.error = f"[{code}] {exc.strerror or exc}"
            if ep.kind == "tcp" and exc.errno == errno.EADDRINUSE:
                ep.holder_uid = tcp_listener_uid(*ep.where)
                ep.holder = describe_uid(ep.holder_uid)
            return False
        self.by_fd[ep.sock.fileno()] = ep
        return True

    def _open(self, ep: Endpoint) -> socket.socket:
        if ep.kind == "tcp":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(ep.where)
                s.listen(BACKLOG)
                s.setblocking(False)
            except OSError:
                s.close()
                raise
            return s
        path: Path = ep.where
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()  # a socket left by a server of this identity that died
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
            s.listen(BACKLOG)
            s.setblocking(False)
            ep.ino = os.lstat(path).st_ino
        except OSError:
            s.close()
            raise
        return s

    def _close(self, ep: Endpoint) -> None:
        if ep.sock is None:
            return
        self.by_fd.pop(ep.sock.fileno(), None)
        ep.sock.close()
        ep.sock = None
        if ep.kind == "unix":
            try:
                if os.lstat(ep.where).st_ino == ep.ino:
                    os.unlink(ep.where)
            except OSError:
                pass


def tcp_listener_uid(host: str, port: int) -> int | None:
    """The uid of a listener on host:port (or on the wildcard address and that port), as
    /proc/net/tcp shows it; None when it does not say."""
    want = {_proc_addr(host, port), _proc_addr("0.0.0.0", port)}
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) > 7 and f[1] in want and f[3] == "0A":  # 0A: LISTEN
            return int(f[7])
    return None


def describe_uid(uid: int | None) -> str:
    """"uid 65534 (nobody) - another user"; "" for None."""
    if uid is None:
        return ""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    return f"uid {uid} ({user})" + (" - another user" if uid != os.geteuid() else "")


def _proc_addr(host: str, port: int) -> str:
    # /proc/net/tcp prints the address as the 32-bit word in host byte order, in hex.
    return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"
