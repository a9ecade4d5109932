"""Suite-wide guards: nothing a test starts may outlive it."""

from __future__ import annotations

import os

import pytest


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_shm_leaks():
    """vmemu's NVRAM is memfd: no test may leave (or even create) a /dev/shm entry."""
    before = _shm_entries()
    yield
    leaked = {e for e in _shm_entries() - before if "vmemu" in e or "nvram" in e or e.startswith("psm_")}
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
