"""The server strategy keeps refusals and failed replies out of the aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from server.run_folder import RunRecorder
from server.strategies import build_strategy
from server.strategies.strategy import FedSegStrategy
from shared.config import RunConfig
from shared.plan import manual_plan
from shared.strategy_table import STRATEGIES
from tests.conftest import TINY_RUN_CONFIG, tiny_recorder


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
    recorder = tiny_recorder(tmp_path)
    strategy = FedSegStrategy(recorder=recorder)
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
    recorder = tiny_recorder(tmp_path)
    strategy = FedSegStrategy(recorder=recorder)
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    arrays, metrics = strategy.aggregate_train(1, [_refusal(13, "c")])
    assert arrays is None and metrics is None


def _three_updates():
    rng = np.random.default_rng(5)
    return [_update_arrays(11 + i, f"s{i}", rng.normal(0, 1, (2, 2)).astype(np.float32), n)
            for i, n in enumerate((1, 3, 2))]


def _update_arrays(node_id, site, values, examples):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(values)}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=_instruction(node_id))


@pytest.mark.parametrize(("name", "flower_class"), [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg)])
def test_robust_strategies_equal_flowers_own_aggregation(tmp_path, flower_identity, name, flower_class):
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy=name, **{"trim-fraction": 0.34}))
    strategy = build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    ours, _ = strategy.aggregate_train(1, _three_updates())
    kwargs = {"beta": 0.34} if name == "fedtrimmedavg" else {}
    theirs, _ = flower_class(**kwargs).aggregate_train(1, _three_updates())
    assert np.array_equal(ours["w"].numpy(), theirs["w"].numpy())


@pytest.mark.parametrize(("name", "flower_class"), [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg)])
def test_robust_strategies_aggregate_the_bounded_update(tmp_path, flower_identity, name, flower_class):
    # two sites: the median is their mean and nothing is trimmed, so the bounded value shows in the result
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy=name))
    strategy = build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    values = [np.full((2, 2), v, dtype=np.float32) for v in (1.0, 500.0)]  # norms 2 and 1000
    ours, _ = strategy.aggregate_train(1, [_update_arrays(11 + i, f"s{i}", v, 1) for i, v in enumerate(values)])

    assert strategy.recorder.rounds[1]["s1"]["update-scale"] == pytest.approx(20 / 1000)
    values[1] = np.full((2, 2), 10.0, dtype=np.float32)  # scaled to norm 20 = 10 x the smaller norm
    kwargs = {"beta": config.trim_fraction} if name == "fedtrimmedavg" else {}
    theirs, _ = flower_class(**kwargs).aggregate_train(
        1, [_update_arrays(11 + i, f"s{i}", v, 1) for i, v in enumerate(values)])
    assert np.allclose(ours["w"].numpy(), theirs["w"].numpy(), rtol=1e-6)
    assert np.allclose(ours["w"].numpy(), 5.5)


def test_fedavg_equals_flowers_fedavg(tmp_path, flower_identity):
    strategy = FedSegStrategy(recorder=tiny_recorder(tmp_path))
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    ours, ours_metrics = strategy.aggregate_train(1, _three_updates())
    theirs, their_metrics = FedAvg().aggregate_train(1, _three_updates())
    # ours accumulates in float64 in site order, Flower in float32 in arrival order
    assert np.allclose(ours["w"].numpy(), theirs["w"].numpy(), rtol=1e-6, atol=1e-7)
    assert ours_metrics["train-loss"] == pytest.approx(their_metrics["train-loss"])


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_run_config_selects_the_strategy(tmp_path, name):
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy=name, **{"min-train-nodes": 7}))
    strategy = build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))
    flower = strategy.aggregator.flower
    assert type(flower).__name__ == STRATEGIES[name].flower and strategy.aggregator.spec is STRATEGIES[name]
    if name == "fedprox":
        assert strategy.aggregator.message_config() == {"proximal-mu": config.proximal_mu}
    if name in ("fedadam", "fedyogi"):
        assert flower.eta == config.server_learning_rate and flower.tau == config.server_tau
    if name in ("krum", "multikrum", "bulyan"):
        assert flower.num_malicious_nodes == config.malicious_sites


def test_an_aggregation_error_keeps_the_model_instead_of_stopping_the_run(tmp_path, flower_identity):
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy="fedmedian"))
    strategy = build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))}))
    odd = _update_arrays(12, "s1", np.ones((2, 2), dtype=np.float32), 2)
    odd.content["metrics"]["extra-metric"] = 1.0  # metric keys differ between sites: Flower refuses to aggregate
    arrays, metrics = strategy.aggregate_train(1, [_update_arrays(11, "s0", np.ones((2, 2), dtype=np.float32), 1), odd])
    assert arrays is None and metrics is None
