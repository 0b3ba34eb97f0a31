"""What every fedseg strategy adds to Flower's: per-site bookkeeping, update checks, resumable rounds.

:class:`SiteTracking` is mixed in front of a Flower message-API strategy
(``class FedSegFedAvg(SiteTracking, FedAvg)``). Flower's class keeps doing the
sampling and the aggregation; the mixin

- sorts replies into accepted / refused / failed / rejected per site and hands
  them to the :class:`~server.run_folder.RunRecorder`;
- checks every update (keys, shapes, dtypes, NaN/Inf) and spools accepted
  ones to disk as they arrive; when the round closes, scales updates above the
  round's norm bound down to it and rejects clear outliers
  (:mod:`server.norm_bounds`);
- feeds Flower's aggregation with accepted updates in site-id order (mean
  strategies get one pre-averaged update, so memory does not grow with the
  number of sites);
- samples nodes reproducibly from (seed, round), so a resumed run asks the same
  nodes as the uninterrupted one would have (in a simulation, through the
  engine's partition order: virtual node ids change every run);
- exposes the strategy's own state for checkpoints;
- with run config ``local-norm`` or ``train-layers``, leaves the weights that
  never travel (:attr:`SiteTracking.staying_weights`: the sites' own norm
  weights, frozen weights) out of every check and aggregate: an update holds
  only the travelling weights, and the global model keeps the values it sent.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from server.norm_bounds import NormRule
from server.polling_grid import sampling_order
from server.site_replies import sort_replies
from server.train_collector import ClosedRound, TrainCollector
from server.update_checks import reference_arrays
from shared.local_weights import travelling
from shared.protocol import ARRAYS, METRICS

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.run_folder import RunRecorder
    from server.secagg_round import SecureRoundResult
    from server.site_dp import SiteDP

LOG = logging.getLogger("fedseg.server")
SITE_DP_STATE = "site-dp"


class SiteTracking:
    """Mixin for a Flower strategy; see the module docstring.

    Parameters
    ----------
    recorder : RunRecorder
        Receives every site's outcome each round.
    seed : int
        Seeds node sampling per round.
    min_train_replies : int
        Fewer accepted updates than this keep the global model unchanged for the round.
    norm_rule : NormRule
        How large updates are bounded or rejected (default: :class:`NormRule`'s defaults).
    site_dp : SiteDP, optional
        Hospital-level DP (:mod:`server.site_dp`): clip, weigh sites equally, add noise, account.
    **kwargs
        Passed to the Flower strategy.
    """

    #: True when the aggregate is a weighted mean (can be accumulated update by update).
    mean_aggregation = True
    #: True when Flower's strategy transforms the mean further (FedAdam/FedYogi server optimisers);
    #: otherwise Flower's weighted average of the single pre-averaged update would be the update itself.
    post_processes_mean = False

    def __init__(self, *, recorder: RunRecorder, seed: int = 0, min_train_replies: int = 1,
                 norm_rule: NormRule | None = None, site_dp: SiteDP | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
        """State beyond the global weights that a resumed run needs (FedAvg: hospital-level DP's releases)."""
        return {SITE_DP_STATE: self.site_dp.state()} if self.site_dp is not None else {}

    def load_strategy_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        if self.site_dp is not None and SITE_DP_STATE in state:
            self.site_dp.load_state(state[SITE_DP_STATE])

    def message_record(self) -> ConfigRecord:
        """The config record every train and evaluate message carries (:attr:`message_config`)."""
        return ConfigRecord(dict(self.message_config))

    # --- sampling -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling, made reproducible; remember the model sent for the update checks."""
        self.expect_updates_of(arrays)
        with _seeded_sampling(self.seed, server_round, "train"):
            messages = list(super().configure_train(server_round, arrays, config, _SortedNodes(grid)))
        self._sampled = len(messages)
        if self.staying_weights and getattr(self, "current_arrays", None) is not None:
            # FedAdam/FedYogi take the server step on what was averaged: the travelling weights
            self.current_arrays = travelling(self.current_arrays, self.staying_weights)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's evaluation sampling, made reproducible."""
        with _seeded_sampling(self.seed, server_round, "evaluate"):
            return list(super().configure_evaluate(server_round, arrays, config, _SortedNodes(grid)))

    # --- training replies ---------------------------------------------------------------
    def expect_updates_of(self, arrays: ArrayRecord) -> None:
        """Set the global model that this round's updates are checked against (its travelling weights)."""
        self._sent = arrays
        self._reference = travelling(reference_arrays(arrays), self.staying_weights)

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
        """Record every site's outcome and aggregate the accepted updates with Flower's strategy."""
        self.recorder.record_phase(server_round, "train", closed.outcomes)
        try:
            if len(closed.accepted) < self.min_train_replies:
                LOG.warning("round %d: %d accepted update(s), fewer than min-train-replies=%d; "
                            "the global model is kept", server_round, len(closed.accepted), self.min_train_replies)
                return None, None
            if self.site_dp is not None:
                mean = self._site_dp_mean(server_round, closed)
                return self._finish_mean(server_round, mean, self._mean_metrics(closed),
                                         examples=sum(u.num_examples for u in closed.accepted))
            if self.mean_aggregation and not self.post_processes_mean:
                return self._whole(closed.spool.weighted_mean(closed.accepted)), self._mean_metrics(closed)
            try:
                arrays, metrics = super().aggregate_train(server_round, self._aggregation_input(closed))
            except (AggregationError, InconsistentMessageReplies) as exc:
                LOG.error("round %d: aggregation failed (%s); the global model is kept", server_round, exc)
                return None, None
            return self._whole(self._in_model_dtypes(arrays)), metrics
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
        mean_delta = result.mean_delta
        if self.site_dp is not None:  # the sites clipped and weighed equally: the mean times k is their sum
            k = len(result.contributors)
            mean_delta = self._release(server_round, [d * k for d in mean_delta], answered=k)
        mean = self._model_plus(mean_delta)
        replies = [RecordDict({METRICS: MetricRecord(m)}) for m in result.outcomes.site_metrics.values()]
        metrics = self.train_metrics_aggr_fn(replies, self.weighted_by_key)
        return self._finish_mean(server_round, mean, metrics, examples=sum(
            m[self.weighted_by_key] for m in result.outcomes.site_metrics.values()))

    def _finish_mean(self, server_round: int, mean: ArrayRecord, metrics: MetricRecord, *,
                     examples: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model from the round's mean: itself, or FedAdam/FedYogi's step along it."""
        if not self.post_processes_mean:
            return self._whole(mean), metrics
        metrics[self.weighted_by_key] = examples
        arrays, metrics = super().aggregate_train(server_round, [_reply_like(mean, metrics)])
        return self._whole(self._in_model_dtypes(arrays)), metrics

    def _whole(self, aggregated: ArrayRecord | None) -> ArrayRecord | None:
        """The new global model: ``aggregated`` travelling weights, the local ones as sent (in model order)."""
        if aggregated is None or not self.staying_weights:
            return aggregated
        assert self._sent is not None
        return ArrayRecord({name: aggregated.get(name, array)
                            for name, array in self._sent.items()})

    def _site_dp_mean(self, server_round: int, closed: ClosedRound) -> ArrayRecord:
        """Clip every accepted change to the site-level norm, sum them with equal weights, release the mean."""
        assert self.site_dp is not None and self._reference is not None
        bound = self.site_dp.settings.clipping_norm
        for update in closed.accepted:
            if update.norm > bound:
                closed.spool.scale_to_bound(update, bound=bound)
                self.recorder.rounds[server_round][update.site]["site-dp-scale"] = bound / update.norm
        k = len(closed.accepted)
        mean = closed.spool.weighted_mean([dataclasses.replace(u, num_examples=1.0) for u in closed.accepted])
        total = [(mean[name].numpy().astype(np.float64) - ref) * k for name, ref in self._reference.items()]
        return self._model_plus(self._release(server_round, total, answered=k))

    def _release(self, server_round: int, total: list[np.ndarray], *, answered: int) -> list[np.ndarray]:
        assert self.site_dp is not None
        noisy = self.site_dp.release(total, sampled=max(self._sampled, answered))
        self.recorder.note_round(server_round, {
            "site-epsilon": self.site_dp.epsilon(), "site-dp-delta": self.site_dp.settings.delta,
            "site-dp-noise-std": self.site_dp.last_noise_std, "site-dp-sampled": max(self._sampled, answered)})
        return noisy

    def _model_plus(self, delta: list[np.ndarray]) -> ArrayRecord:
        """The global model sent this round plus ``delta`` (one array per tensor), in the model's dtypes."""
        assert self._reference is not None
        return ArrayRecord({name: Array((ref.astype(np.float64) + d.reshape(ref.shape)).astype(ref.dtype))
                            for (name, ref), d in zip(self._reference.items(), delta, strict=True)})

    def _in_model_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Cast back to the model's dtypes: Flower's FedAdam/FedYogi return float64 arrays,
        which the sites would (rightly) refuse to load into their float32 model."""
        if arrays is None or self._reference is None:
            return arrays
        return ArrayRecord({name: array if array.dtype == str(self._reference[name].dtype)
                            else Array(array.numpy().astype(self._reference[name].dtype))
                            for name, array in arrays.items()})

    def _mean_metrics(self, closed: ClosedRound) -> MetricRecord:
        return self.train_metrics_aggr_fn(
            [RecordDict({METRICS: MetricRecord(u.metrics)}) for u in closed.accepted], self.weighted_by_key)

    def _aggregation_input(self, closed: ClosedRound) -> list[Message]:
        if self.mean_aggregation:
            metrics = self._mean_metrics(closed)
            metrics[self.weighted_by_key] = sum(u.num_examples for u in closed.accepted)
            return [_reply_like(closed.spool.weighted_mean(closed.accepted), metrics)]
        return [_reply_like(closed.spool.as_record(u), MetricRecord(u.metrics)) for u in closed.accepted]

    # --- evaluation replies -------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the accepted evaluation metrics; record every site's outcome."""
        sorted_replies = sort_replies(replies, self.known_sites)
        self.recorder.record_phase(server_round, "evaluate", sorted_replies)
        self.recorder.name_nodes(server_round, self.known_sites)
        return super().aggregate_evaluate(server_round, sorted_replies.accepted)


def _reply_like(arrays: ArrayRecord, metrics: MetricRecord) -> Message:
    """A message with a reply's content, for Flower's aggregation (which reads only content)."""
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), dst_node_id=0,
                   message_type=MessageType.TRAIN)


class _SortedNodes:
    """A grid view listing node ids in an order that is the same every run, so seeded sampling is reproducible.

    See :func:`server.polling_grid.sampling_order`.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        return sampling_order(self._grid, self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _seeded_sampling:
    """Seed Python's ``random`` (Flower samples with it) from (seed, round, phase); restore after."""

    def __init__(self, seed: int, server_round: int, phase: str) -> None:
        self.key = f"{seed}:{server_round}:{phase}"

    def __enter__(self) -> None:
        self.saved = random.getstate()
        random.seed(self.key)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved)
