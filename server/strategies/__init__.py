"""fedseg strategies: Flower's strategies with site tracking, update checks and checkpointable state.

One strategy per module; :func:`build_strategy` picks the one named by run
config ``strategy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.run_folder import RunRecorder
    from server.strategies.tracking import SiteTracking
    from shared.config import RunConfig


def build_strategy(config: RunConfig, recorder: RunRecorder) -> SiteTracking:
    """The strategy named by run config ``strategy``, configured from the run config."""
    from server.norm_bounds import NormRule
    from server.site_dp import SiteDP, SiteDPSettings
    from server.strategies.fedadam import FedSegFedAdam
    from server.strategies.fedavg import FedSegFedAvg
    from server.strategies.fedmedian import FedSegFedMedian
    from server.strategies.fedprox import FedSegFedProx
    from server.strategies.fedtrimmedavg import FedSegFedTrimmedAvg
    from server.strategies.fedyogi import FedSegFedYogi
    from shared.protocol import ARRAYS, CONFIG, NUM_EXAMPLES

    common: dict[str, Any] = {
        "recorder": recorder, "seed": config.seed, "min_train_replies": config.min_train_replies,
        "norm_rule": NormRule(bound_factor=config.update_norm_bound_factor, outlier_factor=config.outlier_norm_factor,
                              outlier_min_sites=config.outlier_min_sites),
        "fraction_train": config.fraction_train, "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes, "min_evaluate_nodes": config.min_train_nodes,
        "min_available_nodes": config.min_available_nodes,
        # the records and the weight of fedseg's messages (Flower's defaults today, named so they stay fedseg's)
        "weighted_by_key": NUM_EXAMPLES, "arrayrecord_key": ARRAYS, "configrecord_key": CONFIG,
    }
    site_dp = SiteDPSettings.from_config(config)
    if site_dp is not None:
        common["site_dp"] = SiteDP(site_dp)
    server_optimiser = {"eta": config.server_learning_rate, "eta_l": config.learning_rate, "tau": config.server_tau}
    builders = {
        "fedavg": lambda: FedSegFedAvg(**common),
        "fedprox": lambda: FedSegFedProx(**common, proximal_mu=config.proximal_mu),
        "fedadam": lambda: FedSegFedAdam(**common, **server_optimiser),
        "fedyogi": lambda: FedSegFedYogi(**common, **server_optimiser),
        "fedmedian": lambda: FedSegFedMedian(**common),
        "fedtrimmedavg": lambda: FedSegFedTrimmedAvg(**common, beta=config.trim_fraction),
    }
    return builders[config.strategy]()
