"""A whole federation in the test process: fedseg's ServerApp logic against its real ClientApp handlers.

:class:`HandlerGrid` stands in for the network: each pushed message is answered
at once by ``client.runtime.handlers`` on a synthetic hospital (one Flower Context per
node, kept across messages), so :func:`server.federation.run_federation` runs
unchanged, with no Flower process started.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict

from client.runtime.handlers import handle_evaluate, handle_fingerprint, handle_train
from tests.fake_grid import AnsweringGrid

RUN_ID = 5


class HandlerGrid(AnsweringGrid):
    """Nodes 100, 101, ... answering with the real handlers; ``received`` lists (node, message type)."""

    def __init__(self, datalists: list[Path], state_root: Path, run_config: dict, **node: object) -> None:
        super().__init__()
        self.contexts = {
            100 + i: Context(run_id=RUN_ID, node_id=100 + i, state=RecordDict(), run_config=dict(run_config),
                             node_config={"site-id": f"site-{i}", "datalist": str(datalist),
                                          "state-dir": str(state_root / f"site-{i}"), "require-dp": False, **node})
            for i, datalist in enumerate(datalists)}
        self.received: list[tuple[int, str]] = []

    def get_node_ids(self):  # noqa: ANN201
        return list(self.contexts)

    def answer(self, msg: Message) -> Message:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        self.received.append((node, kind))
        handler = {MessageType.TRAIN: handle_train, MessageType.EVALUATE: handle_evaluate}.get(kind, handle_fingerprint)
        return handler(msg, self.contexts[node])


def server_context(run_config: dict) -> Context:
    """The ServerApp's Context for ``run_config``."""
    return Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
