"""Run a simulated federation end to end: make hospitals, run Flower, collect results.

This is the plain function behind ``python -m simulations``; tests call it directly.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from server.federation import PROGRESS_PREFIX, update_latest_link
from shared.config import RunConfig
from shared.errors import ConfigError
from simulations.flower_runtime import Resources, run_app, simulation_superlink
from simulations.synthetic import make_site_profiles, write_hospitals

APP_DIR = Path(__file__).resolve().parent.parent
# Synthetic cases per hospital (fewest, most) when the spec leaves them unset: 2D cases are
# cheap, and DP-SGD needs hundreds of cases per step (build_run_config).
DEFAULT_CASES = {2: (400, 600), 3: (48, 80)}


@dataclass(frozen=True)
class SimulationSpec:
    """What a researcher asks of one simulated federation."""

    sites: int = 3
    rounds: int = 5
    spatial_dims: int = 2
    seed: int = 0
    out: Path = Path("runs")
    min_cases: int | None = None
    max_cases: int | None = None
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    timeout_s: float = 3600.0
    run_config: dict[str, Any] = field(default_factory=dict)
    datalists: tuple[Path, ...] = ()
    max_epsilon: float = 8.0
    dp_delta: float = 1e-5
    site_node_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sites", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'--{name}' must be >= 1, got {getattr(self, name)!r}")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"'--spatial-dims' must be 2 or 3, got {self.spatial_dims!r}")
        if self.datalists:
            ids = [Path(d).stem for d in self.datalists]
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ConfigError(f"'--datalists': site ids come from file names and must differ: {duplicates}")
            missing = [str(d) for d in self.datalists if not Path(d).is_file()]
            if missing:
                raise ConfigError(f"'--datalists': no such file: {', '.join(missing)}")
        if not self.max_epsilon > 0:
            raise ConfigError(f"'--max-epsilon' must be > 0, got {self.max_epsilon!r}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"'--dp-delta' must be in (0, 1), got {self.dp_delta!r}")
        if self.cpus_per_client <= 0:
            raise ConfigError(f"'--cpus-per-client' must be > 0, got {self.cpus_per_client!r}")


def build_run_config(spec: SimulationSpec, run_dir: Path, sites_manifest: Path, *, num_sites: int) -> RunConfig:
    """The run config the harness sends: spec values over per-dimension defaults."""
    values: dict[str, Any] = {"num-rounds": spec.rounds, "spatial-dims": spec.spatial_dims,
                              "seed": spec.seed, "min-available-nodes": num_sites}
    # DP-SGD's noise per step is ~ noise * clip * sqrt(#weights) / cases-per-step, so the
    # default federation is built for it, with and without DP alike: 400-600 cases per site,
    # batches of 128 cases (DP sample rate 1/3 or 1/4), a small U-Net (8-16-32, ~12k weights),
    # plain SGD with momentum at lr 0.2 (Adam amplifies noise-only coordinates), 4 local epochs,
    # and the noise an Opacus RDP accountant needs for epsilon <= 8 (delta 1e-5) after 5 rounds
    # at sample rate 1/3 over 12 steps a round (BENCHMARKS.md).
    values.update({"channels": "8,16,32", "strides": "2,2", "batch-size": 128, "local-epochs": 4,
                   "optimizer": "sgd", "learning-rate": 0.2, "dp-noise-multiplier": 1.9})
    if spec.spatial_dims == 3:
        values.update({"patch-size": 32, "channels": "8,16,32", "strides": "2,2", "batch-size": 2,
                       "local-epochs": 3, "optimizer": "adam", "learning-rate": 0.005,
                       "dp-noise-multiplier": 1.7})
    values.update(spec.run_config)
    values.update({"run-dir": str(run_dir), "simulation-sites": str(sites_manifest)})
    return RunConfig.from_mapping(values)


def run_simulation(spec: SimulationSpec, *, echo: bool = True) -> dict[str, Any]:
    """Generate the hospitals, run the federation through ``flwr run``; return ``summary.json``."""
    run_dir = _new_run_dir(spec.out)
    update_latest_link(run_dir)
    say = print if echo else (lambda *_: None)
    sites = _site_datalists(spec, run_dir, say)
    manifest = write_sites_manifest(run_dir, sites, privacy=site_privacy(spec), overrides=spec.site_node_config)
    config = build_run_config(spec, run_dir, manifest, num_sites=len(sites))
    run_config_path = run_dir / "run-config.toml"
    run_config_path.write_text(tomli_w.dumps(config.to_mapping()))
    resources = Resources(num_supernodes=len(sites), num_cpus=spec.cpus_per_client, num_gpus=spec.gpus_per_client)
    started = time.monotonic()
    with simulation_superlink(run_dir) as env:
        run_app(APP_DIR, env, run_config=run_config_path, resources=resources, log_path=run_dir / "flower.log",
                on_line=lambda line: say(line) if PROGRESS_PREFIX in line else None, timeout_s=spec.timeout_s)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise ConfigError(f"the run wrote no summary: see {run_dir / 'flower.log'}")
    summary = json.loads(summary_path.read_text())
    say(f"{PROGRESS_PREFIX} finished in {time.monotonic() - started:.0f}s; run folder {run_dir}")
    return summary


def _site_datalists(spec: SimulationSpec, run_dir: Path, say: Any) -> list[tuple[str, Path]]:
    """(site id, datalist) per virtual hospital: the given datalists, else synthetic ones."""
    if spec.datalists:
        say(f"{PROGRESS_PREFIX} {len(spec.datalists)} sites from datalists")
        return [(Path(d).stem, Path(d)) for d in spec.datalists]
    say(f"{PROGRESS_PREFIX} writing {spec.sites} synthetic hospitals ({spec.spatial_dims}D) to {run_dir / 'data'}")
    default_min, default_max = DEFAULT_CASES[spec.spatial_dims]
    profiles = make_site_profiles(spec.sites, seed=spec.seed,
                                  min_cases=default_min if spec.min_cases is None else spec.min_cases,
                                  max_cases=default_max if spec.max_cases is None else spec.max_cases)
    datalists = write_hospitals(profiles, run_dir / "data", spatial_dims=spec.spatial_dims, seed=spec.seed)
    return [(p.site_id, d) for p, d in zip(profiles, datalists)]


def site_privacy(spec: SimulationSpec) -> dict[str, Any]:
    """The privacy policy every virtual hospital gets (node config, not run config).

    Simulated sites require DP only when the run uses it, so ``--no-dp`` baselines run.
    """
    dp = bool(spec.run_config.get("dp", True))
    return {"max-epsilon": spec.max_epsilon, "dp-delta": spec.dp_delta, "require-dp": dp}


def write_sites_manifest(run_dir: Path, sites: list[tuple[str, Path]], *, privacy: dict[str, Any] | None = None,
                         overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``sites.json``: the node config of each virtual hospital, by partition id.

    ``privacy`` is every site's policy; ``overrides`` maps a site id to node config
    values of its own (e.g. a smaller ``max-epsilon``).
    """
    overrides = overrides or {}
    entries = [{"site-id": site_id, "datalist": str(datalist.resolve()),
                "state-dir": str((run_dir / "state" / site_id).resolve()), **(privacy or {}),
                **overrides.get(site_id, {})} for site_id, datalist in sites]
    path = run_dir / "sites.json"
    path.write_text(json.dumps({"sites": entries}, indent=2))
    return path


def _new_run_dir(out: Path) -> Path:
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = (Path(out) / run_id).resolve()
    run_dir.mkdir(parents=True)
    return run_dir
