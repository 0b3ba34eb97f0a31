"""Processes fedseg starts: tied to the command that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shared.processes import alive
from tests.conftest import REPO

PARENT = """
import subprocess, sys, time
from shared.processes import stopped_with_parent
tie = stopped_with_parent() if sys.argv[1] == "tied" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         preexec_fn=tie)
print(child.pid, flush=True)
time.sleep(60)
"""


def _child_alive_after_parent_killed(mode: str) -> tuple[bool, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: the parent runs no clean-up
    parent.wait()
    deadline = time.monotonic() + 3.0
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(child), child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
@pytest.mark.parametrize(("mode", "survives"), [("tied", False), ("untied", True)])
def test_a_child_started_with_the_tie_ends_when_its_parent_is_killed(mode, survives):
    still_alive, child = _child_alive_after_parent_killed(mode)
    try:
        assert still_alive == survives  # a new session alone does not end it (the untied control)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
