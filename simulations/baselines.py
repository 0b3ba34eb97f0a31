"""Baselines beside the federation: one model on all data pooled, one per site alone.

Same architecture, same seed, same total epochs as each site trains in the
federation (``local-epochs x num-rounds``), same preprocessing, and all
models (the federated one included) are evaluated by the same function on
the same validation cases of every site, so the comparison is like for like.
Baselines train without differential privacy: they are the reference a
federation is judged against.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic import atomic_write_json
from shared.errors import ConfigError

BASELINES = ("pooled", "local")


def parse_baselines(text: str) -> tuple[str, ...]:
    """Parse ``--baselines pooled,local`` (empty means none)."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in BASELINES]
    if unknown:
        raise ConfigError(f"'--baselines': unknown {unknown}; choose from {list(BASELINES)}")
    return kinds


def bootstrap_interval(values: list[float], *, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over cases (NaN values dropped)."""
    data = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def case_scores(per_case: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per case: Dice and HD95 averaged over the foreground classes (NaN-aware)."""
    dice = [float(np.nanmean(c["dice"])) if not np.all(np.isnan(c["dice"])) else float("nan") for c in per_case]
    hd95 = [float(np.nanmean(c["hd95"])) if not np.all(np.isnan(c["hd95"])) else float("nan") for c in per_case]
    return dice, hd95


def summarise(per_case: list[dict[str, Any]], *, seed: int) -> dict[str, Any]:
    """Mean Dice/HD95 over cases with bootstrap 95% intervals, overall and per foreground class."""
    dice, hd95 = case_scores(per_case)
    classes = len(per_case[0]["dice"]) if per_case else 0
    per_class = []
    for k in range(classes):
        class_dice, class_hd95 = [float(c["dice"][k]) for c in per_case], [float(c["hd95"][k]) for c in per_case]
        per_class.append({"dice": _nanmean(class_dice), "dice-ci": bootstrap_interval(class_dice, seed=seed),
                          "hd95": _nanmean(class_hd95), "hd95-ci": bootstrap_interval(class_hd95, seed=seed)})
    return {"cases": len(per_case), "dice": _nanmean(dice), "dice-ci": bootstrap_interval(dice, seed=seed),
            "hd95": _nanmean(hd95), "hd95-ci": bootstrap_interval(hd95, seed=seed), "per-class": per_class}


def train_model(datalists: list[Path], config: Any, *, epochs: int, seed: int, device: Any) -> Any:
    """Train a fresh U-Net on the training cases of ``datalists`` together."""
    import torch
    from monai.utils import set_determinism

    from client.loading import training_loader
    from client.site_data import load_training_cases
    from client.training import train_local
    from shared.model import build_model

    set_determinism(seed=seed)
    cases: list[dict[str, Any]] = []
    augment = None
    for datalist in datalists:
        site_cases, augment = load_training_cases(datalist, config)
        cases += site_cases
    model = build_model(config.model_config())
    loader = training_loader(cases, augment, batch_size=config.batch_size, generator=torch.Generator().manual_seed(seed))
    train_local(model, loader, config=dataclasses.replace(config, local_epochs=epochs), device=device,
                num_examples=len(cases))
    return model


def evaluate_on_sites(model: Any, sites: list[tuple[str, Path]], config: Any, *, device: Any) -> dict[str, Any]:
    """Per-case results of ``model`` on every site's validation cases."""
    from client.site_data import load_validation_cases
    from client.training import evaluate_local

    results = {}
    for site_id, datalist in sites:
        result = evaluate_local(model, load_validation_cases(datalist, config), config=config, device=device)
        results[site_id] = summarise(result.per_case, seed=config.seed)
    return results


def run_baselines(run_dir: Path, sites: list[tuple[str, Path]], *, kinds: tuple[str, ...],
                  holdout: list[tuple[str, Path]] = ()) -> dict[str, Any]:
    """Evaluate the federated model and train/evaluate the baselines; write ``baselines.json``."""
    from shared.config import RunConfig
    from shared.device import resolve_device
    from shared.model_file import load_model

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    config = RunConfig.from_mapping(summary["run_config"])
    device = resolve_device(config.device)
    everyone = list(sites) + list(holdout)
    federated, _ = load_model(Path(run_dir) / "global_model.pt")
    results: dict[str, Any] = {"federated": evaluate_on_sites(federated, everyone, config, device=device),
                               "holdout": [s for s, _ in holdout], "epochs": config.local_epochs * config.num_rounds}
    epochs = results["epochs"]
    if "pooled" in kinds:
        pooled = train_model([d for _, d in sites], config, epochs=epochs, seed=config.seed, device=device)
        results["pooled"] = evaluate_on_sites(pooled, everyone, config, device=device)
    if "local" in kinds:
        results["local"] = {}
        for site_id, datalist in sites:
            model = train_model([datalist], config, epochs=epochs, seed=config.seed, device=device)
            results["local"][site_id] = evaluate_on_sites(model, everyone, config, device=device)
    atomic_write_json(Path(run_dir) / "baselines.json", _json_safe(results))
    return results


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per site: federated, pooled and local-only (the site's own model) Dice and HD95.

    For a held-out site, "local" is the mean over the sites' local models.
    """
    rows = []
    for site, fed in results["federated"].items():
        row = {"site": site, "holdout": site in results.get("holdout", []), "federated": fed}
        if "pooled" in results:
            row["pooled"] = results["pooled"][site]
        local = results.get("local", {})
        if site in local:
            row["local"] = local[site][site]
        elif local:
            row["local"] = {"dice": _nanmean([m[site]["dice"] for m in local.values()]),
                            "hd95": _nanmean([m[site]["hd95"] for m in local.values()])}
        rows.append(row)
    return rows


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
