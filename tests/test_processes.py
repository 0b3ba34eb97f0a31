"""Processes fedseg starts: tied to the command that started them; their leftovers swept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shared.processes import alive, process_identity
from simulations.flower_runtime import RAY_TMP_OWNER, RAY_TMP_PREFIX, remove_orphaned_ray_tmp
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


def test_a_process_identity_survives_pid_reuse_checks_and_ends_with_the_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        identity = process_identity(child.pid)
        assert identity is not None and identity.startswith(f"{child.pid} ")
        assert process_identity(child.pid) == identity and process_identity(os.getpid()) != identity
    finally:
        child.kill()
        child.wait()
    assert process_identity(child.pid) is None


def test_ray_folders_of_dead_harnesses_are_swept_and_others_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_identity = process_identity(dead.pid) or f"{dead.pid} 1"  # it may already have ended
    dead.wait()
    folders = {name: tmp_path / f"{RAY_TMP_PREFIX}{name}" for name in ("dead", "live", "unowned", "reused")}
    for folder in folders.values():
        (folder / "session_latest").mkdir(parents=True)
    (folders["dead"] / RAY_TMP_OWNER).write_text(dead_identity)
    (folders["live"] / RAY_TMP_OWNER).write_text(str(process_identity(os.getpid())))
    (folders["reused"] / RAY_TMP_OWNER).write_text(f"{os.getpid()} 1")  # our PID, another start time
    (tmp_path / "unrelated").mkdir()

    removed = remove_orphaned_ray_tmp(tmp_path)

    assert sorted(removed) == sorted([folders["dead"], folders["reused"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["unrelated", folders["live"].name, folders["unowned"].name])
