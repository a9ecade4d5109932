"""`vmemu top`: a live full-screen view of a running cluster, with keys to break and mend it.

    domains   one row each: state, pid, partner, who serves its identity and what it serves,
              heartbeat age, NVLog fill as a bar, last CP age, IOPS
    grants    the grant table: owner's region -> grantee, mode, owner alive
    events    the last few lines of <data-dir>/events.jsonl
    keys      up/down or j/k select a domain; c crash (SIGKILL), h hang (SIGSTOP), r restart,
              g giveback, q quit

The pieces are kept apart so that the screen can be tested without a terminal:
- `render()` is pure: a status dict (the `vmemu status --json` shape), events, the selected
  row, a message and IOPS in; a rich renderable out.
- `IopsMeter` turns successive status samples into IOPS (difference of `ops` over elapsed time).
- `EventTail` follows the event log incrementally (it may grow large on a long-running cluster).
- `parse_keys` turns raw terminal bytes into key names; `Terminal` owns cbreak mode.
- `run()` is the loop: sample, draw, wait for a key with a timeout (about 4 frames a second).
"""

from __future__ import annotations

import collections
import io
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from vmemu import datadir
from vmemu.cluster import pid_alive
from vmemu.errors import BadRequest, NotRunning, VmemuError

REFRESH_S = 0.25  # about 4 frames a second
EVENTS_SHOWN = 10
BAR_WIDTH = 20
IOPS_WINDOW_S = 1.0  # IOPS over (about) the last second of status samples
STATE_STYLE = {"serving": "green", "up": "yellow", "booting": "cyan", "down": "bold red"}
SELECTED_MARK = "▶"
DOMAIN_COLUMNS = ("domain", "state", "pid", "partner", "served by", "serves", "takeover", "heartbeat",
                  "NVLog fill", "last CP", "IOPS")
LEGEND = "↑/↓ or j/k select · c crash (kill -9) · h hang (SIGSTOP) · r restart · g giveback · q quit"


@dataclass(frozen=True)
class Message:
    """The one-line message area: the result (or error) of the last action."""

    text: str
    level: str = "info"  # info | ok | error
    at: str = ""  # when it happened (HH:MM:SS), shown first


# -- formatting --------------------------------------------------------------------------------
def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 60:
        return f"{v:.1f}s"
    return f"{int(v // 60)}m{int(v % 60):02d}s"


def _fmt_mib(n: int) -> str:
    return f"{n / 2**20:.1f}" if n < 10 * 2**20 else f"{n / 2**20:.0f}"


def fill_bar(used: int | None, capacity: int | None, width: int = BAR_WIDTH) -> Text:
    """`[████████░░░░░░░░░░░░]  42%`: green below half, yellow to three quarters, then red.

    A CP starts when a log is half full, so a bar that stays yellow means CPs fall behind.
    """
    if used is None or not capacity:
        return Text("-", style="dim")
    frac = min(max(used / capacity, 0.0), 1.0)
    full = int(round(frac * width))
    if used > 0 and full == 0:
        full = 1  # something is in the log: never draw it as empty
    style = "green" if frac < 0.5 else "yellow" if frac < 0.75 else "red"
    t = Text("[")
    t.append("█" * full, style=style)
    t.append("░" * (width - full), style="dim")
    t.append("]")
    t.append(" <1%" if 0 < frac < 0.005 else f" {100 * frac:3.0f}%")
    return t


def nvlog_segments(node: Mapping[str, Any]) -> list[tuple[str, int | None, int | None]]:
    """The NVLog pieces to draw, as (label, used, capacity).

    Today the log is one piece (status reports `nvlog_used` / `nvlog_capacity` of the whole
    log), so this is one bar labelled "log". When the log is split into halves and status
    reports them (`nvlog_halves`: [{"used", "capacity"}, ...]), each half gets its own bar.
    """
    halves = node.get("nvlog_halves")
    if halves:
        return [(f"half{i}", h.get("used"), h.get("capacity")) for i, h in enumerate(halves)]
    return [("log", node.get("nvlog_used"), node.get("nvlog_capacity"))]


