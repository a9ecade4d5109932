"""`vmemu chaos`: judging the histories a chaos run records (docs/chaos.md)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from vmemu.chaos.checker import DEFAULT_BUDGET, check
from vmemu.chaos.history import HistoryError, load_path
from vmemu.chaos.schedule import DEFAULT_KINDS

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


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = BAD_INPUT
            raise


RUN_HELP = """Chaos runs: a fresh cluster, concurrent clients, seeded faults, a verdict.

\b
  vmemu chaos --seed 42 --duration 20s                   one run
  vmemu chaos --runs 1000 --seed 1 --jobs 2 --out runs/  a campaign
  vmemu chaos --runs 20000 --scheduler tcp://h:8786      a campaign on a dask cluster
  vmemu chaos --replay runs/seed-1234 --out again/       the same schedule again
  vmemu chaos --shrink runs/seed-1234                    a smaller schedule that fails
  vmemu chaos check runs/seed-1234/history.jsonl         the checker alone

\b
Exit status: 0 every run linearizable and available; 1 a run failed (not linearizable,
unknown, an identity out of service past its budget, or a fault its cluster did not heal
from); 2 --scheduler cannot be used (dask not installed, scheduler unreachable); 3 bad
input.
"""

CHECK_HELP = """Check HISTORY (JSON lines, one op event a line) for per-block linearizability.

\b
Exit status:
  0  valid: every block is linearizable
  1  not linearizable: at least one block has an anomaly (listed)
  2  unknown: no anomaly found, but some block ran out of --budget
  3  bad input: a malformed history line (named by number), an unreadable file or a bad option
"""


def register(cli: click.Group) -> None:
    @cli.group(invoke_without_command=True, cls=_Group, help=RUN_HELP)
    @click.option("--seed", type=click.IntRange(0, 2**62), default=None,
                  help="The run's seed (a campaign: the first seed). Default: drawn, printed.")
    @click.option("--duration", default="20s", show_default=True,
                  help="How long the clients run, e.g. 20s, 2m (healing may add to it).")
    @click.option("--runs", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
    @click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
                  help="Runs at a time, each with a cluster of its own.")
    @click.option("--out", type=click.Path(file_okay=False), default=None,
                  help="Where runs go (default: ./chaos-runs/<seed>).")
    @click.option("--nodes", type=click.IntRange(2, 16), default=2, show_default=True)
    @click.option("--faults", "kinds", default=",".join(DEFAULT_KINDS), show_default=True,
                  help="Fault kinds to draw from, comma-separated (see docs/chaos.md).")
    @click.option("--replay", type=click.Path(file_okay=False, exists=True), default=None,
                  help="Run a recorded run's schedule again (its seed, faults and workload).")
    @click.option("--shrink", type=click.Path(file_okay=False, exists=True), default=None,
                  help="Find a smaller schedule that still fails, from a failing run.")
    @click.option("--budget", type=click.FloatRange(min=0, min_open=True),
                  default=DEFAULT_BUDGET, show_default=True,
                  help="The checker's seconds per block before it says unknown.")
    @click.option("--availability-slack", "slack", type=click.FloatRange(min=0, min_open=True),
                  default=None, help="Multiply every availability budget by this (a loaded "
                  "host: 2, 3). Default 1; with --replay or --shrink, the run's own.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result (or the "
                  "campaign summary) as JSON.")
    @click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                  help="Farm the campaign's runs out to this dask.distributed scheduler "
                  "(pip install 'vmemu[farm]'; docs/chaos.md).")
    @click.option("--broken", type=click.Choice(["unlogged_ack"]), default=None, hidden=True,
                  help="Run a deliberately broken build (the checker's own test).")
    @click.pass_context
    def chaos(ctx: click.Context, seed: int | None, duration: str, runs: int, jobs: int,
              out: str | None, nodes: int, kinds: str, replay: str | None, shrink: str | None,
              budget: float, slack: float | None, as_json: bool, scheduler: str | None,
              broken: str | None) -> None:
        if ctx.invoked_subcommand is not None:
            return
        from vmemu.chaos import cli_run

        sys.exit(cli_run.main(seed=seed, duration=duration, runs=runs, jobs=jobs, out=out,
                              nodes=nodes, kinds=kinds, replay=replay, shrink=shrink,
                              budget=budget, slack=slack, as_json=as_json,
                              broken=broken or "", scheduler=scheduler))

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
