"""Run a simulated federation end to end: make hospitals, run Flower, collect results.

This is the plain function behind ``python -m simulations``; tests call it directly.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from client.runtime.site_config import CACHE_DIR_NAME, SiteConfig
from server.checkpoint import checkpoint_path
from server.federation import PROGRESS_PREFIX, update_latest_link
from shared.config import DEFAULT_DP_DELTA, DEFAULT_MAX_EPSILON, RunConfig
from shared.datalist_task import drop_unfitting_class_names, task_from_datalists
from shared.errors import ConfigError
from shared.protocol import (
    NODE_DATALIST,
    NODE_DP_DELTA,
    NODE_FAULT,
    NODE_MAX_EPSILON,
    NODE_REQUIRE_DP,
    NODE_SITE_ID,
    NODE_STATE_DIR,
)
from simulations.baselines import run_baselines
from simulations.faults import FaultPlan
from simulations.flower_runtime import (
    Resources,
    SimulationError,
    check_machine_fits,
    check_ray_head_answers,
    cuda_devices,
    logged_exceptions,
    ray_address_parts,
    run_app,
    simulation_superlink,
)
from simulations.layout import LayoutSpec, lay_out_sites
from simulations.report import final_site_table, read_rows, site_table_text, write_report
from simulations.run_logs import write_example_overlays, write_tensorboard
from simulations.synthetic import LABELS

APP_DIR = Path(__file__).resolve().parent.parent
# Synthetic cases per hospital (smallest clinic, largest centre; sizes spread geometrically between
# them, simulations.synthetic.site_sizes) when the spec leaves them unset: 2D cases are cheap, so the
# default 2D federation has quantity skew (3 sites: 600, 190 and 60 cases) on top of its feature skew.
DEFAULT_CASES = {2: (60, 600), 3: (48, 80)}
# What the harness adds to the run config: only how the simulation runs, never what it trains (that is
# the run config's preset, the same in `flwr run` and a deployment). A simulation overlaps each round's
# evaluation with the next round's training (overlap-evaluation): same work and results, one phase end
# per round instead of two, which on a few cores is where the clients idle (BENCHMARKS.md, scale section).
HARNESS_RUN_CONFIG: dict[str, Any] = {"overlap-evaluation": True}


@dataclass(frozen=True)
class SimulationSpec:
    """What a researcher asks of one simulated federation."""

    sites: int = 3
    rounds: int = 0  # 0: the preset's num-rounds
    spatial_dims: int = 2
    seed: int = 0
    out: Path = Path("runs")
    min_cases: int | None = None
    max_cases: int | None = None
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    timeout_s: float = 0.0  # 0: as long as the run's phases may take (RunConfig.run_timeout_s)
    run_config: dict[str, Any] = field(default_factory=dict)
    datalists: tuple[Path, ...] = ()
    partition: str = "natural"
    pool_cases: int = 0
    quantity_exponent: float = 1.0
    dirichlet_alpha: float = 0.5
    sites_per_round: int = 0
    ray_address: str = ""
    stock_engine: bool = False
    baselines: tuple[str, ...] = ()
    holdout_sites: int = 0
    faults: FaultPlan = field(default_factory=FaultPlan)
    max_epsilon: float = DEFAULT_MAX_EPSILON
    dp_delta: float = DEFAULT_DP_DELTA
    site_node_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"'--sites' must be >= 1, got {self.sites!r}")
        if self.rounds < 0:
            raise ConfigError(f"'--rounds' must be >= 1 (or 0: the preset's), got {self.rounds!r}")
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
        if self.sites_per_round < 0 or self.sites_per_round > self.num_sites:
            raise ConfigError(f"'--sites-per-round' must be between 1 and the number of sites "
                              f"({self.num_sites}), got {self.sites_per_round!r}")
        if self.holdout_sites < 0 or self.num_sites < 1:
            raise ConfigError(f"'--holdout-sites' must leave at least one site to train, got {self.holdout_sites!r}")
        if not self.max_epsilon > 0:
            raise ConfigError(f"'--max-epsilon' must be > 0, got {self.max_epsilon!r}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"'--dp-delta' must be in (0, 1), got {self.dp_delta!r}")
        if not self.cpus_per_client > 0:
            raise ConfigError(f"'--cpus-per-client' must be > 0, got {self.cpus_per_client!r}")
        if not self.gpus_per_client >= 0:
            raise ConfigError(f"'--gpus-per-client' must be >= 0, got {self.gpus_per_client!r}")
        if not self.timeout_s >= 0:
            raise ConfigError(f"'--timeout' must be > 0 seconds (or 0: from the rounds), got {self.timeout_s!r}")
        if self.ray_address:
            try:
                ray_address_parts(self.ray_address)
            except ValueError as exc:
                raise ConfigError(f"'--ray-address': {exc}") from None
        self.layout()  # checks the partition options

    @property
    def num_sites(self) -> int:
        """Sites that take part: one per datalist under the natural scheme, else ``sites``."""
        if self.datalists and self.partition == "natural":
            return len(self.datalists) - self.holdout_sites
        return self.sites

    @property
    def cases_range(self) -> tuple[int, int]:
        """(fewest, most) cases at a synthetic site: as given, else the per-dimension default."""
        default_min, default_max = DEFAULT_CASES[self.spatial_dims]
        return (default_min if self.min_cases is None else self.min_cases,
                default_max if self.max_cases is None else self.max_cases)

    def layout(self) -> LayoutSpec:
        """The on-disk layout this spec asks for."""
        return LayoutSpec(scheme=self.partition, sites=self.sites + self.holdout_sites, spatial_dims=self.spatial_dims, seed=self.seed,
                          min_cases=self.cases_range[0], max_cases=self.cases_range[1], pool_cases=self.pool_cases,
                          quantity_exponent=self.quantity_exponent, dirichlet_alpha=self.dirichlet_alpha,
                          datalists=tuple(self.datalists))


def carry_site_state(previous_run: Path, run_dir: Path, site_ids: list[str]) -> list[str]:
    """Copy each site's state folder of the interrupted run into the resumed one; return the sites copied.

    A deployment's sites keep their state folders across a server restart; a resumed simulation
    does the same, so each site's privacy ledger goes on counting (a fresh ledger would let a site
    spend its budget twice) and its preprocessed-case cache is reused. Copied, not linked: the
    audit log is appended to, and the interrupted run's own record must stay as it was. The case
    cache's entries are hard-linked instead (GBs per site on real scans, and a resume would copy
    them again each time): an entry is never changed in place, only written whole and renamed.
    """
    import shutil

    previous_run = Path(previous_run)

    def copy_or_link(source: str, target: str) -> None:
        in_cache = Path(source).relative_to(previous_run / "state").parts[1] == CACHE_DIR_NAME  # <site>/cache/...
        if in_cache:
            try:
                os.link(source, target)
                return
            except OSError:  # another file system, or links not allowed: a copy serves as well
                pass
        shutil.copy2(source, target)

    carried = []
    for site_id in site_ids:
        source = previous_run / "state" / site_id
        if source.is_dir():
            shutil.copytree(source, run_dir / "state" / site_id, dirs_exist_ok=True, copy_function=copy_or_link)
            carried.append(site_id)
    return carried


def build_run_config(spec: SimulationSpec, run_dir: Path, sites_manifest: Path, *, num_sites: int) -> RunConfig:
    """The run config the harness sends: spec values over the datalists' task over per-dimension defaults."""
    values: dict[str, Any] = {"spatial-dims": spec.spatial_dims, "seed": spec.seed, "min-available-nodes": num_sites}
    if spec.rounds:
        values["num-rounds"] = spec.rounds
    if spec.sites_per_round:
        fraction = spec.sites_per_round / num_sites
        values.update({"fraction-train": fraction, "fraction-evaluate": fraction,
                       "min-train-nodes": spec.sites_per_round})
    values.update(HARNESS_RUN_CONFIG)
    values.update(task_from_datalists(spec.datalists))
    values.update(spec.run_config)
    if values.get("secure-aggregation") and "overlap-evaluation" not in spec.run_config:
        values["overlap-evaluation"] = False  # a secure round's four exchanges cannot carry an evaluation
    num_classes = values.get("num-classes", RunConfig().num_classes)
    if "class-names" not in values and num_classes == len(LABELS):
        values["class-names"] = ",".join(LABELS[k] for k in sorted(LABELS))
    drop_unfitting_class_names(values, overrides=spec.run_config)
    for key in ("resume-from", "initial-model", "initial-model-key-map"):  # the ServerApp runs elsewhere
        if values.get(key):
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    values.update({"run-dir": str(run_dir), "simulation-sites": str(sites_manifest)})
    return RunConfig.from_mapping(values)


