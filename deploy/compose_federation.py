"""Run ``deploy/compose/compose.yaml`` as shipped: a SuperLink and two hospitals in containers, one run.

``python -m deploy.compose_federation --rounds 2 --out runs/compose`` (as root, with Podman; the
images built by ``python -m deploy.images build``) does what the operator and the hospitals do in
``deploy/README.md``, in a work folder holding a copy of the compose file:

1. ``certs/`` from ``server certs`` (hosts ``superlink`` and ``localhost``), ``keys/<hospital>/`` from
   ``client keygen``, synthetic data in ``data/<hospital>/``, an empty ``runs/``; the files the
   containers read or write are given to the images' user (uid 49999);
2. ``podman-compose up -d superlink``, waits for ``/health`` over TLS, registers both hospitals' public
   keys with ``flwr supernode register``, then brings up the hospitals and their ClientApp executors;
3. ``flwr run`` of the fedseg app; reads the run folder and each hospital's state volume (egress audit
   log, privacy ledger);
4. every container's output (engine timestamps) to ``logs/<service>.log``, then ``podman-compose down
   --volumes``, also on failure: no container or volume is left.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from client.commands.keygen import make_node_keys
from deploy.images import IMAGES, Podman
from deploy.processes import CONNECTION, DeploymentError, Operator
from server.certs import make_certificates
from shared.cli import exit_on_sigterm
from shared.config import RunConfig
from shared.errors import FedSegError
from shared.processes import free_port, run_streaming, tail
from simulations.synthetic import make_site_profiles, write_site

APP_DIR = Path(__file__).resolve().parent.parent
COMPOSE_FILE = APP_DIR / "deploy" / "compose" / "compose.yaml"
PROJECT = "fedseg"  # the compose file's `name`; each federation here runs as PROJECT-<random> (see ComposeFederation)
HOSPITALS = ("hospital-a", "hospital-b")
APP_UID = 49999  # the images' user `app` (Flower's official images and deploy/base/flwr-base.Dockerfile)
STATE_FILES = ("egress-audit.jsonl", "privacy-ledger.json")
# podman-compose from this Python (requirements.txt; Debian's 1.0.3 mishandles `network_mode: service:`)
COMPOSE_COMMAND = (sys.executable, "-m", "podman_compose", "-f", "compose.yaml")


@dataclass(frozen=True)
class ComposeResult:
    """What a compose federation left: the run folder's files and each hospital's state files."""

    summary: dict[str, Any]
    run_dir: Path  # the ServerApp's run folder (the SuperLink's bind-mounted runs/<run-id>)
    state_dirs: dict[str, Path]  # hospital -> copy of the files of STATE_FILES its state volume held
    containers: dict[str, dict[str, str]]  # container -> {"uid": ..., "root_fs": "read-only" or "writable"}
    seconds: float
    leftovers: list[str] = field(default_factory=list)  # containers/volumes still there after `down`


def prepare_work_dir(work: Path, *, seed: int = 0, min_cases: int = 4, max_cases: int = 6) -> None:
    """The compose file's folder as an operator and two hospitals set it up (step 1 above)."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(COMPOSE_FILE, work / "compose.yaml")
    paths = make_certificates(out=work / "certs", hosts=["superlink", "localhost", "127.0.0.1"])
    os.chown(paths.server_key, APP_UID, -1)  # 0600, read by the SuperLink's user only
    profiles = make_site_profiles(len(HOSPITALS), seed=seed, min_cases=min_cases, max_cases=max_cases)
    for hospital, profile in zip(HOSPITALS, profiles):
        keys = make_node_keys(out=work / "keys" / hospital, comment=hospital)
        for path in (keys.private_key, keys.private_key.parent):  # 0600 key in a 0700 folder
            os.chown(path, APP_UID, -1)
        write_site(profile, work / "data" / hospital, spatial_dims=2, seed=seed)
    (work / "runs").mkdir()
    os.chown(work / "runs", APP_UID, APP_UID)


