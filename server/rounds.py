"""The round loop: like Flower's ``Strategy.start``, but resumable and straggler-proof.

Differences from ``Strategy.start``: it can begin at any round (to resume from
a checkpoint); training replies are handed to the strategy's collector one by
one as they arrive (checked and spooled, never all held in memory); a round
closes when every sampled node answered or ``timeout`` seconds passed, and the
nodes that did not answer are recorded as failed for that round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message

from server.polling_grid import PollingGrid

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.strategies.tracking import SiteTracking

LOG = logging.getLogger("fedseg.server")


def run_rounds(strategy: SiteTracking, grid: Grid, *, arrays: ArrayRecord, first_round: int, num_rounds: int,
               timeout: float, after_round: Callable[[int, ArrayRecord], None]) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; call ``after_round(round, global arrays)`` after each.

    Returns the final global arrays.
    """
    if first_round < 1:
        raise ValueError(f"first_round must be >= 1, got {first_round}")
    for server_round in range(first_round, num_rounds + 1):
        arrays = train_round(strategy, grid, server_round=server_round, arrays=arrays, timeout=timeout)
        evaluate_round(strategy, grid, server_round=server_round, arrays=arrays, timeout=timeout)
        after_round(server_round, arrays)
    return arrays


def train_round(strategy: SiteTracking, grid: Grid, *, server_round: int, arrays: ArrayRecord,
                timeout: float) -> ArrayRecord:
    """One training phase; returns the new global arrays (unchanged if nothing was aggregated)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    collector = strategy.train_collector()
    unanswered = exchange(grid, messages, timeout=timeout, on_reply=collector.add)
    collector.mark_unanswered(unanswered, timeout)
    new_arrays, _ = strategy.aggregate_closed(server_round, collector.close())
    return arrays if new_arrays is None else new_arrays


def evaluate_round(strategy: SiteTracking, grid: Grid, *, server_round: int, arrays: ArrayRecord,
                   timeout: float) -> None:
    """One federated evaluation phase (metrics only, so replies are kept until the end)."""
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies: list[Message] = []
    unanswered = exchange(grid, messages, timeout=timeout, on_reply=replies.append)
    for node_id in unanswered:
        site = strategy.known_sites.get(node_id, f"node-{node_id}")
        LOG.warning("round %d: site %s did not answer evaluation within %g s", server_round, site, timeout)
    for node_id in unanswered:
        site = strategy.known_sites.get(node_id, f"node-{node_id}")
        row = strategy.recorder.rounds[server_round][site]
        row["evaluate-status"] = "failed"
        row["evaluate-reason"] = f"no reply within round-timeout ({timeout:g} s)"
    strategy.aggregate_evaluate(server_round, replies)


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float,
             on_reply: Callable[[Message], None]) -> list[int]:
    """Send ``messages``; pass each reply to ``on_reply`` as it arrives; return unanswered node ids.

    Stops when every message has a reply or ``timeout`` seconds have passed. Replies are
    pulled at the :class:`~server.polling_grid.PollingGrid`'s interval (a plain Grid is
    wrapped in one, whose default interval depends on the Grid Flower gave).
    """
    polling = grid if isinstance(grid, PollingGrid) else PollingGrid(grid)
    return polling.exchange(messages, timeout=timeout, on_reply=on_reply)
