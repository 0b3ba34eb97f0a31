"""Local training with DP-SGD (Opacus): Poisson sampling, per-sample clipping, Gaussian noise.

The privacy unit is one case (patient): under DP the loader draws each case
independently with probability ``sample_rate`` and each drawn case gives ONE
training patch, so clipping bounds what one patient contributes to a step.
The model is trained in place with Opacus hooks attached to it
(``wrap_model=False``), so the weight names sent to the server are exactly
those of the non-DP model.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError, DataError

LOG = logging.getLogger("fedseg.client")

if TYPE_CHECKING:
    import torch

    from shared.config import RunConfig
    from shared.plan import Plan

# Fastest correct Opacus per-sample gradient mode, in 2D and 3D alike, measured with
# benchmarks/dp_step.py (BENCHMARKS.md): "hooks" with fedseg's convolution samplers
# (client/training/dp_grad_samplers.py). All modes offered are exact; "ghost" is never used (see shared/config.py).
AUTO_GRAD_SAMPLE_MODE = "hooks"
EPSILON_TOLERANCE = 0.01  # as Opacus' get_noise_multiplier: the noise found spends the budget to within this
Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as an Opacus accountant's history


@dataclass(frozen=True)
class DPPlan:
    """The DP mechanism of one round of local training, known before it runs."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    grad_sample_mode: str


def plan_round(*, config: RunConfig, plan: Plan, num_cases: int, delta: float, max_epsilon: float | None = None,
               spent: Sequence[Mechanism] = (), server_round: int = 1) -> DPPlan:
    """Sampling rate, steps and noise of one round at a site with ``num_cases`` training cases.

    A round is the plan's ``local_steps`` steps; Opacus' Poisson loader draws
    each case with probability ``1 / ceil(N / B)`` (B: the plan's batch size, so
    a site with fewer cases than B sees all of them, each with probability 1,
    every step). The noise multiplier is, in order:
    with run config ``dp-noise-from-budget``, the one that spends what is left
    of the site's ``max_epsilon`` (at its ``delta``; ``spent`` is every round its
    privacy ledger already holds, from this run and earlier ones) evenly over
    this round and the run's remaining rounds after ``server_round``, so a small
    site (sample rate 1) gets more noise than a large one, and a site that
    already spent part of its budget gets more noise rather than running out
    before the run ends; with ``dp-target-epsilon`` > 0, the one that spends
    that epsilon in this round alone; otherwise ``dp-noise-multiplier``.

    Raises
    ------
    PrivacyBudgetExceeded
        With ``dp-noise-from-budget``, if ``spent`` alone already reaches ``max_epsilon``.
    """
    if num_cases < 1:
        raise DataError("the site has no training cases")
    sample_rate = 1.0 / math.ceil(num_cases / plan.batch_size)
    steps = plan.local_steps
    noise = config.dp_noise_multiplier
    if config.dp_noise_from_budget:
        if max_epsilon is None:
            raise ConfigError("run config key 'dp-noise-from-budget' needs the site's budget (node config "
                              "'max-epsilon')")
        rounds_left = max(1, config.num_rounds - server_round + 1)
        noise = _noise_for(max_epsilon, delta=delta, sample_rate=sample_rate, steps=steps * rounds_left,
                           key="dp-noise-from-budget", spent=tuple(spent))
    elif config.dp_target_epsilon > 0:
        noise = _noise_for(config.dp_target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                           key="dp-target-epsilon")
    mode = AUTO_GRAD_SAMPLE_MODE if config.dp_grad_sample_mode == "auto" else config.dp_grad_sample_mode
    return DPPlan(noise_multiplier=noise, max_grad_norm=config.dp_max_grad_norm, sample_rate=sample_rate,
                  steps=steps, grad_sample_mode=mode)


