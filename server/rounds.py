"""The round loop: like Flower's ``Strategy.start``, but resumable and straggler-proof.

Differences from ``Strategy.start``: it can begin at any round (to resume from
a checkpoint); training and evaluation replies are handed to the strategy's
collectors one by one as they arrive (sorted per site; training updates checked
and spooled, never all held in memory); a round
closes when every sampled node answered or ``timeout`` seconds passed, and the
nodes that did not answer are recorded as failed for that round; and, with run
config ``overlap-evaluation``, a round's evaluation can travel with the next
round's training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Message

from server.polling_grid import PollingGrid
from server.secagg_round import secure_train_round

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.secagg_sum import SecAggSettings
    from server.site_replies import ReplyCollector
    from server.strategies.strategy import FedSegStrategy
    from server.train_collector import TrainCollector

LOG = logging.getLogger("fedseg.server")


def run_rounds(strategy: FedSegStrategy, grid: Grid, *, arrays: ArrayRecord, first_round: int, num_rounds: int,
               timeout: float, close_round: Callable[[int, ArrayRecord], Callable[[], None]],
               overlap_evaluation: bool = False, secure: SecAggSettings | None = None,
               stop_after: Callable[[int], bool] | None = None) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; returns the final global arrays.

    When round r has closed, ``close_round(r, global arrays)`` is called (before
    anything of round r+1 is aggregated, so it can take the strategy's state as of
    round r) and returns a function that writes the round out (metrics, model
    file, checkpoint), called before the next round closes.

    With ``overlap_evaluation``, round r's evaluation is sent together with round
    r+1's training (both get the same global model, so every site does the same
    work as without), and round r closes when both have answered: one wait for
    stragglers per round instead of two. Round r is then written out while the
    sites work on the next round's messages, not while they wait for them.

    Every train and evaluate message carries the strategy's ``message_config``
    (the run's plan) in its config record.

    With ``secure`` settings every training phase is a SecAgg+ round
    (:func:`server.secagg_round.secure_train_round`); run config forbids
    combining it with ``overlap_evaluation``.

    ``stop_after(r)``, asked once round r's training has closed, ends the run
    after round r (evaluated and written out as usual) when it returns True.
    """
    if first_round < 1:
        raise ValueError(f"first_round must be >= 1, got {first_round}")
    if overlap_evaluation and secure is not None:
        raise ValueError("secure aggregation cannot overlap evaluation with training")
    if overlap_evaluation:
        return _run_overlapped(strategy, grid, arrays=arrays, first_round=first_round, num_rounds=num_rounds,
                               timeout=timeout, close_round=close_round, stop_after=stop_after)
    for server_round in range(first_round, num_rounds + 1):
        if secure is None:
            arrays = train_round(strategy, grid, server_round=server_round, arrays=arrays, timeout=timeout)
        else:
            arrays = secure_train_round(strategy, polling(grid), server_round=server_round, arrays=arrays,
                                        timeout=timeout, settings=secure)
        evaluate_round(strategy, grid, server_round=server_round, arrays=arrays, timeout=timeout)
        close_round(server_round, arrays)()
        if stop_after is not None and stop_after(server_round):
            break
    return arrays


def _run_overlapped(strategy: FedSegStrategy, grid: Grid, *, arrays: ArrayRecord, first_round: int, num_rounds: int,
                    timeout: float, close_round: Callable[[int, ArrayRecord], Callable[[], None]],
                    stop_after: Callable[[int], bool] | None = None) -> ArrayRecord:
    """Rounds with round r's evaluation in flight next to round r+1's training (see :func:`run_rounds`)."""
    evaluating: int | None = None  # the round whose aggregated model ``arrays`` is, not yet evaluated
    write_out: Callable[[], None] | None = None  # the last closed round's, run once the next messages are out
    for server_round in range(first_round, num_rounds + 1):
        evaluation = [] if evaluating is None else _configure_evaluate(strategy, grid, evaluating, arrays)
        training = _configure_train(strategy, grid, server_round, arrays)
        collector, evaluated = strategy.train_collector(), strategy.evaluate_collector()
        unanswered_train, unanswered_evaluate = polling(grid).exchange_phases(
            [(training, collector.add), (evaluation, evaluated.add)], timeout=timeout, after_push=write_out)
        write_out = None
        if evaluating is not None:  # before aggregating: close_round takes the strategy's state of then
            _close_evaluate(strategy, evaluating, evaluated, unanswered_evaluate, timeout=timeout)
            write_out = close_round(evaluating, arrays)
        arrays = _close_train(strategy, server_round, collector, unanswered_train, arrays=arrays, timeout=timeout)
        evaluating = server_round
        if stop_after is not None and stop_after(server_round):
            break  # the round's evaluation and write-out follow below, as after the last round
    if evaluating is not None:
        evaluate_round(strategy, grid, server_round=evaluating, arrays=arrays, timeout=timeout, after_push=write_out)
        close_round(evaluating, arrays)()
    return arrays


