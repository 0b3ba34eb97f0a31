"""Broken updates are rejected; large honest ones are bounded, never dropped; clear outliers are
rejected when there are enough sites to tell."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.norm_bounds import NormRule, judge_norms
from server.strategies.strategy import FedSegStrategy
from tests.conftest import tiny_recorder

GLOBAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.full(3, 0.5, dtype=np.float32)}


def _reply(node_id, site, arrays, examples):
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=instruction)


def _delta(seed, norm):
    """A change to the global model with the given L2 norm."""
    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(0, 1, v.shape) for k, v in GLOBAL.items()}
    length = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
    return {k: d * (norm / length) for k, d in delta.items()}


def _update(delta):
    return {k: (GLOBAL[k] + d).astype(np.float32) for k, d in delta.items()}


def _good(seed):
    return _update(_delta(seed, 1.0))


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
    }


def _strategy(tmp_path, **kwargs):
    recorder = tiny_recorder(tmp_path)
    strategy = FedSegStrategy(recorder=recorder, **kwargs)
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    return strategy


@pytest.fixture
def strategy(tmp_path):
    return _strategy(tmp_path)


def _expected_mean(deltas_and_weights):
    """The global model plus the example-weighted mean of the (already scaled) deltas."""
    total = sum(n for _, n in deltas_and_weights)
    return {k: GLOBAL[k] + sum(d[k] * n for d, n in deltas_and_weights) / total for k in GLOBAL}


def _assert_close(arrays, expected):
    """Equal to float32 precision: the update is sent, and bounded by Flower's clipping, in float32."""
    for name in GLOBAL:
        assert np.allclose(arrays[name].numpy(), expected[name], rtol=1e-6, atol=1e-6), name


