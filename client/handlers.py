"""Turn Flower messages into local training/evaluation and back into replies.

Any problem fedseg diagnoses (bad data, bad config, mismatched weights) becomes
a *refusal*: a normal reply with ``refused = 1`` and a short reason that the
server logs and counts. The federation goes on without this site's update.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.site import SiteConfig, resolve_site
from shared.config import RunConfig
from shared.errors import FedSegError

if TYPE_CHECKING:
    from flwr.app import Context

LOG = logging.getLogger("fedseg.client")
MAX_REASON_CHARS = 300


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with the update."""
    site: SiteConfig | None = None
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = resolve_site(context.node_config, config.simulation_sites)
        server_round = int(msg.content["config"]["server-round"])
        return Message(content=_train(msg, config, site, server_round), reply_to=msg)
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


def _train(msg: Message, config: RunConfig, site: SiteConfig, server_round: int) -> RecordDict:
    import torch
    from monai.utils import set_determinism

    from client.loading import training_loader
    from client.site_data import load_training_cases
    from client.training import train_local
    from shared.device import resolve_device
    from shared.model import build_unet
    from shared.weights import load_arrays, model_to_arrays

    if site.fault is not None:
        site.fault.before_training()
    seed = _site_round_seed(config.seed, site.site_id, server_round)
    set_determinism(seed=seed)
    cases, augment = load_training_cases(site.datalist, config)
    model = build_unet(config.model_config())
    load_arrays(model, msg.content["arrays"])
    loader = training_loader(cases, augment, batch_size=config.batch_size,
                             generator=torch.Generator().manual_seed(seed))
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_local(model, loader, config=config, device=resolve_device(config.device),
                         num_examples=len(cases), proximal_mu=proximal_mu)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.train_loss,
                            "steps": result.steps})
    arrays = model_to_arrays(model)
    if site.fault is not None:
        received = msg.content["arrays"].to_torch_state_dict()
        arrays = ArrayRecord(site.fault.poison(dict(arrays.to_torch_state_dict()), dict(received)))
    return RecordDict({"arrays": arrays, "metrics": metrics,
                       "site": ConfigRecord({"site-id": site.site_id})})


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
