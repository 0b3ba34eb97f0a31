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


class AnsweringGrid(OfflineGrid):
    """Answers each pushed message at once with :meth:`answer`; the replies wait to be pulled."""

    def __init__(self) -> None:
        self._replies: dict[str, Message] = {}
        self.pushed = 0

    def answer(self, msg: Message) -> Message:
        """The reply to ``msg`` (subclasses)."""
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for msg in messages:
            reply = self.answer(msg)
            msg_id = f"m{self.pushed}"
            self.pushed += 1
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
