"""Read the domain table back out of a `vmemu top` screen (a rendered frame or a tmux capture).

Columns are found by where their headers start; the last column (IOPS, right-aligned) is the
row's last word. Enough for tests to ask "what does the screen say node1's state is".
"""

from __future__ import annotations

from vmemu.top import DOMAIN_COLUMNS, SELECTED_MARK


def domain_rows(screen: str) -> dict[str, dict[str, str]]:
    """{"node1": {"mark", "domain", "state", ..., "IOPS"}} for every domain row on the screen."""
    lines = screen.splitlines()
    try:
        hi = next(i for i, l in enumerate(lines) if " domain " in l and "served by" in l)
    except StopIteration:
        return {}
    header = lines[hi]
    cols, starts, pos = [], [], 0
    for col in DOMAIN_COLUMNS[:-1]:
        at = header.find(col, pos)
        if at < 0:
            continue  # a column left out on a narrow terminal
        cols.append(col)
        starts.append(at)
        pos = at + len(col)
    rows: dict[str, dict[str, str]] = {}
    for line in lines[hi + 2:]:
        name = line[starts[0]:starts[1]].strip()
        if not name.startswith("node"):
            break
        words = line.split()
        last = line.rstrip().rfind(words[-1])
        cells = {"mark": line[:starts[0]].strip()}
        for i, col in enumerate(cols):
            end = starts[i + 1] if i + 1 < len(starts) else last
            cells[col] = line[starts[i]:end].strip()
        cells[DOMAIN_COLUMNS[-1]] = words[-1]
        rows[name] = cells
    return rows


def selected(screen: str) -> list[str]:
    return [n for n, r in domain_rows(screen).items() if r["mark"] == SELECTED_MARK]
