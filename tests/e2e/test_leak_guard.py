"""The e2e suite's leak guard (conftest.no_process_left) can fail: it finds a process started
for a test, by its arguments or its working directory, and nothing of another test's."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.conftest import processes_under


def test_the_guard_finds_what_a_test_started_and_only_that(tmp_path):
    (tmp_path / "run").mkdir()
    by_arg = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "--data-dir", str(tmp_path / "cluster0")])
    by_cwd = subprocess.Popen(["sleep", "60"], cwd=tmp_path / "run")
    try:
        found = processes_under(tmp_path)
        assert by_arg.pid in found and by_cwd.pid in found
        assert "--data-dir" in found[by_arg.pid]
        # A sibling test's dir whose name only starts the same is not ours.
        assert not {by_arg.pid, by_cwd.pid} & set(processes_under(tmp_path.parent / tmp_path.name[:-1]))
    finally:
        for p in (by_arg, by_cwd):
            p.kill()
            p.wait()
    assert not {by_arg.pid, by_cwd.pid} & set(processes_under(tmp_path))
