"""Run folders for the dashboard tests, written by the server's own writers (RunRecorder, plan.json, checkpoint).

Three sites; ``hospital-03`` refuses every round with :data:`REFUSAL`. Rounds
are added one at a time with :func:`close_round`, so a test can grow a run
folder while the dashboard watches it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from server.checkpoint import Checkpoint, save_checkpoint
from server.export import export_final_model
from server.plan_phase import write_plan_file
from server.run_folder import RunRecorder
from server.site_replies import SortedReplies
from shared.atomic import atomic_write_json
from tests.conftest import tiny_config_with, tiny_plan

SITES = ("hospital-01", "hospital-02", "hospital-03")
REFUSAL = "DataError: case_001.nii.gz: file listed in hospital-03.json (training[0]) does not exist"
BUDGET = 8.0


def start_run(run_dir: Path, *, num_rounds: int = 3) -> RunRecorder:
    """A run folder with its plan (each site's fingerprint outcome and DP outlook) and no round yet."""
    config = tiny_config_with({"num-rounds": num_rounds, "dp": True, "class-names": "background,lesion"})
    recorder = RunRecorder(run_dir, config=config, plan=tiny_plan())
    outlook = {"cases": 4, "epsilon": BUDGET, "delta": 1e-5, "noise_multiplier": 1.2, "noise_ratio": 4.0,
               "learnable": True}
    sites: dict[str, Any] = {site: {"status": "ok", "cases": 4, "dp": outlook} for site in SITES[:2]}
    sites[SITES[2]] = {"status": "refused", "reason": REFUSAL}
    write_plan_file(run_dir, recorder.plan, sites=sites, pooled={"cases": 8, "sites": list(SITES[:2])},
                    notes=["the plan's patch covers the median image"])
    return recorder


def close_round(recorder: RunRecorder, server_round: int, *, refusal: str = REFUSAL) -> None:
    """Record one round (two sites train and evaluate, the third refuses both) and write it out."""
    import torch
    from flwr.app import ArrayRecord

    dice = 0.2 * server_round
    trained = {site: {"num-examples": 4, "train-loss": 1.0 / server_round, "epsilon": 2.0 * server_round,
                      "epsilon-round": 2.0, "dp": 1} for site in SITES[:2]}
    evaluated = {site: {"num-examples": 2, "dice": dice + 0.05 * k, "dice-class-1": dice + 0.05 * k,
                        "hd95": 20.0 / server_round, "hd95-class-1": 20.0 / server_round}
                 for k, site in enumerate(SITES[:2])}
    recorder.record_phase(server_round, "train", SortedReplies(site_metrics=trained, refused={SITES[2]: refusal}))
    recorder.record_phase(server_round, "evaluate", SortedReplies(site_metrics=evaluated,
                                                                  refused={SITES[2]: refusal}))
    # the dashboard never rebuilds the network: one tensor makes a valid model file and keeps MONAI out
    arrays = ArrayRecord({"weight": torch.full((4,), float(server_round))})
    recorder.end_round(server_round, arrays)
    save_checkpoint(recorder.run_dir, Checkpoint(round=server_round, state_dict=dict(arrays.to_torch_state_dict()),
                                                 run_config=recorder.config.to_mapping(),
                                                 metrics_rows=recorder.written_rows, plan=recorder.plan.to_json()))


def finished_run(run_dir: Path, *, num_rounds: int = 2) -> Path:
    """A complete run folder: every round, summary, final model, baselines.json and a report page."""
    recorder = start_run(run_dir, num_rounds=num_rounds)
    for server_round in range(1, num_rounds + 1):
        close_round(recorder, server_round)
    recorder.finish()
    export_final_model(recorder.model_path, config=recorder.config, plan=recorder.plan, rounds=recorder.rounds)
    score = {"cases": 2, "dice": 0.6, "dice-ci": [0.5, 0.7], "hd95": 9.0, "hd95-ci": [8.0, 10.0]}
    atomic_write_json(run_dir / "baselines.json", {
        "federated": {site: score for site in SITES[:2]}, "holdout": [], "steps": 4,
        "pooled": {site: {**score, "dice": 0.7} for site in SITES[:2]},
        "local": {site: {other: {**score, "dice": 0.5} for other in SITES[:2]} for site in SITES[:2]}})
    (run_dir / "report.html").write_text("<!doctype html><title>report</title><h1>fedseg run report</h1>\n")
    return run_dir


def folder_state(path: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``path`` with its sha256 and mtime: equal before and after means nothing was written."""
    return {str(f.relative_to(path)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*")) if f.is_file()}


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
