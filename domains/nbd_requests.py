"""How an NBD request becomes D-module calls (`RequestRunner`, the part of
domains/nbd_conn.Conn that talks to the D-module), and which LUN an export name is.

- every D-module call stays within its limits (sector-aligned, at most 1 MiB): a longer
  request is split into 1 MiB pieces, and an unaligned one read-modify-writes its first and
  last sector, reading them in the same step that writes them back;
- a write (WRITE, and TRIM / WRITE_ZEROES, which write zeros) is acknowledged only once every
  piece of it returned from the D-module, i.e. is in the NVLog, NVRAM, which is stable
  storage: so FUA needs nothing more, and FLUSH, taken in order after everything before it
  on the connection, just checks the LUN;
- NBD has no retry ids: writes go to the D-module with client id 0 (no exactly-once table);
- a D-module error is an error reply to that request only (OutOfRange: ENOSPC or EINVAL,
  BadRequest and UnknownLun: EINVAL, others: EIO), and Fenced ends the connection: a stale
  incarnation answers nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from domains import nbd_proto as P
from domains.nbd_limits import Stats
from storage.lun import MAX_IO, SECTOR
from vmemu.errors import BadRequest, Fenced, NoSpace, OutOfRange, UnknownLun, VmemuError

_ZEROS = bytes(MAX_IO)


def exports_of(d: Any, identity: int, node: int) -> tuple[list[P.Export], dict[str, int]]:
    """The exports of one identity, and the LUN index each name stands for."""
    served = d.served.get(identity)
    luns = [] if served is None else served.luns
    exports: list[P.Export] = []
    lun_of: dict[str, int] = {}
    for l in luns:
        # Every LUN answers to "lunN"; a LUN in a volume also to its path ("vol0/lun0").
        for name in dict.fromkeys((f"lun{l.index}", l.name)):
            exports.append(P.Export(name, l.size, f"vmemu node{identity} {l.name}, "
                                                  f"served by node{node}"))
            lun_of[name] = l.index
    return exports, lun_of


class Job:
    __slots__ = ("req", "pos", "buf")

    def __init__(self, req: P.Request) -> None:
        self.req = req
        self.pos = -1  # next (aligned) offset to do; -1: not started
        self.buf: bytearray | None = None  # READ: the aligned range read so far


class RequestRunner:
    """Runs the oldest queued request of a connection one piece at a time (see the module
    docstring); the connection (domains/nbd_conn.Conn) decides when."""

    proto: P.ServerProto
    identity: int
    lun_of: dict[str, int]
    d: Any
    stats: Stats
    peer: Any
    jobs: deque[Job]
    queued_bytes: int
    out_held: int
    dead: bool
    on_request: Callable[[int], None] | None
    log: Callable[[str], None]

    def _step(self, job: Job) -> int:
        """Do one piece of the oldest request; returns bytes moved."""
        req = job.req
        lun = self.lun_of.get(req.export.name, -1)
        try:
            if req.cmd == P.CMD_READ:
                n = self._read_piece(job, lun)
            elif req.cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
                n = self._write_piece(job, lun)
            elif req.cmd == P.CMD_FLUSH:
                # Everything acknowledged before is in the NVLog (NVRAM: stable storage).
                self.d.flush(self.identity, lun)
                self._done(lambda: self.proto.reply_ok(req))
                n = 0
            else:  # the machine only lets valid commands through
                self._done(lambda: self.proto.reply_error(req, P.EINVAL, "unsupported command"))
                n = 0
        except Fenced as exc:
            # This incarnation may no longer write: answering anything would be a lie.
            self.log(f"nbd: node{self.identity} fenced, closing connection from {self.peer}: "
                     f"{exc.message}")
            self.dead = True
            return 0
        except OutOfRange as exc:
            err = P.ENOSPC if req.cmd != P.CMD_READ and req.cmd != P.CMD_TRIM else P.EINVAL
            self._fail(req, err, exc.message)
            return 0
        except (BadRequest, UnknownLun) as exc:
            self._fail(req, P.EINVAL, exc.message)
            return 0
        except NoSpace as exc:  # NVLog full while the disks refuse CPs: what NBD calls ENOSPC
            self._fail(req, P.ENOSPC, exc.message)
            return 0
        except VmemuError as exc:
            self._fail(req, P.EIO, exc.message)
            return 0
        except Exception as exc:  # an I/O error of the disk, or a bug: fail this request only
            self.log(f"nbd: {req.name} on node{self.identity} failed: {exc!r}")
            self._fail(req, P.EIO, f"{type(exc).__name__}: {exc}")
            return 0
        return n

    def _done(self, reply: Callable[[], None]) -> None:
        job = self.jobs.popleft()
        self.queued_bytes -= len(job.req.data)
        if job.buf is not None:  # a READ assembled in pieces: counted again as its reply
            self.out_held -= len(job.buf)
        reply()
        self.stats.served += 1
        if self.on_request is not None:
            self.on_request(self.identity)

    def _fail(self, req: P.Request, err: int, message: str) -> None:
        self.stats.errors += 1
        if self.jobs and self.jobs[0].req is req:
            self._done(lambda: self.proto.reply_error(req, err, message))

    def _read_piece(self, job: Job, lun: int) -> int:
        req = job.req
        if req.length == 0:
            self._done(lambda: self.proto.reply_read(req, b""))
            return 0
        start = req.offset - req.offset % SECTOR
        end = -(-(req.offset + req.length) // SECTOR) * SECTOR
        if job.buf is None:
            job.pos = start
            if end - start <= MAX_IO:
                # The common case: one piece, answered straight from the D-module.
                data = self.d.read(self.identity, lun, start, end - start)
                if len(data) != req.length:
                    data = memoryview(data)[req.offset - start:req.offset - start + req.length]
                self._done(lambda: self.proto.reply_read(req, data))
                return end - start
            job.buf = bytearray(end - start)
            self.out_held += len(job.buf)
        n = min(MAX_IO, end - job.pos)
        data = self.d.read(self.identity, lun, job.pos, n)
        job.buf[job.pos - start:job.pos - start + n] = data
        job.pos += n
        if job.pos >= end:
            view = memoryview(job.buf)[req.offset - start:req.offset - start + req.length]
            self._done(lambda: self.proto.reply_read(req, view))
        return n

    def _write_piece(self, job: Job, lun: int) -> int:
        req = job.req
        if req.length == 0:
            self._done(lambda: self.proto.reply_ok(req))
            return 0
        off, end = req.offset, req.offset + req.length
        start = off - off % SECTOR
        aend = -(-end // SECTOR) * SECTOR
        if job.pos < 0:
            job.pos = start
        s = job.pos
        t = min(s + MAX_IO, aend)
        zeros = req.cmd != P.CMD_WRITE
        if s >= off and t <= end:
            piece: bytes | bytearray | memoryview = (
                memoryview(_ZEROS)[:t - s] if zeros else memoryview(req.data)[s - off:t - off])
        else:
            # Read-modify-write of the partial first and/or last sector, in this same step,
            # so no other request's write to those sectors can fall in between.
            buf = bytearray(t - s)
            if s < off:
                buf[:SECTOR] = self.d.read(self.identity, lun, s, SECTOR)
            if t > end and not (s < off and t - s == SECTOR):
                buf[t - s - SECTOR:] = self.d.read(self.identity, lun, t - SECTOR, SECTOR)
            lo, hi = max(s, off), min(t, end)
            buf[lo - s:hi - s] = _ZEROS[:hi - lo] if zeros else memoryview(req.data)[lo - off:hi - off]
            piece = buf
        self.d.write(self.identity, lun, s, piece, 0, 0)
        job.pos = t
        if t >= aend:
            self._done(lambda: self.proto.reply_ok(req))
        return t - s
