"""Start the Flower processes of a real federation on this machine, hardened.

:class:`LocalSuperLink` owns one ``flower-superlink`` (TLS, SuperNode
authentication, a persistent ``--database``) and the operator's ``FLWR_HOME``
with a connection to it; it registers node keys with ``flwr supernode
register`` and starts ``flower-supernode`` processes. Every process started
is remembered and stopped by PID (whole process tree) on :meth:`stop`.
Insecure mode (no TLS, no node auth) exists only behind ``insecure=True``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.runtime.site_config import SiteConfig
from deploy.supernode import DEFAULT_POLL_INTERVAL_S
from shared.config import DEFAULT_MAX_EPSILON
from shared.errors import FedSegError
from shared.processes import flower_env, free_port, stop_process_group, tail
from shared.superlink import (
    HOST,
    STARTUP_TIMEOUT_S,
    ServerCredentials,
    SuperLinkError,
    exited,
    spawn_logged,
    superlink_command,
    wait_healthy,
    write_connection,
)

CONNECTION = "fedseg-deploy"
# How often a node's SuperExec polls its SuperNode for a new ClientApp task (Flower default 1 s; twice per round).
# The SuperLink's SuperExec keeps Flower's 1 s: it starts one ServerApp per run, and every poll costs it CPU.
TASK_POLL_INTERVAL_S = "0.1"


class DeploymentError(FedSegError):
    """A process of the local deployment failed to start, or a command failed."""


@dataclass(frozen=True)
class NodeSettings:
    """One hospital node: its identity, data, state, key and Flower options."""

    site_id: str
    datalist: Path
    state_dir: Path
    private_key: Path | None
    root_certificates: Path | None
    isolation: str = "subprocess"
    insecure: bool = False
    max_retries: int | None = None
    require_dp: bool = True
    # seconds between the node's polls (deploy/supernode.py); None: stock `flower-supernode` (3 s)
    poll_interval_s: float | None = DEFAULT_POLL_INTERVAL_S
    # CPU threads of the node's ClientApps (OMP_NUM_THREADS, as Ray sets it per virtual client); None: all cores
    threads: int | None = None
    max_epsilon: float = DEFAULT_MAX_EPSILON  # the site's privacy budget

    def site(self) -> SiteConfig:
        """The site-owned settings this node runs with (:class:`client.runtime.site_config.SiteConfig`)."""
        return SiteConfig(site_id=self.site_id, datalist=self.datalist.resolve(), state_dir=self.state_dir.resolve(),
                          max_epsilon=self.max_epsilon, require_dp=self.require_dp)

    def node_config(self) -> str:
        """The ``--node-config`` value: :meth:`site` as Flower reads it (``key=value`` pairs, TOML values)."""
        return node_config_argument(self.site().to_node_config())


class Operator:
    """The operator's ``flwr`` CLI: its own ``FLWR_HOME`` with one connection to a SuperLink.

    Shared by the process federation (:class:`LocalSuperLink`) and the compose federation
    (``deploy/compose_federation.py``), whose SuperLink runs in a container.
    """

    def __init__(self, work_dir: Path, *, address: str, ca_cert: Path | None) -> None:
        self.work_dir = Path(work_dir)
        self.address = address
        self.ca_cert = ca_cert  # None: insecure (no TLS)
        self.flwr_home = self.work_dir / "operator-flwr-home"
        self.env = flower_env(self.flwr_home)

    def write_connection(self) -> None:
        """Write ``$FLWR_HOME/config.toml`` with the connection :data:`CONNECTION` as the default."""
        write_connection(self.flwr_home, name=CONNECTION, address=self.address, ca_cert=self.ca_cert)

    def register_node(self, public_key: Path, *, name: str) -> int:
        """``flwr supernode register``: allow the node holding this key; returns its node id."""
        out = self.flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name,
                         "--format", "json"])
        try:
            return int(_last_json(out)["node-id"])
        except (KeyError, TypeError, ValueError):
            raise DeploymentError(f"`flwr supernode register {public_key}` gave no node id:\n{out}") from None

    def flwr(self, args: list[str], *, timeout_s: float = 120.0) -> str:
        """Run a ``flwr`` CLI command against this SuperLink; return its output; raise on failure."""
        result = subprocess.run(["flwr", *args], check=False, env=self.env, capture_output=True, text=True,
                                timeout=timeout_s, cwd=self.work_dir)
        if result.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed ({result.returncode}):\n"
                                  f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result.stdout

    def wait_healthy(self, *, failure: Callable[[], str | None], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the SuperLink's ``/health`` answers 200; ``failure()`` says why it never will (or None)."""
        try:
            wait_healthy(self.address, ca_cert=self.ca_cert, failure=failure, timeout_s=timeout_s)
        except SuperLinkError as exc:
            raise DeploymentError(str(exc)) from None


