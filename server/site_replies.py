"""Sort a round's replies into accepted updates, refusals and failures, per site."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from shared.protocol import SITE, SITE_ID, is_refusal, refusal_reason

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class SortedReplies:
    """One round's replies of one kind (train or evaluate), sorted by outcome."""

    accepted: list[Message] = field(default_factory=list)
    site_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: fields the server's update checks add to a site's row (``update-norm``; when bounded also
    #: ``update-bound``, ``update-scale`` and ``train-note``)
    check_fields: dict[str, dict[str, Any]] = field(default_factory=dict)


def site_of(msg: Message, known: dict[int, str]) -> str:
    """The site id a reply came from (learned from earlier replies for error replies)."""
    node_id = msg.metadata.src_node_id
    if not msg.has_error() and SITE in msg.content.config_records:
        site_id = str(msg.content.config_records[SITE].get(SITE_ID, f"node-{node_id}"))
        known[node_id] = site_id
    return known.get(node_id, f"node-{node_id}")


class ReplyCollector:
    """Sort one phase's replies per site as they arrive: failed, refused or accepted.

    Evaluation uses it as it is (an accepted reply is kept); training's
    :class:`~server.train_collector.TrainCollector` checks and spools what it accepts.

    Parameters
    ----------
    known_sites : dict[int, str]
        Node id -> site id, learned from replies (shared across rounds).
    """

    def __init__(self, *, known_sites: dict[int, str]) -> None:
        self.known_sites = known_sites
        self.outcomes = SortedReplies()

    def add(self, msg: Message) -> None:
        """Sort one reply; hand it to :meth:`accept` unless it is an error or a refusal."""
        site = site_of(msg, self.known_sites)
        if msg.has_error():
            self.outcomes.failed[site] = failure_reason(str(msg.error.reason))
            return
        metrics = first_metrics(msg)
        refusal = refused_because(msg, metrics)
        if refusal is not None:
            self.outcomes.refused[site] = refusal
            return
        self.accept(site, msg, metrics)

    def accept(self, site: str, msg: Message, metrics: dict[str, Any]) -> None:
        """Keep a reply that is neither an error nor a refusal."""
        self.outcomes.accepted.append(msg)
        self.outcomes.site_metrics[site] = metrics

    def mark_unanswered(self, node_ids: list[int], timeout: float) -> None:
        """Record sites that did not reply before the phase closed."""
        for node_id in node_ids:
            site = self.known_sites.get(node_id, f"node-{node_id}")
            self.outcomes.failed[site] = f"no reply within round-timeout ({timeout:g} s)"


def sort_replies(replies: Iterable[Message], known_sites: dict[int, str]) -> SortedReplies:
    """Split ``replies`` into accepted ones and per-site refusals/failures (:class:`ReplyCollector`)."""
    collector = ReplyCollector(known_sites=known_sites)
    for msg in replies:
        collector.add(msg)
    return collector.outcomes


def refused_because(msg: Message, metrics: dict[str, Any] | None = None) -> str | None:
    """The reason a reply (not an error reply) gives for refusing; None if it is no refusal.

    ``metrics``: the reply's :func:`first_metrics`, if already at hand.
    """
    if not is_refusal(first_metrics(msg) if metrics is None else metrics):
        return None
    return refusal_reason(msg.content.config_records.get(SITE))


def failure_reason(raw: str, limit: int = 300) -> str:
    """A short, readable reason from a failed reply (Ray tracebacks reduced to their message)."""
    text = ANSI_ESCAPE.sub("", raw)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.split()).strip(" '\">")[:limit]


def first_metrics(msg: Message) -> dict[str, Any]:
    records = list(msg.content.metric_records.values())
    return dict(records[0]) if records else {}
