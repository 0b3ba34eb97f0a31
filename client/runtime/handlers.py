"""Turn Flower messages into local training/evaluation and back into replies.

Any problem fedseg diagnoses (bad data, bad config, mismatched weights) becomes
a *refusal*: a normal reply with ``refused = 1`` and a short reason that the
server logs and counts. The federation goes on without this site's update.

Every reply, refusals included, leaves through :func:`client.runtime.replies.send_reply`: the egress
guard (:mod:`client.runtime.egress.guard`) checks it and the site's audit log
(:mod:`client.runtime.egress.audit_log`) records it before Flower sends it. An unexpected
exception also becomes a refusal here, so that no exception text (which could
hold anything) reaches the server through Flower's error reply.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.runtime.faults import SimulatedCrash
from client.runtime.private_round import check_dp_policy, train_private
from client.runtime.replies import refusal_content, send_reply, site_label
from client.runtime.secagg import SecureStep, check_plain_training_allowed, run_secure_stage
from client.runtime.site_config import SiteConfig, resolve_site
from shared.config import RunConfig
from shared.errors import ConfigError, FedSegError
from shared.local_weights import (
    FEDERATION_ID_KEY,
    frozen_weight_names,
    local_weight_names,
    staying_weight_names,
    travelling,
)
from shared.plan import PLAN_KEY, Plan, resolve_plan_setting
from shared.protocol import (
    ARRAYS,
    CONFIG,
    DICE,
    DP,
    FINGERPRINT,
    HD95,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    STEPS,
    TRAIN_LOSS,
)

LOG = logging.getLogger("fedseg.client")

Work = Callable[[Message, Context, RunConfig, SiteConfig, "Plan | None"], RecordDict]


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with the update.

    A message of the secure-aggregation protocol (:mod:`client.runtime.secagg`) is one
    step of it: only its masking step trains, and its reply holds a masked vector.
    """
    step = SecureStep.of(msg)
    if step is None:
        return _handle(msg, context, _plain_train, needs_plan=True)
    return _handle(msg, context, functools.partial(_secure_train, step=step), needs_plan=step.carries_model,
                   step=step)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation cases."""
    return _handle(msg, context, _evaluate, needs_plan=True)


def handle_fingerprint(msg: Message, context: Context) -> Message:
    """Reply with this site's data fingerprint (aggregates only) for the federated plan."""
    return _handle(msg, context, _fingerprint, needs_plan=False)


def message_plan(msg: Message, config: RunConfig) -> Plan:
    """The plan a train or evaluate message carries; else the one the run config fixes (manual or a file)."""
    config_record = msg.content.config_records.get(CONFIG)
    text = config_record.get(PLAN_KEY) if config_record is not None else None
    if isinstance(text, str) and text:
        return Plan.from_json(text, source="the plan the server sent")
    fixed = resolve_plan_setting(config)
    if fixed is None:
        raise ConfigError("run config key 'plan' = 'auto', but the server's message carries no plan")
    return fixed


def _handle(msg: Message, context: Context, work: Work, *, needs_plan: bool,
            step: SecureStep | None = None) -> Message:
    site: SiteConfig | None = None
    plan: Plan | None = None
    config: RunConfig | None = None
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = resolve_site(context.node_config, config.simulation_sites)
        plan = message_plan(msg, config) if needs_plan else None
        content = work(msg, context, config, site, plan)
    except FedSegError as exc:
        content = refusal_content(msg, site, f"{type(exc).__name__}: {exc}")
    except SimulatedCrash:
        raise  # fault injection (simulations only): the ClientApp must really crash
    except Exception as exc:  # a bug must not leak its message to the server
        LOG.exception("site %s: %s failed unexpectedly", site_label(site), msg.metadata.message_type)
        content = refusal_content(msg, site, f"internal error ({type(exc).__name__}); see the site's log")
    return send_reply(msg, content=content, context=context, site=site, plan=plan, step=step,
                      staying=_staying_or_none(config, plan))


def _train(msg: Message, context: Context, config: RunConfig, site: SiteConfig, plan: Plan | None) -> RecordDict:
    import torch
    from monai.utils import set_determinism

    from client.data.loading import training_loader
    from client.data.site_data import load_training_cases
    from client.inference.site_weights import keep_local_weights
    from client.training.local import make_loss, train_local
    from shared.device import resolve_device
    from shared.weights import model_to_arrays

    assert plan is not None
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    check_dp_policy(config, site)
    if site.fault is not None:
        site.fault.before_training()
    seed = _site_round_seed(config.seed, site.site_id, server_round)
    set_determinism(seed=seed)
    cases, augment = load_training_cases(site.datalist, plan, cache_dir=site.cache_dir)
    model, local, local_path = _received_model(msg, context, config, site, plan)
    staying = staying_weight_names(plan.model_config(), local_norm=config.local_norm, train_layers=config.train_layers)
    device = resolve_device(config.device)
    proximal_mu = float(msg.content[CONFIG].get(PROXIMAL_MU, 0.0))
    if config.patient_dp:
        metrics = train_private(model, cases, augment, config=config, plan=plan, site=site, device=device,
                                run_id=int(context.run_id), server_round=server_round)
    else:
        loader = training_loader(cases, augment, batch_size=plan.batch_size, steps=plan.local_steps,
                                 generator=torch.Generator().manual_seed(seed))
        result = train_local(model, loader, config=config, device=device, num_examples=len(cases),
                             proximal_mu=proximal_mu, loss_fn=make_loss(model_config=plan.model_config()))
        metrics = {NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss, STEPS: result.steps, DP: 0}
    if local:  # kept before replying: the next round and every evaluation start from them
        keep_local_weights(model, local_path, names=local, model_config=plan.model_config())
    arrays = model_to_arrays(model, exclude=staying)
    if site.fault is not None:
        received = travelling(msg.content[ARRAYS].to_torch_state_dict(), staying)
        arrays = ArrayRecord(site.fault.poison(dict(arrays.to_torch_state_dict()), dict(received)))
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), SITE: ConfigRecord({SITE_ID: site.site_id})})


