"""``python -m client finetune``: adapt a federated model to this site's data; the result stays here.

The model file's own plan (preprocessing, patch, network) and run config
(optimiser, learning rate, clipping norm) are reused. ``--epochs`` counts passes
over the site's training cases: ``epochs x ceil(cases / batch)`` steps. With
``--dp`` the steps run as one DP-SGD round (Opacus, as in a federated round)
whose noise spends ``--epsilon``; it is charged to the site's privacy ledger in
its state folder *before* training, against the same budget (``max-epsilon``)
as federated rounds, and refused past it. The personal model is written
atomically with where it came from (path and sha256 of the global model).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from client.runtime.site_config import SiteConfig
from shared.config import DEFAULT_DP_DELTA, DEFAULT_MAX_EPSILON, RunConfig, to_key
from shared.errors import ConfigError
from shared.protocol import (
    DP,
    EPSILON,
    EPSILON_ROUND,
    NODE_DATALIST,
    NODE_DP_DELTA,
    NODE_MAX_EPSILON,
    NODE_STATE_DIR,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_LOSS,
)

#: Ledger entries of local fine-tuning carry this run id (federated runs have Flower's run ids).
FINETUNE_RUN_ID = 0
#: Run config keys of the model file that shape local training; the rest describe the federation.
TRAINING_KEYS = ("optimizer", "learning-rate", "dp-max-grad-norm", "dp-grad-sample-mode", "seed", "device")


@dataclass(frozen=True)
class FinetuneResult:
    """What fine-tuning did: steps, loss, DP spend, validation Dice before (global) and after (personal)."""

    out: Path
    steps: int
    train_loss: float
    dice_global: float | None
    dice_personal: float | None
    epsilon_round: float | None = None
    epsilon: float | None = None


def finetune(*, model_path: Path, site: SiteConfig, out: Path, epochs: int, dp: bool = False,
             epsilon: float = 0.0, train_layers: str = "all", learning_rate: float = 0.0,
             local_weights: Path | None = None, device: str = "auto") -> FinetuneResult:
    """Fine-tune the model in ``model_path`` on ``site``'s training cases and write it to ``out``."""

    from client.data.site_data import load_training_cases
    from client.inference.model_files import plan_of_model, use_local_weights
    from client.training.local import freeze_weights
    from shared.device import resolve_device
    from shared.local_weights import frozen_weight_names
    from shared.model_file import load_model, save_model_file
    from shared.model_sources import file_sha256

    if epochs < 1:
        raise ConfigError(f"'--epochs' must be >= 1, got {epochs}")
    if dp and not epsilon > 0:
        raise ConfigError("'--epsilon': fine-tuning with --dp needs the epsilon it may spend (> 0)")
    model, payload = load_model(model_path)
    plan = plan_of_model(payload, model_path)
    config = training_config(payload, dp=dp, epsilon=epsilon, train_layers=train_layers,
                             learning_rate=learning_rate, device=device)
    if local_weights is not None:
        use_local_weights(model, local_weights, plan=plan)
    cases, augment = load_training_cases(site.datalist, plan, cache_dir=site.cache_dir)
    plan = dataclasses.replace(plan, local_steps=epochs * math.ceil(len(cases) / plan.batch_size))
    freeze_weights(model, frozen_weight_names(plan.model_config(), train_layers=train_layers))
    torch_device = resolve_device(config.device)
    dice_global = _validation_dice(model, site, plan, torch_device)
    metrics = _train(model, cases, augment, config=config, plan=plan, site=site, device=torch_device)
    extra = {"plan": plan.to_dict(), "run_config": payload.get("run_config"), "class_names": payload.get("class_names"),
             "finetuned_from": {"path": str(Path(model_path).resolve()), "sha256": file_sha256(Path(model_path))},
             "finetune": {"site-id": site.site_id, "epochs": epochs, "train-layers": train_layers, **metrics}}
    save_model_file(out, state_dict=model.state_dict(), model_config=plan.model_config(), extra=extra)
    return FinetuneResult(out=Path(out), steps=int(metrics[STEPS]), train_loss=float(metrics[TRAIN_LOSS]),
                          dice_global=dice_global, dice_personal=_validation_dice(model, site, plan, torch_device),
                          epsilon_round=metrics.get(EPSILON_ROUND), epsilon=metrics.get(EPSILON))


