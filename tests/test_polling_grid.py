"""PollingGrid: replies are collected as they arrive, and a silent node costs only the timeout."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.polling_grid import DEFAULT_POLL_INTERVAL_S, SIMULATION_POLL_INTERVAL_S, PollingGrid
from server.rounds import exchange
from tests.conftest import seconds_to_pull_a_late_object
from tests.fake_grid import OfflineGrid


class _LoopbackGrid(OfflineGrid):
    """A Grid whose nodes answer after a delay each; ``None``: the node never answers."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.pulls = 0
        self._pushed: dict[str, tuple[Message, float]] = {}

    def get_node_ids(self):  # noqa: ANN201
        return list(self.delays)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for index, msg in enumerate(messages):
            msg_id = f"m{index}-{msg.metadata.dst_node_id}"
            self._pushed[msg_id] = (msg, time.monotonic())
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        self.pulls += 1
        replies = []
        for msg_id in list(message_ids):
            msg, pushed = self._pushed[msg_id]
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None and time.monotonic() - pushed >= delay:
                reply = Message(content=RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_reply_to_message_id"] = msg_id
                replies.append(reply)
                del self._pushed[msg_id]
        return replies


def _messages(grid: Grid) -> list[Message]:
    return [grid.create_message(RecordDict(), MessageType.TRAIN, node, "1") for node in grid.get_node_ids()]


def test_replies_are_returned_soon_after_the_last_one_arrives(flower_identity):
    inner = _LoopbackGrid({1: 0.0, 2: 0.3})
    grid = PollingGrid(inner, poll_interval_s=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid), timeout=10))
    assert len(replies) == 2
    assert time.monotonic() - started < 1.0  # Flower's own Grid would take >= 3 s here
    assert inner.pulls >= 2


def test_a_node_that_never_answers_costs_only_the_timeout(flower_identity):
    grid = PollingGrid(_LoopbackGrid({1: 0.0, 2: None}), poll_interval_s=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid), timeout=0.5))
    assert len(replies) == 1
    assert 0.5 <= time.monotonic() - started < 2.0


def test_poll_interval_must_be_positive():
    with pytest.raises(ValueError, match="poll_interval_s"):
        PollingGrid(_LoopbackGrid({}), poll_interval_s=0)


def test_the_round_loop_pulls_at_the_grids_interval(flower_identity):
    inner = _LoopbackGrid({1: 0.0, 2: 0.3})
    grid = PollingGrid(inner, poll_interval_s=0.05)
    replies: list[Message] = []
    started = time.monotonic()
    unanswered = exchange(grid, _messages(grid), timeout=10, on_reply=replies.append)
    elapsed = time.monotonic() - started
    assert unanswered == [] and len(replies) == 2
    assert 0.3 <= elapsed < 0.45  # a fixed 0.5 s poll would return after >= 0.5 s
    assert inner.pulls >= 5


def test_simulation_grids_are_polled_more_often_than_deployment_grids():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    simulated = PollingGrid(InMemoryGrid(state_factory=state))
    deployed = PollingGrid(_LoopbackGrid({}))
    assert simulated.poll_interval_s == SIMULATION_POLL_INTERVAL_S < deployed.poll_interval_s == DEFAULT_POLL_INTERVAL_S


def test_a_reply_object_not_yet_on_the_superlink_is_retried_soon(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils

    from server.polling_grid import prepare_flower
    from shared.flower_compat import gate
    from shared.flower_compat.nodes import FLOWER_PULL_BACKOFF_S

    defaults = inflatable_utils.pull_objects.__kwdefaults__
    assert defaults["initial_backoff"] == FLOWER_PULL_BACKOFF_S  # the pinned Flower's 1 s
    assert prepare_flower(_LoopbackGrid({}), first_retry_s=0.02)  # a deployment's Grid (not in-process)
    try:
        # the node pushes a reply's objects after the reply itself; Flower 1.41 alone: ~1 s
        assert seconds_to_pull_a_late_object(inflatable_utils.pull_objects) < 0.5
    finally:
        gate.restore("serverapp")
    assert defaults["initial_backoff"] == FLOWER_PULL_BACKOFF_S
