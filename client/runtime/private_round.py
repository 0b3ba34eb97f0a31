"""One round of DP-SGD at a site: the site's policy, its ledger, then Opacus training."""

from __future__ import annotations

import logging
from typing import Any

from client.runtime.site_config import SiteConfig
from shared.config import RunConfig
from shared.errors import DataError, FedSegError
from shared.plan import Plan
from shared.protocol import (
    DP,
    DP_DELTA,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    EPSILON,
    EPSILON_ROUND,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_LOSS,
)

LOG = logging.getLogger("fedseg.client")


class PrivacyPolicyError(FedSegError):
    """The run's configuration violates the site's privacy policy."""


def check_dp_policy(config: RunConfig, site: SiteConfig) -> None:
    """Refuse a run without DP at a site whose policy (node config ``require-dp``) requires it."""
    if site.require_dp and not config.patient_dp:
        raise PrivacyPolicyError(
            "this site requires differential privacy for its patients (node config 'require-dp') and the run "
            f"trains without DP-SGD (run config 'dp' = {str(config.dp).lower()}, 'dp-level' = "
            f"{config.dp_level!r}); not training")


def train_private(model: Any, cases: list, augment: Any, *, config: RunConfig, plan: Plan, site: SiteConfig,
                  device: Any, run_id: int, server_round: int) -> dict[str, float | int]:
    """Charge the round to the site's privacy ledger (refusing past the budget), then train with DP-SGD."""
    from client.data.loading import training_loader
    from client.training.dp_sgd import plan_round, private_generator, train_local_dp
    from client.training.local import make_loss
    from client.training.privacy_ledger import PrivacyLedger

    if not cases:
        raise DataError("the site has no training cases")
    ledger = PrivacyLedger(site.state_dir, delta=site.dp_delta)
    mechanism = plan_round(config=config, plan=plan, num_cases=len(cases), delta=site.dp_delta,
                           max_epsilon=site.max_epsilon, server_round=server_round,
                           spent=[entry.mechanism() for entry in ledger.entries()] if config.dp_noise_from_budget else ())
    charge = ledger.charge(
        run_id=run_id, server_round=server_round, noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate, steps=mechanism.steps, max_epsilon=site.max_epsilon)
    _warn_if_noise_dominates(model, mechanism, cases=len(cases), rounds=config.num_rounds, site=site.site_id)
    loader = training_loader(cases, augment, batch_size=plan.batch_size, generator=private_generator())
    train_loss, steps = train_local_dp(model, loader, config=config, plan=mechanism, device=device,
                                       loss_fn=make_loss(model_config=plan.model_config()))
    LOG.info("site %s: DP round %d, epsilon +%.3f -> %.3f of %.3f", site.site_id, server_round,
             charge.epsilon_round, charge.epsilon, site.max_epsilon)
    return {NUM_EXAMPLES: len(cases), TRAIN_LOSS: train_loss, STEPS: steps, DP: 1,
            EPSILON: charge.epsilon, EPSILON_ROUND: charge.epsilon_round, DP_DELTA: site.dp_delta,
            DP_NOISE_MULTIPLIER: mechanism.noise_multiplier, DP_SAMPLE_RATE: mechanism.sample_rate}


def _warn_if_noise_dominates(model: Any, mechanism: Any, *, cases: int, rounds: int, site: str) -> None:
    """Log (at the site) when the run's updates will be mostly DP noise (:mod:`shared.dp_advice`)."""
    from shared.dp_advice import LEARNABLE_NOISE_RATIO, noise_ratio

    ratio = noise_ratio(noise_multiplier=mechanism.noise_multiplier,
                        weights=sum(p.numel() for p in model.parameters() if p.requires_grad),
                        expected_batch=mechanism.sample_rate * cases, steps=mechanism.steps * rounds)
    if ratio > LEARNABLE_NOISE_RATIO:
        LOG.warning("site %s: this run's DP-SGD updates are mostly noise (noise/signal over the run %.1f > %.1f: "
                    "%d cases, noise multiplier %.2f); a larger budget (node config 'max-epsilon'), fewer rounds "
                    "or steps, or joining without DP would let it learn", site, ratio, LEARNABLE_NOISE_RATIO,
                    cases, mechanism.noise_multiplier)