def _plain_train(msg: Message, context: Context, config: RunConfig, site: SiteConfig,
                 plan: Plan | None) -> RecordDict:
    check_plain_training_allowed(config, site)
    return _train(msg, context, config, site, plan)


def _secure_train(msg: Message, context: Context, config: RunConfig, site: SiteConfig, plan: Plan | None, *,
                  step: SecureStep) -> RecordDict:
    return run_secure_stage(msg, context, step=step, config=config, site=site,
                            train=lambda: _train(msg, context, config, site, plan),
                            reference=lambda: travelling({name: a.numpy() for name, a in msg.content[ARRAYS].items()},
                                                         _staying_or_none(config, plan) or frozenset()))


def _evaluate(msg: Message, context: Context, config: RunConfig, site: SiteConfig, plan: Plan | None) -> RecordDict:
    from client.data.site_data import load_validation_cases
    from client.training.local import evaluate_local
    from shared.device import resolve_device

    assert plan is not None
    cases = load_validation_cases(site.datalist, plan, cache_dir=site.cache_dir)
    model, _, _ = _received_model(msg, context, config, site, plan)
    result = evaluate_local(model, cases, plan=plan, device=resolve_device(config.device))
    metrics = {NUM_EXAMPLES: result.num_examples, DICE: result.dice, LOSS: result.loss, HD95: result.hd95}
    metrics.update({f"{DICE}-class-{i + 1}": v for i, v in enumerate(result.dice_per_class)})
    metrics.update({f"{HD95}-class-{i + 1}": v for i, v in enumerate(result.hd95_per_class)})
    if config.evaluate_only:  # validating a model: how sure each site's figure is, from its cases' spread
        from shared.metrics import case_intervals

        metrics.update(case_intervals(result.per_case, seed=config.seed))
    return RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({SITE_ID: site.site_id})})


def _received_model(msg: Message, context: Context, config: RunConfig, site: SiteConfig,
                    plan: Plan) -> tuple[Any, frozenset[str], Path]:
    """The global model of ``msg`` with the site's own weights laid over it (run config ``local-norm``) and
    the weights run config ``train-layers`` leaves out frozen (``requires_grad`` off).

    Returns (model, names of the site's own weights, the file that keeps them).
    """
    from client.inference.site_weights import local_weights_path, restore_local_weights
    from client.training.local import freeze_weights
    from shared.model import build_model
    from shared.weights import load_arrays

    model = build_model(plan.model_config())
    load_arrays(model, msg.content[ARRAYS])
    local = local_weight_names(plan.model_config(), local_norm=config.local_norm)
    path = local_weights_path(site.state_dir, run_id=_federation_id(msg, context))
    restore_local_weights(model, path, names=local, model_config=plan.model_config())
    freeze_weights(model, frozen_weight_names(plan.model_config(), train_layers=config.train_layers))
    return model, local, path


def _federation_id(msg: Message, context: Context) -> int:
    """The run id that began this federation (kept across resumes), else this run's."""
    config = msg.content.config_records.get(CONFIG)
    value = config.get(FEDERATION_ID_KEY) if config is not None else None
    return int(value) if isinstance(value, str) and value.isdigit() else int(context.run_id)


def _staying_or_none(config: RunConfig | None, plan: Plan | None) -> frozenset[str] | None:
    """The weights no reply may carry; None when the run config cannot say (then none may leave)."""
    if config is None or plan is None:
        return None
    try:
        return staying_weight_names(plan.model_config(), local_norm=config.local_norm,
                                    train_layers=config.train_layers)
    except ConfigError:
        return None


def _fingerprint(msg: Message, context: Context, config: RunConfig, site: SiteConfig,
                 plan: Plan | None) -> RecordDict:
    from client.data.site_fingerprint import site_fingerprint
    from client.training.privacy_ledger import PrivacyLedger

    left = None
    if config.patient_dp:
        left = max(0.0, site.max_epsilon - PrivacyLedger(site.state_dir, delta=site.dp_delta).epsilon())
    fingerprint = site_fingerprint(site.datalist, num_classes=config.num_classes, seed=config.seed,
                                   dp_epsilon_left=left, dp_delta=site.dp_delta, dp_required=site.require_dp)
    return RecordDict({FINGERPRINT: MetricRecord(fingerprint.to_metrics()),
                       SITE: ConfigRecord({SITE_ID: site.site_id})})


def _site_round_seed(seed: int, site_id: str, server_round: int) -> int:
    """A seed that differs per site and round but is reproducible across runs."""
    return (seed * 1_000_003 + zlib.crc32(site_id.encode()) + server_round * 7919) % (2**31)
