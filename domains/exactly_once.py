"""The exactly-once table: recent (client, request) pairs that were applied.

A retried write (same client, same request id) is acknowledged, not applied twice. The table
is bounded: at most DEDUP_CLIENTS clients (the least recently seen one is dropped, with its
requests) and DEDUP_PER_CLIENT requests per client (the oldest inserted one is dropped; a
request already in the table keeps its place).

A takeover rebuilds it from every replayed record: ``record_many`` applies a whole log's
pairs at once, with the same result as ``record`` per pair in order (a numba pass per
client instead of a Python call per record, which was a fifth of a takeover's time). Where
that equivalence would need the client-eviction order (more clients than the table holds)
or ids outside int64, it runs ``record`` per pair instead.
"""

from __future__ import annotations

import collections

import numpy as np
from numba import njit

from storage import nvlog_format as F
from storage.nvlog import BadRecord, record_payload

DEDUP_PER_CLIENT = 8192
DEDUP_CLIENTS = 1024
LOAD_PAIRS = 65536  # the most pairs taken from one table record (a carry holds <= 32768)

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # hash multiplier, as a signed int64


@njit(cache=True, nogil=True)
def _per_client_kernel(init, init_start, ev, ev_start, keep):  # type: ignore[no-untyped-def]
    """Per client g: its table after its initial requests ``init[init_start[g]:...]`` and
    then ``record`` of each request of ``ev[ev_start[g]:...]``, in order, keeping `keep`.

    The table is a FIFO of distinct requests: it holds the last `keep` *effective* inserts
    (a request not in it when recorded). So a request is in it iff its last effective
    insert has ordinal >= inserts - keep. Returns (out, out_start): each client's final
    requests, oldest first.
    """
    groups = ev_start.size - 1
    total = 0
    for g in range(groups):
        total += min(keep, (init_start[g + 1] - init_start[g]) + (ev_start[g + 1] - ev_start[g]))
    out = np.empty(total, dtype=np.int64)
    out_start = np.empty(groups + 1, dtype=np.int64)
    o = 0
    for g in range(groups):
        n0 = init_start[g + 1] - init_start[g]
        ne = ev_start[g + 1] - ev_start[g]
        seq = np.empty(n0 + ne, dtype=np.int64)  # effective inserts, in order
        cap = 16
        while cap < 2 * (n0 + ne):
            cap *= 2
        mask = cap - 1
        slot_key = np.empty(cap, dtype=np.int64)
        slot_ord = np.full(cap, -1, dtype=np.int64)  # -1: empty
        n = 0
        for i in range(n0 + ne):
            r = init[init_start[g] + i] if i < n0 else ev[ev_start[g] + i - n0]
            h = (r ^ (r >> 31)) * _GOLDEN
            h = (h ^ (h >> 29)) & mask
            while slot_ord[h] != -1 and slot_key[h] != r:
                h = (h + 1) & mask
            if slot_ord[h] != -1 and slot_ord[h] >= n - keep:
                continue  # in the table: recording it again changes nothing
            slot_key[h] = r
            slot_ord[h] = n
            seq[n] = r
            n += 1
        out_start[g] = o
        take = min(keep, n)
        out[o:o + take] = seq[n - take:n]
        o += take
    out_start[groups] = o
    return out, out_start


