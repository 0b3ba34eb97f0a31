"""The round's rule for large updates: bound them to the honest majority, reject only clear outliers.

Real hospitals differ by 10x or more in the norm of their update (data size,
contrast, how far their data are from the global model), so a large norm is no
proof of a bad update. The rule therefore has two tiers, both measured against
the round's **yardstick**, the lower median of the update norms (updates that
change nothing, norm 0, carry no step and are not counted):

- **bound**: an update whose change to the global model has a norm above
  ``bound_factor`` x yardstick is scaled down to that norm (norm bounding, Sun
  et al. 2019, "Can you really backdoor federated learning?"). It keeps its
  direction and is aggregated; only its step is capped.
- **reject**: with at least ``outlier_min_sites`` updates (never fewer than 4),
  an update is left out only when it is a clear outlier on both counts: its norm
  is above ``outlier_factor`` x yardstick, *and* its log-norm lies more than
  :data:`OUTLIER_Z` robust standard deviations above the round's median log-norm
  (Iglewicz and Hoaglin's modified z-score on the median absolute deviation,
  MAD). The first keeps every site within two orders of magnitude of the
  majority; the second keeps a site that is merely the far end of a round whose
  norms are spread widely anyway.

Why the lower median: with k updates it is the ceil(k/2)-th smallest norm, so a
minority of inflated updates cannot raise it above the largest honest norm. With
two sites it is the smaller norm: nobody can tell which of two sites is honest,
and taking the larger would let one site set its own bound (no defence at all).
The cost to an honest site with the larger update is bounded and visible: its
step is capped at ``bound_factor`` x the other's (11.5x measured on two real
tumour patients: scaled by 0.87), its direction still counts, and it is never
excluded. With two or three sites nothing is ever rejected on its norm.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin (1993): modified z-score above 3.5 marks an outlier
MAD_TO_Z = 0.6745  # the modified z-score's constant (normal quantile: MAD ~ 0.6745 sigma)
MIN_OUTLIER_SITES = 4  # a median and a MAD of three updates are set by two of them


@dataclass(frozen=True)
class NormRule:
    """How a round treats large updates (run config keys in brackets).

    Parameters
    ----------
    bound_factor : float
        Scale down updates above this multiple of the yardstick (``update-norm-bound-factor``; 0: off).
    outlier_factor : float
        A rejected update is above this multiple of the yardstick (``outlier-norm-factor``).
    outlier_min_sites : int
        Reject on norm only with at least this many updates (``outlier-min-sites``; 0: never).
    """

    bound_factor: float = 10.0
    outlier_factor: float = 100.0
    outlier_min_sites: int = 5


@dataclass(frozen=True)
class Bounded:
    """An update scaled down to the round's bound."""

    norm: float
    bound: float
    reason: str

    @property
    def scale(self) -> float:
        """The factor the update's change to the global model is multiplied by (< 1)."""
        return self.bound / self.norm


@dataclass
class NormVerdict:
    """What the rule decided for one round: rejected sites (with reasons) and bounded ones."""

    yardstick: float | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    bounded: dict[str, Bounded] = field(default_factory=dict)


def judge_norms(norms: Mapping[str, float], *, rule: NormRule) -> NormVerdict:
    """Apply ``rule`` to the round's update norms (site -> L2 norm of its change).

    Rejected sites are not also bounded. The yardstick is computed once, from
    every update that passed the per-update checks.
    """
    yardstick = lower_median_of_positive(norms.values())
    if yardstick is None:
        return NormVerdict()
    verdict = NormVerdict(yardstick=yardstick, rejected=clear_outliers(norms, yardstick=yardstick, rule=rule))
    if rule.bound_factor > 0:
        bound = rule.bound_factor * yardstick
        for site, norm in norms.items():
            if site not in verdict.rejected and norm > bound:
                reason = (f"update norm {norm:.4g} is more than {rule.bound_factor:g} x the round's median "
                          f"{yardstick:.4g}: scaled by {bound / norm:.3g} to {bound:.4g}")
                verdict.bounded[site] = Bounded(norm=norm, bound=bound, reason=reason)
    return verdict


def lower_median_of_positive(norms: Iterable[float]) -> float | None:
    """Lower median of the positive values in ``norms``; None if there are none."""
    positive = [n for n in norms if n > 0]
    return statistics.median_low(positive) if positive else None


def clear_outliers(norms: Mapping[str, float], *, yardstick: float, rule: NormRule) -> dict[str, str]:
    """Sites whose norm is a clear outlier (see the module docstring), with the reason."""
    positive = {site: norm for site, norm in norms.items() if norm > 0}
    if rule.outlier_min_sites <= 0 or len(positive) < max(rule.outlier_min_sites, MIN_OUTLIER_SITES):
        return {}
    scores = modified_z_scores(positive)
    limit = rule.outlier_factor * yardstick
    return {site: (f"update norm {norm:.4g} is a clear outlier among {len(positive)} sites: "
                   f"{norm / yardstick:.3g} x the round's median {yardstick:.4g} "
                   f"(limit {rule.outlier_factor:g} x) and {_score_text(scores[site])} robust deviations "
                   f"of log-norm above it (limit {OUTLIER_Z:g})")
            for site, norm in positive.items() if norm > limit and scores[site] > OUTLIER_Z}


def modified_z_scores(norms: Mapping[str, float]) -> dict[str, float]:
    """Each positive norm's modified z-score on the log scale: 0.6745 (log n - median) / MAD.

    Log scale because sites differ by factors, not by offsets. When more than
    half the norms are equal the MAD is 0: any larger norm then scores infinity.
    """
    logs = {site: math.log(norm) for site, norm in norms.items()}
    centre = statistics.median(logs.values())
    mad = statistics.median(abs(value - centre) for value in logs.values())
    if mad == 0:
        return {site: math.inf if value > centre else 0.0 for site, value in logs.items()}
    return {site: MAD_TO_Z * (value - centre) / mad for site, value in logs.items()}


def _score_text(score: float) -> str:
    return "infinitely many" if math.isinf(score) else f"{score:.3g}"
