"""Can DP-SGD learn at a site? The noise the run adds against the clipped signal, known before round 1.

A DP-SGD step adds Gaussian noise of std ``sigma x C`` to every coordinate of
the sum of the clipped per-case gradients (each of norm <= C) and divides by
the expected batch ``q x n``. The noise in the averaged gradient then has norm
about ``sigma x C x sqrt(P) / (q x n)`` for P trained weights, against a signal
of norm at most C: per step the ratio is ``sigma x sqrt(P) / (q x n)``. Over
the T steps a site takes in the run the noise adds up as ``sqrt(T)`` while a
consistent signal adds up as T, so :attr:`DPAdvice.noise_ratio` is that ratio
divided by ``sqrt(T)``; how T is split into rounds does not change it (each
round's noise stays in the averaged model). Above :data:`LEARNABLE_NOISE_RATIO`
the site's contribution is mostly noise.

For a fixed budget and T, ``sigma / (q x n)`` hardly depends on the batch
(the accountant raises sigma about in proportion to the sample rate q), so a
larger batch buys little against the noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: 10 per 250-step round on a 5-round run, i.e. 10 / sqrt(5) over the run. Uncalibrated beyond that:
#: it separates a dozen cases from a few hundred (README, the DP outlook).
LEARNABLE_NOISE_RATIO = 10.0 / math.sqrt(5)


@dataclass(frozen=True)
class DPAdvice:
    """One site's DP-SGD mechanism over the run, and whether it can learn."""

    cases: int
    expected_batch: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon: float
    delta: float
    noise_multiplier: float
    weights: int
    noise_ratio: float

    @property
    def learnable(self) -> bool:
        return self.noise_ratio <= LEARNABLE_NOISE_RATIO

    def warning(self, site: str) -> str | None:
        """What to tell the operator and the site when DP-SGD cannot learn there, else None."""
        if self.learnable:
            return None
        return (f"site {site}: DP-SGD is unlikely to learn ({self.cases} cases, expected batch "
                f"{self.expected_batch:.0f}, noise multiplier {self.noise_multiplier:.2f} to spend epsilon "
                f"{self.epsilon:g} over {self.rounds} rounds of {self.steps_per_round} steps; noise/signal over "
                f"the run {self.noise_ratio:.1f} > {LEARNABLE_NOISE_RATIO:.1f}). To change it: a larger "
                "budget (node config 'max-epsilon'), fewer rounds or steps (run config 'num-rounds', "
                "'local-steps'), a smaller network, or joining without DP if the site's policy allows "
                "(node config 'require-dp' = false)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learnable": self.learnable}


def noise_ratio(*, noise_multiplier: float, weights: int, expected_batch: float, steps: int) -> float:
    """Noise against the clipped signal over ``steps`` steps, the run's (see the module docstring)."""
    return noise_multiplier * math.sqrt(weights) / expected_batch / math.sqrt(steps)


def dp_advice(*, cases: int, batch_size: int, steps_per_round: int, rounds: int, epsilon: float, delta: float,
              weights: int) -> DPAdvice:
    """The noise that spends ``epsilon`` over the run at this site (Opacus' RDP accountant) and its ratio."""
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = 1.0 / math.ceil(cases / batch_size)
    try:
        noise = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                           steps=steps_per_round * rounds, accountant="rdp"))
    except ValueError:
        noise = math.inf
    expected_batch = sample_rate * cases
    ratio = noise_ratio(noise_multiplier=noise, weights=weights, expected_batch=expected_batch,
                        steps=steps_per_round * rounds)
    return DPAdvice(cases=cases, expected_batch=expected_batch, sample_rate=sample_rate,
                    steps_per_round=steps_per_round, rounds=rounds, epsilon=epsilon, delta=delta,
                    noise_multiplier=noise, weights=weights, noise_ratio=ratio)
