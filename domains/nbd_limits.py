"""The NBD service's bounds (`Limits`), the memory pool its connections share (`Pool`), and
its counters (`Stats`): what domains/nbd_conn.py enforces for one connection and
domains/nbd_server.py across them. The figures and why they are what they are: in the
docstrings of those two modules and beside each field here."""

from __future__ import annotations

from dataclasses import dataclass

from domains import nbd_proto as P

KiB = 1 << 10
MiB = 1 << 20
# A TLS connection (domains/nbd_tls.py) holds, beyond the bytes it counts, OpenSSL's state
# (~40 KiB measured), a record being assembled, and the plaintext chunk being encrypted.
TLS_EXTRA = 160 * KiB


@dataclass(frozen=True)
class Limits:
    """Every bound of the NBD service; the transport takes one (tests shorten the timeouts)."""

    max_conns: int = 64  # per domain; more are accepted and closed at once
    max_handshakes: int = 16  # in the handshake at once; a new one evicts the oldest
    handshake_timeout_s: float = 10.0  # to reach transmission; real clients take milliseconds
    # Idle clients are legitimate: a VM's disk or a mounted file system may see no I/O for
    # hours, and a dropped connection is an I/O error for clients that do not reconnect
    # (qemu without reconnect-delay). An idle connection costs an fd and a few KiB, so only
    # the connection cap makes it matter: time them out late.
    idle_timeout_s: float = 3600.0
    # A connection that holds buffers while its peer does neither send the rest of a request
    # nor read its replies pins memory of the shared pool: that is no longer idle, cut sooner.
    stall_timeout_s: float = 60.0
    closing_grace_s: float = 10.0  # a closing connection whose peer does not read its last replies
    hs_in: int = 32 * KiB  # handshake: buffered input (MAX_OPTION of option data fits)
    hs_out: int = 32 * KiB  # handshake: queued replies before decoding stops
    res_in: int = P.MAX_BLOCK + 64 * KiB  # transmission reserve, each connection
    res_out: int = P.MAX_BLOCK + 64 * KiB
    conn_max: int = 2 * P.MAX_REQUEST  # one direction of one connection, reserve and pool
    shared: int = 64 * MiB  # the pool: one MAX_REQUEST in and one out at a time
    max_jobs: int = 64  # decoded requests queued per connection
    turn_decode: int = 256  # options and requests decoded per loop turn, all connections
    turn_pieces: int = 512  # D-module calls per loop turn, all connections
    turn_bytes: int = 8 * MiB  # bytes moved through the D-module per loop turn
    recv_chunk: int = 256 * KiB
    recv_per_turn: int = 4 * MiB  # one connection's reads in one loop turn
    accept_per_turn: int = 32
    accept_backoff_s: float = 0.1  # EMFILE and kin: the listener is not polled meanwhile

    def bound(self) -> int:
        """Bytes all connections of a domain may hold at once (the pool and every reserve,
        and with TLS one connection's TLS state and the record or chunk in flight beyond
        what is counted: TLS_EXTRA)."""
        handshake = self.hs_in + self.hs_out + P.MAX_LIST_REPLY + 8 * (P.MAX_STRING + 64)
        per_conn = max(handshake, self.res_in + self.res_out + P.MAX_REPLY) + TLS_EXTRA
        return self.max_conns * per_conn + self.shared


class Pool:
    """Bytes beyond the connections' reserves, shared by all connections of one domain."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0

    def free(self) -> int:
        return self.size - self.used


@dataclass
class Stats:
    decoded: int = 0  # options and requests decoded
    served: int = 0  # requests answered
    errors: int = 0  # requests answered with an error
    internal: int = 0  # exceptions caught at a connection's boundary (bugs)
    refused: int = 0  # accepted and closed at once: at the connection cap
    evicted: int = 0  # handshaking connections closed for a newer one
    handshake_timeouts: int = 0
    idle_timeouts: int = 0
    stall_timeouts: int = 0
    accept_backoffs: int = 0  # EMFILE/ENFILE/ENOBUFS/ENOMEM on accept
    tls_sessions: int = 0  # STARTTLS acknowledged, TLS started
    tls_failures: int = 0  # TLS broken by the peer (handshake refused, not TLS, bad record)