def _logged(strategy):
    return [json.loads(line) for line in strategy.recorder.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("kind", list(_bad_updates()))
def test_each_broken_update_is_rejected_and_the_good_ones_are_averaged(strategy, flower_identity, kind):
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
    assert [r["train-status"] for r in _logged(strategy) if r["site"] == "mallory"] == ["rejected"]


@pytest.mark.parametrize("norms", [(0.075, 0.86), (0.05, 1.0)])  # measured on two real tumour patients; 20x
def test_two_honest_sites_apart_by_more_than_the_factor_are_both_aggregated(strategy, flower_identity, norms):
    small, large = _delta(1, norms[0]), _delta(2, norms[1])
    replies = [_reply(1, "hospital-a", _update(small), 3), _reply(2, "hospital-b", _update(large), 5)]

    arrays, _ = strategy.aggregate_train(1, replies)

    scale = 10 * norms[0] / norms[1]  # bound: 10 x the lower median, here the smaller site's norm
    expected = _expected_mean([(small, 3), ({k: d * scale for k, d in large.items()}, 5)])
    _assert_close(arrays, expected)
    global_row = strategy.recorder.end_round(1, arrays)
    assert (global_row["sites-train-ok"], global_row["sites-train-bounded"], global_row["sites-train-rejected"]) \
        == (2, 1, 0)
    rows = {r["site"]: r for r in _logged(strategy)}
    assert rows["hospital-b"]["train-status"] == "ok"
    assert rows["hospital-b"]["update-norm"] == pytest.approx(norms[1], rel=1e-6)
    assert rows["hospital-b"]["update-bound"] == pytest.approx(10 * norms[0], rel=1e-6)
    assert rows["hospital-b"]["update-scale"] == pytest.approx(scale, rel=1e-6)
    assert "more than 10 x the round's median" in rows["hospital-b"]["train-note"]
    assert "update-scale" not in rows["hospital-a"] and rows["hospital-a"]["train-status"] == "ok"


def _poisoned_round(sites):
    """``sites`` honest updates of norm ~1 plus one scaled 1000x, as simulations' ``--poison-kind scale``."""
    deltas = {f"site-{i}": (_delta(i, 1.0 + 0.1 * i), i + 1) for i in range(sites)}
    deltas["mallory"] = ({k: 1000 * d for k, d in _delta(7, 1.0).items()}, 2)
    replies = [_reply(i, s, _update(d), n) for i, (s, (d, n)) in enumerate(deltas.items())]
    return deltas, replies


def test_with_five_sites_a_scaled_poisoning_is_rejected(strategy, flower_identity):
    deltas, replies = _poisoned_round(4)

    arrays, _ = strategy.aggregate_train(1, replies)

    row = strategy.recorder.rounds[1]["mallory"]
    assert row["train-status"] == "rejected" and "clear outlier among 5 sites" in row["train-reason"]
    honest = _expected_mean([deltas[s] for s in sorted(deltas) if s != "mallory"])
    _assert_close(arrays, honest)


def test_with_three_sites_the_same_poisoning_is_bounded_not_rejected(strategy, flower_identity):
    deltas, replies = _poisoned_round(2)

    arrays, _ = strategy.aggregate_train(1, replies)

    row = strategy.recorder.rounds[1]["mallory"]
    assert row["train-status"] == "ok"
    assert row["update-scale"] == pytest.approx(10 * 1.1 / 1000, rel=1e-5)  # the median is site-1's norm
    poisoned, weight = deltas["mallory"]
    bounded = {k: d * row["update-scale"] for k, d in poisoned.items()}
    expected = _expected_mean([deltas["site-0"], deltas["site-1"], (bounded, weight)])
    _assert_close(arrays, expected)


def test_the_bound_can_be_turned_off(tmp_path, flower_identity):
    strategy = _strategy(tmp_path, norm_rule=NormRule(bound_factor=0, outlier_min_sites=0))
    small, large = _delta(1, 0.01), _delta(2, 1.0)
    replies = [_reply(1, "a", _update(small), 1), _reply(2, "b", _update(large), 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = _expected_mean([(small, 1), (large, 1)])
    _assert_close(arrays, expected)
    assert "update-scale" not in strategy.recorder.rounds[1]["b"]


@pytest.mark.parametrize(("norms", "bounded", "rejected"), [
    ({"a": 0.075, "b": 0.86}, {"b"}, set()),  # two sites: the smaller one is the yardstick
    ({"a": 1.0, "b": 1.1, "c": 1000.0}, {"c"}, set()),  # three sites: never rejected on norm
    ({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.2, "e": 1000.0}, set(), {"e"}),  # five: a clear outlier
    ({"a": 1.0, "b": 1.01, "c": 1.02, "d": 1.03, "e": 20.0}, {"e"}, set()),  # within 100x: bounded only
    ({"a": 0.01, "b": 0.05, "c": 0.1, "d": 0.5, "e": 0.9, "f": 12.0}, {"f"}, set()),  # 120x, but widely spread
    ({"a": 0.0, "b": 1.0}, set(), set()),  # an unchanged model is no yardstick
])
def test_norm_rule(norms, bounded, rejected):
    verdict = judge_norms(norms, rule=NormRule())
    assert set(verdict.bounded) == bounded and set(verdict.rejected) == rejected
    for site in bounded:
        assert verdict.bounded[site].bound == pytest.approx(10 * verdict.yardstick)


def test_the_spool_is_removed_after_aggregation(strategy, flower_identity):
    strategy.aggregate_train(1, [_reply(1, "a", _good(1), 3), _reply(2, "b", _good(2), 3)])
    assert not list(strategy.recorder.run_dir.glob(".spool-*"))


def test_result_does_not_depend_on_reply_order(strategy, flower_identity):
    norms = (0.5, 1.0, 1.5, 2.0, 50.0)  # the last one is bounded
    updates = [(f"site-{i}", _update(_delta(i, norm)), i + 1) for i, norm in enumerate(norms)]
    forward, _ = strategy.aggregate_train(1, [_reply(i, s, a, n) for i, (s, a, n) in enumerate(updates)])
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    backward, _ = strategy.aggregate_train(2, [_reply(i, s, a, n) for i, (s, a, n) in reversed(list(enumerate(updates)))])
    assert strategy.recorder.rounds[1]["site-4"]["update-scale"] < 1
    for name in GLOBAL:
        assert forward[name].numpy().tobytes() == backward[name].numpy().tobytes()


def test_too_few_accepted_updates_keep_the_global_model(tmp_path, flower_identity):
    recorder = tiny_recorder(tmp_path)
    strategy = FedSegStrategy(recorder=recorder, min_train_replies=2)
    strategy.expect_updates_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "a", _good(1), 3)])
    assert arrays is None and metrics is None
    assert recorder.rounds[1]["a"]["train-status"] == "ok"
