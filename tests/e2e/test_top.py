"""`vmemu top` in a real terminal (tmux): watch a cluster, crash and restart a node with keys, quit.

The tmux server is private to the test (its own socket, named from the xdist worker and the
test's tmp dir), so parallel workers never share a server, a session or a screen.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.top_screen import domain_rows, selected

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed: the terminal test "
                                "needs it to run `vmemu top` in a real pseudo-terminal")
ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without COLUMNS/LINES, which would pin rich's width.

    (A harness may have put them in the C environment, where os.environ does not show them but
    children inherit them; an explicit env= drops them.)
    """
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra)
    return env


class Tmux:
    def __init__(self, tmp_path: Path) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.name = re.sub(r"[^A-Za-z0-9_-]", "-", f"vmemu-top-{worker}-{tmp_path.name}-{os.getpid()}")
        # The server's socket lives in the test's tmp dir (gone with it) unless that path is too
        # long for a unix socket; then tmux's own dir, under the unique name.
        sock = tmp_path / "tmux.sock"
        self.server = ["-S", str(sock)] if len(str(sock)) < 100 else ["-L", self.name]

    def __call__(self, *args: str, check: bool = True) -> str:
        p = subprocess.run([TMUX, *self.server, "-f", os.devnull, *args], capture_output=True,
                           text=True, timeout=20, env=clean_env())
        if check and p.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def start(self, command: str) -> None:
        # remain-on-exit (set in the same command list, before the server looks at the child
        # again) keeps the pane after the program ends, so its exit can be observed.
        self("new-session", "-d", "-s", self.name, "-x", "160", "-y", "45", "-c", str(ROOT),
             command, ";", "set-option", "-w", "-t", self.name, "remain-on-exit", "on")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.name, *keys)

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", self.name, fmt).strip()

    def kill(self) -> None:
        self("kill-session", "-t", self.name, check=False)
        self("kill-server", check=False)


def wait_screen(tmux: Tmux, pred: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < end:
        screen = tmux.screen()
        if pred(screen):
            return screen
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{screen}")


def row(screen: str, name: str) -> dict[str, str]:
    return domain_rows(screen).get(name, {})


def test_top_crash_and_restart_with_keys(make_cluster, tmp_path):
    c = make_cluster(nodes=2, giveback_delay_s=0.2)
    d = c.dir
    once = subprocess.run([sys.executable, "-m", "vmemu.cli", "--data-dir", str(d), "top", "--once"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean_env(COLUMNS="160"))
    assert once.returncode == 0, once.stderr
    assert [row(once.stdout, n).get("state") for n in ("node1", "node2")] == ["serving", "serving"]

    top = shlex.join([sys.executable, "-m", "vmemu.cli", "--data-dir", str(d), "top"])

    def script(run: str) -> tuple[str, Path, Path, Path]:
        """A shell around `top` that records the terminal settings before and after, and top's
        exit code (tmux does not always report a dead pane's exit status). The shell traps
        SIGINT (Ctrl-C reaches the whole foreground group) so that it lives on to record; top
        starts with SIGINT at its default, as a trapped signal is reset by exec."""
        rc, before, after = (tmp_path / f"{run}.{what}" for what in ("rc", "stty-before", "stty-after"))
        q = lambda p: shlex.quote(str(p))  # noqa: E731
        body = (f"trap : INT; unset COLUMNS LINES; stty -g > {q(before)}; {top}; "
                f"echo $? > {q(rc)}; stty -g > {q(after)}")
        return f"sh -c {shlex.quote(body)}", rc, before, after

    def wait_exit(key: str, rc: Path, before: Path, after: Path) -> None:
        tmux.keys(key)
        end = time.monotonic() + 15
        while time.monotonic() < end and tmux.pane("#{pane_dead}") != "1":
            time.sleep(0.05)
        assert tmux.pane("#{pane_dead}") == "1", f"top did not exit on {key}:\n" + tmux.screen()
        assert rc.read_text().strip() == "0"
        assert after.read_text() == before.read_text(), f"the terminal was not restored after {key}"

    tmux = Tmux(tmp_path)
    try:
        command, *files = script("first")
        tmux.start(command)
        wait_screen(tmux, lambda s: all(row(s, n).get("state") == "serving" for n in ("node1", "node2")),
                    "both nodes serving")
        tmux.keys("j")
        wait_screen(tmux, lambda s: selected(s) == ["node2"], "node2 selected (j)")
        tmux.keys("Up")
        wait_screen(tmux, lambda s: selected(s) == ["node1"], "node1 selected (up arrow)")
        make_cluster.track(c.status())  # the fixture makes sure every domain process is gone at the end
        tmux.keys("c")
        s = wait_screen(tmux, lambda s: row(s, "node1").get("state") == "down"
                        and row(s, "node1").get("served by") == "node2"
                        and row(s, "node2").get("serves") == "node1,node2",
                        "node1 down, its identity served by node2")
        assert "killed with SIGKILL" in s
        tmux.keys("c")  # a second crash of a down node: an error line, not a traceback
        s = wait_screen(tmux, lambda s: "error: " in s, "the error of crashing a down node")
        assert "node1 is not running" in s and "Traceback" not in s
        tmux.keys("r")
        wait_screen(tmux, lambda s: row(s, "node1").get("state") == "serving"
                    and row(s, "node1").get("served by") == "node1"
                    and row(s, "node2").get("serves") == "node2",
                    "node1 serving its own identity again (giveback)")
        make_cluster.track(c.status())
        wait_exit("q", *files)

        # Ctrl-C quits too, and restores the terminal as well.
        command, *files = script("second")
        tmux("respawn-pane", "-k", "-t", tmux.name, command)
        wait_screen(tmux, lambda s: row(s, "node1").get("state") == "serving", "top again")
        wait_exit("C-c", *files)
    finally:
        tmux.kill()
