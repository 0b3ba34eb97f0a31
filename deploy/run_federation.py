"""Run a whole federation as real processes on this machine, without containers.

``python -m deploy.run_federation --sites 2 --rounds 2 --out runs/deploy``:

1. makes a CA and a SuperLink certificate for 127.0.0.1 (``server.certs``);
2. starts ``flower-superlink`` with TLS, SuperNode authentication and a
   persistent ``--database``;
3. per hospital: writes synthetic data (or uses ``--datalists``), makes the
   node's key pair (``client.commands.keygen``), registers the public key with
   ``flwr supernode register``, starts Flower's SuperNode (through
   ``deploy/supernode.py``: shorter fixed waits; one CPU share) with its own key,
   node config and state directory;
4. ``flwr run`` the fedseg app against the SuperLink and waits for the result;
5. stops every process it started, by PID, even on failure.

:func:`run_local_federation` is the plain function tests call.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from client.commands.keygen import make_node_keys
from deploy.processes import CONNECTION, DeploymentError, LocalSuperLink, NodeSettings
from deploy.supernode import DEFAULT_POLL_INTERVAL_S, PollIntervalError, parse_poll_interval
from server.certs import make_certificates
from shared.cli import exit_on_sigterm, parse_run_config
from shared.config import DEFAULT_MAX_EPSILON, RunConfig
from shared.datalist_task import drop_unfitting_class_names, task_from_datalists
from shared.errors import ConfigError, FedSegError
from shared.processes import run_streaming, tail
from shared.superlink import ServerCredentials
from simulations.synthetic import make_site_profiles, write_hospitals

APP_DIR = Path(__file__).resolve().parent.parent
ISOLATIONS = ("subprocess", "process")


@dataclass(frozen=True)
class DeploymentSpec:
    """What one local process federation runs."""

    out: Path
    sites: int = 2
    rounds: int = 0  # 0: the preset's num-rounds
    seed: int = 0
    datalists: tuple[Path, ...] = ()
    run_config: dict[str, Any] = field(default_factory=dict)
    isolation: str = "subprocess"
    poll_interval_s: float | None = DEFAULT_POLL_INTERVAL_S  # None: stock `flower-supernode` (polls every 3 s)
    node_threads: int | None = None  # CPU threads per hospital node; None: this machine's cores / sites
    insecure: bool = False
    min_cases: int = 4
    max_cases: int = 6
    timeout_s: float = 0.0  # 0: as long as the run's phases may take (RunConfig.run_timeout_s)
    max_epsilon: float = DEFAULT_MAX_EPSILON  # every hospital's privacy budget (node config max-epsilon)

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise ConfigError(f"'max_epsilon' must be > 0, got {self.max_epsilon!r}")
        if self.sites < 1 or self.rounds < 0:
            raise ConfigError(f"'sites' must be >= 1 and 'rounds' >= 1 (or 0: the preset's), "
                              f"got {self.sites}, {self.rounds}")
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"'isolation' must be one of {ISOLATIONS}, got {self.isolation!r}")
        if self.node_threads is not None and self.node_threads < 1:
            raise ConfigError(f"'node_threads' must be >= 1, got {self.node_threads}")
        if self.poll_interval_s is not None:
            try:
                parse_poll_interval(self.poll_interval_s, key="poll_interval_s")
            except PollIntervalError as exc:
                raise ConfigError(str(exc)) from None
        missing = [str(d) for d in self.datalists if not Path(d).is_file()]
        if missing:
            raise ConfigError(f"'datalists': no such file: {', '.join(missing)}")


def run_local_federation(spec: DeploymentSpec, *, echo: bool | Callable[[str], None] = True) -> dict[str, Any]:
    """Run the federation described by ``spec``; return the run's ``summary.json``.

    The work folder ``spec.out/<timestamp>`` holds ``certs/``, ``nodes/<site>/``
    (key pair, state), ``logs/`` (one log per process), ``superlink-state.db``
    and ``run/`` (the ServerApp's run folder). ``echo``: print progress lines
    (True), stay quiet (False), or pass each line to this callable.
    """
    say = echo if callable(echo) else (print if echo else (lambda *_: None))
    work_dir = (Path(spec.out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}").resolve()
    work_dir.mkdir(parents=True)
    sites = _site_datalists(spec, work_dir)
    credentials = None
    if not spec.insecure:
        paths = make_certificates(out=work_dir / "certs", hosts=["127.0.0.1", "localhost"])
        credentials = ServerCredentials(paths.ca_cert, paths.server_cert, paths.server_key)
    else:
        say("[fedseg] WARNING: insecure mode: no TLS, no node authentication (local experiments only)")
    with LocalSuperLink(work_dir, credentials=credentials, insecure=spec.insecure) as link:
        say(f"[fedseg] SuperLink on {link.address} (TLS and node auth {'off' if spec.insecure else 'on'})")
        for site_id, datalist in sites:
            link.start_supernode(_enroll(link, work_dir, site_id, datalist, spec))
            say(f"[fedseg] SuperNode {site_id} started")
        run_dir = work_dir / "run"
        _flwr_run(link, _write_run_config(spec, work_dir, run_dir, datalists=[d for _, d in sites]), spec, say)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise DeploymentError(f"the run wrote no summary; see the logs in {work_dir / 'logs'}")
    return json.loads(summary_path.read_text())


def _site_datalists(spec: DeploymentSpec, work_dir: Path) -> list[tuple[str, Path]]:
    if spec.datalists:
        return [(Path(d).stem, Path(d).resolve()) for d in spec.datalists]
    profiles = make_site_profiles(spec.sites, seed=spec.seed, min_cases=spec.min_cases, max_cases=spec.max_cases)
    datalists = write_hospitals(profiles, work_dir / "data", spatial_dims=2, seed=spec.seed)
    return [(p.site_id, d) for p, d in zip(profiles, datalists)]


def _enroll(link: LocalSuperLink, work_dir: Path, site_id: str, datalist: Path,
            spec: DeploymentSpec) -> NodeSettings:
    """What the hospital does (keygen) and the operator does (register) before the node starts."""
    node_dir = work_dir / "nodes" / site_id
    private_key = None
    if not spec.insecure:
        keys = make_node_keys(out=node_dir / "keys", comment=site_id)
        link.register_node(keys.public_key, name=site_id)
        private_key = keys.private_key
    return NodeSettings(site_id=site_id, datalist=datalist, state_dir=node_dir / "state",
                        private_key=private_key, insecure=spec.insecure, isolation=spec.isolation,
                        poll_interval_s=spec.poll_interval_s, threads=_node_threads(spec),
                        require_dp=bool(spec.run_config.get("dp", RunConfig().dp)), max_epsilon=spec.max_epsilon,
                        root_certificates=None if spec.insecure else work_dir / "certs" / "ca.crt")


def _node_threads(spec: DeploymentSpec) -> int:
    """CPU threads per node: as asked, else an equal share of this machine's cores (at least 1)."""
    if spec.node_threads is not None:
        return spec.node_threads
    sites = len(spec.datalists) or spec.sites
    return max(1, (os.cpu_count() or 1) // sites)


def _write_run_config(spec: DeploymentSpec, work_dir: Path, run_dir: Path, *, datalists: list[Path]) -> Path:
    """The run config ``flwr run`` sends: the sites' task (what their datalists declare, as the harness
    takes it) under the spec's own values."""
    num_sites = len(datalists)
    values: dict[str, Any] = {"seed": spec.seed, "min-available-nodes": num_sites, "min-train-nodes": num_sites}
    if spec.rounds:
        values["num-rounds"] = spec.rounds
    values.update(task_from_datalists(tuple(datalists)))
    values.update(spec.run_config)
    drop_unfitting_class_names(values, overrides=spec.run_config)
    values["run-dir"] = str(run_dir)
    path = work_dir / "run-config.toml"
    path.write_text(tomli_w.dumps(RunConfig.from_mapping(values).to_mapping()))
    return path


def _flwr_run(link: LocalSuperLink, run_config: Path, spec: DeploymentSpec, say: Any) -> None:
    """``flwr run --stream`` against the SuperLink; echo fedseg's progress lines; raise on failure."""
    log_path = link.log_path("flwr-run")
    command = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(run_config)]

    def on_line(line: str) -> None:
        if "[fedseg]" in line:
            say(line)

    try:
        timeout_s = spec.timeout_s or RunConfig.from_mapping(tomllib.loads(run_config.read_text())).run_timeout_s()
        code = run_streaming(command, env=link.env, log_path=log_path, on_line=on_line, timeout_s=timeout_s,
                             cwd=link.work_dir)
    except TimeoutError as exc:
        raise DeploymentError(f"the run: {exc}") from None
    if code != 0:
        raise DeploymentError(f"`flwr run` exited with code {code}; last lines of {log_path}:\n{tail(log_path)}")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m deploy.run_federation``."""
    parser = argparse.ArgumentParser(prog="python -m deploy.run_federation", description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=2, help="synthetic hospitals (ignored with --datalists)")
    parser.add_argument("--datalists", type=Path, nargs="+", default=[], help="one datalist JSON per hospital")
    parser.add_argument("--rounds", type=int, default=0,
                        help="federated rounds (default: the preset's run config num-rounds, 25 for 'default')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/deploy"))
    parser.add_argument("--isolation", choices=ISOLATIONS, default="subprocess",
                        help="SuperNode ClientApp isolation: 'process' uses a warm ClientApp executor")
    polling = parser.add_mutually_exclusive_group()
    polling.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S, metavar="S",
                         help="seconds between a SuperNode's polls when idle (deploy/supernode.py)")
    polling.add_argument("--stock-supernode", action="store_true",
                         help="run stock `flower-supernode` (Flower 1.41 polls every 3 s when idle)")
    parser.add_argument("--node-threads", type=int, metavar="N",
                        help="CPU threads per hospital node (OMP_NUM_THREADS; default: cores / sites)")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="any run-config key, e.g. --run-config local-epochs=2")
    parser.add_argument("--max-epsilon", type=float, default=DEFAULT_MAX_EPSILON, metavar="EPS",
                        help="every hospital's total privacy budget (node config max-epsilon; default: %(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="NO TLS and NO node authentication: local experiments only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m deploy.run_federation``; returns the exit code."""
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    try:
        spec = DeploymentSpec(out=args.out, sites=args.sites, rounds=args.rounds, seed=args.seed,
                              datalists=tuple(args.datalists), isolation=args.isolation, insecure=args.insecure,
                              poll_interval_s=None if args.stock_supernode else args.poll_interval,
                              node_threads=args.node_threads, max_epsilon=args.max_epsilon,
                              run_config=parse_run_config(args.run_config))
        summary = run_local_federation(spec)
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the SuperLink, SuperNodes and executors were stopped on the way out
        print("interrupted: the federation's processes were stopped", file=sys.stderr)
        return 130
    if summary.get("stopped"):  # no site could train: not a result to take for one
        print(f"error: {summary['stopped']}", file=sys.stderr)
        return 1
    print(f"[fedseg] done: {summary['rounds']} rounds, final dice {summary['final_dice']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