def training_config(payload: dict[str, Any], *, dp: bool, epsilon: float, train_layers: str,
                    learning_rate: float, device: str) -> RunConfig:
    """The run config local training reads: the model file's training keys, one DP round spending ``epsilon``."""
    known = {to_key(f.name) for f in fields(RunConfig)}
    saved = payload.get("run_config") or {}
    values = {k: v for k, v in saved.items() if k in TRAINING_KEYS and k in known}
    values.update({"num-rounds": 1, "dp": dp, "dp-noise-from-budget": False, "dp-target-epsilon": epsilon,
                   "dp-noise-multiplier": 0.0, "train-layers": train_layers, "plan": "manual", "device": device})
    if learning_rate > 0:
        values["learning-rate"] = learning_rate
    return RunConfig.from_mapping(values)


def _train(model: Any, cases: list, augment: Any, *, config: RunConfig, plan: Any, site: SiteConfig,
           device: Any) -> dict[str, Any]:
    import torch

    from client.data.loading import training_loader
    from client.runtime.private_round import train_private
    from client.training.local import make_loss, train_local
    from client.training.privacy_ledger import PrivacyLedger

    if config.dp:
        done = sum(1 for e in PrivacyLedger(site.state_dir, delta=site.dp_delta).entries()
                   if e.run_id == FINETUNE_RUN_ID)
        return train_private(model, cases, augment, config=config, plan=plan, site=site, device=device,
                             run_id=FINETUNE_RUN_ID, server_round=done + 1)
    loader = training_loader(cases, augment, batch_size=plan.batch_size, steps=plan.local_steps,
                             generator=torch.Generator().manual_seed(config.seed))
    result = train_local(model, loader, config=config, device=device, num_examples=len(cases),
                         loss_fn=make_loss(model_config=plan.model_config()))
    return {NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss, STEPS: result.steps, DP: 0}


def _validation_dice(model: Any, site: SiteConfig, plan: Any, device: Any) -> float | None:
    """Dice on the site's validation cases (None when it has none)."""
    from client.data.site_data import load_validation_cases
    from client.training.local import evaluate_local

    cases = load_validation_cases(site.datalist, plan, cache_dir=site.cache_dir)
    return evaluate_local(model, cases, plan=plan, device=device).dice if cases else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="global_model.pt written by a run")
    parser.add_argument("--datalist", type=Path, required=True, help="this site's datalist JSON")
    parser.add_argument("--out", type=Path, required=True, help="personal model file to write (.pt)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training cases (default: 1)")
    parser.add_argument("--dp", action="store_true", help="train with DP-SGD, charged to the site's privacy ledger")
    parser.add_argument("--epsilon", type=float, default=0.0, help="epsilon the --dp fine-tuning may spend")
    parser.add_argument("--state-dir", type=Path,
                        help="the site's state folder holding its privacy ledger (node config state-dir; default: "
                             "<datalist folder>/.fedseg-state, as the node's)")
    parser.add_argument("--max-epsilon", type=float, default=DEFAULT_MAX_EPSILON,
                        help="the site's total budget (node config max-epsilon; default: %(default)s)")
    parser.add_argument("--dp-delta", type=float, default=DEFAULT_DP_DELTA,
                        help="the site's delta (node config dp-delta; default: %(default)s)")
    parser.add_argument("--train-layers", default="all", help="what trains (as run config train-layers)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="default: the model's run's")
    parser.add_argument("--local-weights", type=Path,
                        help="this site's own norm weights of a local-norm run (<state-dir>/local-weights/run-N.pt)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def run(args: argparse.Namespace) -> int:
    node = {NODE_DATALIST: str(args.datalist), NODE_MAX_EPSILON: args.max_epsilon, NODE_DP_DELTA: args.dp_delta,
            **({NODE_STATE_DIR: str(args.state_dir)} if args.state_dir else {})}
    result = finetune(model_path=args.model, site=SiteConfig.from_node_config(node), out=args.out,
                      epochs=args.epochs, dp=args.dp, epsilon=args.epsilon, train_layers=args.train_layers,
                      learning_rate=args.learning_rate, local_weights=args.local_weights, device=args.device)
    spent = "" if result.epsilon is None else (f"; epsilon +{result.epsilon_round:.3f}, the site's ledger now "
                                               f"holds {result.epsilon:.3f} of {args.max_epsilon:g}")
    print(f"wrote {result.out}: {result.steps} steps, train loss {result.train_loss:.4f}{spent}")
    if result.dice_global is not None:
        print(f"validation Dice at this site: global model {result.dice_global:.4f}, "
              f"personal model {result.dice_personal:.4f}")
    return 0