@functools.lru_cache(maxsize=256)
def _noise_for(epsilon: float, *, delta: float, sample_rate: float, steps: int, key: str,
               spent: tuple[Mechanism, ...] = ()) -> float:
    """Opacus' (RDP) noise multiplier that spends ``epsilon`` in ``steps`` steps after ``spent``.

    ``key`` names the setting for errors. Cached: the search takes 0.1-1 s and
    sites ask the same question round after round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if spent:
        return _noise_after(epsilon, delta=delta, sample_rate=sample_rate, steps=steps, spent=spent)
    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant="rdp"))
    except ValueError as exc:
        raise ConfigError(f"run config key '{key}': epsilon {epsilon} in {steps} steps is not reachable "
                          f"({exc})") from None


def _noise_after(epsilon: float, *, delta: float, sample_rate: float, steps: int,
                 spent: tuple[Mechanism, ...]) -> float:
    """The noise that keeps ``spent`` plus ``steps`` steps within ``epsilon``, spending it to within the tolerance.

    Opacus' ``get_noise_multiplier`` searches for one mechanism alone; this is
    its bisection (same epsilon tolerance) over the composition with ``spent``.
    The noise of the site's last round is kept when it still spends the rest
    of the budget to within the tolerance, so a run's rounds share one noise.
    """
    from opacus.accountants.utils import MAX_SIGMA

    from client.training.privacy_ledger import PrivacyBudgetExceeded, cumulative_epsilon

    def epsilon_with(noise: float) -> float:
        return cumulative_epsilon([*spent, (noise, sample_rate, steps)], delta=delta)

    last_noise, last_rate, _ = spent[-1]
    if last_rate == sample_rate and 0 <= epsilon - epsilon_with(last_noise) <= EPSILON_TOLERANCE:
        return last_noise
    low, high = 0.0, 1.0
    while epsilon_with(high) > epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise PrivacyBudgetExceeded(
                f"privacy budget: the site's ledger already holds epsilon "
                f"{cumulative_epsilon(spent, delta=delta):.3f} (delta {delta:g}) of its max-epsilon {epsilon:g}; "
                "no noise keeps another round within it; not training")
    spent_at_high = epsilon_with(high)
    for _ in range(100):  # bisection: high always fits the budget
        if epsilon - spent_at_high <= EPSILON_TOLERANCE:
            break
        middle = (low + high) / 2
        spent_at_middle = epsilon_with(middle)
        if spent_at_middle <= epsilon:
            high, spent_at_high = middle, spent_at_middle
        else:
            low = middle
    return high


def private_generator() -> torch.Generator:
    """A torch generator seeded from the OS entropy pool, for Poisson sampling and DP noise.

    Never derived from the run's ``seed``: the operator knows that seed, and
    noise or batch membership it can reproduce protects nothing. (Opacus'
    cryptographically secure ``secure_mode`` needs torchcsprng, which is not
    installable in this stack.)
    """
    import torch

    return torch.Generator().manual_seed(secrets.randbits(63))


def train_local_dp(model: torch.nn.Module, loader: Any, *, config: RunConfig, plan: DPPlan,
                   device: torch.device, loss_fn: torch.nn.Module | None = None) -> tuple[float, int]:
    """Train ``model`` in place with DP-SGD for ``plan.steps`` steps; return (mean train loss, steps).

    ``loader`` is one shuffled pass over the cases (the plan's batch size, one
    patch per case, its generator from :func:`private_generator`); Opacus
    replaces its sampler by Poisson sampling at ``plan.sample_rate``. ``loss_fn``: as
    :func:`client.training.local.train_local`.
    """
    from client.training.local import make_optimizer, mean_loss, run_steps

    model.to(device).train()
    optimizer = make_optimizer(model, config=config)
    hooks, dp_optimizer, dp_loader = make_private(model, optimizer, loader, plan=plan)
    # Opacus guesses the shape of an empty *first* batch from dataset[0], which fails for
    # MONAI's dict-of-tensors items; without the guess it yields [] and run_epochs treats
    # that as an empty batch (noise-only step). Later empty batches copy the first batch's dict.
    dp_loader.collate_fn.sample_empty_shapes = None
    _check_mechanism(dp_loader, plan)
    try:
        losses = run_steps(model, dp_loader, dp_optimizer, steps=plan.steps, device=device, per_sample_grads=True,
                           loss_fn=loss_fn)
    finally:
        hooks.cleanup()
    if not losses:  # tiny sites: every Poisson batch of the round can come up empty
        LOG.warning("no case was drawn in any DP-SGD step of this round: the update is noise only "
                    "(as DP-SGD with Poisson sampling allows) and has no training loss")
    return mean_loss(losses), plan.steps


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, *,
                 plan: DPPlan) -> tuple[Any, Any, Any]:
    """Opacus ``make_private`` as fedseg uses it: (hooks, DP optimizer, Poisson loader).

    Hooks are attached to ``model`` itself (``wrap_model=False``), noise comes
    from :func:`private_generator`. The loss is a batch mean (DiceCE with
    ``batch=False`` is a mean of per-case losses) and the optimizer divides the
    clipped sum by the expected batch size (Opacus' ``"mean"``), but the
    backward pass starts from the summed loss (:func:`client.training.local.train_step`
    multiplies by the batch length) and the hooks run Opacus' ``"sum"``: Opacus'
    ``"mean"`` multiplies the output gradient of every hooked layer by the batch
    length instead, a pass over each (2D SegResNet, batches of 8: 46 ms of a
    0.7 s DP step). fedseg's
    own hooks come with them: in-place operations on hooked outputs run out of
    place (:mod:`client.training.dp_inplace`), shifted-window attention gets
    per-example gradients (:mod:`client.training.dp_windows`), and Opacus keeps each
    per-sample gradient without a copy (:mod:`client.training.opacus_patches`); large convolutions at few
    pixels give their per-sample norms without their per-sample gradients (:mod:`client.training.dp_ghost`), which
    fedseg's DP optimizer clips in one batch weight gradient, adding the noise without Opacus' copies
    (:mod:`client.training.dp_optimizer`; the same clipping and noise).
    """
    from opacus import PrivacyEngine

    # importing them registers fedseg's grad samplers: convolutions and PReLU, group and instance norm, windows
    from client.training import (  # noqa: F401
        dp_ghost,
        dp_grad_samplers,
        dp_inplace,
        dp_norm_samplers,
        dp_windows,
        opacus_patches,
    )
    from client.training.dp_optimizer import upgrade

    opacus_patches.apply()

    hooks, dp_optimizer, dp_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, poisson_sampling=True, grad_sample_mode=plan.grad_sample_mode,
        loss_reduction="sum", wrap_model=False, noise_generator=private_generator())
    dp_optimizer.loss_reduction = "mean"  # the update is the clipped sum over the expected batch size
    # fedseg's forward hooks join Opacus' own, so hooks.cleanup() removes them too
    hooks.autograd_grad_sample_hooks.extend(dp_inplace.attach(model) + dp_windows.attach(model))
    hooks.autograd_grad_sample_hooks.append(dp_ghost.attach(model))
    dp_optimizer = upgrade(dp_optimizer)
    return hooks, dp_optimizer, dp_loader


def _check_mechanism(dp_loader: Any, plan: DPPlan) -> None:
    """The ledger was charged for ``plan``: refuse to run any other sampling rate."""
    if not math.isclose(dp_loader.sample_rate, plan.sample_rate):
        raise RuntimeError(f"Opacus loader (sample rate {dp_loader.sample_rate}) differs from the charged plan {plan}")
