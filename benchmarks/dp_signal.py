"""Benchmark (issues 19, 21): DP-SGD's signal against its noise, per site and per trained part of a model.

DP-SGD clips each case's gradient to ``C`` (run config ``dp-max-grad-norm``) and adds
Gaussian noise of ``sigma * C`` per weight to the batch's sum: on the averaged gradient,
``sigma * C / B`` per weight, ``sigma * C / B * sqrt(d)`` over ``d`` trained weights. This
measures, at each site of a finished (or running) federation and for the model given, the
per-case gradient norms and the norm of the mean clipped gradient (the signal a DP step keeps)
for each ``train-layers`` choice, next to that noise at the run's own noise multiplier and batch.
Over ``T`` steps the signal adds up as ``T`` and the noise as ``sqrt(T)``; their ratio after
``T`` steps (``signal-to-noise``) says whether DP-SGD can move that part at all (well below 1:
the run's updates are mostly noise).

Usage (a run folder of the harness, whose ``state/<site>/cache`` holds the preprocessed cases)::

    .venv/bin/python -m benchmarks.dp_signal --run benchmarks/out/transfer/target-dp-pretrained-norm/latest \\
        --model benchmarks/out/transfer/pretrain/latest/global_model.pt --cases 24
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

PARTS = ("norm", "decoder+norm", "all")


def gradient_signal(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: Any, *,
                    parts: Mapping[str, list[str]], clip: float) -> dict[str, dict[str, float]]:
    """Per-case gradient norms and the norm of the mean clipped gradient, for each named set of weights.

    Each batch is one case (image, label); ``parts`` maps a name to the parameter names it trains;
    ``clip`` is DP-SGD's per-case clipping norm (applied over each part's weights, as DP-SGD clips
    the weights it trains).
    """
    params = dict(model.named_parameters())
    sums = {part: {name: torch.zeros_like(params[name]) for name in names} for part, names in parts.items()}
    norms: dict[str, list[float]] = {part: [] for part in parts}
    for image, label in batches:
        model.zero_grad()
        loss_fn(model(image), label).backward()
        for part, names in parts.items():
            norm = math.sqrt(sum(float((params[n].grad ** 2).sum()) for n in names if params[n].grad is not None))
            norms[part].append(norm)
            scale = min(1.0, clip / max(norm, 1e-12))
            for name in names:
                if params[name].grad is not None:
                    sums[part][name] += params[name].grad * scale
    result = {}
    for part, names in parts.items():
        cases = len(norms[part])
        mean = math.sqrt(sum(float(((acc / cases) ** 2).sum()) for acc in sums[part].values()))
        result[part] = {"weights": sum(params[n].numel() for n in names), "median-norm": float(np.median(norms[part])),
                        "p90-norm": float(np.percentile(norms[part], 90)), "mean-clipped-norm": mean}
    return result


def signal_to_noise(signal: Mapping[str, float], *, noise_multiplier: float, batch_size: int, clip: float,
                    steps: int) -> float:
    """After ``steps`` DP-SGD steps: the summed mean clipped gradient over the summed noise (both as norms)."""
    noise_per_step = noise_multiplier * clip / batch_size * math.sqrt(signal["weights"])
    return steps * signal["mean-clipped-norm"] / (math.sqrt(steps) * noise_per_step)


def run(run_dir: Path, model_path: Path, *, cases: int, seed: int) -> dict[str, Any]:
    """Each site's :func:`gradient_signal` and, if the run trained with DP, the signal-to-noise after all of its
    steps at its noise multiplier and batch (the site's first DP row in ``metrics.jsonl``)."""
    from client.data.loading import training_loader
    from client.data.site_data import load_training_cases
    from client.training.local import make_loss
    from shared.config import RunConfig
    from shared.local_weights import frozen_weight_names
    from shared.model_file import load_model
    from shared.plan import read_plan_file
    from simulations.api import read_sites_manifest

    torch.set_num_threads(1)
    plan = read_plan_file(run_dir / "plan.json")
    config = RunConfig.from_mapping(tomllib.loads((run_dir / "run-config.toml").read_text()))
    model, _ = load_model(model_path)
    model.train()
    names = [name for name, _ in model.named_parameters()]
    parts = {part: [n for n in names if n not in frozen_weight_names(plan.model_config(), train_layers=part)]
             for part in PARTS}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    results = {}
    for site in read_sites_manifest(run_dir):
        site_id = site.site_id
        train_cases, augment = load_training_cases(site.datalist, plan, cache_dir=site.cache_dir)
        loader = training_loader(train_cases, augment, batch_size=1, steps=cases,
                                 generator=torch.Generator().manual_seed(seed))
        signal = gradient_signal(model, ((b["image"], b["label"]) for b in loader),
                                 make_loss(model_config=plan.model_config()), parts=parts, clip=config.dp_max_grad_norm)
        dp_row = next((r for r in rows if r["site"] == site_id and r.get("dp")), None)
        if dp_row is not None:
            steps = plan.local_steps * config.num_rounds
            batch = max(1, round(dp_row["dp-sample-rate"] * dp_row["num-train-examples"]))
            for part in signal.values():
                part["signal-to-noise"] = signal_to_noise(part, noise_multiplier=dp_row["dp-noise-multiplier"],
                                                          batch_size=batch, clip=config.dp_max_grad_norm, steps=steps)
        results[site_id] = signal
        print(f"[dp_signal] {site_id}: {json.dumps(signal)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a harness run folder (plan.json, sites.json, state/)")
    parser.add_argument("--model", type=Path, required=True, help="the model file whose gradients are measured")
    parser.add_argument("--cases", type=int, default=24, help="cases drawn per site")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.run, args.model, cases=args.cases, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
