"""Under DP, the plan's network width is chosen so that DP-SGD can learn at the sites holding most cases.

DP-SGD's noise in a step's averaged gradient grows with the square root of
the number of trained weights, while the clipped signal does not
(:mod:`shared.dp_advice`). nnU-Net's widths (32 filters doubling to 320) are
sized for GPUs without DP; with a privacy budget and the few dozen cases a
hospital has per task, such a network's update is mostly noise. So when the
run trains with DP and the width comes from the preset (run config
``channels`` unset, ``base-filters``/``max-filters`` as the preset has them),
the plan halves the width, down to :data:`MIN_BASE_FILTERS`, until sites
holding at least :data:`LEARNABLE_CASE_SHARE` of the federation's cases can
learn (a smaller network also leaves memory for larger batches, which helps
again). Sites that stay above the threshold are warned before round 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from shared.config import AUTO, PRESETS, RunConfig
from shared.dp_advice import DPAdvice, dp_advice
from shared.fingerprint import Fingerprint
from shared.plan import Plan

MIN_BASE_FILTERS = 4
#: The share of the federation's cases that must sit at sites where DP-SGD can learn.
LEARNABLE_CASE_SHARE = 0.5


def site_dp_advice(config: RunConfig, plan: Plan, fingerprint: Fingerprint) -> DPAdvice | None:
    """The site's DP-SGD outlook under ``plan`` (None without DP or when the site did not state its budget)."""
    if not config.dp or fingerprint.dp_epsilon_left is None:
        return None
    return dp_advice(cases=fingerprint.cases, batch_size=plan.batch_size, steps_per_round=plan.local_steps,
                     rounds=config.num_rounds, epsilon=max(fingerprint.dp_epsilon_left, 1e-3),
                     delta=fingerprint.dp_delta or 1e-5,
                     weights=trained_weights(plan, train_layers=config.train_layers))


def trained_weights(plan: Plan, *, train_layers: str = "all") -> int:
    """Number of weights the plan's network trains (run config ``train-layers``; counted on torch's ``meta``
    device): DP-SGD noises only those."""
    import torch

    from shared.local_weights import frozen_weight_names
    from shared.model import build_model

    frozen = frozen_weight_names(plan.model_config(), train_layers=train_layers)
    with torch.device("meta"):
        model = build_model(plan.model_config())
    return sum(p.numel() for name, p in model.named_parameters() if name not in frozen)


def learnable_case_share(config: RunConfig, plan: Plan, fingerprints: Mapping[str, Fingerprint]) -> float:
    """The share of cases at sites whose DP-SGD outlook under ``plan`` is learnable (1.0 without DP)."""
    outlooks = {site: site_dp_advice(config, plan, f) for site, f in fingerprints.items()}
    stated = {site: advice for site, advice in outlooks.items() if advice is not None}
    if not stated:
        return 1.0
    total = sum(fingerprints[site].cases for site in stated)
    return sum(fingerprints[site].cases for site, advice in stated.items() if advice.learnable) / total


def width_is_the_presets(config: RunConfig) -> bool:
    """True when nothing but the preset fixed the network's width (so the plan may narrow it)."""
    preset = PRESETS[config.preset]
    return (config.channels == AUTO and config.base_filters == preset.get("base-filters")
            and config.max_filters == preset.get("max-filters"))


def narrower_widths(config: RunConfig) -> list[RunConfig]:
    """The config with the width halved, then halved again, ... down to :data:`MIN_BASE_FILTERS`."""
    configs = []
    base, top = config.base_filters, config.max_filters
    while base // 2 >= MIN_BASE_FILTERS:
        base, top = base // 2, max(base // 2, top // 2)
        configs.append(dataclasses.replace(config, base_filters=base, max_filters=top))
    return configs
