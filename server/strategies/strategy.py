"""fedseg's Flower strategy: Flower's FedAvg samples and configures the rounds, an aggregator combines updates.

:class:`FedSegStrategy` is one class for every run config ``strategy``: what
differs between them is its :class:`~server.strategies.aggregators.Aggregator`
(built from the table, :func:`server.strategies.build_strategy`). The class

- samples nodes with Flower's FedAvg, reproducibly from (seed, round), so a
  resumed run asks the same nodes as the uninterrupted one would have
  (:mod:`server.strategies.sampling`), and adds the aggregator's entries
  (FedProx: ``proximal-mu``) to every training message;
- hands the round's training replies to one :class:`~server.train_collector.TrainCollector`
  (checked and spooled as they arrive; outliers rejected and large updates
  bounded when the round closes) and every site's outcome to the
  :class:`~server.run_folder.RunRecorder`;
- asks the aggregator for the new global model, from the closed round or, in a
  secure round and with hospital-level DP, from the sites' mean alone;
- with run config ``local-norm`` or ``train-layers``, leaves the weights that
  never travel (:attr:`FedSegStrategy.staying_weights`) out of every check and
  aggregate: the global model keeps the values it sent;
- exposes its state (the aggregator's and hospital-level DP's) for checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from server.norm_bounds import NormRule
from server.site_replies import ReplyCollector, SortedReplies, sort_replies
from server.strategies.aggregators import Aggregator, StreamingMean, model_plus
from server.strategies.sampling import SortedNodes, seeded_sampling
from server.strategies.site_dp_mean import SITE_DP_STATE, release, site_dp_mean
from server.train_collector import ClosedRound, TrainCollector
from server.update_checks import reference_arrays
from shared.local_weights import travelling

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.run_folder import RunRecorder
    from server.secagg_round import SecureRoundResult
    from server.site_dp import SiteDP

LOG = logging.getLogger("fedseg.server")

__all__ = ["SITE_DP_STATE", "FedSegStrategy"]


class FedSegStrategy(FedAvg):
    """Flower's FedAvg for sampling and configuration, composed with an aggregator; see the module docstring.

    Parameters
    ----------
    recorder : RunRecorder
        Receives every site's outcome each round.
    aggregator : Aggregator, optional
        Combines the accepted updates (default: :class:`StreamingMean`, FedAvg).
    seed : int
        Seeds node sampling per round.
    min_train_replies : int
        Fewer accepted updates than this keep the global model unchanged for the round.
    norm_rule : NormRule
        How large updates are bounded or rejected (default: :class:`NormRule`'s defaults).
    site_dp : SiteDP, optional
        Hospital-level DP (:mod:`server.site_dp`): clip, weigh sites equally, add noise, account.
    **kwargs
        Passed to Flower's FedAvg (sampling fractions and minimums, record keys).
    """

    def __init__(self, *, recorder: RunRecorder, aggregator: Aggregator | None = None, seed: int = 0,
                 min_train_replies: int = 1, norm_rule: NormRule | None = None, site_dp: SiteDP | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregator = aggregator or StreamingMean()
        self.site_dp = site_dp
        self._sampled = 0
        self.recorder = recorder
        self.seed = seed
        self.min_train_replies = min_train_replies
        self.norm_rule = norm_rule or NormRule()
        self.known_sites: dict[int, str] = {}
        #: What every train and evaluate message carries in its config record (the run's plan).
        self.message_config: dict[str, str] = {}
        #: Weights that never travel (run config ``local-norm``, ``train-layers``): not in an update, not averaged.
        self.staying_weights: frozenset[str] = frozenset()
        self._reference: dict[str, np.ndarray] | None = None
        self._sent: ArrayRecord | None = None

    # --- strategy state for checkpoints -------------------------------------------------
    def strategy_state(self) -> dict[str, dict[str, np.ndarray]]:
        """State beyond the global weights that a resumed run needs (hospital-level DP's, the aggregator's)."""
        state = {SITE_DP_STATE: self.site_dp.state()} if self.site_dp is not None else {}
        return {**state, **self.aggregator.state()}

    def load_strategy_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        if self.site_dp is not None and SITE_DP_STATE in state:
            self.site_dp.load_state(state[SITE_DP_STATE])
        self.aggregator.load_state(state)

    def message_record(self) -> ConfigRecord:
        """The config record every train and evaluate message carries (:attr:`message_config`)."""
        return ConfigRecord(dict(self.message_config))

    # --- sampling -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling, made reproducible; remember the model sent for the update checks."""
        self.expect_updates_of(arrays)
        config = ConfigRecord({**dict(config.items()), **self.aggregator.message_config()})
        with seeded_sampling(self.seed, server_round, "train"):
            messages = list(super().configure_train(server_round, arrays, config, SortedNodes(grid)))
        self._sampled = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's evaluation sampling, made reproducible."""
        with seeded_sampling(self.seed, server_round, "evaluate"):
            return list(super().configure_evaluate(server_round, arrays, config, SortedNodes(grid)))

    # --- training replies ---------------------------------------------------------------
    def expect_updates_of(self, arrays: ArrayRecord) -> None:
        """Set the global model that this round's updates are checked against (its travelling weights)."""
        self._sent = arrays
        self._reference = travelling(reference_arrays(arrays), self.staying_weights)
        self.aggregator.start_round(self._reference)

    def train_collector(self) -> TrainCollector:
        """A collector for this round's training replies (after :meth:`expect_updates_of`)."""
        if self._reference is None:
            raise RuntimeError("expect_updates_of() must be called before collecting updates")
        return TrainCollector(reference=self._reference, spool_parent=Path(self.recorder.run_dir),
                              known_sites=self.known_sites, norm_rule=self.norm_rule,
                              weighted_by=self.weighted_by_key)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: check and spool every reply, then aggregate the accepted ones."""
        collector = self.train_collector()
        for msg in replies:
            collector.add(msg)
        return self.aggregate_closed(server_round, collector.close())

    def aggregate_closed(self, server_round: int,
                         closed: ClosedRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every site's outcome and aggregate the accepted updates with the aggregator."""
        self.recorder.record_phase(server_round, "train", closed.outcomes)
        try:
            if not self._enough(server_round, len(closed.accepted)):
                return None, None
            if self.site_dp is not None:
                assert self._reference is not None
                mean = site_dp_mean(self.site_dp, closed, reference=self._reference, recorder=self.recorder,
                                    server_round=server_round, sampled=self._sampled)
                return self._whole(self.aggregator.aggregate_mean(
                    server_round, mean, self.aggregator.train_metrics([u.metrics for u in closed.accepted]),
                    examples=sum(u.num_examples for u in closed.accepted)))
            try:
                return self._whole(self.aggregator.aggregate(server_round, closed))
            except (AggregationError, InconsistentMessageReplies) as exc:
                LOG.error("round %d: aggregation failed (%s); the global model is kept", server_round, exc)
                return None, None
        finally:
            closed.spool.close()

    def aggregate_secure(self, server_round: int,
                         result: SecureRoundResult) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record a secure round's outcomes; turn its mean change into the new global model.

        The sites' mean change is added to the model sent this round; FedAdam and
        FedYogi then apply their server optimiser to that mean, as to a plain round's.
        """
        self.recorder.record_phase(server_round, "train", result.outcomes)
        if result.mean_delta is None:
            return None, None
        if len(result.contributors) < self.min_train_replies:
            LOG.warning("round %d: %d site(s) in the secure sum, fewer than min-train-replies=%d; "
                        "the global model is kept", server_round, len(result.contributors), self.min_train_replies)
            return None, None
        assert self._reference is not None
        mean_delta = result.mean_delta
        if self.site_dp is not None:  # the sites clipped and weighed equally: the mean times k is their sum
            k = len(result.contributors)
            mean_delta = release(self.site_dp, [d * k for d in mean_delta], recorder=self.recorder,
                                 server_round=server_round, sampled=max(self._sampled, k))
        site_metrics = list(result.outcomes.site_metrics.values())
        examples = sum(m[self.weighted_by_key] for m in site_metrics)
        return self._whole(self.aggregator.aggregate_mean(
            server_round, model_plus(self._reference, mean_delta), self.aggregator.train_metrics(site_metrics),
            examples=examples))

    def _enough(self, server_round: int, accepted: int) -> bool:
        """True when the round has enough accepted updates for ``min-train-replies`` and the aggregator's rule."""
        if accepted < self.min_train_replies:
            LOG.warning("round %d: %d accepted update(s), fewer than min-train-replies=%d; "
                        "the global model is kept", server_round, accepted, self.min_train_replies)
            return False
        fewest = self.aggregator.fewest_updates
        if accepted < fewest:
            note = (f"{accepted} accepted update(s), fewer than {self.aggregator.spec.flower} needs "
                    f"({self.aggregator.spec.fewest_text()} = {fewest}): the global model is kept")
            LOG.warning("round %d: %s", server_round, note)
            self.recorder.note_round(server_round, {"aggregation-note": note})
            return False
        return True

    def _whole(self, result: tuple[ArrayRecord | None, MetricRecord | None]
               ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model in the model's dtypes, the weights that stay local as sent (in model order)."""
        aggregated, metrics = result
        aggregated = self._in_model_dtypes(aggregated)
        if aggregated is None or not self.staying_weights:
            return aggregated, metrics
        assert self._sent is not None
        return ArrayRecord({name: aggregated.get(name, array) for name, array in self._sent.items()}), metrics

    def _in_model_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Cast back to the model's dtypes: Flower's FedAdam/FedYogi return float64 arrays,
        which the sites would (rightly) refuse to load into their float32 model."""
        if arrays is None or self._reference is None:
            return arrays
        return ArrayRecord({name: array if array.dtype == str(self._reference[name].dtype)
                            else Array(array.numpy().astype(self._reference[name].dtype))
                            for name, array in arrays.items()})

    # --- evaluation replies -------------------------------------------------------------
    def evaluate_collector(self) -> ReplyCollector:
        """A collector for this round's evaluation replies (sorted per site as they arrive)."""
        return ReplyCollector(known_sites=self.known_sites)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's entry point: sort the replies, then :meth:`aggregate_evaluated`."""
        return self.aggregate_evaluated(server_round, sort_replies(replies, self.known_sites))

    def aggregate_evaluated(self, server_round: int, outcomes: SortedReplies) -> MetricRecord | None:
        """Record every site's evaluation outcome; aggregate the accepted metrics with Flower's FedAvg."""
        self.recorder.record_phase(server_round, "evaluate", outcomes)
        self.recorder.name_nodes(server_round, self.known_sites)
        return super().aggregate_evaluate(server_round, outcomes.accepted)
