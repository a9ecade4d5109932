"""Names of volumes and LUNs: one rule, checked by the hypervisor before the RDB records a
name and by the aggregate that makes it (a light module: the hypervisor imports it)."""

from __future__ import annotations

import re

from vmemu.errors import BadRequest

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,15}$")


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(f"invalid {what} name {name!r}: 1-16 characters, a letter first, then "
                         "letters, digits, '-' or '_'")


def human_size(n: int | None) -> str:
    """1073741824 -> '1.0 GiB' (for messages and tables)."""
    if n is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
