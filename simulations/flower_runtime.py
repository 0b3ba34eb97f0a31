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
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared import superlink
from shared.errors import ConfigError, FedSegError
from shared.processes import flower_env, free_port, process_identity, run_streaming, stop_process_group, tail
from simulations import engine_launcher

CONNECTION = "fedseg-sim"
RAY_TMP_PREFIX = "fsray-"
RAY_TMP_OWNER = "fedseg-owner"  # "<pid> <start time>" of the harness the folder belongs to
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


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


@contextlib.contextmanager
def simulation_superlink(work_dir: Path, *, ray_address: str = "",
                         stock_engine: bool = False) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink; yield the environment for ``flwr run``; stop everything.

    With ``ray_address`` the simulation engine joins that existing Ray cluster
    (``ray.init`` honours ``RAY_ADDRESS``) instead of starting a private one.
    Unless ``stock_engine``, the engine process is started through
    :func:`simulations.engine_launcher.write_launcher` (messages handed over
    when stored instead of Flower's 0.1 s sweep over every node).
    """
    flwr_home = work_dir / "flwr-home"
    ray_tmp = new_ray_tmp()
    env = flower_env(flwr_home, ray_tmp)
    if not stock_engine:
        engine_launcher.write_launcher(ray_tmp / "bin")
        engine_launcher.prepend_path(env, ray_tmp / "bin")
    marker = f"FEDSEG_RUN_MARKER={secrets.token_hex(8)}"
    env[marker.split("=")[0]] = marker.split("=")[1]
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    port = free_port()
    address = f"{superlink.HOST}:{port}"
    superlink.write_connection(flwr_home, name=CONNECTION, address=address, ca_cert=None)
    log_path = work_dir / "superlink.log"
    process = superlink.spawn_logged(superlink.superlink_command(port=port, credentials=None, simulation=True),
                                     env=env, log_path=log_path)
    try:
        try:
            superlink.wait_healthy(address, ca_cert=None, failure=superlink.exited(process))
        except superlink.SuperLinkError as exc:
            raise SimulationError(f"flower-superlink: {exc}; see {log_path}") from None
        yield env
    finally:
        stop_process_group(process, marker=marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def new_ray_tmp() -> Path:
    """A folder for Ray's session files, owned by this process; first removes those of dead harnesses."""
    remove_orphaned_ray_tmp(Path(tempfile.gettempdir()))
    ray_tmp = Path(tempfile.mkdtemp(prefix=RAY_TMP_PREFIX))  # short: Ray's socket paths have a length limit
    owner = process_identity(os.getpid())
    if owner is not None:  # without /proc nothing is recorded, and the folder is never swept
        (ray_tmp / RAY_TMP_OWNER).write_text(owner)
    return ray_tmp


def remove_orphaned_ray_tmp(root: Path) -> list[Path]:
    """Delete the Ray folders under ``root`` whose harness died without clean-up (SIGKILL); return them.

    A folder without an owner file (being created, or not ours) is left alone.
    """
    removed = []
    for folder in root.glob(f"{RAY_TMP_PREFIX}*"):
        try:
            owner = (folder / RAY_TMP_OWNER).read_text().strip()
        except OSError:
            continue
        pid = owner.split(" ")[0]
        if not pid.isdigit() or process_identity(int(pid)) != owner:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def run_app(app_dir: Path, env: dict[str, str], *, run_config: Path, resources: Resources, log_path: Path,
            on_line: Callable[[str], None], timeout_s: float) -> None:
    """``flwr run --stream`` the app; pass each output line to ``on_line``; raise on failure."""
    command = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(run_config),
               "--federation-config", resources.federation_config()]
    try:
        code = run_streaming(command, env=env, log_path=log_path, on_line=on_line, timeout_s=timeout_s)
    except TimeoutError as exc:
        raise SimulationError(f"simulation: {exc}") from None
    if code != 0:
        raise SimulationError(f"`flwr run` exited with code {code}; last lines of {log_path}:\n{tail(log_path)}")


def check_machine_fits(resources: Resources, *, cpus: int, gpus: int) -> None:
    """Refuse per-client resources that this machine's private Ray can never grant.

    Flower's engine would otherwise stop at start-up with an empty actor pool.
    """
    if resources.num_cpus > cpus:
        raise ConfigError(f"'--cpus-per-client' is {resources.num_cpus:g} but this machine has {cpus} "
                          "CPUs; no virtual hospital could run")
    if resources.num_gpus > gpus:
        has = f"{gpus} GPU(s)" if gpus else "no GPU"
        raise ConfigError(f"'--gpus-per-client' is {resources.num_gpus:g} but this machine has {has} that "
                          "PyTorch can use; ask for less (0 = CPU), or use --ray-address to join a cluster "
                          "with GPUs")


def cuda_devices() -> int:
    """GPUs PyTorch can use here (imports torch: call only when a GPU share is asked for)."""
    import torch

    return torch.cuda.device_count()


def ray_address_parts(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``[ray://]host:port`` Ray address; None for ``auto`` (a local cluster).

    Raises
    ------
    ValueError
        If the address has no host or no port number in 1-65535.
    """
    if address == "auto":
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. 10.0.0.5:6379) or 'auto', got {address!r}")
    return host.strip("[]"), int(port)


def check_ray_head_answers(address: str, *, timeout_s: float = 5.0) -> None:
    """Raise :class:`SimulationError` unless something accepts connections at a Ray address.

    Ray's driver retries an address where nothing listens for a long time; a run
    pointed at a stopped or mistyped cluster would wait out its whole timeout.
    """
    parts = ray_address_parts(address)
    if parts is None:
        return
    try:
        with socket.create_connection(parts, timeout=timeout_s):
            pass
    except OSError as exc:
        raise SimulationError(f"'--ray-address' {address}: no Ray head answers there ({exc}); start the "
                              "cluster first (`ray start --head --port 6379`) or fix the address") from None


def logged_exceptions(log_path: Path, *, last: int = 4) -> list[str]:
    """The last ``last`` distinct exceptions a Flower log shows, as ``"Type: message"``.

    Ordered by where each last appears. Flower's simulation runtime logs a crash and
    then ends ``flwr run`` with exit code 0, so the log is the only place that says why
    a run stopped early; the crash's exceptions are the last ones logged.
    """
    try:
        text = _ANSI_ESCAPE.sub("", log_path.read_text(errors="replace"))
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            entry = f"{match.group(1)}: {match.group(2)}"
            if entry in found:
                found.remove(entry)
            found.append(entry)
    return found[-last:]

