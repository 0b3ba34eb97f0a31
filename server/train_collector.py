"""Collect one round's training replies as they arrive: sort, check, spool.

Refusals and failed replies are recorded per site; a reply with an update is
checked (:mod:`server.update_checks`) and written to the round's
:class:`~server.update_spool.UpdateSpool` at once, so the server never holds
every site's update in memory. When the round closes, the round's norm rule
(:mod:`server.norm_bounds`) rejects clear outliers and scales large updates
down to the bound (rewriting their spool files); the accepted updates are
returned in site-id order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from server.norm_bounds import NormRule, NormVerdict, judge_norms
from server.site_replies import ReplyCollector, SortedReplies
from server.update_checks import UpdateRejected, check_layout, tensor_delta_norm_sq
from server.update_spool import SpooledUpdate, UpdateSpool
from shared.protocol import NUM_EXAMPLES

LOG = logging.getLogger("fedseg.server")


@dataclass
class ClosedRound:
    """What a round's training phase produced: accepted updates and every site's outcome."""

    accepted: list[SpooledUpdate]
    outcomes: SortedReplies
    spool: UpdateSpool
    weighted_by: str = NUM_EXAMPLES
    notes: dict[str, str] = field(default_factory=dict)


class TrainCollector(ReplyCollector):
    """Take training replies one by one (sorted as :class:`ReplyCollector` does, updates checked and spooled);
    close the round to get the accepted updates.

    Parameters
    ----------
    reference : Mapping[str, numpy.ndarray]
        The global model sent this round.
    spool_parent : Path
        Where the round's update files go (deleted when the round is aggregated).
    known_sites : dict[int, str]
        Node id -> site id, learned from replies (shared across rounds).
    norm_rule : NormRule
        How large updates are bounded or rejected when the round closes.
    weighted_by : str
        Metric holding each update's weight.
    """

    def __init__(self, *, reference: Mapping[str, np.ndarray], spool_parent: Path, known_sites: dict[int, str],
                 norm_rule: NormRule, weighted_by: str = NUM_EXAMPLES) -> None:
        super().__init__(known_sites=known_sites)
        self.reference = reference
        self.spool = UpdateSpool(spool_parent, reference=reference)
        self.norm_rule = norm_rule
        self.weighted_by = weighted_by
        self.updates: dict[str, SpooledUpdate] = {}

    def accept(self, site: str, msg: Message, metrics: dict[str, Any]) -> None:
        """Check and spool the update of a reply that is neither an error nor a refusal."""
        try:
            update = self._check_and_spool(site, msg, metrics)
        except UpdateRejected as exc:
            LOG.warning("rejected the update of site %s: %s", site, exc)
            self.outcomes.rejected[site] = str(exc)
            self.outcomes.site_metrics[site] = metrics
            return
        self.updates[site] = update
        self.outcomes.site_metrics[site] = metrics

    def close(self) -> ClosedRound:
        """Apply the norm rule (reject clear outliers, bound large updates); return the accepted
        updates in site-id order."""
        verdict = judge_norms({s: u.norm for s, u in self.updates.items()}, rule=self.norm_rule)
        for site, update in self.updates.items():
            self.outcomes.check_fields[site] = {"update-norm": update.norm}
        self._reject_outliers(verdict)
        self._bound(verdict)
        accepted = [self.updates[site] for site in sorted(self.updates)]
        return ClosedRound(accepted=accepted, outcomes=self.outcomes, spool=self.spool, weighted_by=self.weighted_by)

    def _reject_outliers(self, verdict: NormVerdict) -> None:
        for site, reason in sorted(verdict.rejected.items()):
            LOG.warning("rejected the update of site %s: %s", site, reason)
            self.outcomes.rejected[site] = reason
            del self.updates[site]

    def _bound(self, verdict: NormVerdict) -> None:
        for site, bounded in sorted(verdict.bounded.items()):
            LOG.warning("bounded the update of site %s: %s", site, bounded.reason)
            self.spool.scale_to_bound(self.updates[site], bound=bounded.bound)
            self.outcomes.check_fields[site].update({
                "update-bound": bounded.bound, "update-scale": bounded.scale, "train-note": bounded.reason})

    def _check_and_spool(self, site: str, msg: Message, metrics: dict) -> SpooledUpdate:
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            raise UpdateRejected(f"expected one ArrayRecord in the reply, got {len(records)}")
        weight = metrics.get(self.weighted_by)
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            raise UpdateRejected(f"metric '{self.weighted_by}' must be a positive number, got {weight!r}")
        check_layout(records[0], self.reference)
        path, norm = self.spool.write_checked(records[0], check=self._tensor_norm_sq)
        return SpooledUpdate(site=site, num_examples=float(weight), norm=norm, path=path, metrics=metrics)

    def _tensor_norm_sq(self, name: str, values: np.ndarray) -> float:
        return tensor_delta_norm_sq(name, values, self.reference[name])
