"""Coverage-guided fuzzing with atheris (libFuzzer), where it installs:

    python -m tests.fuzz.atheris_harness nbd -atheris_runs=100000
    python -m tests.fuzz.atheris_harness codec -max_total_time=600

The targets are the ones of tests/fuzz/targets.py, with vmemu's own modules instrumented
for coverage; the first input byte of an nbd input chooses whether the peer reads
(`peer_reads`), a codec input is length-prefixed frames (domains/block_stream.split_frames).
The libFuzzer corpus starts from tests/fuzz/corpus, copied into
tests/fuzz/crashes/<target>/corpus (git-ignored, kept from run to run, so libFuzzer's
additions do not land in the repository); findings are written beside it. Replay one with libFuzzer's own way (pass the
file as the only argument).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["domains", "vmemu", "storage"]):
    from domains.block_stream import join_frames, split_frames
    from tests.fuzz import seeds, targets

CRASHES = Path(__file__).resolve().parent / "crashes"


def one_nbd(data: bytes) -> None:
    if data:
        targets.nbd(data[1:], bool(data[0] & 1))


def one_codec(data: bytes) -> None:
    targets.frames(split_frames(data))


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ("nbd", "codec"):
        raise SystemExit(f"usage: {argv[0]} nbd|codec [libFuzzer options] [corpus dirs]")
    target = argv[1]
    rest = argv[2:]
    (CRASHES / target).mkdir(parents=True, exist_ok=True)
    work = CRASHES / target / "corpus"
    if not any(not a.startswith("-") for a in rest):  # no corpus given: ours
        work.mkdir(exist_ok=True)
        if target == "nbd":
            for name, data in seeds.nbd_seeds():
                (work / name).write_bytes(b"\1" + data)
        else:
            for i, (_, frames) in enumerate(seeds.frame_seeds()):
                (work / f"seed-{i}").write_bytes(join_frames(frames))
        rest = [*rest, str(work)]
    args = [argv[0], f"-artifact_prefix={CRASHES / target}/", *rest]
    atheris.Setup(args, one_nbd if target == "nbd" else one_codec)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
