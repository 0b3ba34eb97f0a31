"""Hospital-level differential privacy: DP-FedAvg (McMahan et al. 2018) over whole sites' updates.

Run config ``dp-level = "site"`` (or ``"patient+site"``). Each round:

- every accepted site's change to the global model is clipped to L2 norm S =
  ``dp-site-clipping-norm`` (Flower's ``compute_clip_model_update``; with secure
  aggregation each site clips before masking), and the sites weigh equally;
- their sum is divided by the number of sites **sampled** m, not by the number
  that answered: the fixed denominator keeps one site's influence at S / m;
- Gaussian noise of standard deviation z S / m (Flower's ``compute_stdv``, z =
  ``dp-site-noise-multiplier``) is added to that mean change;
- Flower's RDP accountant (``flwr.supercore.privacy_accounting``, Google's
  dp-accounting underneath) composes one Gaussian release with noise multiplier
  z under add-or-remove-one-site neighbouring and reports epsilon at
  ``dp-site-delta``.

Each round's sample of sites is recorded (``site-dp-sampled``) but gives no
amplification: fedseg draws it from (``seed``, round) so that a resumed run asks
the same sites, and a sample anyone with the run config can recompute amplifies
nothing (subsampling bounds need a draw the adversary cannot see); the
population can also change between rounds. So every round counts in full, as
in Flower's own fixed-clipping accounting; with ``fraction-train`` < 1 that is
an upper bound on what a secret draw would give.

The noise comes from a generator seeded by the operating system, not from the
run's seed (the server seeds NumPy's global generator for reproducible
sampling, so Flower's ``add_gaussian_noise_inplace`` would draw noise that
anyone with the run config can regenerate and subtract). Rounds with site-level
DP are therefore not bit-identical when a run is resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from shared.config import RunConfig

#: The accountant's population: without amplification Flower keeps sampling metadata for reports only.
_NO_SAMPLING = 1


@dataclass(frozen=True)
class SiteDPSettings:
    """The mechanism of a run (run config ``dp-site-*``)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float

    @classmethod
    def from_config(cls, config: RunConfig) -> SiteDPSettings | None:
        """The run's settings, or None when hospital-level DP is off."""
        if not config.site_dp:
            return None
        return cls(noise_multiplier=config.dp_site_noise_multiplier, clipping_norm=config.dp_site_clipping_norm,
                   delta=config.dp_site_delta)


class SiteDP:
    """Adds the noise to each round's mean change and keeps the epsilon spent so far.

    Parameters
    ----------
    settings : SiteDPSettings
        Noise multiplier, clipping norm and delta.
    rng : numpy.random.Generator, optional
        Source of the noise (default: seeded by the operating system; tests pass their own).
    """

    def __init__(self, settings: SiteDPSettings, *, rng: np.random.Generator | None = None) -> None:
        self.settings = settings
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.delta, population_size=_NO_SAMPLING,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        self.last_noise_std = 0.0

    def release(self, total_change: Sequence[np.ndarray], *, sampled: int) -> list[np.ndarray]:
        """The private mean change: ``total_change`` (sum of the clipped changes) / ``sampled`` plus noise.

        Composes one release in the accountant. ``sampled`` is the number of
        sites asked to train this round (>= the number whose change is in the sum).
        """
        if sampled < 1:
            raise ValueError(f"sampled must be >= 1, got {sampled}")
        std = compute_stdv(self.settings.noise_multiplier, self.settings.clipping_norm, sampled)
        noisy = [np.asarray(t, dtype=np.float64) / sampled + self.rng.normal(0.0, std, np.shape(t))
                 for t in total_change]
        self.accountant.compose(self._event())
        self.last_noise_std = std
        return noisy

    @property
    def releases(self) -> int:
        """Rounds released so far."""
        return self.accountant.num_releases

    def epsilon(self) -> float:
        """Epsilon spent at ``delta`` over every release so far (0 before the first)."""
        return self.accountant.get_epsilon(self.settings.delta) if self.releases else 0.0

    def state(self) -> dict[str, np.ndarray]:
        """What a resumed run needs: the number of releases (all with this run's noise multiplier)."""
        return {"releases": np.array([self.releases], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Compose the releases of a checkpointed run again (the config is checked equal on resume)."""
        count = int(np.asarray(state["releases"]).reshape(-1)[0])
        if count:
            self.accountant.compose(self._event(), count)

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.settings.noise_multiplier, sample_size=_NO_SAMPLING,
                                    population_size=_NO_SAMPLING)
