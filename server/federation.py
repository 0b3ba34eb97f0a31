"""Run one federation: build the strategy, drive the rounds, write the run folder."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from server.run_folder import RunRecorder
from server.strategy import SiteTrackingFedAvg
from shared.config import RunConfig

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid

PROGRESS_PREFIX = "[fedseg]"


def resolve_run_dir(config: RunConfig, run_id: int) -> Path:
    """The folder this run writes to: run config ``run-dir``, else ``runs/<run id>``."""
    if config.run_dir:
        return Path(config.run_dir).expanduser()
    return Path("runs") / str(run_id)


def update_latest_link(run_dir: Path) -> None:
    """Point ``<runs>/latest`` at ``run_dir`` (replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def build_strategy(config: RunConfig, recorder: RunRecorder) -> SiteTrackingFedAvg:
    """The strategy named by run config ``strategy``."""
    return SiteTrackingFedAvg(
        recorder=recorder,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_train_nodes,
        min_available_nodes=config.min_available_nodes,
    )


def run_federation(grid: Grid, context: Context) -> dict[str, Any]:
    """Train for ``num-rounds`` rounds and return the run summary."""
    from monai.utils import set_determinism

    from shared.model import build_unet
    from shared.weights import model_to_arrays

    config = RunConfig.from_mapping(context.run_config)
    run_dir = resolve_run_dir(config, context.run_id)
    recorder = RunRecorder(run_dir, config=config)
    update_latest_link(run_dir.resolve())
    set_determinism(seed=config.seed)
    initial = model_to_arrays(build_unet(config.model_config()))
    progress = ProgressPrinter(config.num_rounds)
    print(f"{PROGRESS_PREFIX} run folder: {run_dir.resolve()}", flush=True)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            progress.report(recorder.end_round(server_round, arrays), recorder.rounds.get(server_round, {}))
        return None

    build_strategy(config, recorder).start(
        grid=grid, initial_arrays=initial, num_rounds=config.num_rounds,
        timeout=config.round_timeout, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
        evaluate_fn=after_round,
    )
    summary = recorder.finish()
    print(f"{PROGRESS_PREFIX} done: {summary['rounds']} rounds, final dice "
          f"{_fmt(summary['final_dice'])} (round 1: {_fmt(summary['first_round_dice'])})", flush=True)
    return summary


class ProgressPrinter:
    """One console line per round: sites answered, aggregated Dice, time."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds
        self.started = time.monotonic()

    def report(self, row: dict[str, Any], sites: dict[str, dict[str, Any]]) -> None:
        trained = row["sites-train-ok"]
        asked = trained + row["sites-train-refused"] + row["sites-train-failed"]
        elapsed = time.monotonic() - self.started
        remaining = elapsed / row["round"] * (self.num_rounds - row["round"])
        print(f"{PROGRESS_PREFIX} round {row['round']}/{self.num_rounds} | trained {trained}/{asked} sites"
              f" | evaluated {row['sites-evaluate-ok']} | dice {_fmt(row['dice'])}"
              f" | train-loss {_fmt(row['train-loss'])}{_epsilon(row)} | {elapsed:.0f}s elapsed,"
              f" ~{remaining:.0f}s left",
              flush=True)
        for site, site_row in sorted(sites.items()):
            for phase in ("train", "evaluate"):
                if site_row.get(f"{phase}-status", "ok") != "ok":
                    print(f"{PROGRESS_PREFIX}   {site} {site_row[f'{phase}-status']} {phase}: "
                          f"{site_row.get(f'{phase}-reason', '')}", flush=True)


def _epsilon(row: dict[str, Any]) -> str:
    return "" if row.get("max-epsilon") is None else f" | max epsilon {row['max-epsilon']:.2f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