class ExactlyOnce:
    """Recent (client, request) pairs that were applied: a retried write is not applied twice."""

    def __init__(self) -> None:
        self.seen: collections.OrderedDict[int, collections.OrderedDict[int, None]] = \
            collections.OrderedDict()

    def applied(self, client: int, request: int) -> bool:
        return client != 0 and request in self.seen.get(client, ())

    def record(self, client: int, request: int) -> None:
        if client == 0:
            return
        reqs = self.seen.get(client)
        if reqs is None:
            reqs = self.seen[client] = collections.OrderedDict()
            if len(self.seen) > DEDUP_CLIENTS:
                self.seen.popitem(last=False)
        else:
            self.seen.move_to_end(client)
        reqs[request] = None
        if len(reqs) > DEDUP_PER_CLIENT:
            reqs.popitem(last=False)

    def record_many(self, clients: np.ndarray, requests: np.ndarray) -> None:
        """``record(clients[i], requests[i])`` for each i in order, in one pass.

        int64 arrays, ids as the Python ints ``int(clients[i])``; ``record_py`` is the
        reference (and the path taken where this one's preconditions do not hold)."""
        clients = np.asarray(clients, dtype=np.int64)
        requests = np.asarray(requests, dtype=np.int64)
        live = clients != 0  # client 0: no id, never recorded (and not moved)
        if not live.all():
            clients, requests = clients[live], requests[live]
        if clients.size == 0:
            return
        ids, inverse = np.unique(clients, return_inverse=True)
        fresh = sum(1 for c in ids.tolist() if c not in self.seen)
        if len(self.seen) + fresh > DEDUP_CLIENTS:
            self.record_py(clients, requests)  # clients would be evicted: their order matters
            return
        order = np.argsort(inverse, kind="stable")  # each client's events together, in order
        ev = requests[order]
        ev_start = np.searchsorted(inverse[order], np.arange(ids.size + 1))
        init_lists: list[np.ndarray] = []
        for c in ids.tolist():
            old = self.seen.get(c)
            try:
                init_lists.append(np.fromiter(old, dtype=np.int64, count=len(old))
                                  if old else np.zeros(0, dtype=np.int64))
            except OverflowError:  # a request id >= 2**63 (from a table record): exact path
                self.record_py(clients, requests)
                return
        init_start = np.zeros(ids.size + 1, dtype=np.int64)
        np.cumsum([a.size for a in init_lists], out=init_start[1:])
        init = np.concatenate(init_lists)
        out, out_start = _per_client_kernel(init, init_start, ev, ev_start, DEDUP_PER_CLIENT)
        # Clients end in the order of their last event, after those without events.
        last = order[ev_start[1:] - 1]  # each group's last event (the sort is stable)
        bounds = out_start.tolist()
        for g in np.argsort(last).tolist():
            c = int(ids[g])
            self.seen.pop(c, None)
            self.seen[c] = collections.OrderedDict.fromkeys(out[bounds[g]:bounds[g + 1]].tolist())

    def record_py(self, clients: np.ndarray, requests: np.ndarray) -> None:
        """``record`` per pair, in order: the reference for ``record_many``."""
        for c, r in zip(np.asarray(clients).tolist(), np.asarray(requests).tolist()):
            self.record(c, r)

    def snapshot(self, per_client: int, limit_pairs: int) -> bytes:
        """The most recent pairs of the most recent clients, as (client, request) u64 pairs."""
        pairs: list[int] = []
        for client in reversed(self.seen):
            reqs = list(self.seen[client])[-per_client:]
            take = min(len(reqs), (limit_pairs - len(pairs) // 2))
            if take <= 0:
                break
            for r in reqs[-take:]:
                pairs += (client, r)
        return np.asarray(pairs, dtype="<u8").tobytes()

    def load(self, payload: bytes) -> None:
        """Pairs from a table record (read back from NVRAM: whole pairs only, and at most
        the last LOAD_PAIRS of them, so a forged record costs a bounded loop)."""
        arr = load_pairs(payload)
        for i in range(0, len(arr) - 1, 2):
            self.record(int(arr[i]), int(arr[i + 1]))


def load_pairs(payload: bytes) -> np.ndarray:
    """A table record's pairs as read by ``load``: u64 (client, request), flattened."""
    whole = len(payload) // 16 * 16
    return np.frombuffer(payload, dtype="<u8", count=whole // 8)[-2 * LOAD_PAIRS:]


def rebuild_table(table: ExactlyOnce, log: np.ndarray, index: np.ndarray, count: int,
                  gids: set[int]) -> int:
    """The exactly-once table from the replayed records; returns the bad table records.

    The (client, request) pairs of our LUNs' records and of the table records, in log
    order, go to ``record_many`` at once; ids a table record holds above 2**63 (which
    the index's int64 columns cannot tell from negative ones) take the per-record path."""
    rs = index[:count]
    gid = rs[:, F.IDX_LUN]
    ours = np.isin(gid, np.fromiter(gids, dtype=np.int64, count=len(gids)))
    tables = np.flatnonzero(gid == F.DEDUP_LUN).tolist()
    clients: list[np.ndarray] = []
    requests: list[np.ndarray] = []
    bad = start = 0
    for r in tables + [rs.shape[0]]:
        seg = start + np.flatnonzero(ours[start:r])
        clients.append(rs[seg, F.IDX_CLIENT])
        requests.append(rs[seg, F.IDX_REQUEST])
        start = r + 1
        if r == rs.shape[0]:
            break
        try:
            pairs = load_pairs(record_payload(log, rs[r]))
        except BadRecord:
            bad += 1  # it verified but cannot be a table the writer wrote: skip it
            continue
        if pairs.size and int(pairs.max()) >= 1 << 63:
            return rebuild_table_py(table, log, index, count, gids)
        clients.append(pairs[0::2].astype(np.int64))
        requests.append(pairs[1::2].astype(np.int64))
    table.record_many(np.concatenate(clients), np.concatenate(requests))
    return bad


def rebuild_table_py(table: ExactlyOnce, log: np.ndarray, index: np.ndarray, count: int,
               gids: set[int]) -> int:
    """``rebuild_table`` one record at a time: the reference, and the exact path."""
    bad = 0
    for row in index[:count]:
        gid = int(row[F.IDX_LUN])
        if gid in gids:
            table.record(int(row[F.IDX_CLIENT]), int(row[F.IDX_REQUEST]))
        elif gid == F.DEDUP_LUN:
            try:
                table.load(record_payload(log, row))
            except BadRecord:
                bad += 1  # it verified but cannot be a table the writer wrote: skip it
    return bad


def warm() -> None:
    """Compile or load the kernel (a domain pays it at boot, not in a takeover)."""
    t = ExactlyOnce()
    t.record_many(np.array([1, 1], dtype=np.int64), np.array([2, 2], dtype=np.int64))
