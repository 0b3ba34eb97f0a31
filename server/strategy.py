"""FedAvg with per-site bookkeeping: every site's metrics, refusals and failures.

Flower's FedAvg does the sampling and the weighted averaging; this subclass
only sorts replies first, so that refusals (a site declining a round) and
failed replies never reach the aggregation, and hands per-site results to a
:class:`~server.run_folder.RunRecorder`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from server.run_folder import RunRecorder
from server.site_replies import sort_replies


class SiteTrackingFedAvg(FedAvg):
    """Flower FedAvg that records every site's outcome each round.

    Parameters
    ----------
    recorder : RunRecorder
        Receives per-site train and evaluate results.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, recorder: RunRecorder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.known_sites: dict[int, str] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the accepted updates; record every site's outcome."""
        sorted_replies = sort_replies(replies, self.known_sites)
        self.recorder.record_phase(server_round, "train", sorted_replies)
        return super().aggregate_train(server_round, sorted_replies.accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the accepted evaluation metrics; record every site's outcome."""
        sorted_replies = sort_replies(replies, self.known_sites)
        self.recorder.record_phase(server_round, "evaluate", sorted_replies)
        return super().aggregate_evaluate(server_round, sorted_replies.accepted)
