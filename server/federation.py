"""Run one federation: build the strategy, drive the rounds, write the run folder."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from server.budget_stop import BudgetStop
from server.checkpoint import Checkpoint, check_resumable, checkpoint_path, load_checkpoint, save_checkpoint
from server.export import export_final_model
from server.plan_phase import establish_plan, keep_or_write_plan_file, write_plan_file
from server.polling_grid import PollingGrid, prepare_flower
from server.rounds import evaluate_round, run_rounds
from server.run_folder import RunRecorder
from server.secagg_sum import SecAggSettings
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.local_weights import FEDERATION_ID_KEY, staying_weight_names
from shared.plan import PLAN_KEY, Plan

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from flwr.app import Context
    from flwr.serverapp import Grid

    from server.strategies.strategy import FedSegStrategy
    from shared.model_sources import ModelSource

PROGRESS_PREFIX = "[fedseg]"
#: Where a run started from (run config ``initial-model``): path, kind and sha256, written before round 1.
INITIAL_MODEL_FILE = "initial_model.json"


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


def run_federation(grid: Grid, context: Context) -> dict[str, Any]:
    """Plan (or resume), then train until round ``num-rounds``; return the summary."""
    config = RunConfig.from_mapping(context.run_config)
    run_dir = resolve_run_dir(config, context.run_id)
    recorder = RunRecorder(run_dir, config=config)
    remove_stale_spools(run_dir)
    update_latest_link(run_dir.resolve())
    strategy = build_strategy(config, recorder)
    print(f"{PROGRESS_PREFIX} run folder: {run_dir.resolve()}", flush=True)
    prepare_flower(grid)
    grid = PollingGrid(grid)
    checkpoint = resume_checkpoint(config)
    initial = open_initial_model(config, run_dir=run_dir)  # on resume too: the run folder says where it began
    recorder.initial_model = initial.provenance() if initial is not None else None
    if checkpoint is not None and checkpoint.plan:
        recorder.plan = Plan.from_json(checkpoint.plan, source=f"checkpoint of {config.resume_from}")
        keep_or_write_plan_file(run_dir, recorder.plan)
    elif initial is not None and initial.plan is not None and config.plan == "auto" and checkpoint is None:
        recorder.plan = Plan.from_dict(initial.plan, source=f"initial-model {initial.path}")
        write_plan_file(run_dir, recorder.plan, sites={})
        print(f"{PROGRESS_PREFIX} plan: the one {initial.path} was trained with", flush=True)
    else:
        recorder.plan = establish_plan(grid, config, run_dir=run_dir, known_sites=strategy.known_sites,
                                       say=lambda line: print(line, flush=True))
    strategy.message_config[PLAN_KEY] = recorder.plan.to_json()
    federation_id = (checkpoint.federation_id if checkpoint is not None else 0) or int(context.run_id)
    strategy.message_config[FEDERATION_ID_KEY] = str(federation_id)
    strategy.staying_weights = staying_weight_names(recorder.plan.model_config(), local_norm=config.local_norm,
                                                    train_layers=config.train_layers)
    arrays, first_round = starting_point(config, strategy, recorder, checkpoint, initial=initial)
    progress = ProgressPrinter(1 if config.evaluate_only else config.num_rounds, first_round=first_round)

    def close_round(server_round: int, arrays: ArrayRecord) -> Callable[[], None]:
        strategy_state, known_sites = strategy.strategy_state(), dict(strategy.known_sites)  # as of now

        def write_out() -> None:
            progress.report(recorder.end_round(server_round, arrays), recorder.rounds.get(server_round, {}))
            write_round_checkpoint(run_dir, server_round, arrays, config=config, strategy_state=strategy_state,
                                   known_sites=known_sites, recorder=recorder, federation_id=federation_id)
            print(f"{PROGRESS_PREFIX} checkpoint written: round {server_round}", flush=True)

        return write_out

    if config.evaluate_only:  # one evaluation of the given model at every site; nothing trains, no budget spent
        evaluate_round(strategy, grid, server_round=1, arrays=arrays, timeout=config.round_timeout)
        progress.report(recorder.end_round(1, arrays), recorder.rounds.get(1, {}))
    else:
        budget = BudgetStop(config=config, known_sites=strategy.known_sites) if config.patient_dp else None
        run_rounds(strategy, grid, arrays=arrays, first_round=first_round, num_rounds=config.num_rounds,
                   timeout=config.round_timeout, close_round=close_round,
                   overlap_evaluation=config.overlap_evaluation,
                   secure=SecAggSettings.from_config(config) if config.secure_aggregation else None,
                   stop_after=None if budget is None else lambda server_round: budget.after_training(
                       server_round, recorder.rounds.get(server_round, {}), grid.get_node_ids()))
        recorder.stopped = None if budget is None else budget.line
    summary = recorder.finish()
    if recorder.model_path.exists():
        export_final_model(recorder.model_path, config=config, plan=recorder.plan, rounds=recorder.rounds)
    if summary["stopped"]:
        print(f"{PROGRESS_PREFIX} {summary['stopped']}", flush=True)
    else:
        print(f"{PROGRESS_PREFIX} done: {summary['rounds']} rounds, final dice "
              f"{_fmt(summary['final_dice'])} (round 1: {_fmt(summary['first_round_dice'])})", flush=True)
    return summary


def remove_stale_spools(run_dir: Path) -> None:
    """Delete update spools a crashed server left in ``run_dir`` (they belong to no round now)."""
    for stale in run_dir.glob(".spool-*"):
        shutil.rmtree(stale, ignore_errors=True)


def resume_checkpoint(config: RunConfig) -> Checkpoint | None:
    """The checkpoint run config ``resume-from`` names, checked against this run's config (None: a fresh run)."""
    if not config.resume_from:
        return None
    path = checkpoint_path(config.resume_from)
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, config, path=path)
    return checkpoint


