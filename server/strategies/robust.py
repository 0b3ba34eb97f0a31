"""Robust aggregation rules that need every accepted update at once: Flower's own, fed from the spool.

FedMedian and FedTrimmedAvg (Yin et al. 2018), Krum and Multi-Krum
(Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018) are Flower's
``flwr.serverapp.strategy`` classes; :class:`BufferedRobust` reads the round's
accepted updates back from the spool (already checked, and scaled where the
round's norm rule bounded them) and hands them to that class's
``aggregate_train`` in site-id order. Memory: every accepted update, while the
round is aggregated (the mean families hold one chunk at a time).

Krum's family assumes at most ``malicious-sites`` (f) bad updates in a round of
n: Krum and Multi-Krum are defined for n >= 2f + 3, Bulyan for n >= 4f + 3. The
run config refuses a ``min-train-nodes`` below that; a round in which refusals or
failures leave fewer accepted updates keeps the global model and says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import MetricRecord
from flwr.serverapp.strategy import MultiKrum

from server.strategies.aggregators import Aggregator, reply_like

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from server.train_collector import ClosedRound
    from shared.strategy_table import StrategySpec


class BufferedRobust(Aggregator):
    """Flower's robust rule on every accepted update of the round.

    Parameters
    ----------
    flower : flwr.serverapp.strategy.FedAvg
        FedMedian, FedTrimmedAvg, Krum, MultiKrum or Bulyan, configured from the run config.
    spec : StrategySpec
        The table row it was built from.
    malicious_sites : int
        The run config's ``malicious-sites`` (f), which sets the fewest updates the rule needs.
    keep_all_but_malicious : bool
        Multi-Krum with ``multikrum-keep`` = 0: keep n - f updates in a round of n.
    """

    def __init__(self, flower: FedAvg, spec: StrategySpec, *, malicious_sites: int = 0,
                 keep_all_but_malicious: bool = False) -> None:
        super().__init__(flower, spec)
        self.malicious_sites = malicious_sites
        self.keep_all_but_malicious = keep_all_but_malicious

    @property
    def fewest_updates(self) -> int:
        return self.spec.fewest_updates(self.malicious_sites)

    def aggregate(self, server_round: int,
                  closed: ClosedRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        n = len(closed.accepted)
        if self.keep_all_but_malicious and isinstance(self.flower, MultiKrum):
            self.flower.num_nodes_to_select = max(1, n - self.malicious_sites)
        replies = [reply_like(closed.spool.as_record(u), MetricRecord(u.metrics)) for u in closed.accepted]
        return self.flower.aggregate_train(server_round, replies)
