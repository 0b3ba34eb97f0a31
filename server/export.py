"""Hand back the final model in a self-describing form.

After the last round ``global_model.pt`` is rewritten (atomically) with
everything a hospital needs to use it and a reader needs to trust it: weights,
model config, the plan (preprocessing, patch size: what inference repeats), class names, the run config, every
site's final metrics (Dice, HD95, epsilon) and a sha256 of the weights, which
``shared.model_file.load_model`` (used by ``client predict``) verifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.model_file import read_model_file, save_model_file
from shared.plan import Plan

FINAL_SITE_KEYS = ("dice", "hd95", "loss", "epsilon")


def final_site_metrics(rounds: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each site's latest value of the final-metric keys, with the round it came from."""
    latest: dict[str, dict[str, Any]] = {}
    for server_round in sorted(rounds):
        for site, row in rounds[server_round].items():
            for key in FINAL_SITE_KEYS:
                if isinstance(row.get(key), (int, float)):
                    latest.setdefault(site, {})[key] = row[key]
                    latest[site][f"{key}-round"] = server_round
    return latest


def class_names(config: RunConfig) -> list[str]:
    """Class names from run config ``class-names`` if set, else generic ones."""
    declared = [n.strip() for n in str(getattr(config, "class_names", "")).split(",") if n.strip()]
    if len(declared) == config.num_classes:
        return declared
    return ["background"] + [f"class-{k}" for k in range(1, config.num_classes)]


def export_final_model(model_path: Path, *, config: RunConfig, plan: Plan,
                       rounds: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rewrite the final ``global_model.pt`` with its provenance; return the added fields."""
    payload = read_model_file(model_path)
    extra = {
        "round": payload.get("round"),
        "run_config": config.to_mapping(),
        "plan": plan.to_dict(),
        "class_names": class_names(config),
        "per_site": final_site_metrics(rounds),
        "initial_model": payload.get("initial_model"),
        "final": True,
    }
    from shared.model import ModelConfig

    save_model_file(Path(model_path), state_dict=payload["state_dict"],
                    model_config=ModelConfig.from_dict(payload["model_config"]), extra=extra)
    return extra
