"""The recorded seed corpora (tests/fuzz/corpus, made by tests/fuzz/record.py) and the
regression inputs (tests/fuzz/regressions: reproducers of findings, kept once fixed)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from domains.block_stream import split_frames

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"


@functools.lru_cache(maxsize=1)
def nbd_seeds() -> tuple[tuple[str, bytes], ...]:
    return tuple((p.name, p.read_bytes()) for p in sorted((CORPUS / "nbd").glob("*.bin")))


@functools.lru_cache(maxsize=1)
def frame_seeds() -> tuple[tuple[str, tuple[bytes, ...]], ...]:
    """Each recorded session whole, and each of its frames alone."""
    out = []
    for p in sorted((CORPUS / "bus").glob("*.frames")):
        frames = tuple(split_frames(p.read_bytes()))
        out.append((p.name, frames))
        out.extend((f"{p.name}#{i}", (f,)) for i, f in enumerate(frames))
    return tuple(out)


def regressions(target: str) -> list[tuple[str, bytes, dict]]:
    """(name, input bytes, options) of every kept reproducer of a target."""
    out = []
    for p in sorted((REGRESSIONS / target).glob("*.bin")):
        meta = p.with_suffix(".json")
        out.append((p.name, p.read_bytes(), json.loads(meta.read_text()) if meta.exists() else {}))
    return out
