"""A chaos run's fault schedule: which faults, when, against which node, from one seed.

Pure: `generate` maps (seed, duration, nodes, kinds) to the same list of faults every time,
so a failing run can be replayed fault for fault (`vmemu chaos --replay DIR` reads the list
back from `schedule.json` instead of drawing it again) and shrunk (a sub-list is a schedule
too). Nothing here knows how a fault is done: vmemu/chaos/nemesis.py does.

Faults are spaced by `gap_s` at least: a killed guest is restarted and given its identity
back before the next fault, and on two shared cores a fresh guest takes seconds to boot.
A fault whose target is not in a state to take it when its time comes (still booting, say)
is recorded as skipped in the run's results, never moved: the schedule is what was asked.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

# kind -> what it does (the nemesis' docstring says how)
KINDS: dict[str, str] = {
    "kill": "kill -9 of a guest; its partner replays its NVRAM and serves its identity",
    "pause_short": "SIGSTOP for less than the failure detection time, then SIGCONT",
    "pause_long": "SIGSTOP for longer than detection: fenced while stopped, then SIGCONT",
    "kill_pair": "kill -9 of a guest and then of its partner (a double failure)",
    "kill_in_replay": "kill -9 of a guest, then of its partner as soon as it starts replaying",
    "kill_after_assume": "kill -9 of the taker between identity assumed and its first request",
    "kill_in_giveback": "kill -9 of a guest while its identity is given back to it",
    "kill_in_cp": "kill -9 of a guest while it writes a consistency point",
    # disk faults (vmemu/chaos/nemesis_disk.py), not in DEFAULT_KINDS: --faults names them
    "disk_eio": "a disk of one identity fails every read, write and sync for a few seconds",
    "disk_slow": "a disk of one identity answers every I/O late for a few seconds",
    "disk_torn": "a disk of one identity tears its writes (a sector prefix, then EIO)",
    "disk_bitflip": "bits flipped straight into allocated data blocks of a disk image",
    "kill_in_rebuild": "a disk failed and replaced, and kill -9 of the guest as it rebuilds",
    "client_cut": "clients of an identity hang up mid-request for a few seconds, and reconnect",
    "bus_drop": "a share of a guest's reports and Domain 0's requests and replies dropped "
                "for a few seconds (heartbeats spared)",
    "bus_delay": "every message between Domain 0 and a guest delayed (well under detection)",
    "bus_dup": "messages between Domain 0 and a guest delivered twice",
    "bus_reorder": "messages between Domain 0 and a guest shuffled in small windows",
    "heartbeat_loss": "every heartbeat of a live guest lost: fenced, then taken over",
}
DEFAULT_KINDS = ("kill", "pause_short", "pause_long", "kill_in_cp", "kill_in_replay",
                 "kill_after_assume", "kill_in_giveback", "kill_pair",
                 "client_cut")
DISK_KINDS = ("disk_eio", "disk_slow", "disk_torn", "disk_bitflip", "kill_in_rebuild")
# Faults on the bus between Domain 0 and a guest (vmemu/bus/faults.py). Not among the
# defaults: a default campaign's seeds keep drawing the schedules they always drew.
BUS_KINDS = ("bus_drop", "bus_delay", "bus_dup", "bus_reorder", "heartbeat_loss")
MAX_FAULTS = 10_000  # a schedule read back from a file is bounded like anything else read


def _disk_draw(rng: random.Random) -> dict[str, Any]:
    return {"disk_draw": rng.randrange(1 << 16)}  # the disk is this modulo the node's disks


def _hold(rng: random.Random) -> dict[str, Any]:
    # A CP every 2 s in a chaos cluster: a hold this long sees at least one
    return {"hold_s": round(rng.uniform(2.0, 4.0), 3)}


DISK_PARAMS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "disk_eio": lambda r: {**_disk_draw(r), **_hold(r), "probability": r.choice((0.3, 1.0))},
    "disk_slow": lambda r: {**_disk_draw(r), **_hold(r),
                            "delay_ms": round(r.uniform(5.0, 40.0), 1)},
    "disk_torn": lambda r: {**_disk_draw(r), **_hold(r), "probability": r.choice((0.5, 1.0))},
    "disk_bitflip": lambda r: {**_disk_draw(r), "flips": r.randint(1, 8),
                               "flip_seed": r.randrange(1 << 32)},
    "kill_in_rebuild": _disk_draw,
}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the clients started
    kind: str
    target: str  # "node<N>"
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("params"))
        return d


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration: float
    nodes: int
    faults: tuple[Fault, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "duration": self.duration, "nodes": self.nodes,
                "faults": [f.to_dict() for f in self.faults]}

    def without(self, drop: set[int]) -> "Schedule":
        return Schedule(self.seed, self.duration, self.nodes,
                        tuple(f for i, f in enumerate(self.faults) if i not in drop))


class ScheduleError(ValueError):
    """A schedule file that does not describe a schedule."""


def generate(seed: int, duration: float, nodes: int, kinds: tuple[str, ...] = DEFAULT_KINDS,
             gap_s: float = 12.0, first_s: float = 2.0) -> Schedule:
    """Faults from `first_s` on, one every `gap_s` or more (up to half a gap later, drawn),
    each of a kind and against a node drawn from the seed."""
    for k in kinds:
        if k not in KINDS:
            raise ScheduleError(f"unknown fault kind {k!r} (known: {', '.join(KINDS)})")
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = first_s + rng.uniform(0, gap_s / 4)
    while t < duration - 1.0 and kinds:
        kind = rng.choice(kinds)
        target = f"node{rng.randint(1, nodes)}"
        params: dict[str, Any] = {}
        if kind == "pause_short":
            params["fraction"] = round(rng.uniform(0.2, 0.6), 3)  # of the detection time
        elif kind == "kill_in_giveback":
            params["victim"] = rng.choice(("owner", "releaser"))
        elif kind == "pause_long":
            params["hold_s"] = round(rng.uniform(0.5, 2.0), 3)  # beyond the fence
        elif kind in DISK_PARAMS:
            params.update(DISK_PARAMS[kind](rng))
        elif kind == "client_cut":
            params["hold_s"] = round(rng.uniform(2.0, 4.0), 3)  # how long clients cut
        elif kind in BUS_KINDS:
            params.update(bus_params(kind, rng))
        faults.append(Fault(round(t, 3), kind, target, params))
        t += gap_s + rng.uniform(0, gap_s / 2)
    return Schedule(seed, duration, nodes, tuple(faults))


def bus_params(kind: str, rng: random.Random) -> dict[str, Any]:
    """A bus fault's draw: on which side it is done (Domain 0's sockets, or the guest's),
    the rule's seed, how long it holds (heartbeat_loss: until the fence), and its strength.
    Delays are fractions of the detection time (the nemesis scales them): a bus that is
    slow, not dead, must not get a node fenced."""
    p: dict[str, Any] = {"side": rng.choice(("dom0", "guest")), "seed": rng.randrange(2**31)}
    if kind != "heartbeat_loss":
        p["hold_s"] = round(rng.uniform(2.0, 4.0), 3)
    if kind == "bus_drop":
        p["drop"] = round(rng.uniform(0.2, 0.6), 3)
    elif kind == "bus_delay":
        p["delay"] = round(rng.uniform(0.1, 0.3), 3)  # x detection, +- half of it
    elif kind == "bus_dup":
        p["dup"] = round(rng.uniform(0.5, 1.0), 3)
    elif kind == "bus_reorder":
        p["window"] = rng.randint(2, 8)
    return p


def load(path: Path) -> Schedule:
    try:
        raw = json.loads(path.read_text())
        faults = raw["faults"]
        if not isinstance(faults, list) or len(faults) > MAX_FAULTS:
            raise ScheduleError(f"{path}: faults must be a list of at most {MAX_FAULTS}")
        out = []
        for i, f in enumerate(faults):
            f = dict(f)
            at, kind, target = float(f.pop("at")), str(f.pop("kind")), str(f.pop("target"))
            if kind not in KINDS:
                raise ScheduleError(f"{path}: fault {i}: unknown kind {kind!r}")
            if not (0 <= at < 1e6) or not target.startswith("node") \
                    or not target[4:].isdigit():
                raise ScheduleError(f"{path}: fault {i}: bad time or target")
            out.append(Fault(at, kind, target, f))
        sched = Schedule(int(raw["seed"]), float(raw["duration"]), int(raw["nodes"]), tuple(out))
    except ScheduleError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ScheduleError(f"{path}: not a chaos schedule ({type(exc).__name__}: {exc})") \
            from None
    if not 2 <= sched.nodes <= 64 or not 0 < sched.duration <= 86400:
        raise ScheduleError(f"{path}: nodes or duration out of range")
    for f in sched.faults:
        if not 1 <= int(f.target[4:]) <= sched.nodes:
            raise ScheduleError(f"{path}: fault target {f.target} is not one of the nodes")
    return sched


def save(sched: Schedule, path: Path) -> None:
    path.write_text(json.dumps(sched.to_dict(), indent=1) + "\n")
