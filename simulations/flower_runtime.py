"""Run the fedseg Flower App on a local simulation SuperLink that we own.

Instead of ``flwr run``'s magic ``:local:`` connection (fixed ports, a detached
SuperLink that outlives the command), the harness starts its own
``flower-superlink --simulation`` on a free loopback port in its own process
group, points a private ``FLWR_HOME`` at it, runs ``flwr run --stream``, and
stops the whole process group (SuperLink, simulation engine, Ray) afterwards,
even on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FedSegError

CONNECTION = "fedseg-sim"
STARTUP_TIMEOUT_S = 60.0


class SimulationError(FedSegError):
    """The Flower simulation could not be started or did not finish cleanly."""


@dataclass(frozen=True)
class Resources:
    """Simulation size and per-virtual-client resources (Ray)."""

    num_supernodes: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def federation_config(self) -> str:
        """The ``flwr run --federation-config`` value."""
        cpus = int(self.num_cpus) if float(self.num_cpus).is_integer() else self.num_cpus
        return (f"num-supernodes={self.num_supernodes} client-resources-num-cpus={cpus} "
                f"client-resources-num-gpus={float(self.num_gpus)}")


def flower_env(flwr_home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no installs."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONWARNINGS": "ignore",
    })
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_connection(flwr_home: Path, port: int) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one connection to our SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


@contextlib.contextmanager
def simulation_superlink(work_dir: Path) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink; yield the environment for ``flwr run``; stop everything."""
    flwr_home = work_dir / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsray-"))  # short: Ray's socket paths have a length limit
    env = flower_env(flwr_home, ray_tmp)
    port = free_port()
    write_connection(flwr_home, port)
    log = open(work_dir / "superlink.log", "ab")
    process = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_healthy(process, port, work_dir / "superlink.log")
        yield env
    finally:
        stop_process_group(process)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_app(app_dir: Path, env: dict[str, str], *, run_config: Path, resources: Resources, log_path: Path,
            on_line: Callable[[str], None], timeout_s: float) -> None:
    """``flwr run --stream`` the app; pass each output line to ``on_line``; raise on failure."""
    command = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(run_config),
               "--federation-config", resources.federation_config()]
    deadline = time.monotonic() + timeout_s
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                on_line(line.rstrip("\n"))
                if time.monotonic() > deadline:
                    raise SimulationError(f"simulation exceeded {timeout_s:.0f} s; see {log_path}")
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            stop_process_group(process)
    if code != 0:
        raise SimulationError(f"`flwr run` exited with code {code}; last lines of {log_path}:\n{_tail(log_path)}")


def stop_process_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop ``process`` and every process it started, even those in other sessions.

    Flower's SuperLink starts its SuperExec in a session of its own, and Ray's
    daemons hang below that, so killing one process group is not enough: the
    whole tree is collected first, asked to terminate, then killed if needed.
    """
    tree = [process.pid, *descendants(process.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            process.poll()
        # processes started while the tree shuts down (e.g. a ClientApp spawned late) are collected too
        tree.extend(pid for pid in descendants(*[p for p in tree if _alive(p)]) if pid not in tree)
        time.sleep(0.1)
    for pid in tree:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def descendants(*roots: int) -> list[int]:
    """PIDs of every process below ``roots`` (Linux ``/proc``; empty elsewhere)."""
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


def _alive(pid: int) -> bool:
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


def _wait_healthy(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink not healthy after {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
