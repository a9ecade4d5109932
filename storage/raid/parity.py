"""XOR parity over 4 KiB blocks, in numpy (one vectorised pass per block, not a byte loop)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from storage.raid.device import BLOCK_SIZE

ZERO_BLOCK = bytes(BLOCK_SIZE)


def xor_blocks(blocks: Iterable[bytes]) -> bytes:
    """XOR of equally sized blocks; the XOR of nothing is the zero block."""
    acc = np.zeros(BLOCK_SIZE // 8, dtype=np.uint64)
    for b in blocks:
        acc ^= np.frombuffer(b, dtype=np.uint64)
    return acc.tobytes()
