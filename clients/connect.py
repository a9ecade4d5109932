"""Pick the client for a target: a vmemu identity endpoint (native protocol) or an nbd:// URI."""

from __future__ import annotations

from typing import Union

from clients.block import BlockClient
from clients.nbd_client import NbdClient

AnyClient = Union[BlockClient, NbdClient]


def open_client(endpoint: str) -> AnyClient:
    if endpoint.startswith("nbd://"):
        return NbdClient(endpoint)
    return BlockClient(endpoint)
