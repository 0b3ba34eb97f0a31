"""Hospital-level DP on a closed round (DP-FedAvg): clip each site's change, weigh sites equally, release a noisy mean.

The noise and the accounting are :class:`~server.site_dp.SiteDP`'s; this module
feeds it from the round's spool, and notes the round's epsilon in the run folder.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from server.strategies.aggregators import model_plus

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from server.run_folder import RunRecorder
    from server.site_dp import SiteDP
    from server.train_collector import ClosedRound

#: The key of hospital-level DP's state in a checkpoint's strategy state.
SITE_DP_STATE = "site-dp"


def site_dp_mean(site_dp: SiteDP, closed: ClosedRound, *, reference: dict[str, np.ndarray],
                 recorder: RunRecorder, server_round: int, sampled: int) -> ArrayRecord:
    """Clip every accepted change to the site-level norm, sum them with equal weights, release the mean.

    Returns the global model sent this round (``reference``) plus the released mean change.
    """
    bound = site_dp.settings.clipping_norm
    for update in closed.accepted:
        if update.norm > bound:
            closed.spool.scale_to_bound(update, bound=bound)
            recorder.rounds[server_round][update.site]["site-dp-scale"] = bound / update.norm
    k = len(closed.accepted)
    mean = closed.spool.weighted_mean([dataclasses.replace(u, num_examples=1.0) for u in closed.accepted])
    total = [(mean[name].numpy().astype(np.float64) - ref) * k for name, ref in reference.items()]
    return model_plus(reference, release(site_dp, total, recorder=recorder, server_round=server_round,
                                         sampled=max(sampled, k)))


def release(site_dp: SiteDP, total: list[np.ndarray], *, recorder: RunRecorder, server_round: int,
            sampled: int) -> list[np.ndarray]:
    """The noisy mean of ``total`` (the sum of the sites' clipped changes) over ``sampled`` sites; noted per round."""
    noisy = site_dp.release(total, sampled=sampled)
    recorder.note_round(server_round, {
        "site-epsilon": site_dp.epsilon(), "site-dp-delta": site_dp.settings.delta,
        "site-dp-noise-std": site_dp.last_noise_std, "site-dp-sampled": sampled})
    return noisy
