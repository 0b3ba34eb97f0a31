"""fedseg strategies: one Flower strategy for sampling and configuration, composed with an aggregator.

:func:`build_strategy` builds :class:`~server.strategies.strategy.FedSegStrategy`
with the aggregator that run config ``strategy`` names in the table of
strategies (:data:`shared.strategy_table.STRATEGIES`): the row's family picks
the aggregator class, its Flower class (from ``flwr.serverapp.strategy``) is
built with the keyword arguments its run-config keys give.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.run_folder import RunRecorder
    from server.strategies.aggregators import Aggregator
    from server.strategies.strategy import FedSegStrategy
    from shared.config import RunConfig


def build_aggregator(config: RunConfig) -> Aggregator:
    """The aggregator of run config ``strategy``, its Flower class configured from the run config."""
    import flwr.serverapp.strategy as flower_strategies

    from server.strategies.aggregators import ServerOptimiser, StreamingMean
    from server.strategies.robust import BufferedRobust
    from shared.protocol import NUM_EXAMPLES
    from shared.strategy_table import BUFFERED_ROBUST, SERVER_OPTIMISER, strategy_spec

    spec = strategy_spec(config.strategy)
    flower = getattr(flower_strategies, spec.flower)(
        weighted_by_key=NUM_EXAMPLES, **{arg: getattr(config, field) for arg, field in spec.params.items()})
    if spec.family == BUFFERED_ROBUST:
        return BufferedRobust(flower, spec, malicious_sites=config.malicious_sites,
                              keep_all_but_malicious="multikrum-keep" in spec.keys and config.multikrum_keep == 0)
    if spec.family == SERVER_OPTIMISER:
        return ServerOptimiser(flower, spec)
    return StreamingMean(flower, spec)


def build_strategy(config: RunConfig, recorder: RunRecorder) -> FedSegStrategy:
    """The strategy named by run config ``strategy``, configured from the run config."""
    from server.norm_bounds import NormRule
    from server.site_dp import SiteDP, SiteDPSettings
    from server.strategies.strategy import FedSegStrategy
    from shared.protocol import ARRAYS, CONFIG, NUM_EXAMPLES

    site_dp = SiteDPSettings.from_config(config)
    common: dict[str, Any] = {
        "recorder": recorder, "seed": config.seed, "min_train_replies": config.min_train_replies,
        "norm_rule": NormRule(bound_factor=config.update_norm_bound_factor, outlier_factor=config.outlier_norm_factor,
                              outlier_min_sites=config.outlier_min_sites),
        "fraction_train": config.fraction_train, "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes, "min_evaluate_nodes": config.min_train_nodes,
        "min_available_nodes": config.min_available_nodes,
        # the records and the weight of fedseg's messages (Flower's defaults today, named so they stay fedseg's)
        "weighted_by_key": NUM_EXAMPLES, "arrayrecord_key": ARRAYS, "configrecord_key": CONFIG,
        "site_dp": SiteDP(site_dp) if site_dp is not None else None,
    }
    return FedSegStrategy(aggregator=build_aggregator(config), **common)
