"""Start a ``flower-superlink`` on loopback, point a ``flwr`` home at it, wait until it serves.

The one way fedseg does it: the simulation harness (``--simulation``, insecure,
loopback only; ``simulations/flower_runtime.py``) and the process deployment
(TLS, SuperNode authentication, a persistent ``--database``;
``deploy/processes.py``) both build the command, write the connection and wait
for ``/health`` here, and stop the process with
:func:`shared.processes.stop_process_group`.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FedSegError
from shared.processes import stopped_with_parent

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0


class SuperLinkError(FedSegError):
    """The SuperLink did not start, or stopped answering its health check."""


@dataclass(frozen=True)
class ServerCredentials:
    """The SuperLink's TLS files (from ``python -m server certs``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_command(*, port: int, credentials: ServerCredentials | None, simulation: bool = False,
                      database: Path | None = None) -> list[str]:
    """``flower-superlink`` on :data:`HOST`:``port``: with ``credentials`` TLS and SuperNode authentication,
    else insecure; ``simulation``: it runs the simulation engine; ``database``: state that survives restarts."""
    command = ["flower-superlink", "--host", HOST, "--port", str(port), "--disable-runtime-dependency-installation"]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    if database is not None:
        command += ["--database", str(database)]
    if credentials is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(credentials.ca_cert), "--ssl-certfile", str(credentials.server_cert),
            "--ssl-keyfile", str(credentials.server_key), "--enable-supernode-auth"]


def spawn_logged(command: list[str], *, env: dict[str, str], log_path: Path,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a session of its own, output appended to ``log_path``, stopped when we die."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd, preexec_fn=stopped_with_parent())  # noqa: PLW1509 - prctl only


def write_connection(flwr_home: Path, *, name: str, address: str, ca_cert: Path | None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with the one connection ``name`` (the default) to ``address``;
    ``ca_cert`` None: insecure (no TLS)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = "insecure = true" if ca_cert is None else f'root-certificates = "{Path(ca_cert).resolve()}"'
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')


def wait_healthy(address: str, *, ca_cert: Path | None, failure: Callable[[], str | None],
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the SuperLink at ``address`` answers ``/health`` with 200 (over TLS when ``ca_cert``).

    Raises
    ------
    SuperLinkError
        As soon as ``failure()`` says why it never will (e.g. the process exited), or after ``timeout_s``.
    """
    scheme = "http" if ca_cert is None else "https"
    context = None if ca_cert is None else ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        problem = failure()
        if problem:
            raise SuperLinkError(problem)
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SuperLinkError(f"the SuperLink at {address} is not healthy after {timeout_s:.0f} s")


def exited(process: subprocess.Popen) -> Callable[[], str | None]:
    """A ``failure`` for :func:`wait_healthy`: says so once ``process`` has exited."""
    return lambda: None if process.poll() is None else f"exited with code {process.returncode}"
