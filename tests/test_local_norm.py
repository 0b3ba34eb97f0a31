"""Run config ``local-norm`` (FedBN): norm weights stay at each site, never in a reply or the average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client.inference.site_weights import local_weights_path
from client.runtime.egress.audit_log import read_entries
from client.runtime.egress.guard import EgressBlocked, check_reply, expected_parameter_specs
from client.runtime.handlers import handle_evaluate, handle_train
from server.strategies.strategy import FedSegStrategy
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.local_weights import local_weight_names, norm_weight_names
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG, tiny_recorder

FEDBN = dict(TINY_RUN_CONFIG, **{"model": "dynunet", "channels": "4,8,16", "strides": "2,2", "num-res-units": -1,
                                 "deep-supervision": 0,
                                 "local-norm": True})


def _model_config(run=FEDBN):
    return manual_plan(RunConfig.from_mapping(run)).model_config()


def _context(datalist, state_dir, run=FEDBN, run_id=3, **node):
    node_config = {"site-id": datalist.parent.name, "datalist": str(datalist), "require-dp": False,
                   "state-dir": str(state_dir), **node}
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=dict(run))


def _message(kind, arrays, server_round=1):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _global(run=FEDBN):
    torch.manual_seed(0)
    return model_to_arrays(build_model(_model_config(run)))


def test_norm_weights_are_found_and_unet_without_affine_norm_is_refused_by_key():
    names = local_weight_names(_model_config(), local_norm=True)
    assert names and all(".norm" in name for name in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"weight", "bias"}  # affine instance norm, no running stats
    assert local_weight_names(_model_config(), local_norm=False) == frozenset()
    unet = _model_config(dict(TINY_RUN_CONFIG, **{"local-norm": True}))
    assert norm_weight_names(unet) == frozenset()
    with pytest.raises(ConfigError, match="'local-norm'.*'unet'"):
        local_weight_names(unet, local_norm=True)


def test_egress_guard_blocks_a_norm_weight_when_norms_are_local():
    model = build_model(_model_config())
    content = RecordDict({"arrays": model_to_arrays(model)})
    with pytest.raises(EgressBlocked, match="norm"):
        check_reply(content, message_type="train", expected=expected_parameter_specs(
            _model_config(), staying=local_weight_names(_model_config(), local_norm=True)))
    check_reply(content, message_type="train", expected=expected_parameter_specs(_model_config()))  # FedAvg: all


def test_norm_weights_stay_at_the_site_across_rounds(two_sites, tmp_path, flower_identity):
    state = tmp_path / "state"
    local = local_weight_names(_model_config(), local_norm=True)
    sent = _global()
    reply = handle_train(_message(MessageType.TRAIN, sent), _context(two_sites[0], state))
    assert "refused" not in reply.content["metrics"]
    replied = list(reply.content["arrays"])
    assert replied == [name for name in sent if name not in local]
    logged = [a["name"] for _, entry in read_entries(state / "egress-audit.jsonl") for a in entry["arrays"]]
    assert logged == replied and not set(logged) & local

    kept = torch.load(local_weights_path(state, run_id=3), weights_only=True)["state_dict"]
    assert set(kept) == local
    assert any(not np.array_equal(kept[n].numpy(), sent[n].numpy()) for n in local)  # trained at the site

    # round 2: the server's model still holds the starting norm weights; the site trains from its own
    second = handle_train(_message(MessageType.TRAIN, sent, server_round=2), _context(two_sites[0], state))
    assert "refused" not in second.content["metrics"] and not set(second.content["arrays"]) & local
    after = torch.load(local_weights_path(state, run_id=3), weights_only=True)["state_dict"]
    assert any(not torch.equal(after[n], kept[n]) for n in local)

    # evaluation uses the site's own norm weights: same global model, other result than with the sent ones
    own = handle_evaluate(_message(MessageType.EVALUATE, sent), _context(two_sites[0], state))
    fresh = handle_evaluate(_message(MessageType.EVALUATE, sent), _context(two_sites[0], tmp_path / "new-site"))
    assert own.content["metrics"]["loss"] != fresh.content["metrics"]["loss"]
    # another run starts from the global model's norm weights, not this run's
    assert not local_weights_path(state, run_id=4).exists()


def test_local_norm_with_dp_charges_the_ledger_as_usual(two_sites, tmp_path, flower_identity):
    run = dict(FEDBN, **{"dp": True, "dp-noise-multiplier": 1.5, "dp-noise-from-budget": False})
    reply = handle_train(_message(MessageType.TRAIN, _global(run)), _context(two_sites[0], tmp_path, run=run))
    metrics = reply.content["metrics"]
    assert metrics["dp"] == 1 and metrics["epsilon"] > 0 and "refused" not in metrics
    assert not set(reply.content["arrays"]) & local_weight_names(_model_config(run), local_norm=True)
    assert local_weights_path(tmp_path, run_id=3).exists()


def test_global_aggregation_leaves_norm_weights_out(two_sites, tmp_path, flower_identity):
    local = local_weight_names(_model_config(), local_norm=True)
    sent = _global()
    replies = [handle_train(_message(MessageType.TRAIN, sent), _context(d, tmp_path / d.parent.name))
               for d in two_sites]
    strategy = FedSegStrategy(recorder=tiny_recorder(tmp_path / "run"))
    strategy.staying_weights = local
    strategy.expect_updates_of(sent)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays) == list(sent)
    for name in local:  # the global model keeps the starting norm weights
        assert np.array_equal(arrays[name].numpy(), sent[name].numpy())
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    for name in (n for n in sent if n not in local):
        mean = sum(w * r.content["arrays"][name].numpy() for w, r in zip(weights, replies)) / sum(weights)
        assert np.allclose(arrays[name].numpy(), mean, atol=1e-6)


def test_an_update_carrying_a_norm_weight_is_rejected(tmp_path, flower_identity):
    sent = ArrayRecord({"conv.weight": Array(np.zeros(3, np.float32)), "norm.weight": Array(np.ones(3, np.float32))})
    strategy = FedSegStrategy(recorder=tiny_recorder(tmp_path))
    strategy.staying_weights = frozenset({"norm.weight"})
    strategy.expect_updates_of(sent)
    update = RecordDict({"arrays": sent, "metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0}), "site": ConfigRecord({"site-id": "a"})})
    reply = Message(content=update, reply_to=Message(content=RecordDict(), dst_node_id=1,
                                                      message_type=MessageType.TRAIN))
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None
    assert "norm.weight" in strategy.recorder.rounds[1]["a"]["train-reason"]


def test_secure_aggregation_sums_only_the_travelling_weights(two_sites, tmp_path, flower_identity):
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from server.polling_grid import PollingGrid
    from server.run_folder import RunRecorder
    from server.secagg_round import secure_train_round
    from server.secagg_sum import SecAggSettings
    from server.strategies import build_strategy
    from tests.test_secagg import NODES, _SecureSitesGrid

    run = dict(FEDBN, **{"secure-aggregation": True, "secagg-threshold": 2})

    class TrainingSites(_SecureSitesGrid):
        """Each node runs the real ClientApp handler (training included) on a synthetic hospital."""

        def __init__(self) -> None:
            super().__init__(run, tmp_path)
            self.contexts = {node: _context(two_sites[node % 2], tmp_path / site, run=run, **{"site-id": site})
                             for node, (site, _) in NODES.items()}

        def _answer(self, node, msg, step):
            return handle_train(msg, self.contexts[node])

    config = RunConfig.from_mapping(run)
    strategy = build_strategy(config, RunRecorder(tmp_path / "run", config=config, plan=manual_plan(config)))
    local = strategy.staying_weights = local_weight_names(_model_config(run), local_norm=True)
    start = _global(run)
    new = secure_train_round(strategy, PollingGrid(TrainingSites(), poll_interval_s=0.005), server_round=1,
                             arrays=start, timeout=60, settings=SecAggSettings.from_config(config))
    assert {row["train-status"] for row in strategy.recorder.rounds[1].values()} == {"ok"}
    assert list(new) == list(start)
    assert all(np.array_equal(new[n].numpy(), start[n].numpy()) for n in local)
    assert any(not np.array_equal(new[n].numpy(), start[n].numpy()) for n in start if n not in local)
    for site, _ in NODES.values():
        entries = [e for _, e in read_entries(tmp_path / site / "egress-audit.jsonl")]
        masked = [e["secagg"][Key.MASKED_PARAMETERS]["items"] for e in entries if e.get("secagg-stage") == Stage.COLLECT_MASKED_VECTORS]
        assert masked == [len(start) - len(local) + 1]
        assert local_weights_path(tmp_path / site, run_id=3).exists()


def test_a_resumed_federation_goes_on_from_each_sites_own_norm_weights(two_sites, tmp_path, flower_identity):
    from flwr.app import Context

    from server.federation import run_federation
    from tests.local_federation import HandlerGrid, server_context

    run = dict(FEDBN, **{"num-rounds": 1, "run-dir": str(tmp_path / "run")})
    run_federation(HandlerGrid(two_sites, tmp_path / "sites", run), server_context(run))
    kept = local_weights_path(tmp_path / "sites" / "site-0", run_id=5)  # the first run's id
    first = torch.load(kept, weights_only=True)["state_dict"]

    resumed = dict(run, **{"num-rounds": 2, "resume-from": str(tmp_path / "run"), "run-dir": str(tmp_path / "run2")})
    grid = HandlerGrid(two_sites, tmp_path / "sites", resumed)
    for node, context in grid.contexts.items():  # a resumed run has a new run id
        grid.contexts[node] = Context(run_id=6, node_id=node, node_config=context.node_config, state=RecordDict(),
                                      run_config=context.run_config)
    server = server_context(resumed)
    run_federation(grid, Context(run_id=6, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=server.run_config))
    assert [p.name for p in kept.parent.iterdir()] == ["run-5.pt"]
    second = torch.load(kept, weights_only=True)["state_dict"]
    assert any(not torch.equal(first[n], second[n]) for n in first)  # round 2 trained on from them


def test_predict_lays_the_sites_own_norm_weights_over_the_global_model(tmp_path):
    from client.inference.model_files import use_local_weights
    from client.inference.site_weights import keep_local_weights
    from shared.errors import WeightsError

    plan = manual_plan(RunConfig.from_mapping(FEDBN))
    local = local_weight_names(plan.model_config(), local_norm=True)
    mine = build_model(plan.model_config())
    with torch.no_grad():
        for name, parameter in mine.named_parameters():
            if name in local:
                parameter.mul_(-1.0).add_(0.5)
    keep_local_weights(mine, tmp_path / "run-1.pt", names=local, model_config=plan.model_config())
    model = build_model(plan.model_config())
    use_local_weights(model, tmp_path / "run-1.pt", plan=plan)
    assert all(torch.equal(model.state_dict()[n], mine.state_dict()[n]) for n in local)
    with pytest.raises(ConfigError, match="'--local-weights'"):
        use_local_weights(model, tmp_path / "none.pt", plan=plan)
    other = manual_plan(RunConfig.from_mapping(dict(FEDBN, channels="4,16,32")))
    with pytest.raises(WeightsError, match="belong to another model"):
        use_local_weights(build_model(other.model_config()), tmp_path / "run-1.pt", plan=other)


@pytest.mark.parametrize("name", ["fedadam", "fedmedian"])
def test_server_optimisers_and_robust_strategies_leave_norm_weights_out(tmp_path, flower_identity, name):
    from server.run_folder import RunRecorder
    from server.strategies import build_strategy
    from tests.fake_grid import AnsweringGrid

    class TwoNodes(AnsweringGrid):
        def get_node_ids(self):
            return [1, 2]

    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy=name))
    strategy = build_strategy(config, RunRecorder(tmp_path, config=config, plan=manual_plan(config)))
    strategy.staying_weights = frozenset({"norm.weight"})
    sent = ArrayRecord({"conv.weight": Array(np.zeros(3, np.float32)), "norm.weight": Array(np.ones(3, np.float32))})
    strategy.configure_train(1, sent, ConfigRecord(), TwoNodes())
    replies = []
    for node, value in ((1, 1.0), (2, 3.0)):
        content = RecordDict({"arrays": ArrayRecord({"conv.weight": Array(np.full(3, value, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0}),
                              "site": ConfigRecord({"site-id": f"s{node}"})})
        replies.append(Message(content=content, reply_to=Message(content=RecordDict(), dst_node_id=node,
                                                                  message_type=MessageType.TRAIN)))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays) == ["conv.weight", "norm.weight"]
    assert np.array_equal(arrays["norm.weight"].numpy(), np.ones(3, np.float32))
    assert arrays["conv.weight"].dtype == "float32" and np.all(arrays["conv.weight"].numpy() > 0)