def train_round(strategy: FedSegStrategy, grid: Grid, *, server_round: int, arrays: ArrayRecord,
                timeout: float) -> ArrayRecord:
    """One training phase; returns the new global arrays (unchanged if nothing was aggregated)."""
    messages = _configure_train(strategy, grid, server_round, arrays)
    collector = strategy.train_collector()
    unanswered = exchange(grid, messages, timeout=timeout, on_reply=collector.add)
    return _close_train(strategy, server_round, collector, unanswered, arrays=arrays, timeout=timeout)


def evaluate_round(strategy: FedSegStrategy, grid: Grid, *, server_round: int, arrays: ArrayRecord,
                   timeout: float, after_push: Callable[[], None] | None = None) -> None:
    """One federated evaluation phase (metrics only, so accepted replies are kept until the end).

    ``after_push`` is called once the messages are out (see :meth:`PollingGrid.exchange_phases`).
    """
    collector = strategy.evaluate_collector()
    [unanswered] = polling(grid).exchange_phases(
        [(_configure_evaluate(strategy, grid, server_round, arrays), collector.add)], timeout=timeout,
        after_push=after_push)
    _close_evaluate(strategy, server_round, collector, unanswered, timeout=timeout)


def _configure_train(strategy: FedSegStrategy, grid: Grid, server_round: int, arrays: ArrayRecord) -> list[Message]:
    return list(strategy.configure_train(server_round, arrays, strategy.message_record(), grid))


def _configure_evaluate(strategy: FedSegStrategy, grid: Grid, server_round: int,
                        arrays: ArrayRecord) -> list[Message]:
    return list(strategy.configure_evaluate(server_round, arrays, strategy.message_record(), grid))


def _close_train(strategy: FedSegStrategy, server_round: int, collector: TrainCollector, unanswered: list[int], *,
                 arrays: ArrayRecord, timeout: float) -> ArrayRecord:
    collector.mark_unanswered(unanswered, timeout)
    new_arrays, _ = strategy.aggregate_closed(server_round, collector.close())
    return arrays if new_arrays is None else new_arrays


def _close_evaluate(strategy: FedSegStrategy, server_round: int, collector: ReplyCollector, unanswered: list[int], *,
                    timeout: float) -> None:
    for node_id in unanswered:
        site = strategy.known_sites.get(node_id, f"node-{node_id}")
        LOG.warning("round %d: site %s did not answer evaluation within %g s", server_round, site, timeout)
    collector.mark_unanswered(unanswered, timeout)
    strategy.aggregate_evaluated(server_round, collector.outcomes)


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float,
             on_reply: Callable[[Message], None]) -> list[int]:
    """Send ``messages``; pass each reply to ``on_reply`` as it arrives; return unanswered node ids.

    Stops when every message has a reply or ``timeout`` seconds have passed. Replies are
    pulled at the :class:`~server.polling_grid.PollingGrid`'s interval (a plain Grid is
    wrapped in one, whose default interval depends on the Grid Flower gave).
    """
    return polling(grid).exchange(messages, timeout=timeout, on_reply=on_reply)


def polling(grid: Grid) -> PollingGrid:
    """``grid`` itself if it is a :class:`PollingGrid`, else wrapped in one (default interval for its kind)."""
    return grid if isinstance(grid, PollingGrid) else PollingGrid(grid)
