"""The owner's side of NVLog mirroring, as a state machine: events in, actions out.

No sockets, no clock of its own (every event carries `now`), no region bytes: the shell in
domains/mirror.py turns the actions into frames and feeds the replies back. So every rule
below is unit-tested without processes (tests/unit/test_mirror_link.py).

Modes of the copy on the partner:

    DOWN   no copy we vouch for: the partner is gone, stuck, or has not asked yet
    BEGIN  a fresh session was opened (an empty copy requested), its answer not yet back
    COPY   the used part of the log goes over in chunks, a bounded amount per loop turn,
           while every new span goes too (in the same ordered stream)
    TAIL   the last chunk is sent; waiting for its acknowledgement
    SYNC   the copy holds everything the owner acknowledged; Domain 0 is told in_sync=true

Batches. The spans of one loop turn (and at most one chunk) go in one message, numbered
from one sequence over all sessions; the next turn's batch may leave before the previous
one is answered (pipelined). The receiver applies messages in order and answers in order, so
an answer for batch n acknowledges every batch up to n.

The acknowledgement rule, as tickets. A reply a transport is about to send (write or read:
a read may show a write that is not yet safe) takes `ticket()`, the number of the batch that
carries everything logged so far, and may leave once `releasable(ticket)`:
- the partner acknowledged that batch (TAIL, SYNC: the copy holds it), or
- the ticket is from a time Domain 0 does not count on the copy (DOWN, BEGIN, COPY, and the
  batch that carries the last chunk), and Domain 0 has confirmed in_sync=false. Such a write
  is safe in our own region, which Domain 0 holds: a takeover then maps the region instead.
So writes are held like group commit (never the loop) only while the copy is or is about to
be vouched for, and a partner that dies costs at most `deadline_s` of held replies.

Why in_sync=true only after the last chunk's batch is acknowledged: every byte logged before
the session began is in a chunk, read when the chunk is sent; every byte logged since is in
a span sent after it was written. Messages are applied in order, so once that batch is
applied the copy equals the region as of its sending, and every later write is held until
its own batch is acknowledged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

DOWN, BEGIN, COPY, TAIL, SYNC = "down", "begin", "copy", "tail", "sync"
NEVER = 1 << 62  # a ticket bound meaning "every ticket"

DEADLINE_S = 0.25  # an unanswered batch older than this: the partner is gone or stuck
CHUNK = 256 << 10  # resync bytes added to one turn's batch
WINDOW = 4 << 20  # resync bytes sent and not yet acknowledged
RETRY_S = 0.5  # after a timeout or a refusal, a new session after this, doubling...
RETRY_MAX_S = 8.0  # ...up to this
REPORT_RETRY_S = 0.1  # Domain 0 refused or did not answer a report: say it again after this


@dataclass(frozen=True)
class Begin:
    """Open a fresh connection (dropping whatever the old one queued) and ask for an empty
    copy of the region, for session `session`."""
    id: int
    session: int


@dataclass(frozen=True)
class Batch:
    """Send the region's bytes in `ranges` (sorted, disjoint (start, end)), read now."""
    id: int
    session: int
    ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class Drop:
    """Close the connection: nothing it queued may arrive later."""
    reason: str


@dataclass(frozen=True)
class Report:
    """Tell Domain 0 whether the copy is complete (answered by `reported`)."""
    in_sync: bool


Action = Union[Begin, Batch, Drop, Report]


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering `spans`. Every byte of a batch is read when it is sent,
    so order inside a batch does not matter, and a batch is never larger than the region."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


@dataclass
class LinkStats:
    batches: int = 0
    bytes: int = 0
    resync_bytes: int = 0
    acks: int = 0
    rtt_max_ms: float = 0.0
    rtt_sum_ms: float = 0.0
    # acknowledgement times: counts below 1, 2, 4, ... 512 ms and above (what DEADLINE_S is
    # judged by: `vmemu status --json`, node row "mirror")
    rtt_hist: list[int] = field(default_factory=lambda: [0] * 11)
    dropped_spans: int = 0  # logged while DOWN (our region holds them)
    sessions: int = 0
    syncs: int = 0
    degrades: int = 0
    last_degrade: str = ""
    resync_ms: float = 0.0  # the last session's BEGIN to SYNC, in ms


