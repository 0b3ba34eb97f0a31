"""How a round's accepted updates become the new global model: one interface, three families.

:class:`Aggregator` is what :class:`~server.strategies.strategy.FedSegStrategy`
calls once a round's training replies are checked and spooled
(:class:`~server.train_collector.ClosedRound`), or once a secure round (or
hospital-level DP) released only the sites' mean. Every aggregator holds the
Flower strategy named in :data:`shared.strategy_table.STRATEGIES` and reuses
its code (its metric aggregation always; its array aggregation where it can run
on what the server holds):

- :class:`StreamingMean` (FedAvg, FedProx): the spool's example-weighted mean,
  folded chunk by chunk (memory O(model), any number of sites);
- :class:`ServerOptimiser` (FedAdam, FedYogi): that mean, then Flower's server
  step along it, with its moments checkpointed;
- :class:`~server.strategies.robust.BufferedRobust` (median, trimmed mean,
  Krum, Multi-Krum, Bulyan): Flower's rule on every accepted update at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from shared.errors import ConfigError
from shared.protocol import ARRAYS, METRICS, PROXIMAL_MU
from shared.strategy_table import STRATEGIES, StrategySpec

if TYPE_CHECKING:
    from flwr.serverapp.strategy import FedOpt

    from server.train_collector import ClosedRound

#: Flower's FedOpt moments, saved in checkpoints under these names.
MOMENTS = ("m_t", "v_t")


class Aggregator(ABC):
    """Turns a closed round (or a released mean) into the new global arrays and the round's train metrics.

    Parameters
    ----------
    flower : flwr.serverapp.strategy.FedAvg
        The Flower strategy whose aggregation this reuses (built with fedseg's ``weighted_by_key``).
    spec : StrategySpec
        The table row it was built from.
    """

    def __init__(self, flower: FedAvg, spec: StrategySpec) -> None:
        self.flower = flower
        self.spec = spec

    @property
    def fewest_updates(self) -> int:
        """The fewest accepted updates this rule is defined for."""
        return 1

    def start_round(self, reference: Mapping[str, np.ndarray]) -> None:
        """Note the global model sent this round (its travelling weights)."""

    def message_config(self) -> dict[str, Any]:
        """What every training message carries for this rule (FedProx: ``proximal-mu``)."""
        return {}

    @abstractmethod
    def aggregate(self, server_round: int,
                  closed: ClosedRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregate of ``closed.accepted`` (in site-id order) and the round's train metrics."""

    def aggregate_mean(self, server_round: int, mean: ArrayRecord, metrics: MetricRecord, *,
                       examples: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model from the sites' mean alone (secure aggregation, hospital-level DP)."""
        raise ConfigError(f"run config key 'strategy': {self.spec.flower} ({self.spec.family}) needs every "
                          "update in the clear, not only their mean")

    def train_metrics(self, metrics: list[Mapping[str, Any]]) -> MetricRecord:
        """The round's train metrics from the sites' ones: Flower's metric aggregation, weighted by examples."""
        records = [RecordDict({METRICS: MetricRecord(dict(m))}) for m in metrics]
        return self.flower.train_metrics_aggr_fn(records, self.flower.weighted_by_key)

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """State a resumed run needs (empty: none)."""
        return {}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Restore what :meth:`state` returned."""


class StreamingMean(Aggregator):
    """The example-weighted mean, read from the spool chunk by chunk in site-id order (FedAvg, FedProx).

    Flower's FedAvg would need every reply in memory; the result is the same
    mean, summed in float64 (see :meth:`~server.update_spool.UpdateSpool.weighted_mean`).
    """

    def __init__(self, flower: FedAvg | None = None, spec: StrategySpec | None = None) -> None:
        super().__init__(flower or FedAvg(), spec or STRATEGIES["fedavg"])

    def message_config(self) -> dict[str, Any]:
        # Flower's FedProx.configure_train adds exactly this; fedseg's strategy does the sampling instead
        return {PROXIMAL_MU: self.flower.proximal_mu} if isinstance(self.flower, FedProx) else {}

    def aggregate(self, server_round: int,
                  closed: ClosedRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean = closed.spool.weighted_mean(closed.accepted)
        return self.aggregate_mean(server_round, mean, self.train_metrics([u.metrics for u in closed.accepted]),
                                   examples=sum(u.num_examples for u in closed.accepted))

    def aggregate_mean(self, server_round: int, mean: ArrayRecord, metrics: MetricRecord, *,
                       examples: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return mean, metrics


class ServerOptimiser(StreamingMean):
    """The streaming mean, then Flower's FedAdam/FedYogi step along it; the moments m_t, v_t are checkpointed.

    Flower's ``aggregate_train`` gets one reply holding the mean (weight: the
    round's examples), so its weighted average is the mean itself, and its step
    starts from the model sent this round (:meth:`start_round`).
    """

    flower: FedOpt

    def start_round(self, reference: Mapping[str, np.ndarray]) -> None:
        # what Flower's FedOpt.configure_train sets, restricted to the weights that travel
        self.flower.current_arrays = dict(reference)

    def aggregate_mean(self, server_round: int, mean: ArrayRecord, metrics: MetricRecord, *,
                       examples: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics[self.flower.weighted_by_key] = examples
        return self.flower.aggregate_train(server_round, [reply_like(mean, metrics)])

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """The first and second moment estimates (empty before the first aggregation).

        ``current_arrays`` is not saved: it is the model sent at the start of every round.
        """
        state: dict[str, dict[str, np.ndarray]] = {}
        for name in MOMENTS:
            moments = getattr(self.flower, name)
            if moments:
                state[name] = {k: np.array(v, copy=True) for k, v in moments.items()}
        return state

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for name in MOMENTS:
            moments = state.get(name)
            setattr(self.flower, name, {k: np.asarray(v) for k, v in moments.items()} if moments else None)


def reply_like(arrays: ArrayRecord, metrics: MetricRecord) -> Message:
    """A message with a reply's content, for Flower's aggregation (which reads only content)."""
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), dst_node_id=0,
                   message_type=MessageType.TRAIN)


def model_plus(reference: Mapping[str, np.ndarray], delta: list[np.ndarray]) -> ArrayRecord:
    """The global model sent this round plus ``delta`` (one array per tensor), in the model's dtypes."""
    return ArrayRecord({name: Array((ref.astype(np.float64) + d.reshape(ref.shape)).astype(ref.dtype))
                        for (name, ref), d in zip(reference.items(), delta, strict=True)})
