"""vmemu: a clustered storage system with virtual-machine failover, emulated on one host."""

from __future__ import annotations

from typing import Any

__all__ = ["Cluster", "Status"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that a guest domain importing vmemu.errors does not pay for the client side.
    if name in __all__:
        from vmemu import cluster

        return getattr(cluster, name)
    raise AttributeError(name)
