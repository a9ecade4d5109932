"""`vmemu chaos`: judging the histories a chaos run records (docs/chaos.md)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from vmemu.chaos.checker import DEFAULT_BUDGET, check
from vmemu.chaos.history import HistoryError, load_path

BAD_INPUT = 3


class BadInput(click.ClickException):
    """A history or an argument we cannot use: one line, exit 3 (1 and 2 are verdicts)."""

    exit_code = BAD_INPUT


class _Command(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = BAD_INPUT  # click's 2 would read as "unknown"
            raise


CHECK_HELP = """Check HISTORY (JSON lines, one op event a line) for per-block linearizability.

\b
Exit status:
  0  valid: every block is linearizable
  1  not linearizable: at least one block has an anomaly (listed)
  2  unknown: no anomaly found, but some block ran out of --budget
  3  bad input: a malformed history line (named by number), an unreadable file or a bad option
"""


def register(cli: click.Group) -> None:
    @cli.group()
    def chaos() -> None:
        """Chaos campaign: check recorded histories of block reads and writes."""

    @chaos.command("check", cls=_Command, help=CHECK_HELP)
    @click.argument("history", type=click.Path(dir_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the verdict as verdict.json.")
    @click.option("--budget", type=click.FloatRange(min=0, min_open=True),
                  default=DEFAULT_BUDGET, show_default=True,
                  help="Seconds of search per block before it is reported unknown.")
    def check_cmd(history: str, as_json: bool, budget: float) -> None:
        try:
            ops = load_path(history)
        except HistoryError as exc:
            raise BadInput(f"{history}: {exc}") from None
        except OSError as exc:
            raise BadInput(f"{history}: {exc.strerror or exc}") from None
        verdict = check(ops, budget=budget)
        if as_json:
            out: Any = verdict.to_json()
            click.echo(json.dumps(out, indent=1))
        else:
            for line in verdict.summary():
                click.echo(line)
        sys.exit(verdict.exit_code())
