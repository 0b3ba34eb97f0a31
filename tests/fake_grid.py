"""A base for Grids that stand in for the network in tests: no run, messages built locally."""

from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid


class OfflineGrid(Grid):
    """Implements what tests never use; subclasses add nodes, push and pull."""

    def set_run(self, run) -> None:  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        raise AssertionError("fedseg's PollingGrid must not delegate send_and_receive (Flower's polls every 3 s)")