class Link:
    def __init__(self, has_partner: bool, used: Callable[[], int | list[tuple[int, int]]], *,
                 deadline_s: float = DEADLINE_S, chunk: int = CHUNK, window: int = WINDOW,
                 rate: float = 0.0, retry_s: float = RETRY_S,
                 retry_max_s: float = RETRY_MAX_S) -> None:
        """`used()`: what of the region a resync must copy, read when one begins: a number of
        bytes from 0, or (start, end) ranges; `rate`: resync bytes per second at most (0: as
        fast as the window allows)."""
        self.has_partner = has_partner
        self.used = used
        self.deadline_s = deadline_s
        self.chunk = chunk
        self.window = window
        self.rate = rate
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.mode = DOWN
        self.session = 0
        self.next_id = 1
        self.last_sent = 0
        self.acked = 0
        self.pending: list[tuple[int, int]] = []
        self.pending_chunk = 0
        self.inflight: deque[tuple[int, float, int]] = deque()  # (id, sent at, chunk bytes)
        self.inflight_chunk = 0
        self.begin_id = 0
        self.last_chunk_id = 0
        self.copy_pos = self.copy_end = 0  # resync bytes sent, and to send in all
        self.copy_left: deque[tuple[int, int]] = deque()  # region ranges not sent yet
        self.copy_t0 = self.begin_t0 = 0.0
        self.unheld_upto = NEVER
        # What Domain 0 believes (None: unknown), what we told it last (None: nothing
        # unanswered), and what it should believe.
        self.hv_known: bool | None = False  # a new region is not in sync until we say so
        self.hv_sent: bool | None = None
        self.hv_want = False
        self.hv_retry_at = 0.0  # after a refused or unanswered report, not at once again
        self.resync_wanted = False
        self.retry_at: float | None = None
        self.failures = 0
        self.stats = LinkStats()

    # -- queries -----------------------------------------------------------------------------
    def ticket(self) -> int:
        return self.next_id if self.pending else self.last_sent

    def releasable(self, ticket: int) -> bool:
        return ticket <= self.acked or (ticket <= self.unheld_upto and self._hv_false())

    def in_sync(self) -> bool:
        return self.mode == SYNC

    def busy(self) -> bool:
        """A chunk could go now: the loop should poll without sleeping."""
        return self.mode == COPY and self._chunk_room(None) > 0

    def next_wakeup(self) -> float | None:
        """When `turn` has something to do that no socket will wake the loop for."""
        times = []
        if self.inflight:
            times.append(self.inflight[0][1] + self.deadline_s)
        if self.mode == DOWN and self.retry_at is not None:
            times.append(self.retry_at)
        if self.hv_sent is None and self.hv_known is not self.hv_want:
            times.append(self.hv_retry_at)
        if self.mode == COPY and self.rate > 0 and self.copy_pos < self.copy_end:
            times.append(self.copy_t0 + (self.copy_pos + min(self.chunk, self.copy_end -
                                                             self.copy_pos)) / self.rate)
        return min(times) if times else None

    def _hv_false(self) -> bool:
        return self.hv_known is False and self.hv_sent is None

    # -- events ------------------------------------------------------------------------------
    def spans(self, spans: list[tuple[int, int]]) -> None:
        """Region bytes just written (an NVLog append, a half switch)."""
        if self.mode == DOWN:
            self.stats.dropped_spans += len(spans)
        else:
            self.pending.extend(spans)

    def request_resync(self, now: float) -> list[Action]:
        """The partner (re)registered and asked for a copy: whatever it had is gone."""
        out: list[Action] = []
        if self.mode != DOWN:
            out += self._degrade("partner asked for a new copy", now, retry=False)
        self.resync_wanted = self.has_partner
        self.retry_at = None  # a partner that just registered is worth trying at once
        return out + self._progress(now)

    def partner_gone(self, now: float) -> list[Action]:
        """We are taking over the partner's identity: it is dead, stop waiting for it."""
        self.resync_wanted = False
        self.retry_at = None
        out = self._degrade("partner taken over", now, retry=False) if self.mode != DOWN else []
        return out + self._report(now)

    def reply(self, batch: int, ok: bool, now: float) -> list[Action]:
        """The partner answered message `batch` (and so every one before it)."""
        if not self.inflight or batch < self.inflight[0][0] or batch > self.inflight[-1][0]:
            return []  # not of this session's connection
        if not ok:
            return self._degrade("partner refused a batch", now, retry=True)
        st = self.stats
        while self.inflight and self.inflight[0][0] <= batch:
            _, sent, chunk = self.inflight.popleft()
            self.inflight_chunk -= chunk
            ms = (now - sent) * 1000
            st.acks += 1
            st.rtt_sum_ms += ms
            st.rtt_max_ms = max(st.rtt_max_ms, ms)
            st.rtt_hist[min(10, max(0, int(ms).bit_length()))] += 1
        self.acked = max(self.acked, batch)
        if self.mode == BEGIN and batch >= self.begin_id:
            self.mode = COPY
            self.copy_t0 = now
        if self.mode == TAIL and self.acked >= self.last_chunk_id:
            self.mode = SYNC
            self.failures = 0
            self.hv_want = True
            st.syncs += 1
            st.resync_ms = round((now - self.begin_t0) * 1000, 3)
        return self._report(now)

    def reported(self, in_sync: bool, ok: bool, now: float) -> list[Action]:
        """Domain 0 answered (ok) or did not answer in time (then it may yet apply it)."""
        if self.hv_sent is None or self.hv_sent != in_sync:
            return []
        self.hv_sent = None
        if not ok:
            # A lost "true" may still be applied: until one is confirmed, assume the worst.
            self.hv_known = None if in_sync else self.hv_known
            self.hv_retry_at = now + REPORT_RETRY_S
            return []
        self.hv_known = in_sync
        return self._report(now) + self._progress(now)

    def send_failed(self, now: float) -> list[Action]:
        """The connection would not take a message (its queue is full): the partner is stuck."""
        return self._degrade("partner not reading", now, retry=True) if self.mode != DOWN else []

    def turn(self, now: float) -> list[Action]:
        """End of a loop turn: deadlines, a new session if one is due, this turn's batch."""
        if self.inflight and now - self.inflight[0][1] > self.deadline_s:
            return self._degrade(f"no answer within {self.deadline_s * 1000:.0f} ms", now,
                                 retry=True) + self._progress(now)
        out = self._progress(now)
        if self.mode == COPY:
            n = self._chunk_room(now)
            if n > 0:
                self.pending.extend(self._take(n))
                self.pending_chunk += n
                self.copy_pos += n
                if self.copy_pos >= self.copy_end:
                    # The batch that carries the last chunk: tickets up to it need no answer
                    # (Domain 0 does not count on the copy yet); every later one does.
                    self.mode = TAIL
                    self.last_chunk_id = self.unheld_upto = self.next_id
        if self.pending and self.mode != DOWN:
            ranges = merge(self.pending)
            batch = Batch(self.next_id, self.session, ranges)
            self.inflight.append((self.next_id, now, self.pending_chunk))
            self.inflight_chunk += self.pending_chunk
            self.stats.batches += 1
            self.stats.bytes += sum(b - a for a, b in ranges)
            self.stats.resync_bytes += self.pending_chunk
            self.last_sent = self.next_id
            self.next_id += 1
            self.pending = []
            self.pending_chunk = 0
            out.append(batch)
        return out + self._report(now)

    # -- internals ---------------------------------------------------------------------------
    def _chunk_room(self, now: float | None) -> int:
        """Resync bytes that may join this turn's batch (window, rate, what is left)."""
        left = self.copy_end - self.copy_pos
        n = min(self.chunk, left, max(0, self.window - self.inflight_chunk - self.pending_chunk))
        if n <= 0 or self.pending_chunk:
            return 0
        if self.rate > 0:
            if now is None:
                return 0  # paced: next_wakeup says when
            n = min(n, int((now - self.copy_t0) * self.rate) - self.copy_pos)
            if n < min(self.chunk, left):
                return 0  # whole chunks only (or the last, shorter one)
        return max(0, n)

    def _take(self, n: int) -> list[tuple[int, int]]:
        """The next `n` resync bytes, as region ranges."""
        out: list[tuple[int, int]] = []
        while n > 0:
            a, b = self.copy_left[0]
            k = min(n, b - a)
            out.append((a, a + k))
            n -= k
            if a + k == b:
                self.copy_left.popleft()
            else:
                self.copy_left[0] = (a + k, b)
        return out

    def _degrade(self, reason: str, now: float, retry: bool) -> list[Action]:
        """Stop vouching for the copy: keep serving, unhold everything once Domain 0 knows."""
        self.mode = DOWN
        self.inflight.clear()
        self.inflight_chunk = 0
        self.pending = []
        self.pending_chunk = 0
        self.copy_pos = self.copy_end = 0
        self.copy_left.clear()
        self.unheld_upto = NEVER
        self.hv_want = False
        self.stats.degrades += 1
        self.stats.last_degrade = reason
        if retry and self.has_partner:
            self.failures += 1
            self.resync_wanted = True
            self.retry_at = now + min(self.retry_max_s, self.retry_s * 2 ** (self.failures - 1))
        return [Drop(reason)] + self._report(now)

    def _report(self, now: float) -> list[Action]:
        if self.hv_sent is None and self.hv_known is not self.hv_want and now >= self.hv_retry_at:
            self.hv_sent = self.hv_want
            return [Report(self.hv_want)]
        return []

    def _progress(self, now: float) -> list[Action]:
        """Begin a wanted session once Domain 0 surely does not count on the old copy (the
        receiver empties it at BEGIN)."""
        if self.mode != DOWN or not self.resync_wanted or not self._hv_false():
            return []
        if self.retry_at is not None and now < self.retry_at:
            return []
        self.resync_wanted = False
        self.retry_at = None
        self.mode = BEGIN
        self.session += 1
        self.stats.sessions += 1
        self.begin_id = self.last_sent = self.next_id
        self.next_id += 1
        used = self.used()
        self.copy_left = deque(merge([(0, used)] if isinstance(used, int) else used))
        self.copy_pos, self.copy_end = 0, sum(b - a for a, b in self.copy_left)
        self.copy_t0 = self.begin_t0 = now
        self.inflight.append((self.begin_id, now, 0))
        return [Begin(self.begin_id, self.session)]
