"""What the checker concludes: per-block results, anomalies, and verdict.json.

verdict.json: {"valid": true | false | "unknown", "blocks": n, "ops": n,
               "anomalies": [{"block", "kind", "ops": [...], "detail"}],
               "unknown_blocks": [...], "anomalies_omitted": n}

`valid` is false as soon as one block is proven not linearizable, else "unknown" if any block
ran out of its budget, else true: an unknown block is never counted as a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vmemu.chaos.history import Op

Validity = bool | Literal["unknown"]

# The kinds, in the order a block's anomalies are reported (most specific first).
KINDS = ("phantom", "future-read", "lost", "stale", "nonlinearizable")


@dataclass(frozen=True)
class Anomaly:
    """A proof that a block is not linearizable: `ops` cannot all be ordered.

    For nonlinearizable, `minimal` says whether each op of `ops` was shown to be needed (the
    shrinking finished within its budget); the named kinds are minimal by construction.
    """

    block: str
    kind: str
    ops: tuple[Op, ...]
    detail: str
    minimal: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block": self.block, "kind": self.kind,
                               "ops": [op.to_json() for op in self.ops], "detail": self.detail}
        if not self.minimal:
            out["minimal"] = False
        return out


@dataclass
class BlockResult:
    block: str
    valid: Validity
    ops: int  # ops that took part (after failed writes and failed/info reads were dropped)
    anomalies: list[Anomaly] = field(default_factory=list)
    omitted: int = 0  # anomalies found but not listed (the first few per kind are enough)
    seconds: float = 0.0


@dataclass
class Verdict:
    valid: Validity
    blocks: int
    ops: int
    anomalies: list[Anomaly]
    unknown_blocks: list[str]
    omitted: int = 0

    @classmethod
    def of(cls, results: list[BlockResult], ops: int) -> Verdict:
        anomalies = [a for r in results for a in r.anomalies]
        unknown = sorted(r.block for r in results if r.valid == "unknown")
        valid: Validity = (False if any(r.valid is False for r in results)
                           else "unknown" if unknown else True)
        return cls(valid, len(results), ops, anomalies, unknown,
                   sum(r.omitted for r in results))

    def to_json(self) -> dict[str, Any]:
        return {"valid": self.valid, "blocks": self.blocks, "ops": self.ops,
                "anomalies": [a.to_json() for a in self.anomalies],
                "unknown_blocks": self.unknown_blocks, "anomalies_omitted": self.omitted}

    def exit_code(self) -> int:
        return 0 if self.valid is True else 1 if self.valid is False else 2

    def summary(self, limit: int = 10) -> list[str]:
        """A short human verdict: a headline, then one line per anomaly (at most `limit`)."""
        where = f"{_n(self.ops, 'op')} over {_n(self.blocks, 'block')}"
        if self.valid is True:
            return [f"valid: linearizable ({where})"]
        lines: list[str] = []
        if self.valid is False:
            bad = len({a.block for a in self.anomalies})
            lines.append(f"NOT linearizable: {_n(len(self.anomalies) + self.omitted, 'anomaly')}"
                         f" in {bad} of {_n(self.blocks, 'block')} ({_n(self.ops, 'op')})")
        else:
            lines.append(f"unknown: no anomaly found, but {_n(len(self.unknown_blocks), 'block')}"
                         f" ran out of budget ({where})")
        for a in self.anomalies[:limit]:
            lines.append(f"  {a.kind} on {a.block}: {a.detail}")
        more = len(self.anomalies) - limit + self.omitted
        if more > 0:
            lines.append(f"  ... and {more} more (--json lists the first few of each kind "
                         "in each block)")
        if self.unknown_blocks and self.valid is False:
            lines.append(f"  and {_n(len(self.unknown_blocks), 'block')} unknown (out of budget)")
        if self.valid == "unknown":
            shown = ", ".join(self.unknown_blocks[:5])
            lines.append(f"  unknown: {shown}{' ...' if len(self.unknown_blocks) > 5 else ''}")
        return lines


def _n(count: int, noun: str) -> str:
    plural = "anomalies" if noun == "anomaly" else noun + "s"
    return f"{count} {noun if count == 1 else plural}"


def describe(op: Op) -> str:
    """'write c1-7 by p3 (line 12)': how an op is named in an anomaly's detail."""
    what = "write" if op.f == "write" else "read"
    val = "null" if op.value is None else repr(op.value)
    tail = "" if op.type == "ok" else f", {op.type}"
    at = f"line {op.line}" if op.line else f"op {op.index}"
    return f"{what} {val} by p{op.process} ({at}{tail})"
