"""Baselines beside the federation: one model on all data pooled, one per site alone.

Same plan (network, preprocessing, patch and batch size) and seed as the
federation, as many optimisation steps as each site takes in it
(``local-steps x num-rounds``), and all
models (the federated one included) are evaluated by the same function on
the same validation cases of every site, so the comparison is like for like.
Baselines train without differential privacy: they are the reference a
federation is judged against. For a ``local-norm`` run each site's personal
model (the global model with the site's own norm weights, as the site
evaluates it in every round) is evaluated on that site's cases too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.atomic import atomic_write_json
from shared.baselines import comparison_rows, finite_mean  # noqa: F401  (comparison_rows: re-exported)
from shared.errors import ConfigError

if TYPE_CHECKING:
    from shared.plan import Plan

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
        per_class.append({"dice": finite_mean(class_dice), "dice-ci": bootstrap_interval(class_dice, seed=seed),
                          "hd95": finite_mean(class_hd95), "hd95-ci": bootstrap_interval(class_hd95, seed=seed)})
    return {"cases": len(per_case), "dice": finite_mean(dice), "dice-ci": bootstrap_interval(dice, seed=seed),
            "hd95": finite_mean(hd95), "hd95-ci": bootstrap_interval(hd95, seed=seed), "per-class": per_class}


def train_model(datalists: list[Path], plan: Plan, config: Any, *, steps: int, seed: int, device: Any,
                caches: dict[Path, Path] | None = None) -> Any:
    """Train a fresh network of ``plan`` for ``steps`` steps on the training cases of ``datalists`` together."""
    import torch
    from monai.utils import set_determinism

    from client.data.loading import training_loader
    from client.data.site_data import load_training_cases
    from client.training.local import make_loss, train_local
    from shared.model import build_model

    set_determinism(seed=seed)
    cases: list[dict[str, Any]] = []
    augment = None
    for datalist in datalists:
        site_cases, augment = load_training_cases(datalist, plan, cache_dir=(caches or {}).get(datalist))
        cases += site_cases
    model = build_model(plan.model_config())
    loader = training_loader(cases, augment, batch_size=plan.batch_size, steps=steps,
                             generator=torch.Generator().manual_seed(seed))
    train_local(model, loader, config=config, device=device, num_examples=len(cases),
                loss_fn=make_loss(model_config=plan.model_config()))
    return model


def evaluate_on_sites(model: Any, sites: list[tuple[str, Path]], plan: Plan, *, seed: int,
                      device: Any, caches: dict[Path, Path] | None = None) -> dict[str, Any]:
    """Per-case results of ``model`` on every site's validation cases."""
    from client.data.site_data import load_validation_cases
    from client.training.local import evaluate_local

    results = {}
    for site_id, datalist in sites:
        cases = load_validation_cases(datalist, plan, cache_dir=(caches or {}).get(datalist))
        result = evaluate_local(model, cases, plan=plan, device=device)
        results[site_id] = summarise(result.per_case, seed=seed)
    return results


#: Each model's results as it is done: a baseline run cut short (a session, a machine) goes on from there.
PROGRESS_FILE = "baselines.partial.json"


