"""The composed strategies equal Flower's own aggregation; Krum, Multi-Krum and Bulyan leave an outlier out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from server.run_folder import RunRecorder
from server.strategies import build_strategy
from shared.errors import ConfigError
from shared.plan import manual_plan
from shared.strategy_table import STRATEGIES, strategies_markdown
from tests.conftest import tiny_config_with

README = Path(__file__).resolve().parent.parent / "README.md"
#: the round's norm rule off, so that only the aggregation rule judges the outlier
NO_NORM_RULE = {"update-norm-bound-factor": 0.0, "outlier-min-sites": 0}
SHAPE = (2, 3)


class _Nodes:
    """Stands in for the network: Flower's sampling only asks which nodes are connected."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(11, 11 + count))

    def get_node_ids(self) -> list[int]:
        return self.ids


def _reply(node_id: int, values: np.ndarray, examples: int) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(values.astype(np.float32))}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5 * node_id}),
                          "site": ConfigRecord({"site-id": f"s{node_id}"})})
    return Message(content=content, reply_to=instruction)


def _honest(count: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.1, SHAPE).astype(np.float32) for _ in range(count)]


def _strategy(tmp_path: Path, name: str, **overrides):
    config = tiny_config_with({"strategy": name, **overrides})
    return build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))


def _aggregate(strategy, updates: list[np.ndarray], examples: list[int] | None = None, *,
               sampled: int = 0) -> np.ndarray | None:
    """Sample ``sampled`` nodes (default: one per update), aggregate ``updates``; the new weights (None: kept)."""
    examples = examples or [1 + i for i in range(len(updates))]
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}), ConfigRecord(),
                             _Nodes(sampled or len(updates)))
    arrays, _ = strategy.aggregate_train(1, [_reply(11 + i, u, n) for i, (u, n) in enumerate(zip(updates, examples))])
    return None if arrays is None else arrays["w"].numpy()


@pytest.mark.parametrize(("name", "flower"), [
    ("fedmedian", FedMedian()), ("fedtrimmedavg", FedTrimmedAvg(beta=0.2))])
def test_composed_robust_rules_equal_flowers_bit_for_bit(tmp_path, flower_identity, name, flower):
    updates = _honest(5)
    ours = _aggregate(_strategy(tmp_path, name, **NO_NORM_RULE), updates)
    theirs, _ = flower.aggregate_train(1, [_reply(11 + i, u, 1 + i) for i, u in enumerate(updates)])
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs["w"].numpy())


def test_composed_mean_and_server_optimiser_equal_flowers(tmp_path, flower_identity):
    updates, examples = _honest(4), [3, 1, 4, 2]
    replies = [_reply(11 + i, u, n) for i, (u, n) in enumerate(zip(updates, examples))]
    mean, _ = FedAvg().aggregate_train(1, replies)
    # ours sums in float64 in site order, Flower in float32 in arrival order
    assert np.allclose(_aggregate(_strategy(tmp_path / "avg", "fedavg", **NO_NORM_RULE), updates, examples),
                       mean["w"].numpy(), rtol=1e-6, atol=1e-7)
    flower = FedAdam(eta=0.01, tau=0.001)
    start = ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))})
    flower.configure_train(1, start, ConfigRecord(), _Nodes(4))
    theirs, _ = flower.aggregate_train(1, replies)
    ours = _aggregate(_strategy(tmp_path / "adam", "fedadam", **NO_NORM_RULE), updates, examples)
    assert ours.dtype == np.float32  # Flower's step is float64; the sites' model is float32
    assert np.allclose(ours, theirs["w"].numpy(), rtol=1e-5, atol=1e-7)


def _with_outlier(count: int) -> tuple[list[np.ndarray], np.ndarray]:
    honest = _honest(count - 1)
    outlier = np.full(SHAPE, 50.0, dtype=np.float32)
    return [*honest[:2], outlier, *honest[2:]], np.stack(honest)


def test_krum_picks_one_honest_update(tmp_path, flower_identity):
    updates, honest = _with_outlier(5)
    ours = _aggregate(_strategy(tmp_path, "krum", **NO_NORM_RULE, **{"min-train-nodes": 5}), updates)
    assert any(np.array_equal(ours, h) for h in honest)


def test_multikrum_averages_the_honest_updates(tmp_path, flower_identity):
    updates, honest = _with_outlier(5)
    examples = [2, 1, 9, 3, 4]  # the outlier claims the most examples: still left out
    ours = _aggregate(_strategy(tmp_path, "multikrum", **NO_NORM_RULE, **{"min-train-nodes": 5}), updates, examples)
    weights = np.array([2, 1, 3, 4], dtype=np.float64)
    expected = np.tensordot(weights / weights.sum(), honest.astype(np.float64), axes=1)
    assert np.allclose(ours, expected, atol=1e-6)  # n - f = 4 kept: exactly the honest ones


def test_bulyan_stays_within_the_honest_updates(tmp_path, flower_identity):
    updates, honest = _with_outlier(7)
    ours = _aggregate(_strategy(tmp_path, "bulyan", **NO_NORM_RULE, **{"min-train-nodes": 7}), updates)
    assert np.all(ours >= honest.min(axis=0)) and np.all(ours <= honest.max(axis=0))


def test_bulyan_with_too_few_updates_keeps_the_model_and_says_why(tmp_path, flower_identity):
    strategy = _strategy(tmp_path, "bulyan", **NO_NORM_RULE, **{"min-train-nodes": 7})
    assert _aggregate(strategy, _honest(6), sampled=7) is None  # 4 x 1 + 3 = 7 needed: one site did not answer
    assert "4 x malicious-sites + 3 = 7" in strategy.recorder.round_notes[1]["aggregation-note"]


@pytest.mark.parametrize(("name", "needed"), [("krum", 5), ("multikrum", 5), ("bulyan", 7)])
def test_run_config_refuses_too_few_sites_for_the_rule(name, needed):
    with pytest.raises(ConfigError, match="min-train-nodes', 'min-available-nodes', 'malicious-sites'") as refused:
        tiny_config_with({"strategy": name, "min-train-nodes": needed - 1})
    assert f"= {needed} sites" in str(refused.value)
    tiny_config_with({"strategy": name, "min-train-nodes": needed})
    tiny_config_with({"strategy": name, "min-available-nodes": needed})  # fraction-train 1: all of them sampled
    tiny_config_with({"strategy": name, "min-train-nodes": needed - 2, "malicious-sites": 0})


def test_run_config_refuses_robust_rules_that_need_updates_in_the_clear():
    with pytest.raises(ConfigError, match="'secure-aggregation', 'strategy'"):
        tiny_config_with({"strategy": "krum", "min-train-nodes": 5, "secure-aggregation": True,
                          "overlap-evaluation": False})
    with pytest.raises(ConfigError, match="'dp-level', 'strategy'"):
        tiny_config_with({"strategy": "bulyan", "min-train-nodes": 7, "dp": True, "dp-level": "site",
                          "dp-site-clipping-norm": 1.0})
    with pytest.raises(ConfigError, match="multikrum-keep"):
        tiny_config_with({"strategy": "multikrum", "min-train-nodes": 5, "multikrum-keep": 5})


def test_readme_lists_the_table_of_strategies():
    assert strategies_markdown() in README.read_text()
    assert {row.family for row in STRATEGIES.values()} == {"streaming mean", "server optimiser", "buffered robust"}