def open_initial_model(config: RunConfig, *, run_dir: Path) -> ModelSource | None:
    """The model run config ``initial-model`` names (None: none); its provenance goes to ``initial_model.json``."""
    from shared.atomic import atomic_write_json
    from shared.model_sources import open_model_source

    if not config.initial_model:
        return None
    source = open_model_source(config.initial_model, key_map=config.initial_model_key_map)
    atomic_write_json(run_dir / INITIAL_MODEL_FILE, source.provenance())
    print(f"{PROGRESS_PREFIX} initial model: {source.kind} {source.path} (sha256 {source.sha256[:12]}...)", flush=True)
    return source


def starting_point(config: RunConfig, strategy: FedSegStrategy, recorder: RunRecorder,
                   checkpoint: Checkpoint | None, *, initial: ModelSource | None = None) -> tuple[ArrayRecord, int]:
    """(global arrays, first round): the ``initial`` model checked against the plan's network, a fresh seeded
    model of the plan, or the state of ``checkpoint``."""
    from monai.utils import set_determinism

    from shared.model import build_model
    from shared.model_sources import fit_to_network
    from shared.weights import model_to_arrays

    if checkpoint is None and initial is not None:
        return ArrayRecord(fit_to_network(initial, recorder.plan.model_config())), 1
    if checkpoint is None:
        set_determinism(seed=config.seed)
        return model_to_arrays(build_model(recorder.plan.model_config())), 1
    strategy.load_strategy_state({name: {k: v.numpy() for k, v in moments.items()}
                                  for name, moments in checkpoint.strategy_state.items()})
    strategy.known_sites.update(checkpoint.known_sites)
    recorder.restore(checkpoint.metrics_rows)
    print(f"{PROGRESS_PREFIX} resuming from {config.resume_from} after round {checkpoint.round}", flush=True)
    return ArrayRecord(checkpoint.state_dict), checkpoint.round + 1


def write_round_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, *, config: RunConfig,
                           federation_id: int = 0,
                           strategy_state: dict[str, dict[str, np.ndarray]], known_sites: dict[int, str],
                           recorder: RunRecorder) -> Path:
    """Save everything a resumed run needs after ``server_round``.

    ``strategy_state`` and ``known_sites`` are the strategy's as the round closed
    (:meth:`~server.strategies.strategy.FedSegStrategy.strategy_state`).
    """
    import torch

    state = {name: {k: torch.from_numpy(v) for k, v in moments.items()} for name, moments in strategy_state.items()}
    checkpoint = Checkpoint(round=server_round, state_dict=dict(arrays.to_torch_state_dict()),
                            run_config=config.to_mapping(), strategy_state=state,
                            metrics_rows=recorder.written_rows, known_sites=dict(known_sites),
                            plan=recorder.plan.to_json(), federation_id=federation_id)
    return save_checkpoint(run_dir, checkpoint)


class ProgressPrinter:
    """One console line per round: sites answered, aggregated Dice, time."""

    def __init__(self, num_rounds: int, *, first_round: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.num_rounds = num_rounds
        self.first_round = first_round
        self.clock = clock
        self.started = clock()

    def report(self, row: dict[str, Any], sites: dict[str, dict[str, Any]]) -> None:
        trained = row["sites-train-ok"]
        asked = trained + row["sites-train-refused"] + row["sites-train-failed"] + row["sites-train-rejected"]
        elapsed = self.clock() - self.started
        done = row["round"] - self.first_round + 1
        remaining = elapsed / done * (self.num_rounds - row["round"])
        bounded = f" ({row['sites-train-bounded']} bounded)" if row.get("sites-train-bounded") else ""
        print(f"{PROGRESS_PREFIX} round {row['round']}/{self.num_rounds} | trained {trained}/{asked} sites"
              f"{bounded} | evaluated {row['sites-evaluate-ok']} | dice {_fmt(row['dice'])}"
              f" | train-loss {_fmt(row['train-loss'])}{_epsilon(row)} | {elapsed:.0f}s elapsed,"
              f" ~{remaining:.0f}s left",
              flush=True)
        for site, site_row in sorted(sites.items()):
            if "train-note" in site_row:
                print(f"{PROGRESS_PREFIX}   {site} bounded train: {site_row['train-note']}", flush=True)
            for phase in ("train", "evaluate"):
                if site_row.get(f"{phase}-status", "ok") != "ok":
                    print(f"{PROGRESS_PREFIX}   {site} {site_row[f'{phase}-status']} {phase}: "
                          f"{site_row.get(f'{phase}-reason', '')}", flush=True)


def _epsilon(row: dict[str, Any]) -> str:
    return "" if row.get("max-epsilon") is None else f" | max epsilon {row['max-epsilon']:.2f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