class LocalSuperLink:
    """A SuperLink on loopback plus the SuperNodes attached to it; stops them all."""

    def __init__(self, work_dir: Path, *, credentials: ServerCredentials | None, insecure: bool = False) -> None:
        if credentials is None and not insecure:
            raise DeploymentError("TLS credentials are required unless insecure=True (local experiments only)")
        self.work_dir = Path(work_dir)
        self.credentials = None if insecure else credentials
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.operator = Operator(self.work_dir, address=self.address,
                                 ca_cert=None if self.credentials is None else self.credentials.ca_cert)
        self.flwr_home, self.env = self.operator.flwr_home, self.operator.env
        self.logs = self.work_dir / "logs"
        self.processes: dict[str, subprocess.Popen] = {}

    # -- SuperLink -------------------------------------------------------------------------------
    def start(self) -> LocalSuperLink:
        """Start the SuperLink, wait until it answers, and write the operator's connection."""
        self.logs.mkdir(parents=True, exist_ok=True)
        command = superlink_command(port=self.port, credentials=self.credentials,
                                    database=self.work_dir / "superlink-state.db")
        process = self._spawn("superlink", command, self.env)
        self.operator.write_connection()
        try:
            self.operator.wait_healthy(failure=exited(process))
        except DeploymentError as exc:
            raise DeploymentError(f"flower-superlink: {exc}:\n{tail(self.log_path('superlink'))}") from None
        return self

    def stop(self) -> None:
        """Stop every process this object started (SuperNodes first), by PID, whole trees."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            stop_process_group(self.processes.pop(name), grace_s=10.0)

    def __enter__(self) -> LocalSuperLink:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- operator commands (flwr CLI) ------------------------------------------------------------
    def register_node(self, public_key: Path, *, name: str) -> int:
        """``flwr supernode register`` (see :meth:`Operator.register_node`)."""
        return self.operator.register_node(public_key, name=name)

    def flwr(self, args: list[str], *, timeout_s: float = 120.0) -> str:
        """A ``flwr`` CLI command against this SuperLink (see :meth:`Operator.flwr`)."""
        return self.operator.flwr(args, timeout_s=timeout_s)

    # -- SuperNodes ------------------------------------------------------------------------------
    def start_supernode(self, node: NodeSettings) -> subprocess.Popen:
        """Start Flower's SuperNode for ``node`` (and, for ``process`` isolation, its executor).

        Through ``deploy/supernode.py`` (Flower's main, shorter polls) unless ``node.poll_interval_s`` is None.
        """
        node.state_dir.mkdir(parents=True, exist_ok=True)
        runtime_port = free_port()
        command = ["flower-supernode"] if node.poll_interval_s is None else [
            sys.executable, str(Path(__file__).with_name("supernode.py")), "--poll-interval", str(node.poll_interval_s)]
        command += ["--superlink", self.address, "--node-config", node.node_config(),
                    "--isolation", node.isolation, "--port", str(runtime_port)]
        command += ["--insecure"] if node.insecure else []
        command += ["--root-certificates", str(node.root_certificates)] if node.root_certificates else []
        command += ["--auth-supernode-private-key", str(node.private_key)] if node.private_key else []
        command += ["--max-retries", str(node.max_retries)] if node.max_retries is not None else []
        env = flower_env(node.state_dir / "flwr-home")
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = TASK_POLL_INTERVAL_S
        if node.threads is not None:
            env["OMP_NUM_THREADS"] = str(node.threads)
        process = self._spawn(f"supernode-{node.site_id}", command, env)
        if node.isolation == "process":
            # run as a script so that no fedseg package is importable in it: app code comes from the FAB
            self._spawn(f"clientapp-executor-{node.site_id}", [
                sys.executable, str(Path(__file__).with_name("clientapp_executor.py")), "--insecure",
                "--runtime-api-address", f"{HOST}:{runtime_port}", "--parent-pid", str(process.pid)], env)
        return process

    def log_path(self, name: str) -> Path:
        """The log file of the process called ``name``."""
        return self.logs / f"{name}.log"

    # -- internals -------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        if name in self.processes:
            raise DeploymentError(f"a process called {name!r} is already running")
        process = spawn_logged(command, env=env, log_path=self.log_path(name), cwd=self.work_dir)
        self.processes[name] = process
        return process


def node_config_argument(values: Mapping[str, Any]) -> str:
    """``values`` in the form of Flower's ``--node-config``: space-separated ``key=value``, each value TOML."""
    import tomli_w

    return " ".join(f"{key}={tomli_w.dumps({'v': value}).partition('=')[2].strip()}" for key, value in values.items())


def _last_json(output: str) -> dict:
    """The last JSON object in a command's output (``flwr ... --format json``)."""
    start = output.rfind("\n{")
    return json.loads(output[start + 1 if start >= 0 else output.find("{"):])