def nvlog_cell(node: Mapping[str, Any], width: int = BAR_WIDTH, sizes: bool = True) -> Text:
    segs = nvlog_segments(node)
    if all(used is None or not cap for _, used, cap in segs):
        return Text("-", style="dim")
    out = Text()
    for i, (label, used, cap) in enumerate(segs):
        if i:
            out.append("  ")
        out.append(f"{label} ", style="dim")
        out.append_text(fill_bar(used, cap, width if len(segs) == 1 else max(6, width // len(segs))))
    if len(segs) == 1 and sizes:
        _, used, cap = segs[0]
        if used is not None and cap:
            out.append(f" {_fmt_mib(used)}/{_fmt_mib(cap)}M", style="dim")
    return out


def _served_by_cell(node: Mapping[str, Any]) -> Text:
    by = node.get("identity_served_by")
    if not by:
        return Text("nobody", style="bold red")
    return Text(by, style="green" if by == node["name"] else "yellow")


def _heartbeat_cell(age_ms: float | None, config: Mapping[str, Any]) -> Text:
    if age_ms is None:
        return Text("-", style="dim")
    interval = float(config.get("heartbeat_ms") or 100)
    limit = interval * float(config.get("heartbeat_misses") or 5)
    style = "red" if age_ms > limit else "yellow" if age_ms > 2 * interval else ""
    return Text(_fmt_ms(age_ms), style=style)


def _iops_cell(v: float | None) -> Text:
    if v is None:
        return Text("-", style="dim")
    return Text(f"{v:,.0f}", style="bold" if v > 0 else "dim")


def _event_fields(e: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in e.items() if k not in ("t", "mono", "kind", "node")}
    if "region_hex" in rest and isinstance(rest.get("region"), int):
        rest["region"] = rest.pop("region_hex")  # one region, said once, in hex
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in rest.items())


def _event_style(kind: str) -> str:
    if kind in ("heartbeat_missed", "domain_exited", "crash_requested") or "fail" in kind:
        return "red"
    if "fence" in kind:
        return "magenta"
    if "takeover" in kind or "replay" in kind or kind == "identity_assumed":
        return "yellow"
    if "giveback" in kind:
        return "cyan"
    if kind == "cp":
        return "dim"
    return ""


# -- the frame ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """How much of the domain table to draw: narrower terminals get shorter bars, then fewer
    columns (the least needed first), never cut domain names."""

    bar: int = BAR_WIDTH
    sizes: bool = True  # "8.0/16M" after the bar
    takeover: bool = True
    partner: bool = True


FITS = (Fit(), Fit(10, False), Fit(6, False, False), Fit(6, False, False, False))
_MEASURE = Console(width=10_000, file=io.StringIO(), color_system=None)


def domain_table(raw: Mapping[str, Any], selected: int,
                 iops: Mapping[str, float | None] | None = None, width: int | None = None) -> Table:
    """The domain rows; with `width`, the fullest layout that fits in that many columns."""
    if width is None:
        return _domain_table(raw, selected, iops or {}, FITS[0])
    for fit in FITS:
        t = _domain_table(raw, selected, iops or {}, fit)
        if Measurement.get(_MEASURE, _MEASURE.options, t).maximum <= width:
            return t
    return t


def _domain_table(raw: Mapping[str, Any], selected: int, iops: Mapping[str, float | None],
                  fit: Fit) -> Table:
    config = raw.get("config") or {}
    shown = [c for c in DOMAIN_COLUMNS
             if (c != "takeover" or fit.takeover) and (c != "partner" or fit.partner)]
    t = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    t.add_column("", width=1, no_wrap=True)  # selection mark
    for col in shown:
        t.add_column(col, no_wrap=True, justify="right" if col == "IOPS" else "left")
    for i, n in enumerate(raw.get("nodes") or []):
        state = n.get("state") or "?"
        cp_age = n.get("last_cp_age_s")
        if cp_age is not None:
            cp = _fmt_s(cp_age) + " ago"
        else:
            cp = "none yet" if n.get("pid") and state != "down" else "-"
        is_sel = i == selected
        cells: dict[str, RenderableType] = {
            "domain": Text(n["name"], style="bold"),
            "state": Text(state, style=STATE_STYLE.get(state, "")),
            "pid": str(n.get("pid") or "-"),
            "partner": n.get("partner") or "-",
            "served by": _served_by_cell(n),
            "serves": ",".join(n.get("serves") or []) or "-",
            "takeover": "yes" if n.get("takeover_possible") else Text("no", style="yellow"),
            "heartbeat": _heartbeat_cell(n.get("heartbeat_age_ms"), config),
            "NVLog fill": nvlog_cell(n, fit.bar, fit.sizes),
            "last CP": cp,
            "IOPS": _iops_cell(iops.get(n["name"])),
        }
        t.add_row(Text(SELECTED_MARK if is_sel else " ", style="bold cyan"), *(cells[c] for c in shown),
                  style="on grey27" if is_sel else None)
    return t


def _node_key(name: Any) -> tuple[int, str]:
    s = str(name or "")
    return (int(s[4:]), s) if s.startswith("node") and s[4:].isdigit() else (1 << 30, s)


def grant_table(raw: Mapping[str, Any]) -> RenderableType:
    grants = raw.get("grants") or []
    held = raw.get("regions_held")
    title = Text("grants", style="bold")
    if held is not None:
        title.append(f"  (NVRAM regions held by the hypervisor: {held})", style="dim")
    if not grants:
        return Group(title, Text("  no grants", style="dim"))
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("owner", "region", "", "grantee", "mode", "owner alive"):
        t.add_column(col, no_wrap=True)
    for g in sorted(grants, key=lambda g: (_node_key(g.get("owner")), _node_key(g.get("grantee")))):
        alive = g.get("owner_alive")
        t.add_row(g.get("owner") or "?", g.get("region") or "?", "->", g.get("grantee") or "?",
                  Text(g.get("mode") or "?", style="yellow" if g.get("mode") == "rw" else ""),
                  Text("alive", style="green") if alive else Text("down", style="bold red"))
    return Group(title, t)


def event_line(e: Mapping[str, Any]) -> Text:
    """`07:17:50.123 node1      cp                   reason=timer blocks=12 ...`, one line."""
    ts = float(e.get("t") or 0.0)
    kind = str(e.get("kind", "?"))
    t = Text(time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d} ", style="dim",
             no_wrap=True, overflow="ellipsis")
    t.append(f"{str(e.get('node', '')):<10} ")
    t.append(f"{kind:<20}", style=_event_style(kind))
    t.append(" " + _event_fields(e))
    return t


def event_table(events: Sequence[Mapping[str, Any]], title_count: int = EVENTS_SHOWN) -> RenderableType:
    title = Text("events", style="bold")
    title.append(f"  (last {title_count}, newest at the bottom)", style="dim")
    if not events:
        return Group(title, Text("  no events yet", style="dim"))
    return Group(title, *(event_line(e) for e in events))


def header(raw: Mapping[str, Any] | None) -> Text:
    t = Text("vmemu top", style="bold reverse")
    if raw is not None:
        cfg = raw.get("config") or {}
        nodes = raw.get("nodes") or []
        serving = sum(1 for n in nodes if n.get("state") == "serving")
        gb = cfg.get("giveback_delay_s")
        ha = f" · HA {cfg['ha_mode']}" if cfg.get("ha_mode") else ""
        t.append(f"  cluster {raw.get('cluster_id', '?')} · {cfg.get('topology', '?')}{ha} · "
                 f"{serving}/{len(nodes)} serving · up {_fmt_s(raw.get('uptime_s'))} · "
                 f"heartbeat {cfg.get('heartbeat_ms', '?')}ms x{cfg.get('heartbeat_misses', '?')} · "
                 + ("giveback manual" if gb is not None and gb < 0 else f"giveback after {gb}s"))
    return t


def message_line(message: Message | str | None) -> Text:
    if message is None:
        return Text("")
    if isinstance(message, str):
        message = Message(message)
    style = {"ok": "green", "error": "bold red"}.get(message.level, "")
    t = Text(no_wrap=True, overflow="ellipsis")
    if message.at:
        t.append(message.at + " ", style="dim")
    t.append(("error: " if message.level == "error" else "") + message.text, style=style)
    return t


def render(raw: Mapping[str, Any] | None, events: Sequence[Mapping[str, Any]] = (),
           selected: int = 0, message: Message | str | None = None,
           iops: Mapping[str, float | None] | None = None, error: str | None = None,
           interactive: bool = True, width: int | None = None) -> Group:
    """One frame, from data only (no terminal, no clock other than event timestamps).

    raw: a status dict (`vmemu status --json`), or None when none could be had yet.
    events: the events to show, oldest first (the caller picks how many fit).
    selected: index of the highlighted domain row.
    iops: per-domain IOPS (None: not known yet).
    error: why the status is stale or missing (a red line under the header).
    interactive: draw the message line and the key legend (not for `--once`).
    width: the terminal's width, to draw narrower bars (and fewer columns) on a narrow one.
    """
    parts: list[RenderableType] = [header(raw)]
    if error:
        parts.append(Text(error, style="bold red"))
    if raw is not None:
        parts += [domain_table(raw, selected, iops, width), grant_table(raw)]
    else:
        parts.append(Text("no status yet", style="dim"))
    parts += [Text(""), event_table(events)]
    if interactive:
        parts += [Text(""), message_line(message), Text(LEGEND, style="dim")]
    return Group(*parts)


# -- sampling ----------------------------------------------------------------------------------
def iops_between(old: Mapping[str, Any], new: Mapping[str, Any], dt: float) -> float | None:
    """IOPS of one domain from two samples of its status row ({"pid", "ops"}).

    None when it cannot be told: no figures, no time elapsed, or another incarnation (a
    restarted domain starts counting again from zero).
    """
    a, b = old.get("ops"), new.get("ops")
    if a is None or b is None or dt <= 0 or old.get("pid") != new.get("pid") or b < a:
        return None
    return (b - a) / dt


class IopsMeter:
    """IOPS per domain over about the last `window` seconds of status samples."""

    def __init__(self, window: float = IOPS_WINDOW_S) -> None:
        self.window = window
        self.samples: collections.deque[tuple[float, dict[str, dict[str, Any]]]] = collections.deque()

    def add(self, mono: float, raw: Mapping[str, Any]) -> None:
        rows = {n["name"]: {"pid": n.get("pid"), "ops": n.get("ops")} for n in raw.get("nodes") or []}
        self.samples.append((mono, rows))
        # Keep the newest sample that is at least `window` old, as the base of the difference.
        while len(self.samples) > 2 and self.samples[1][0] <= mono - self.window:
            self.samples.popleft()

    def rates(self) -> dict[str, float | None]:
        if len(self.samples) < 2:
            return {}
        (t0, old), (t1, new) = self.samples[0], self.samples[-1]
        return {name: iops_between(old.get(name, {}), row, t1 - t0) for name, row in new.items()}


class EventTail:
    """Follows the event log: reads only what was appended since the last poll."""

    def __init__(self, path: Path, keep: int = 100, backlog: int = 64 * 1024) -> None:
        self.path = path
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.backlog = backlog
        self.ino: int | None = None
        self.offset = 0
        self.partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return list(self.recent)
        if st.st_ino != self.ino or st.st_size < self.offset:  # new or truncated file
            self.ino, self.recent, self.partial = st.st_ino, collections.deque(maxlen=self.recent.maxlen), b""
            self.offset = max(0, st.st_size - self.backlog)
            skip_first = self.offset > 0  # started mid-line: drop the piece
        else:
            skip_first = False
        if st.st_size == self.offset:
            return list(self.recent)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(st.st_size - self.offset)
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next poll
        if skip_first and lines:
            lines = lines[1:]
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                self.recent.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return list(self.recent)


# -- keys --------------------------------------------------------------------------------------
_ESCAPES = {b"\x1b[A": "up", b"\x1bOA": "up", b"\x1b[B": "down", b"\x1bOB": "down",
            b"\x1b[C": "right", b"\x1bOC": "right", b"\x1b[D": "left", b"\x1bOD": "left"}


def parse_keys(data: bytes) -> tuple[list[str], bytes]:
    """Raw terminal bytes -> (key names, unfinished escape sequence to complete later).

    Arrows become "up"/"down"/"left"/"right"; other escape sequences are dropped; a printable
    byte is its character.
    """
    keys: list[str] = []
    i = 0
    while i < len(data):
        b = data[i:i + 1]
        if b != b"\x1b":
            ch = b.decode("latin-1")
            keys.append(ch)
            i += 1
            continue
        seq = data[i:i + 3]
        if seq in _ESCAPES:
            keys.append(_ESCAPES[seq])
            i += 3
            continue
        if len(data) - i < 3 and (len(data) - i == 1 or data[i + 1:i + 2] in (b"[", b"O")):
            return keys, data[i:]  # maybe the rest of a sequence is on its way
        if data[i + 1:i + 2] == b"[":  # some other CSI sequence: skip to its final byte
            j = i + 2
            while j < len(data) and not 0x40 <= data[j] <= 0x7E:
                j += 1
            if j == len(data):
                return keys, data[i:]
            i = j + 1
            continue
        if data[i + 1:i + 2] == b"O":
            i += 3
            continue
        keys.append("esc")
        i += 1
    return keys, b""


class Terminal:
    """cbreak mode on a tty for the life of the `with` block; restored on any way out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None
        self.pending = b""

    def __enter__(self) -> "Terminal":
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except (termios.error, OSError):
                pass  # the terminal is gone (hangup): nothing left to restore
            self.saved = None

    def keys(self, timeout: float) -> list[str]:
        """Keys typed within `timeout` seconds (an empty list if none)."""
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            if self.pending:  # a lone ESC that nothing followed
                self.pending = b""
                return ["esc"]
            return []
        data = os.read(self.fd, 1024)
        if not data:
            raise EOFError("the terminal closed")
        keys, self.pending = parse_keys(self.pending + data)
        if self.pending:
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                more, self.pending = parse_keys(self.pending + os.read(self.fd, 1024))
                keys += more
        return keys


# -- the loop ----------------------------------------------------------------------------------

class TopState:
    """What the loop knows between frames: the last status, IOPS, selection, message."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.ctl: Any = None
        self.next_connect = 0.0
        self.raw: dict[str, Any] | None = None
        self.error: str | None = None
        self.meter = IopsMeter()
        self.tail = EventTail(datadir.events_file(data_dir))
        self.selected = 0
        self.message: Message | None = Message(f"watching the cluster in {data_dir}")

    def connect(self) -> Any:
        from vmemu.cluster import Control

        return Control(self.dir, timeout=1.0)

    def sample(self) -> None:
        now = time.monotonic()
        if self.ctl is None:
            if now < self.next_connect:
                return
            self.next_connect = now + 1.0
            try:
                self.ctl = self.connect()
            except VmemuError as exc:
                self.error = f"status is stale: {exc.message}" if self.raw else exc.message
                return
        try:
            pid = int(self.ctl.info.get("hypervisor_pid", 0))
            if not pid_alive(pid):  # do not wait out an RPC timeout for a process that is gone
                raise NotRunning(f"the cluster stopped (hypervisor pid {pid} exited)")
            self.raw = self.ctl.status().raw
            self.error = None
        except VmemuError as exc:
            # The hypervisor stopped or does not answer: show the last status, marked stale,
            # and find the cluster afresh (a new one may have started in this data dir).
            self.error = f"status is stale: {exc.message}"
            self._drop_control()
            return
        self.meter.add(time.monotonic(), self.raw)
        self.selected = min(self.selected, max(0, len(self.raw.get("nodes") or []) - 1))

    def _drop_control(self) -> None:
        if self.ctl is not None:
            try:
                self.ctl.close()
            except Exception:
                pass
            self.ctl = None

    def close(self) -> None:
        self._drop_control()

    def frame(self, events_fit: int = EVENTS_SHOWN, interactive: bool = True,
              width: int | None = None) -> Group:
        evs = self.tail.poll()
        return render(self.raw, evs[-events_fit:] if events_fit > 0 else [], self.selected,
                      self.message, self.meter.rates(), self.error, interactive, width)

    def selected_node(self) -> str | None:
        nodes = (self.raw or {}).get("nodes") or []
        return nodes[self.selected]["name"] if 0 <= self.selected < len(nodes) else None

    def key(self, k: str) -> None:
        count = len((self.raw or {}).get("nodes") or [])
        if k in ("up", "k"):
            self.selected = max(0, self.selected - 1)
        elif k in ("down", "j"):
            self.selected = min(max(0, count - 1), self.selected + 1)
        elif k in ("c", "h", "r", "g"):
            self.message = self.act(k)

    def act(self, k: str) -> Message:
        stamp = time.strftime("%H:%M:%S")
        node = self.selected_node()
        if node is None:
            return Message("no domain selected (no status yet)", "error", stamp)
        if self.ctl is None:
            return Message(f"cannot {'crash' if k in 'ch' else 'restart' if k == 'r' else 'give back'} "
                           f"{node}: {self.error or 'no cluster'}", "error", stamp)
        try:
            if k in ("c", "h"):
                res = self.ctl.call("crash", {"node": node, "hang": k == "h"})
                if k == "h":
                    cfg = (self.raw or {}).get("config") or {}
                    limit = int(cfg.get("heartbeat_ms", 0)) * int(cfg.get("heartbeat_misses", 0))
                    return Message(f"{node} (pid {res['pid']}) stopped with SIGSTOP; the heartbeat "
                                   f"monitor declares it failed after {limit}ms of silence", "ok", stamp)
                return Message(f"{node} (pid {res['pid']}) killed with SIGKILL", "ok", stamp)
            if k == "r":
                self.ctl.call("restart", {"node": node})
                gb = ((self.raw or {}).get("config") or {}).get("giveback_delay_s", 0)
                after = ("press g to give its identity back once it is up" if gb is not None and gb < 0
                         else f"giveback follows {gb}s after it is up")
                return Message(f"{node} booting; {after}", "ok", stamp)
            self.ctl.call("giveback", {"node": node})
            return Message(f"giveback of {node} requested", "ok", stamp)
        except VmemuError as exc:
            if exc.code == "timeout":
                self._drop_control()
            return Message(exc.message, "error", stamp)


def fitted_frame(console: Console, state: TopState) -> Group:
    """A frame for the terminal as it is now: its width, and as many events as its height fits."""
    width, height = console.size
    bare = state.frame(0, width=width)  # every part but the events ("no events yet": one line)
    used = len(console.render_lines(bare, console.options.update(height=None), pad=False))
    return state.frame(max(1, min(EVENTS_SHOWN, height - used + 1)), width=width)


def once(data_dir: Path, console: Console) -> None:
    """Print one frame (IOPS from two status samples half a second apart) and return."""
    state = TopState(data_dir)
    try:
        state.ctl = state.connect()  # NotRunning: one line from the CLI, no frame
        state.raw = state.ctl.status().raw  # and so is a hypervisor that does not answer
        state.meter.add(time.monotonic(), state.raw)
        time.sleep(0.5)
        state.sample()
        console.print(state.frame(interactive=False, width=console.width))
    finally:
        state.close()


def make_console() -> Console:
    """The terminal's width when there is one; 160 columns (or $COLUMNS) into a pipe or file."""
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)


def run(data_dir: Path, console: Console | None = None) -> None:
    """The live view; returns when the user presses q (or Ctrl-C)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise BadRequest("vmemu top needs a terminal; use `vmemu top --once` to print one frame")
    console = console or make_console()
    state = TopState(data_dir)
    state.ctl = state.connect()  # no cluster: one line from the CLI before the screen changes

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old_term = signal.signal(signal.SIGTERM, terminated)  # `kill` from elsewhere: restore too
    try:
        with Terminal(sys.stdin.fileno()) as term, \
                Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                     redirect_stderr=False) as live:
            while True:
                state.sample()
                live.update(fitted_frame(console, state), refresh=True)
                deadline = time.monotonic() + REFRESH_S
                while (left := deadline - time.monotonic()) > 0:
                    keys = term.keys(left)
                    if "q" in keys or "Q" in keys:
                        return
                    for k in keys:
                        state.key(k)
                    if keys:
                        live.update(fitted_frame(console, state), refresh=True)
    except (KeyboardInterrupt, EOFError):
        return  # Ctrl-C (or a closed terminal) quits like q; the terminal is already restored
    finally:
        signal.signal(signal.SIGTERM, old_term)
        state.close()

