"""Start, watch and stop the Flower processes fedseg runs locally.

Used by the simulation harness and by the process deployment
(``deploy/run_federation.py``). Flower processes start their own children in
sessions of their own (SuperLink -> SuperExec -> ServerApp, SuperNode ->
SuperExec -> ClientApp, Ray daemons), so stopping one process group is not
enough: :func:`stop_process_group` collects the whole tree first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent dies
HARDENED_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
# Ray in a simulation: no usage stats; none of the bookkeeping only Ray's dashboard reads (task events,
# metrics export, event-loop stats: without it simulated rounds were a few percent shorter, 1.17x against
# 1.20x the plain loop in benchmarks/scale.py); worker logs passed on undeduplicated.
SIMULATION_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_task_events_report_interval_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_event_stats": "0",
    "RAY_DEDUP_LOGS": "0",
}


def flower_env(flwr_home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no runtime installs.

    Parameters
    ----------
    flwr_home : Path
        The private ``FLWR_HOME`` (connections, installed FABs) of these processes.
    ray_tmp : Path, optional
        Ray's temporary directory (simulation only).
    """
    env = dict(os.environ)
    env.update(HARDENED_FLOWER_ENV)
    env.update({"FLWR_HOME": str(flwr_home), "PYTHONWARNINGS": "ignore"})
    if ray_tmp is not None:
        env.update(SIMULATION_RAY_ENV, RAY_TMPDIR=str(ray_tmp))
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def stopped_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent SIGTERM when the process starting it dies (Linux only).

    Every process fedseg starts is stopped by :func:`stop_process_group` when its
    command ends, but a command killed outright (SIGKILL, the OOM killer) runs no
    clean-up: without this its SuperLink served on (and its run went on) with
    nobody left to read it. The signal follows the *thread* that started the
    child (prctl(2)), so start a process from the thread that also stops it.
    Between fork and exec the child only makes system calls (safe beside other
    threads). Returns None where prctl is not available.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: the child only calls it
    parent = os.getpid()

    def tie_to_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the tie was made
            os.kill(os.getpid(), signal.SIGTERM)

    return tie_to_parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: subprocess.Popen, grace_s: float = 15.0, *, marker: str = "") -> None:
    """Stop ``process`` and every process it started, even those in other sessions.

    The whole tree is collected first, its process group is asked to terminate
    (SIGTERM), then every survivor of the tree is killed by PID after ``grace_s``.
    With ``marker`` (a ``NAME=value`` environment entry only this run's
    processes carry), processes that left the tree and its groups (re-parented
    to init in a session of their own) are found and stopped too.
    """
    tree = [process.pid, *descendants(process.pid)]
    tree.extend(pid for pid in group_members(tree) if pid not in tree)
    if marker:
        tree.extend(pid for pid in processes_with_env(marker) if pid not in tree)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            process.poll()
        # daemons may start workers, or orphan them, while they shut down (Ray does): track them too
        tree.extend(pid for pid in [*descendants(*tree), *group_members(tree)] if pid not in tree)
        time.sleep(0.1)
    if marker:
        tree.extend(pid for pid in processes_with_env(marker) if pid not in tree)
    for pid in tree:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def processes_with_env(entry: str) -> list[int]:
    """PIDs of the processes whose environment holds ``entry`` (``NAME=value``)."""
    needle = b"\0" + entry.encode() + b"\0"
    found = []
    for path in Path("/proc").glob("[0-9]*"):
        if int(path.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (path / "environ").read_bytes() + b"\0":
                found.append(int(path.name))
        except OSError:
            continue
    return found


def descendants(*roots: int) -> list[int]:
    """PIDs of every process below any of ``roots`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        parent = _stat_field(int(entry.name), 3)
        if parent is not None:
            children.setdefault(int(parent), []).append(int(entry.name))
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def group_members(pids: list[int]) -> list[int]:
    """PIDs of every process in the process groups of ``pids`` (their orphans included)."""
    groups = {_stat_field(pid, 4) for pid in pids} - {None, _stat_field(os.getpid(), 4)}  # never our own
    return [int(entry.name) for entry in Path("/proc").glob("[0-9]*")
            if int(entry.name) != os.getpid() and _stat_field(int(entry.name), 4) in groups]


def process_identity(pid: int) -> str | None:
    """``"<pid> <start time>"``: names one process even after its PID is reused (None if it is gone)."""
    started = _stat_field(pid, 21)
    return None if started is None else f"{pid} {started}"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    state = _stat_field(pid, 2)
    return state is not None and state not in ("Z", "X")


def _stat_field(pid: int, index: int) -> str | None:
    """Field ``index`` (0-based, per proc(5)) of ``/proc/<pid>/stat``; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[index - 2] if index >= 2 else None


def run_streaming(command: list[str], *, env: dict[str, str], log_path: Path, on_line: Callable[[str], None],
                  timeout_s: float, cwd: Path | None = None) -> int:
    """Run ``command``, append its output to ``log_path``, pass each line to ``on_line``; return its exit code.

    Raises :class:`TimeoutError` past ``timeout_s``. The command and everything
    it started are stopped in every case.
    """
    deadline = time.monotonic() + timeout_s
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True, cwd=cwd,
                                   preexec_fn=stopped_with_parent())
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command[0]} exceeded {timeout_s:.0f} s; see {log_path}")
            return process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{command[0]} exceeded {timeout_s:.0f} s; see {log_path}") from None
        finally:
            stop_process_group(process)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
