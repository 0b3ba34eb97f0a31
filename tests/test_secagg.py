"""Secure aggregation: Flower's SecAgg+ client protocol at each site against fedseg's server driver.

Each node runs the site side for real (``client.runtime.secagg.run_secure_stage``:
Flower's ``secaggplus_mod``, the site's checks, the egress guard, the audit
log) with a fixed "trained" model in place of training, so the mean the server
unmasks can be compared with the plain weighted mean exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.commands.audit import summarise_audit_log
from client.runtime.handlers import refusal_content, send_reply
from client.runtime.secagg import SecureStep, run_secure_stage
from client.runtime.site_config import SiteConfig
from server.polling_grid import PollingGrid
from server.run_folder import RunRecorder
from server.secagg_round import secure_train_round
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG
from tests.fake_grid import OfflineGrid

SECURE = {**TINY_RUN_CONFIG, "secure-aggregation": True, "secagg-threshold": 2}
NODES = {11: ("site-a", 30), 12: ("site-b", 50), 13: ("site-c", 120)}  # node -> (site id, num-examples)


def _offset(node: int) -> float:
    return 0.01 * (node - 10)  # each site moves every weight by its own amount


class _SecureSitesGrid(OfflineGrid):
    """Nodes running the site side of SecAgg+ for real; each keeps its Flower Context across stages.

    ``silent`` holds (node, stage) pairs that never answer; ``tamper`` = (what, node) alters that
    node's reply in transit: "vector" replaces its masked vector's values, "share" its first
    unmasking share, "shape" drops the last array of its masked vector, "keys" its second public key. The training of the
    nodes in ``crash`` raises an unexpected error.
    """

    def __init__(self, run_config: dict, tmp_path, *, silent=frozenset(),
                 tamper: tuple[str, int] | None = None, crash=frozenset()) -> None:
        self.run_config, self.tmp_path, self.silent, self.tamper = run_config, tmp_path, silent, tamper
        self.crash = crash
        self.contexts = {node: Context(run_id=7, node_id=node, node_config={}, state=RecordDict(),
                                       run_config=run_config) for node in NODES}
        self.config = RunConfig.from_mapping(run_config)
        self.plan = manual_plan(self.config)
        self._replies: dict[str, Message] = {}
        self.pushed = 0
        self.sent_content: list[RecordDict] = []

    def get_node_ids(self):  # noqa: ANN201
        return list(NODES)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            step = SecureStep.of(msg)
            msg_id = f"m{self.pushed}"
            self.pushed += 1
            ids.append(msg_id)
            if (node, step.stage) in self.silent:
                continue
            reply = self._answer(node, msg, step)
            if self.tamper is not None and self.tamper[1] == node:
                _tamper(self.tamper[0], step.stage, reply.content.config_records[RECORD_KEY_CONFIGS])
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def _answer(self, node: int, msg: Message, step: SecureStep) -> Message:
        site_id, examples = NODES[node]
        site = SiteConfig(site_id=site_id, datalist=self.tmp_path / "unused.json",
                          state_dir=self.tmp_path / "state" / site_id)

        def train() -> RecordDict:
            if node in self.crash:
                raise RuntimeError("patient Jane Doe")
            trained = {k: Array(v.numpy() + np.float32(_offset(node))) for k, v in msg.content["arrays"].items()}
            return RecordDict({"arrays": ArrayRecord(trained), "site": ConfigRecord({"site-id": site_id}),
                               "metrics": MetricRecord({"num-examples": examples, "train-loss": float(node)})})

        context = self.contexts[node]
        try:
            content = run_secure_stage(msg, context, step=step, config=self.config, site=site, train=train,
                                       reference=lambda: {k: a.numpy() for k, a in msg.content["arrays"].items()})
        except Exception as exc:  # noqa: BLE001 - as the ClientApp does: a refusal
            content = refusal_content(msg, site, f"{type(exc).__name__}: {exc}")
        reply = send_reply(msg, content=content, context=context, site=site, plan=self.plan, step=step)
        self.sent_content.append(reply.content)
        return reply


def _tamper(what: str, stage: str, record: ConfigRecord) -> None:
    if stage == Stage.COLLECT_MASKED_VECTORS and what == "vector":
        masked = record[Key.MASKED_PARAMETERS]
        record[Key.MASKED_PARAMETERS] = [*masked[:-1], _altered(masked[-1])]
    elif stage == Stage.COLLECT_MASKED_VECTORS and what == "shape":
        record[Key.MASKED_PARAMETERS] = record[Key.MASKED_PARAMETERS][:-1]
    elif stage == Stage.SETUP and what == "keys":
        del record[Key.PUBLIC_KEY_2]
    elif stage == Stage.UNMASK and what == "share":
        shares = record[Key.SHARE_LIST]
        record[Key.SHARE_LIST] = [shares[0][:4] + bytes(b ^ 0x5A for b in shares[0][4:]), *shares[1:]]


def _altered(payload: bytes) -> bytes:
    """The masked array with its values replaced by others (corrupted in transit)."""
    import io

    values = np.load(io.BytesIO(payload))
    values[...] = np.random.default_rng(0).integers(0, 2**32, size=values.shape)
    out = io.BytesIO()
    np.save(out, values)
    return out.getvalue()


def _secure_round(tmp_path, grid: _SecureSitesGrid, run_config: dict):
    config = RunConfig.from_mapping(run_config)
    recorder = RunRecorder(tmp_path / "run", config=config, plan=manual_plan(config))
    strategy = build_strategy(config, recorder)
    start = model_to_arrays(build_model(manual_plan(config).model_config()))
    from server.secagg_sum import SecAggSettings

    new = secure_train_round(strategy, PollingGrid(grid, poll_interval_s=0.005), server_round=1, arrays=start,
                             timeout=0.5, settings=SecAggSettings.from_config(config))
    return start, new, recorder.rounds[1], tmp_path / "run"


def _plain_mean(start: ArrayRecord, nodes) -> dict[str, np.ndarray]:
    total = sum(NODES[n][1] for n in nodes)
    shift = sum(NODES[n][1] * _offset(n) for n in nodes) / total
    return {k: a.numpy().astype(np.float64) + shift for k, a in start.items()}


def _max_error(new: ArrayRecord, expected: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(new[k].numpy() - v).max()) for k, v in expected.items())


# error bound: per site one quantisation step of the weighted change (2 c / Q), divided by its weight
# ratio (num-examples / max-weight), plus float32 rounding of the model
def _tolerance(config: RunConfig, nodes) -> float:
    step = 2 * config.secagg_clipping_range / config.secagg_quantization_range
    return step * config.secagg_max_weight / min(NODES[n][1] for n in nodes) + 1e-6


def test_the_secure_mean_equals_the_plain_weighted_mean_within_the_quantisation_error(tmp_path, flower_identity):
    grid = _SecureSitesGrid(SECURE, tmp_path)
    start, new, rows, run_dir = _secure_round(tmp_path, grid, SECURE)

    assert _max_error(new, _plain_mean(start, NODES)) <= _tolerance(grid.config, NODES)
    assert {site: row["train-status"] for site, row in rows.items()} == {s: "ok" for s, _ in NODES.values()}
    assert not list(run_dir.glob(".spool-*"))  # nothing of a site's update was spooled
    for content in grid.sent_content:  # no plain weights ever left a site
        assert "arrays" not in content and not content.array_records
    audit = [json.loads(line) for line in (tmp_path / "state" / "site-a" / "egress-audit.jsonl").open()]
    assert [entry["secagg-stage"] for entry in audit] == list(Stage.all())
    masking = audit[2]
    assert masking["site-checks"]["update-norm"] > 0 and masking["array-bytes"] == 0
    assert masking["secagg"][Key.MASKED_PARAMETERS]["items"] == len(start) + 1
    summary = summarise_audit_log(path=tmp_path / "state" / "site-a" / "egress-audit.jsonl").runs[7]
    assert summary.rounds[1].outcomes["train"] == "masked" and summary.rounds_trained == [1]
    assert summary.array_bytes == 0 and summary.masked_bytes == masking["secagg"][Key.MASKED_PARAMETERS]["bytes"]


def test_a_site_dropping_after_key_sharing_is_recovered_above_the_threshold(tmp_path, flower_identity):
    grid = _SecureSitesGrid(SECURE, tmp_path, silent={(13, Stage.COLLECT_MASKED_VECTORS)})
    start, new, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert _max_error(new, _plain_mean(start, [11, 12])) <= _tolerance(grid.config, [11, 12])
    assert rows["site-c"]["train-status"] == "failed" and "collect_masked_vectors" in rows["site-c"]["train-reason"]
    assert rows["site-a"]["train-status"] == rows["site-b"]["train-status"] == "ok"


def test_a_site_whose_training_fails_is_recovered_and_its_error_is_not_taken_for_the_protocols(
        tmp_path, flower_identity):
    grid = _SecureSitesGrid(SECURE, tmp_path, crash={11})
    start, new, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert _max_error(new, _plain_mean(start, [12, 13])) <= _tolerance(grid.config, [12, 13])
    # the error reaches the ClientApp's own handling unchanged (which sends only its type, test_egress)
    assert rows["site-a"]["train-reason"] == "collect_masked_vectors: RuntimeError: patient Jane Doe"


def test_a_site_silent_while_unmasking_still_counts_its_update(tmp_path, flower_identity):
    grid = _SecureSitesGrid(SECURE, tmp_path, silent={(12, Stage.UNMASK)})
    start, new, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert _max_error(new, _plain_mean(start, NODES)) <= _tolerance(grid.config, NODES)
    assert all(row["train-status"] == "ok" for row in rows.values())


def test_below_the_threshold_the_round_is_skipped_with_its_reason(tmp_path, flower_identity):
    run_config = {**SECURE, "secagg-threshold": 3}
    grid = _SecureSitesGrid(run_config, tmp_path, silent={(13, Stage.COLLECT_MASKED_VECTORS)})
    start, new, rows, _ = _secure_round(tmp_path, grid, run_config)

    assert all(np.array_equal(new[k].numpy(), a.numpy()) for k, a in start.items())  # the model is kept
    for site in ("site-a", "site-b"):
        assert rows[site]["train-status"] == "rejected"
        assert rows[site]["train-reason"].startswith("secure aggregation round skipped: only 2 site(s) sent a "
                                                     "masked vector, fewer than secagg-threshold = 3")


@pytest.mark.parametrize("what", ["vector", "share"])
def test_an_altered_masked_vector_or_share_fails_the_round_cleanly(tmp_path, flower_identity, what):
    grid = _SecureSitesGrid(SECURE, tmp_path, tamper=(what, 12))
    start, new, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert all(np.array_equal(new[k].numpy(), a.numpy()) for k, a in start.items())
    assert rows["site-a"]["train-status"] == "rejected"
    assert "altered" in rows["site-a"]["train-reason"] and "skipped" in rows["site-a"]["train-reason"]


@pytest.mark.parametrize(("what", "stage"), [("shape", "collect_masked_vectors"), ("keys", "setup")])
def test_a_malformed_protocol_reply_drops_only_its_site(tmp_path, flower_identity, what, stage):
    grid = _SecureSitesGrid(SECURE, tmp_path, tamper=(what, 12))
    start, new, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert _max_error(new, _plain_mean(start, [11, 13])) <= _tolerance(grid.config, [11, 13])
    assert rows["site-b"]["train-status"] == "rejected"
    assert rows["site-b"]["train-reason"].startswith(f"{stage}: malformed protocol reply")


@pytest.mark.parametrize(("run_config", "node_config", "why"), [
    ({"secure-aggregation": True}, {}, "run config 'secure-aggregation' is true"),
    ({}, {"require-secure-aggregation": True}, "node config 'require-secure-aggregation'"),
])
def test_a_plain_update_is_refused_when_the_run_or_the_site_wants_secure_aggregation(
        tmp_path, flower_identity, run_config, node_config, why):
    from client.runtime.handlers import handle_train

    config = RunConfig.from_mapping({**TINY_RUN_CONFIG, **run_config})
    start = model_to_arrays(build_model(manual_plan(config).model_config()))
    msg = Message(content=RecordDict({"arrays": start, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=11, message_type=MessageType.TRAIN)
    node = {"datalist": str(tmp_path / "d.json"), "state-dir": str(tmp_path / "state"), **node_config}
    reply = handle_train(msg, Context(run_id=7, node_id=11, node_config=node, state=RecordDict(),
                                      run_config={**TINY_RUN_CONFIG, **run_config}))

    assert reply.content["metrics"]["refused"] == 1 and not reply.content.array_records
    assert why in reply.content["site"]["reason"]


def test_a_site_refuses_a_setup_that_differs_from_the_run_config(tmp_path, flower_identity):
    # the server asks for a threshold of 2 while the sites' run config says 3
    grid = _SecureSitesGrid({**SECURE, "secagg-threshold": 3}, tmp_path)
    _, _, rows, _ = _secure_round(tmp_path, grid, SECURE)

    assert {row["train-status"] for row in rows.values()} == {"refused"}
    assert "'threshold' 2 is not run config 'secagg-threshold' = 3" in rows["site-a"]["train-reason"]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_and_secure_aggregation_are_refused_together(strategy):
    with pytest.raises(ConfigError, match="'secure-aggregation', 'strategy'"):
        RunConfig.from_mapping({"secure-aggregation": True, "strategy": strategy})
    RunConfig.from_mapping({"secure-aggregation": False, "strategy": strategy})


def test_secure_aggregation_cannot_overlap_evaluation():
    with pytest.raises(ConfigError, match="'secure-aggregation', 'overlap-evaluation'"):
        RunConfig.from_mapping({"secure-aggregation": True, "overlap-evaluation": True})


@pytest.mark.parametrize(("key", "value"), [("secagg-threshold", 1), ("secagg-modulus-range", 3 * 2**20),
                                            ("secagg-clipping-range", 0.0), ("secagg-update-norm-bound", -1.0)])
def test_bad_secure_aggregation_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: value})


def test_the_harness_turns_overlap_off_for_secure_aggregation_unless_asked(tmp_path):
    from simulations.api import SimulationSpec, build_run_config

    def config(run_config: dict) -> RunConfig:
        spec = SimulationSpec(out=tmp_path, run_config=run_config)
        return build_run_config(spec, tmp_path, tmp_path / "sites.json", num_sites=3)

    assert config({}).overlap_evaluation  # the harness' default
    secure = config({"secure-aggregation": True})
    assert secure.secure_aggregation and not secure.overlap_evaluation
    with pytest.raises(ConfigError, match="'secure-aggregation', 'overlap-evaluation'"):
        config({"secure-aggregation": True, "overlap-evaluation": True})


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_every_mean_strategy_aggregates_the_secure_mean_as_it_would_the_plain_one(tmp_path, flower_identity,
                                                                                    strategy):
    from flwr.serverapp.strategy import FedAdam, FedYogi

    run_config = {**SECURE, "strategy": strategy}
    grid = _SecureSitesGrid(run_config, tmp_path)
    start, new, rows, _ = _secure_round(tmp_path, grid, run_config)

    mean = _plain_mean(start, NODES)
    if strategy == "fedprox":
        expected = mean
    else:  # Flower's own optimiser step on the plain mean
        config = grid.config
        flower = {"fedadam": FedAdam, "fedyogi": FedYogi}[strategy](
            eta=config.server_learning_rate, eta_l=config.learning_rate, tau=config.server_tau)
        flower.current_arrays = {k: a.numpy() for k, a in start.items()}
        reply = Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in
                                                                    mean.items()}),
                                            "metrics": MetricRecord({"num-examples": 200})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = flower.aggregate_train(1, [reply])
        expected = {k: a.numpy() for k, a in arrays.items()}
    assert all(new[k].dtype == start[k].dtype for k in start)
    assert _max_error(new, expected) <= 2 * _tolerance(grid.config, NODES)
    assert all(row["train-status"] == "ok" for row in rows.values())