def run_simulation(spec: SimulationSpec, *, echo: bool = True,
                   on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate the hospitals, run the federation through ``flwr run``; return ``summary.json``.

    Progress lines go to stdout when ``echo`` is true, and to ``on_progress`` if given.
    """
    resources = Resources(num_supernodes=spec.num_sites, num_cpus=spec.cpus_per_client,
                          num_gpus=spec.gpus_per_client)
    if spec.ray_address:
        check_ray_head_answers(spec.ray_address)
    else:
        check_machine_fits(resources, cpus=os.cpu_count() or 1, gpus=cuda_devices() if resources.num_gpus else 0)
    run_dir = _new_run_dir(spec.out)
    update_latest_link(run_dir)

    def say(line: str) -> None:
        if echo:
            print(line, flush=True)
        if on_progress is not None:
            on_progress(line)

    say(f"{PROGRESS_PREFIX} laying out {spec.num_sites} sites ({spec.partition}, {spec.spatial_dims}D) "
        f"under {run_dir / 'data'}")
    laid_out = lay_out_sites(spec.layout(), run_dir / "data", run_dir)
    sites, holdout = laid_out[:spec.num_sites], laid_out[spec.num_sites:]
    manifest = write_sites_manifest(run_dir, sites, faults=spec.faults.assign([site for site, _ in sites]),
                                    privacy=site_privacy(spec), overrides=spec.site_node_config)
    config = build_run_config(spec, run_dir, manifest, num_sites=len(sites))
    if config.resume_from:
        carried = carry_site_state(checkpoint_path(config.resume_from).parent, run_dir,
                                   [site for site, _ in sites + holdout])
        say(f"{PROGRESS_PREFIX} resuming: {len(carried)} site state folder(s) carried over from "
            f"{checkpoint_path(config.resume_from).parent}")
    run_config_path = run_dir / "run-config.toml"
    run_config_path.write_text(tomli_w.dumps(config.to_mapping()))
    started = time.monotonic()
    with simulation_superlink(run_dir, ray_address=spec.ray_address, stock_engine=spec.stock_engine) as env:
        run_app(APP_DIR, env, run_config=run_config_path, resources=resources, log_path=run_dir / "flower.log",
                on_line=lambda line: say(line) if PROGRESS_PREFIX in line else None,
                timeout_s=spec.timeout_s or config.run_timeout_s())
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        causes = "".join(f"\n  {cause}" for cause in logged_exceptions(run_dir / "flower.log"))
        raise SimulationError(f"the run ended without a summary; see {run_dir / 'flower.log'}"
                              + (f". It logged:{causes}" if causes else ""))
    summary = json.loads(summary_path.read_text())
    if spec.baselines or holdout:
        say(f"{PROGRESS_PREFIX} evaluating the federated model"
            f"{' and training baselines ' + ', '.join(spec.baselines) if spec.baselines else ''}"
            f"{f' (held-out sites: {len(holdout)})' if holdout else ''}")
        run_baselines(run_dir, sites, kinds=spec.baselines, holdout=holdout)
    write_tensorboard(run_dir, read_rows(run_dir))
    write_example_overlays(run_dir, sites + holdout)
    report = write_report(run_dir)
    say(f"{PROGRESS_PREFIX} finished in {time.monotonic() - started:.0f}s; run folder {run_dir}")
    say(f"{PROGRESS_PREFIX} report: {report} (and report.html)")
    say(site_table_text(final_site_table(read_rows(run_dir))))
    return summary


def site_privacy(spec: SimulationSpec) -> dict[str, Any]:
    """The privacy policy every virtual hospital gets (node config, not run config).

    Simulated sites require (patient-level) DP only when the run trains with DP-SGD, so ``--no-dp``
    baselines and hospital-level-only runs (``dp-level = "site"``) run.
    """
    dp = bool(spec.run_config.get("dp", True)) and "patient" in str(spec.run_config.get("dp-level", "patient"))
    return {NODE_MAX_EPSILON: spec.max_epsilon, NODE_DP_DELTA: spec.dp_delta, NODE_REQUIRE_DP: dp}


def write_sites_manifest(run_dir: Path, sites: list[tuple[str, Path]], *, privacy: dict[str, Any] | None = None,
                         overrides: dict[str, dict[str, Any]] | None = None,
                         faults: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``sites.json``: the node config of each virtual hospital, by partition id.

    ``privacy`` is every site's policy; ``overrides`` maps a site id to node config
    values of its own (e.g. a smaller ``max-epsilon``); ``faults`` (site id -> fault
    entry) marks the sites that misbehave on purpose.
    """
    overrides, faults = overrides or {}, faults or {}
    entries = []
    for site_id, datalist in sites:
        site = SiteConfig.from_node_config({NODE_SITE_ID: site_id, NODE_DATALIST: str(datalist),
                                            NODE_STATE_DIR: str((run_dir / "state" / site_id).resolve()),
                                            **(privacy or {})})
        entries.append({**site.to_node_config(), **overrides.get(site_id, {}),
                        **({NODE_FAULT: faults[site_id]} if site_id in faults else {})})
    path = run_dir / "sites.json"
    path.write_text(json.dumps({"sites": entries}, indent=2))
    return path


def read_sites_manifest(run_dir: Path) -> list[SiteConfig]:
    """The sites of a run folder as its nodes read them (``sites.json``, written by :func:`write_sites_manifest`)."""
    return [SiteConfig.from_node_config(entry) for entry in json.loads((Path(run_dir) / "sites.json").read_text())["sites"]]


def _new_run_dir(out: Path) -> Path:
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = (Path(out) / run_id).resolve()
    run_dir.mkdir(parents=True)
    return run_dir
