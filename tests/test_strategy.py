"""The server strategy keeps refusals and failed replies out of the aggregate."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from server.run_folder import RunRecorder
from server.strategies.fedavg import FedSegFedAvg
from shared.config import RunConfig
from tests.conftest import TINY_RUN_CONFIG


def _instruction(node_id):
    return Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)


def _update(node_id, site, value, examples):
    arrays = ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=_instruction(node_id))


def _refusal(node_id, site):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}),
                          "site": ConfigRecord({"site-id": site, "reason": "DataError: broken.nii.gz"})})
    return Message(content=content, reply_to=_instruction(node_id))


def test_aggregate_uses_only_accepted_updates(tmp_path, flower_identity):
    recorder = RunRecorder(tmp_path, config=RunConfig.from_mapping(TINY_RUN_CONFIG))
    strategy = FedSegFedAvg(recorder=recorder)
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    crashed = Message(error=Error(code=1, reason="ClientApp crashed"), reply_to=_instruction(14))
    replies = [_update(11, "a", 1.0, 1), _update(12, "b", 4.0, 3), _refusal(13, "c"), crashed]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), (1.0 * 1 + 4.0 * 3) / 4)
    round_rows = recorder.rounds[1]
    assert round_rows["c"]["train-status"] == "refused" and "broken.nii.gz" in round_rows["c"]["train-reason"]
    assert round_rows["node-14"]["train-status"] == "failed"
    assert round_rows["a"]["train-status"] == "ok"


def test_round_where_every_site_refuses_keeps_the_model(tmp_path, flower_identity):
    recorder = RunRecorder(tmp_path, config=RunConfig.from_mapping(TINY_RUN_CONFIG))
    strategy = FedSegFedAvg(recorder=recorder)
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    arrays, metrics = strategy.aggregate_train(1, [_refusal(13, "c")])
    assert arrays is None and metrics is None