def run_baselines(run_dir: Path, sites: list[tuple[str, Path]], *, kinds: tuple[str, ...],
                  holdout: list[tuple[str, Path]] = ()) -> dict[str, Any]:
    """Evaluate the federated model and train/evaluate the baselines; write ``baselines.json``.

    Every model's results are kept in :data:`PROGRESS_FILE` as soon as they exist, and a later call
    on the same run folder (same sites, steps and seed) takes them from there instead of training
    that model again; ``baselines.json`` is written once, complete (its readers never see a part).
    """
    from shared.config import RunConfig
    from shared.device import resolve_device
    from shared.model_file import load_model
    from shared.plan import read_plan_file

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = RunConfig.from_mapping(summary["run_config"])
    plan = read_plan_file(run_dir / "plan.json")
    device = resolve_device(config.device)
    # the sites' own case caches (a simulation's state folders): preprocessed with this plan already
    caches = {d: run_dir / "state" / s / "cache" for s, d in list(sites) + list(holdout)
              if (run_dir / "state" / s / "cache").is_dir()}
    unreadable = unreadable_sites(list(sites) + list(holdout), plan, caches=caches)
    sites = [(s, d) for s, d in sites if s not in unreadable]
    everyone = sites + [(s, d) for s, d in holdout if s not in unreadable]
    steps = plan.local_steps * config.num_rounds
    setting = {"holdout": [s for s, _ in holdout], "steps": steps, "unreadable": unreadable,
               "sites": [s for s, _ in everyone], "seed": config.seed}
    results = _progress(run_dir, setting)

    def done(key: str, make: Any) -> Any:
        if key not in results:
            results[key] = _json_safe(make())
            atomic_write_json(run_dir / PROGRESS_FILE, results)
        return results[key]

    def trained_on(datalists: list[Path]) -> Any:
        model = train_model(datalists, plan, config, steps=steps, seed=config.seed, device=device, caches=caches)
        return evaluate_on_sites(model, everyone, plan, seed=config.seed, device=device, caches=caches)

    done("federated", lambda: evaluate_on_sites(load_model(run_dir / "global_model.pt")[0], everyone, plan,
                                                seed=config.seed, device=device, caches=caches))
    for site_id, datalist in sites if config.local_norm else []:
        done(f"personal/{site_id}", lambda site_id=site_id, datalist=datalist: evaluate_on_sites(
            personal_model(run_dir, site_id, plan=plan), [(site_id, datalist)], plan, seed=config.seed,
            device=device, caches=caches)[site_id])
    if "pooled" in kinds:
        done("pooled", lambda: trained_on([d for _, d in sites]))
    for site_id, datalist in sites if "local" in kinds else []:
        done(f"local/{site_id}", lambda datalist=datalist: trained_on([datalist]))
    final = {key: value for key, value in results.items() if "/" not in key and key != "sites"}
    final.pop("seed")
    if config.local_norm:
        final["personal"] = {site_id: results[f"personal/{site_id}"] for site_id, _ in sites}
    if "local" in kinds:
        final["local"] = {site_id: results[f"local/{site_id}"] for site_id, _ in sites}
    atomic_write_json(run_dir / "baselines.json", final)
    (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
    return final


def personal_model(run_dir: Path, site_id: str, *, plan: Plan) -> Any:
    """The global model of a ``local-norm`` run with ``site_id``'s own norm weights laid over it.

    Raises :class:`ConfigError` naming the folder when the site kept no weights of this run.
    """
    from client.inference.model_files import use_local_weights
    from shared.model_file import load_model

    kept = sorted((run_dir / "state" / site_id / "local-weights").glob("run-*.pt"))
    if len(kept) != 1:
        raise ConfigError(f"{run_dir / 'state' / site_id / 'local-weights'}: expected the site's own norm weights "
                          f"of this run in one file, found {len(kept)}")
    model = load_model(run_dir / "global_model.pt")[0]
    use_local_weights(model, kept[0], plan=plan)
    return model


def _progress(run_dir: Path, setting: dict[str, Any]) -> dict[str, Any]:
    """The models already done for this run folder under the same setting (else nothing)."""
    try:
        kept = json.loads((run_dir / PROGRESS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return dict(setting)
    same = isinstance(kept, dict) and all(kept.get(k) == _json_safe(v) for k, v in setting.items())
    return kept if same else dict(setting)


def unreadable_sites(sites: list[tuple[str, Path]], plan: Plan, *,
                     caches: dict[Path, Path] | None = None) -> dict[str, str]:
    """Sites whose cases cannot be read (their problem, as the site itself reported it when it refused):
    left out of every baseline instead of failing them all."""
    from client.data.site_data import load_training_cases, load_validation_cases
    from shared.errors import FedSegError

    problems = {}
    for site_id, datalist in sites:
        try:
            load_training_cases(datalist, plan, cache_dir=(caches or {}).get(datalist))
            load_validation_cases(datalist, plan, cache_dir=(caches or {}).get(datalist))
        except FedSegError as exc:
            problems[site_id] = f"{type(exc).__name__}: {exc}"
    return problems


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
