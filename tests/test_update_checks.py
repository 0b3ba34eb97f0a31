"""Bad updates are rejected with a reason, counted, and the rest are aggregated exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.run_folder import RunRecorder
from server.strategies.fedavg import FedSegFedAvg
from server.update_checks import norm_outliers
from shared.config import RunConfig
from tests.conftest import TINY_RUN_CONFIG

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _reply(node_id, site, arrays, examples):
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=instruction)


def _good(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def _bad_updates():
    good = _good(99)
    nan = {k: v.copy() for k, v in good.items()}
    nan["w"][0, 1] = np.nan
    inf = {k: v.copy() for k, v in good.items()}
    inf["b"][2] = np.inf
    return {
        "wrong-key": ({"w": good["w"], "bias": good["b"]}, "wrong keys"),
        "wrong-shape": ({"w": good["w"].reshape(3, 2), "b": good["b"]}, "wrong shape"),
        "wrong-dtype": ({"w": good["w"].astype(np.float64), "b": good["b"]}, "wrong dtype"),
        "nan": (nan, "non-finite"),
        "inf": (inf, "non-finite"),
        "huge": ({k: v * 1000 for k, v in good.items()}, "more than 10 x the round's median"),
    }


@pytest.fixture
def strategy(tmp_path):
    recorder = RunRecorder(tmp_path, config=RunConfig.from_mapping(TINY_RUN_CONFIG))
    strategy = FedSegFedAvg(recorder=recorder, norm_factor=10.0)
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    return strategy


@pytest.mark.parametrize("kind", list(_bad_updates()))
def test_each_bad_update_is_rejected_and_the_good_ones_are_averaged(strategy, flower_identity, kind):
    bad, reason = _bad_updates()[kind]
    goods = {"site-a": (_good(1), 2), "site-b": (_good(2), 5), "site-c": (_good(3), 3)}
    replies = [_reply(i, s, arrays, n) for i, (s, (arrays, n)) in enumerate(goods.items())]
    replies.insert(1, _reply(9, "mallory", bad, 4))

    arrays, _ = strategy.aggregate_train(1, replies)

    total = sum(n for _, n in goods.values())
    for name, reference in GLOBAL.items():
        expected = sum(a[name].astype(np.float64) * n for a, n in goods.values()) / total
        assert np.array_equal(arrays[name].numpy(), expected.astype(reference.dtype))
    row = strategy.recorder.rounds[1]["mallory"]
    assert row["train-status"] == "rejected" and reason in row["train-reason"]
    global_row = strategy.recorder.end_round(1, arrays)
    assert global_row["sites-train-rejected"] == 1 and global_row["sites-train-ok"] == 3
    logged = [json.loads(line) for line in strategy.recorder.metrics_path.read_text().splitlines()]
    assert [r["train-status"] for r in logged if r["site"] == "mallory"] == ["rejected"]


def test_result_does_not_depend_on_reply_order(strategy, flower_identity):
    updates = [(f"site-{i}", _good(i), i + 1) for i in range(5)]
    forward, _ = strategy.aggregate_train(1, [_reply(i, s, a, n) for i, (s, a, n) in enumerate(updates)])
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    backward, _ = strategy.aggregate_train(2, [_reply(i, s, a, n) for i, (s, a, n) in reversed(list(enumerate(updates)))])
    for name in GLOBAL:
        assert forward[name].numpy().tobytes() == backward[name].numpy().tobytes()


def test_too_few_accepted_updates_keep_the_global_model(tmp_path, flower_identity):
    recorder = RunRecorder(tmp_path, config=RunConfig.from_mapping(TINY_RUN_CONFIG))
    strategy = FedSegFedAvg(recorder=recorder, min_train_replies=2)
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "a", _good(1), 3)])
    assert arrays is None and metrics is None
    assert recorder.rounds[1]["a"]["train-status"] == "ok"


def test_norm_check_uses_the_lower_median_and_can_be_turned_off():
    assert set(norm_outliers({"a": 1.0, "b": 50.0}, factor=10)) == {"b"}
    assert norm_outliers({"a": 1.0, "b": 5.0, "c": 9.0}, factor=10) == {}
    assert norm_outliers({"a": 1.0, "b": 50.0}, factor=0) == {}


def test_the_spool_is_removed_after_aggregation(strategy, flower_identity):
    strategy.aggregate_train(1, [_reply(1, "a", _good(1), 3), _reply(2, "b", _good(2), 3)])
    assert not list(strategy.recorder.run_dir.glob(".spool-*"))
