"""One round of DP-SGD at a site: the site's policy, its ledger, then Opacus training."""

from __future__ import annotations

import logging
from typing import Any

from client.site import SiteConfig
from shared.config import RunConfig
from shared.errors import DataError, FedSegError

LOG = logging.getLogger("fedseg.client")


class PrivacyPolicyError(FedSegError):
    """The run's configuration violates the site's privacy policy."""


def check_dp_policy(config: RunConfig, site: SiteConfig) -> None:
    """Refuse a run without DP at a site whose policy (node config ``require-dp``) requires it."""
    if site.require_dp and not config.dp:
        raise PrivacyPolicyError(
            "this site requires differential privacy (node config 'require-dp') and the run is "
            "configured without it (run config 'dp' = false); not training")


def train_private(model: Any, cases: list, augment: Any, *, config: RunConfig, site: SiteConfig,
                  device: Any, run_id: int, server_round: int) -> dict[str, float | int]:
    """Charge the round to the site's privacy ledger (refusing past the budget), then train with DP-SGD."""
    from client.dp_training import plan_round, private_generator, train_local_dp
    from client.loading import training_loader
    from client.privacy_ledger import PrivacyLedger

    if not cases:
        raise DataError("the site has no training cases")
    ledger = PrivacyLedger(site.state_dir, delta=site.dp_delta)
    plan = plan_round(config=config, num_cases=len(cases), delta=site.dp_delta, max_epsilon=site.max_epsilon,
                      spent=[entry.mechanism() for entry in ledger.entries()] if config.dp_noise_from_budget else (),
                      server_round=server_round)
    charge = ledger.charge(
        run_id=run_id, server_round=server_round, noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, steps=plan.steps, max_epsilon=site.max_epsilon)
    loader = training_loader(cases, augment, batch_size=config.batch_size, generator=private_generator())
    train_loss, steps = train_local_dp(model, loader, config=config, plan=plan, device=device)
    LOG.info("site %s: DP round %d, epsilon +%.3f -> %.3f of %.3f", site.site_id, server_round,
             charge.epsilon_round, charge.epsilon, site.max_epsilon)
    return {"num-examples": len(cases), "train-loss": train_loss, "steps": steps, "dp": 1,
            "epsilon": charge.epsilon, "epsilon-round": charge.epsilon_round, "dp-delta": site.dp_delta,
            "dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate}
