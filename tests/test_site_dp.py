"""Hospital-level DP (run config dp-level): clipping, equal weights, calibrated noise, the accountant, the rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from client.runtime.private_round import PrivacyPolicyError, check_dp_policy
from client.runtime.secagg import check_update, secure_weight, update_bound
from server.secagg_round import SecureRoundResult
from server.site_dp import SiteDP, SiteDPSettings
from server.site_replies import SortedReplies
from server.strategies import build_strategy
from server.strategies.strategy import SITE_DP_STATE, FedSegStrategy
from shared.errors import ConfigError
from tests.conftest import tiny_config_with, tiny_recorder

SETTINGS = SiteDPSettings(noise_multiplier=0.7, clipping_norm=1.0, delta=1e-5)
SITE_DP = {"dp": True, "dp-level": "site", "dp-site-clipping-norm": 1.0, "dp-site-noise-multiplier": 0.7}


def _reply(node_id: int, site: str, values: np.ndarray, examples: int) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(values.astype(np.float32))}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=instruction)


def _strategy(tmp_path, *, seed: int, sampled: int) -> FedSegStrategy:
    strategy = FedSegStrategy(recorder=tiny_recorder(tmp_path), site_dp=SiteDP(SETTINGS, rng=np.random.default_rng(seed)))
    strategy.expect_updates_of(ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))}))
    strategy._sampled = sampled  # what configure_train records: the sites asked this round
    return strategy


def test_site_dp_clips_weighs_sites_equally_and_adds_noise_of_z_s_over_m(tmp_path, flower_identity):
    big = np.full((2, 3), 10.0)  # change of norm 9 sqrt(6) from the global ones: clipped to 1
    small = np.full((2, 3), 1.1)  # change 0.1 per entry (norm 0.245): kept, and not outweighed by examples
    strategy = _strategy(tmp_path, seed=3, sampled=4)  # 4 asked, 2 answered: the denominator stays 4
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", big, 1), _reply(2, "b", small, 1000)])

    clipped = np.full((2, 3), 1.0 / np.sqrt(6))
    std = 0.7 * 1.0 / 4
    noise = np.random.default_rng(3).normal(0.0, std, (2, 3))
    expected = 1.0 + (clipped + np.full((2, 3), 0.1)) / 4 + noise
    assert np.allclose(arrays["w"].numpy(), expected.astype(np.float32), atol=1e-6)
    rows = strategy.recorder.rounds[1]
    assert rows["a"]["site-dp-scale"] == pytest.approx(1.0 / (9 * np.sqrt(6)))
    assert "site-dp-scale" not in rows["b"]
    notes = strategy.recorder.round_notes[1]
    assert notes["site-dp-noise-std"] == pytest.approx(std) and notes["site-dp-sampled"] == 4
    assert notes["site-epsilon"] == pytest.approx(strategy.site_dp.epsilon()) and notes["site-epsilon"] > 0


def test_site_dp_noise_does_not_follow_the_run_seed():
    first = SiteDP(SETTINGS).release([np.zeros(1000)], sampled=1)[0]
    second = SiteDP(SETTINGS).release([np.zeros(1000)], sampled=1)[0]
    assert not np.array_equal(first, second)
    assert first.std() == pytest.approx(0.7, rel=0.1)  # z S / m with m = 1


@pytest.mark.parametrize(("z", "rounds", "delta"), [(0.7, 10, 1e-5), (1.5, 50, 1e-5), (4.0, 200, 1e-3)])
def test_epsilon_agrees_with_opacus_rdp_accountant(z, rounds, delta):
    site_dp = SiteDP(SiteDPSettings(noise_multiplier=z, clipping_norm=2.0, delta=delta))
    for _ in range(rounds):
        site_dp.release([np.zeros(3)], sampled=5)
    independent = RDPAccountant()
    independent.history = [(z, 1.0, rounds)]  # no amplification: every round counts in full
    assert site_dp.epsilon() == pytest.approx(independent.get_epsilon(delta), rel=0.02)


def test_checkpointed_releases_give_the_same_epsilon_on_resume(tmp_path, flower_identity):
    strategy = _strategy(tmp_path, seed=0, sampled=2)
    for server_round in (1, 2, 3):
        strategy.aggregate_train(server_round, [_reply(1, "a", np.full((2, 3), 2.0), 5)])
    state = strategy.strategy_state()
    assert int(state[SITE_DP_STATE]["releases"][0]) == 3
    resumed = _strategy(tmp_path / "resumed", seed=1, sampled=2)
    resumed.load_strategy_state(state)
    assert resumed.site_dp.epsilon() == pytest.approx(strategy.site_dp.epsilon())


def test_secure_round_sum_gets_the_fixed_denominator_and_noise(tmp_path, flower_identity):
    strategy = _strategy(tmp_path, seed=4, sampled=3)
    outcomes = SortedReplies()
    outcomes.site_metrics.update({"a": {"num-examples": 7}, "b": {"num-examples": 9}})
    mean_of_two = [np.full(6, 0.5)]  # the sites' clipped changes, weighed equally, averaged by the protocol
    arrays, _ = strategy.aggregate_secure(1, SecureRoundResult(mean_delta=mean_of_two, outcomes=outcomes,
                                                               contributors=["a", "b"]))
    noise = np.random.default_rng(4).normal(0.0, 0.7 / 3, 6)
    assert np.allclose(arrays["w"].numpy().ravel(), 1.0 + 0.5 * 2 / 3 + noise, atol=1e-6)


def test_a_site_clips_to_the_site_level_norm_and_weighs_one_before_masking():
    config = tiny_config_with({**SITE_DP, "secure-aggregation": True, "secagg-update-norm-bound": 5.0})
    assert update_bound(config) == ("dp-site-clipping-norm", 1.0)
    assert secure_weight(config, 40.0) == secure_weight(config, 7.0) == config.secagg_max_weight
    delta, checks = check_update({"w": np.full(4, 3.0)}, {"w": np.zeros(4)}, config=config,
                                 num_examples=config.secagg_max_weight)
    assert np.linalg.norm(delta[0]) == pytest.approx(1.0) and "dp-site-clipping-norm" in checks.notes[0]
    plain = tiny_config_with({"secure-aggregation": True})
    assert update_bound(plain) == ("secagg-update-norm-bound", 0.0) and secure_weight(plain, 40.0) == 40.0


def test_site_level_only_trains_without_dp_sgd_and_a_site_requiring_patient_dp_refuses():
    from client.runtime.site_config import SiteConfig

    config = tiny_config_with(SITE_DP)
    assert config.site_dp and not config.patient_dp
    both = tiny_config_with({**SITE_DP, "dp-level": "patient+site"})
    assert both.site_dp and both.patient_dp
    site = SiteConfig(site_id="h1", datalist=Path("x.json"), state_dir=Path("state"), require_dp=True)
    with pytest.raises(PrivacyPolicyError, match="dp-level"):
        check_dp_policy(config, site)
    check_dp_policy(both, site)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"dp-site-clipping-norm": 0.0}, "dp-site-clipping-norm"),
    ({"dp-level": "hospital"}, "dp-level"),
    ({"dp-site-noise-multiplier": 0.0}, "dp-site-noise-multiplier"),
    ({"dp-site-delta": 1.0}, "dp-site-delta"),
    ({"strategy": "fedmedian"}, "strategy"),
])
def test_bad_site_dp_settings_are_refused_by_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        tiny_config_with({**SITE_DP, **overrides})


def test_run_config_builds_the_strategy_with_site_dp(tmp_path):
    config = tiny_config_with(SITE_DP)
    strategy = build_strategy(config, tiny_recorder(tmp_path))
    assert strategy.site_dp is not None and strategy.site_dp.settings == SETTINGS
    assert build_strategy(tiny_config_with(), tiny_recorder(tmp_path / "off")).site_dp is None
