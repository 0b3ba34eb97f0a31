"""Turn Flower messages into local training/evaluation and back into replies.

Any problem fedseg diagnoses (bad data, bad config, mismatched weights) becomes
a *refusal*: a normal reply with ``refused = 1`` and a short reason that the
server logs and counts. The federation goes on without this site's update.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.site import SiteConfig, resolve_site
from shared.config import RunConfig
from shared.errors import DataError, FedSegError

if TYPE_CHECKING:
    from flwr.app import Context

LOG = logging.getLogger("fedseg.client")
MAX_REASON_CHARS = 300


class PrivacyPolicyError(FedSegError):
    """The run's configuration violates the site's privacy policy."""


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with the update."""
    site: SiteConfig | None = None
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = resolve_site(context.node_config, config.simulation_sites)
        server_round = int(msg.content["config"]["server-round"])
        check_dp_policy(config, site)
        return Message(content=_train(msg, config, site, server_round, run_id=int(context.run_id)), reply_to=msg)
    except FedSegError as exc:
        return refusal(msg, site, exc)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation cases."""
    site: SiteConfig | None = None
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = resolve_site(context.node_config, config.simulation_sites)
        return Message(content=_evaluate(msg, config, site), reply_to=msg)
    except FedSegError as exc:
        return refusal(msg, site, exc)


def refusal(msg: Message, site: SiteConfig | None, exc: Exception) -> Message:
    """A reply that declines this round with a short, loggable reason."""
    reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
    LOG.error("site %s refuses %s: %s", site.site_id if site else "?", msg.metadata.message_type, reason)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "refused": 1}),
        "site": ConfigRecord({"site-id": site.site_id if site else "unknown", "reason": reason}),
    })
    return Message(content=content, reply_to=msg)


def _train(msg: Message, config: RunConfig, site: SiteConfig, server_round: int, *, run_id: int) -> RecordDict:
    import torch
    from monai.utils import set_determinism

    from client.loading import training_loader
    from client.site_data import load_training_cases
    from client.training import train_local
    from shared.device import resolve_device
    from shared.model import build_unet
    from shared.weights import load_arrays, model_to_arrays

    seed = _site_round_seed(config.seed, site.site_id, server_round)
    set_determinism(seed=seed)
    cases, augment = load_training_cases(site.datalist, config)
    model = build_unet(config.model_config())
    load_arrays(model, msg.content["arrays"])
    device = resolve_device(config.device)
    if config.dp:
        metrics = _train_private(model, cases, augment, config=config, site=site, device=device,
                                 run_id=run_id, server_round=server_round)
    else:
        loader = training_loader(cases, augment, batch_size=config.batch_size,
                                 generator=torch.Generator().manual_seed(seed))
        result = train_local(model, loader, config=config, device=device, num_examples=len(cases))
        metrics = {"num-examples": result.num_examples, "train-loss": result.train_loss,
                   "steps": result.steps, "dp": 0}
    return RecordDict({"arrays": model_to_arrays(model), "metrics": MetricRecord(metrics),
                       "site": ConfigRecord({"site-id": site.site_id})})


def check_dp_policy(config: RunConfig, site: SiteConfig) -> None:
    """Refuse a run without DP at a site whose policy (node config ``require-dp``) requires it."""
    if site.require_dp and not config.dp:
        raise PrivacyPolicyError(
            "this site requires differential privacy (node config 'require-dp') and the run is "
            "configured without it (run config 'dp' = false); not training")


def _train_private(model: Any, cases: list, augment: Any, *, config: RunConfig, site: SiteConfig,
                   device: Any, run_id: int, server_round: int) -> dict[str, float | int]:
    """Charge the round to the site's privacy ledger (refusing past the budget), then train with DP-SGD."""
    from client.dp_training import plan_round, private_generator, train_local_dp
    from client.loading import training_loader
    from client.privacy_ledger import PrivacyLedger

    if not cases:
        raise DataError("the site has no training cases")
    plan = plan_round(config=config, num_cases=len(cases), delta=site.dp_delta)
    charge = PrivacyLedger(site.state_dir, delta=site.dp_delta).charge(
        run_id=run_id, server_round=server_round, noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, steps=plan.steps, max_epsilon=site.max_epsilon)
    loader = training_loader(cases, augment, batch_size=config.batch_size, generator=private_generator())
    train_loss, steps = train_local_dp(model, loader, config=config, plan=plan, device=device)
    LOG.info("site %s: DP round %d, epsilon +%.3f -> %.3f of %.3f", site.site_id, server_round,
             charge.epsilon_round, charge.epsilon, site.max_epsilon)
    return {"num-examples": len(cases), "train-loss": train_loss, "steps": steps, "dp": 1,
            "epsilon": charge.epsilon, "epsilon-round": charge.epsilon_round, "dp-delta": site.dp_delta,
            "dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate}


def _evaluate(msg: Message, config: RunConfig, site: SiteConfig) -> RecordDict:
    from client.site_data import load_validation_cases
    from client.training import evaluate_local
    from shared.device import resolve_device
    from shared.model import build_unet
    from shared.weights import load_arrays

    cases = load_validation_cases(site.datalist, config)
    model = build_unet(config.model_config())
    load_arrays(model, msg.content["arrays"])
    result = evaluate_local(model, cases, config=config, device=resolve_device(config.device))
    metrics = {"num-examples": result.num_examples, "dice": result.dice, "loss": result.loss}
    metrics.update({f"dice-class-{i + 1}": v for i, v in enumerate(result.dice_per_class)})
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site.site_id})})


def _site_round_seed(seed: int, site_id: str, server_round: int) -> int:
    """A seed that differs per site and round but is reproducible across runs."""
    return (seed * 1_000_003 + zlib.crc32(site_id.encode()) + server_round * 7919) % (2**31)