class ComposeFederation:
    """``podman-compose`` on a prepared work folder; :meth:`down` removes every container and volume."""

    def __init__(self, work: Path, podman: Podman, *, port: int = 0, node_threads: int | None = None) -> None:
        self.work = Path(work)
        self.podman = podman
        # A project name of its own (podman-compose would take the folder's name, not the file's `name`): every
        # container, volume, pod and network is named after it, and networks are shared by every Podman storage
        # on the host, so two federations called `fedseg` at once joined one network (a hospital reached the
        # other federation's SuperLink, whose certificate it rejected) and the first `down` removed it.
        self.project = f"{PROJECT}-{secrets.token_hex(3)}"
        self.port = port or free_port()
        self.operator = Operator(self.work, address=f"localhost:{self.port}", ca_cert=self.work / "certs" / "ca.crt")
        # the hospitals share this host: an equal share of its cores each, as deploy.run_federation gives
        threads = node_threads or max(1, (os.cpu_count() or 1) // len(HOSPITALS))
        self.env = {**podman.env, "FEDSEG_SUPERLINK_PORT": str(self.port), "FEDSEG_NODE_THREADS": str(threads)}

    def compose(self, args: list[str], *, timeout_s: float = 300.0) -> str:
        """Run ``podman-compose ARGS`` in the work folder; raise :class:`DeploymentError` on failure."""
        result = subprocess.run([*COMPOSE_COMMAND, "-p", self.project, *args], check=False, cwd=self.work,
                                env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise DeploymentError(f"`podman-compose {' '.join(args)}` failed ({result.returncode}):\n"
                                  f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result.stdout

    def start(self) -> None:
        """Step 2: the SuperLink, the hospitals' registration, then the hospitals and their executors."""
        self.compose(["up", "-d", "--no-build", "superlink"])
        self.operator.write_connection()
        try:
            self.operator.wait_healthy(failure=lambda: None)
        except DeploymentError as exc:
            raise DeploymentError(f"{exc}\n{self.logs('superlink')}") from None
        for hospital in HOSPITALS:
            self.operator.register_node(self.work / "keys" / hospital / "supernode_key.pub", name=hospital)
        self.compose(["up", "-d", "--no-build"])

    def logs(self, service: str, *, lines: int = 40) -> str:
        """The last lines a service's container printed."""
        result = subprocess.run(["podman", "logs", "--tail", str(lines), f"{self.project}_{service}_1"], check=False,
                                env=self.env, capture_output=True, text=True)
        return f"--- {service} ---\n{result.stdout}{result.stderr}"

    def copy_state(self, hospital: str) -> Path:
        """Copy the files of :data:`STATE_FILES` from the hospital's state volume to ``state-copy/<hospital>``."""
        mountpoint = Path(self.podman.run(["volume", "inspect", "--format", "{{.Mountpoint}}",
                                           f"{self.project}_{hospital}-state"]).strip())
        out = self.work / "state-copy" / hospital
        out.mkdir(parents=True)
        for name in STATE_FILES:
            if (mountpoint / name).is_file():
                shutil.copy(mountpoint / name, out / name)
        return out

    def container_checks(self) -> dict[str, dict[str, str]]:
        """Per running container: the uid its processes run as, and whether its root filesystem is writable."""
        names = self.podman.run(["ps", "--filter", f"label=io.podman.compose.project={self.project}",
                                 "--format", "{{.Names}}"]).split()
        probe = "id -u; touch /app/.probe 2>/dev/null && echo writable || echo read-only"
        checks = {}
        for name in names:
            uid, root_fs = (self.podman.run(["exec", name, "sh", "-c", probe], check=False).split() + ["?", "?"])[:2]
            checks[name] = {"uid": uid, "root_fs": root_fs}
        return checks

    def save_logs(self) -> None:
        """Every container's output, with the engine's timestamps, to ``logs/<service>.log`` (as run_federation)."""
        names = self.podman.run(["ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                                  "--format", "{{.Names}}"], check=False).split()
        (self.work / "logs").mkdir(exist_ok=True)
        for name in names:
            result = subprocess.run(["podman", "logs", "--timestamps", name], check=False, env=self.env,
                                    capture_output=True, text=True)
            service = name.removeprefix(f"{self.project}_").removesuffix("_1")
            (self.work / "logs" / f"{service}.log").write_text(result.stdout + result.stderr)

    def down(self) -> list[str]:
        """Save the containers' logs, then remove every container, network and volume of the project.

        Returns what is still there afterwards.
        """
        self.save_logs()
        subprocess.run([*COMPOSE_COMMAND, "-p", self.project, "down", "--volumes", "-t", "10"], check=False,
                       cwd=self.work, env=self.env, capture_output=True, timeout=300)
        # podman-compose leaves the project's network behind
        self.podman.run(["network", "rm", f"{self.project}_default"], check=False)
        label = f"label=io.podman.compose.project={self.project}"
        left = self.podman.run(["ps", "-a", "--filter", label, "--format", "{{.Names}}"], check=False).split()
        left += self.podman.run(["volume", "ls", "--filter", label, "--format", "{{.Name}}"], check=False).split()
        left += self.podman.run(["network", "ls", "--filter", f"name={self.project}_", "--format", "{{.Name}}"],
                                check=False).split()
        return left


def run_compose_federation(work: Path, podman: Podman, *, rounds: int = 2, run_config: dict[str, Any] | None = None,
                           seed: int = 0, cases: tuple[int, int] = (4, 6), node_threads: int | None = None,
                           say: Any = print) -> ComposeResult:
    """Steps 1-4 of the module docstring in ``work`` (a new folder); the images must exist.

    ``seed`` and ``cases`` (fewest, most per hospital): the synthetic hospitals, as in
    ``deploy.run_federation``, so that both runners can train on the same sites. ``node_threads``:
    each hospital's training threads (the compose file's ``FEDSEG_NODE_THREADS``; default: this
    machine's cores / hospitals).
    """
    missing = [tag for tag in IMAGES.values() if not podman.exists(tag)]
    if missing:
        raise DeploymentError(f"images not built: {', '.join(missing)} (python -m deploy.images build)")
    start = time.monotonic()
    prepare_work_dir(work, seed=seed, min_cases=cases[0], max_cases=cases[1])
    federation = ComposeFederation(work, podman, node_threads=node_threads)
    try:
        federation.start()
        say(f"[fedseg] compose federation up (SuperLink on localhost:{federation.port}, TLS and node auth on)")
        containers = federation.container_checks()
        _flwr_run(federation, _run_config(work, rounds, seed, run_config or {}), say)
        runs = sorted(p for p in (work / "runs").iterdir() if p.is_dir() and not p.is_symlink())
        if not runs or not (runs[-1] / "summary.json").is_file():
            raise DeploymentError(f"the run wrote no summary.json under {work / 'runs'}\n"
                                  + "\n".join(federation.logs(s) for s in ("superlink", *HOSPITALS)))
        summary = json.loads((runs[-1] / "summary.json").read_text())
        state_dirs = {hospital: federation.copy_state(hospital) for hospital in HOSPITALS}
        seconds = time.monotonic() - start
    finally:
        leftovers = federation.down()
    return ComposeResult(summary=summary, run_dir=runs[-1], state_dirs=state_dirs, containers=containers,
                         seconds=seconds, leftovers=leftovers)


def _run_config(work: Path, rounds: int, seed: int, overrides: dict[str, Any]) -> Path:
    values = {"num-rounds": rounds, "seed": seed, "min-available-nodes": len(HOSPITALS), "min-train-nodes": len(HOSPITALS),
              **overrides}
    path = work / "run-config.toml"
    path.write_text(tomli_w.dumps(RunConfig.from_mapping(values).to_mapping()))
    return path


def _flwr_run(federation: ComposeFederation, run_config: Path, say: Any) -> None:
    log_path = federation.work / "flwr-run.log"
    command = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(run_config)]
    timeout_s = RunConfig.from_mapping(tomllib.loads(run_config.read_text())).run_timeout_s()
    try:
        code = run_streaming(command, env=federation.operator.env, log_path=log_path, timeout_s=timeout_s,
                             on_line=lambda line: say(line) if "[fedseg]" in line else None, cwd=federation.work)
    except TimeoutError as exc:
        raise DeploymentError(f"the run: {exc}") from None
    if code != 0:
        raise DeploymentError(f"`flwr run` exited with code {code}; last lines of {log_path}:\n{tail(log_path)}\n"
                              + "\n".join(federation.logs(s) for s in ("superlink", *HOSPITALS)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m deploy.compose_federation``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m deploy.compose_federation", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/compose"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # the `finally` below takes the containers and volumes down
    work = (args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    try:
        result = run_compose_federation(work, Podman.configured(conf_dir=work / "engine"), rounds=args.rounds)
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[fedseg] done in {result.seconds:.0f} s: {result.summary.get('rounds')} rounds; work folder {work}")
    return 1 if result.leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
