"""A Grid that collects replies as soon as they arrive.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) checks for
replies every 3 s, so each round's train and evaluate phases each wait ~1.5 s
on average after the last hospital has answered. This wrapper does the same
push-then-pull through the Grid's public ``push_messages``/``pull_messages``
but polls every ``poll_interval_s``; everything else goes to the wrapped Grid.
The server's round loop (:mod:`server.rounds`) polls at the same interval.

The default interval depends on the wrapped Grid: 0.1 s for a deployment (each
pull is a request to the SuperLink), 0.05 s in a simulation, where a pull is an
in-process look-up of a few message ids and the phases of a round with small
sites last a few seconds (BENCHMARKS.md, scale section). If the wrapped Grid
offers ``wait_for_replies(timeout)`` (:class:`shared.flower_compat.grid.WaitsForReplies`:
fedseg's simulation engine adds it to Flower's in-process Grid), the wait between pulls ends as soon as a reply is
stored, so no reply waits for the next poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from shared.flower_compat.grid import OrdersForSampling, WaitsForReplies, offers
from shared.flower_compat.nodes import install_serverapp

DEFAULT_POLL_INTERVAL_S = 0.1
SIMULATION_POLL_INTERVAL_S = 0.05


def default_poll_interval(grid: Grid) -> float:
    """The polling interval for replies through ``grid`` (in-process simulation Grid: shorter)."""
    from flwr.superlink.grid import InMemoryGrid

    return SIMULATION_POLL_INTERVAL_S if isinstance(grid, InMemoryGrid) else DEFAULT_POLL_INTERVAL_S


# Flower 1.41's HttpGrid pulls a reply's objects with ``pull_objects``, which retries an object not yet on the
# SuperLink after 1 s, then 2 s, ... A node pushes a reply's objects after the reply itself, so a server that
# polls every 0.1 s often finds a reply before its objects and then waits 1 s. First retry here: 0.05 s.
FIRST_OBJECT_RETRY_S = 0.05


def prepare_flower(grid: Grid, *, first_retry_s: float = FIRST_OBJECT_RETRY_S) -> bool:
    """Make the ServerApp's replacements of Flower internals for ``grid`` (:mod:`shared.flower_compat`).

    In a deployment: Flower's first retry of a missing reply object becomes
    ``first_retry_s`` (then doubling as before). In a simulation (in-process
    Grid): reports, once, if the engine's replacements were refused. False if
    this process runs stock Flower (the gate's one warning is logged).
    """
    from flwr.superlink.grid import InMemoryGrid

    return install_serverapp(in_process=isinstance(grid, InMemoryGrid), first_retry_s=first_retry_s)


def sampling_order(grid: Grid, node_ids: Iterable[int]) -> list[int]:
    """``node_ids`` in an order that stays the same from run to run, for seeded sampling.

    ``grid``'s own ``sampling_order`` if it has one (:class:`OrdersForSampling`: fedseg's
    simulation engine lists virtual nodes by partition, their ids are drawn anew each run), else by id.
    """
    return list(grid.sampling_order(node_ids)) if offers(grid, OrdersForSampling) else sorted(node_ids)


class PollingGrid(Grid):
    """Delegate to ``grid``; poll for replies every ``poll_interval_s`` seconds.

    Parameters
    ----------
    grid : Grid
        The Grid Flower gave the ServerApp.
    poll_interval_s : float, optional
        Seconds between pulls; default :func:`default_poll_interval` of ``grid``.
    """

    def __init__(self, grid: Grid, *, poll_interval_s: float | None = None) -> None:
        if poll_interval_s is None:
            poll_interval_s = default_poll_interval(grid)
        if not poll_interval_s > 0:
            raise ValueError(f"'poll_interval_s' must be > 0, got {poll_interval_s!r}")
        self._grid = grid
        self.poll_interval_s = poll_interval_s
        # A Grid may offer wait_for_replies(timeout): return early once a reply is stored (fedseg's
        # simulation engine adds it to Flower's in-process Grid, shared/flower_compat/engine.py).
        self._wait: Callable[[float], None] = grid.wait_for_replies if offers(grid, WaitsForReplies) else time.sleep

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run type is internal
        """Set the run on the wrapped Grid."""
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        """The wrapped Grid's run."""
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Create a message through the wrapped Grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids (wrapped Grid)."""
        return self._grid.get_node_ids()

    def sampling_order(self, node_ids: Iterable[int]) -> list[int]:
        """``node_ids`` in an order that stays the same from run to run (:func:`sampling_order`)."""
        return sampling_order(self._grid, node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped Grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped Grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrive before ``timeout`` seconds (None: wait for all)."""
        replies: list[Message] = []
        self.exchange(messages, timeout=timeout, on_reply=replies.append)
        return replies

    def exchange(self, messages: Iterable[Message], *, timeout: float | None,
                 on_reply: Callable[[Message], None]) -> list[int]:
        """Push ``messages``; pass each reply to ``on_reply`` as it arrives; return unanswered node ids.

        Pulls every ``poll_interval_s`` seconds until every message has a reply or
        ``timeout`` seconds have passed (None: no limit).
        """
        return self.exchange_phases([(messages, on_reply)], timeout=timeout)[0]

    def exchange_phases(self, phases: Sequence[tuple[Iterable[Message], Callable[[Message], None]]], *,
                        timeout: float | None, after_push: Callable[[], None] | None = None) -> list[list[int]]:
        """Like :meth:`exchange` for several phases at once: ``[(messages, on_reply), ...]``.

        All messages are pushed together, in the order given; each reply goes to
        its own phase's ``on_reply``. ``after_push`` (if given) is called once the
        messages are out, before the first pull: work that can overlap the nodes'.
        Returns each phase's unanswered node ids (a node may be in several phases).
        """
        batches = [list(messages) for messages, _ in phases]
        owners = [(phase, msg.metadata.dst_node_id) for phase, batch in enumerate(batches) for msg in batch]
        unanswered: list[list[int]] = [[] for _ in phases]
        pending = dict(zip(self.push_messages([msg for batch in batches for msg in batch]), owners)) if owners else {}
        del batches
        deadline = None if timeout is None else time.monotonic() + timeout
        if after_push is not None:
            after_push()
        while pending:
            for reply in self.pull_messages(list(pending)):
                owner = pending.pop(reply.metadata.reply_to_message_id, None)
                if owner is not None:
                    phases[owner[0]][1](reply)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self._wait(self.poll_interval_s)
        for phase, node_id in pending.values():
            unanswered[phase].append(node_id)
        return [sorted(nodes) for nodes in unanswered]
