"""Fault injection (simulations only) and FedProx's proximal term on the client."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.runtime.faults import SimulatedCrash, SiteFault
from client.runtime.handlers import handle_train
from client.runtime.site_config import resolve_site
from server.run_folder import RunRecorder
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import arrays_to_state_dict, model_to_arrays
from simulations.api import write_sites_manifest
from simulations.faults import FaultPlan
from tests.conftest import TINY_RUN_CONFIG

SITES = ["hospital-01", "hospital-02", "hospital-03", "hospital-04"]


def test_fault_plan_draws_distinct_sites_reproducibly():
    plan = FaultPlan(fail_sites="1", slow_sites="1", poison_sites="hospital-04", poison_kind="scale", seed=7)
    faults = plan.assign(SITES)
    assert faults == plan.assign(SITES)
    assert sorted(f["kind"] for f in faults.values()) == ["fail", "poison-scale", "slow"]
    assert faults["hospital-04"]["kind"] == "poison-scale"


@pytest.mark.parametrize(("plan", "message"), [
    (FaultPlan(fail_sites="5"), "--fail-sites"),
    (FaultPlan(slow_sites="hospital-09"), "unknown site"),
    (FaultPlan(fail_sites="hospital-01", poison_sites="hospital-01"), "already have another fault"),
])
def test_bad_fault_options_are_named(plan, message):
    with pytest.raises(ConfigError, match=message):
        plan.assign(SITES)


def _manifest(tmp_path, datalist, fault):
    return write_sites_manifest(tmp_path, [("hospital-01", datalist)], faults={"hospital-01": fault},
                                privacy={"require-dp": False})


def test_faults_apply_to_simulated_nodes_only(tmp_path, two_sites):
    manifest = _manifest(tmp_path, two_sites[0], {"kind": "fail", "seed": 1})
    assert resolve_site({"partition-id": 0}, str(manifest)).fault == SiteFault(kind="fail", seed=1)
    real = resolve_site({"partition-id": 0, "datalist": str(two_sites[0]), "fault": {"kind": "fail"}}, str(manifest))
    assert real.fault is None


def _train(tmp_path, datalist, fault, config=TINY_RUN_CONFIG):
    manifest = _manifest(tmp_path, datalist, fault)
    run_config = dict(config, **{"simulation-sites": str(manifest)})
    torch.manual_seed(0)  # every call starts from the same global model, whatever trained before
    model = build_model(manual_plan(RunConfig.from_mapping(run_config)).model_config())
    msg = Message(content=RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    return handle_train(msg, context), model.state_dict()


def test_a_failing_site_crashes_its_clientapp(tmp_path, two_sites, flower_identity):
    with pytest.raises(SimulatedCrash):
        _train(tmp_path, two_sites[0], {"kind": "fail"})


def test_poisoned_sites_send_nan_or_scaled_updates(tmp_path, two_sites, flower_identity):
    nan_reply, _ = _train(tmp_path, two_sites[0], {"kind": "poison-nan", "seed": 3})
    sent = arrays_to_state_dict(nan_reply.content.array_records["arrays"])
    assert sum(int(torch.isnan(t).sum()) for t in sent.values()) == 1

    honest, start = _train(tmp_path, two_sites[0], {"kind": "slow", "slow-seconds": 0})
    scaled, _ = _train(tmp_path, two_sites[0], {"kind": "poison-scale", "scale": 100.0})
    honest_sd = arrays_to_state_dict(honest.content.array_records["arrays"])
    scaled_sd = arrays_to_state_dict(scaled.content.array_records["arrays"])
    for name, value in start.items():
        assert torch.allclose(scaled_sd[name] - value, 100.0 * (honest_sd[name] - value), atol=1e-4)


def _as_site(reply, site, node_id):
    """``reply``'s update and metrics as site ``site`` (node ``node_id``) would have sent them."""
    content = RecordDict({**reply.content, "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=Message(content=RecordDict(), dst_node_id=node_id,
                                                     message_type=MessageType.TRAIN))


def test_the_server_bounds_a_scaled_poisoning_among_three_sites_and_rejects_it_among_five(
        tmp_path, two_sites, flower_identity):
    honest = [_train(tmp_path, datalist, {"kind": "slow", "slow-seconds": 0})[0] for datalist in two_sites]
    poisoned, start = _train(tmp_path, two_sites[0], {"kind": "poison-scale", "scale": 1000.0})
    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    outcomes = {}
    for sites in (3, 5):
        replies = [_as_site(honest[i % 2], f"hospital-{i:02d}", i) for i in range(sites - 1)]
        replies.append(_as_site(poisoned, "mallory", 99))
        strategy = build_strategy(config, RunRecorder(tmp_path / f"run-{sites}", config=config, plan=manual_plan(config)))
        strategy.expect_updates_of(ArrayRecord(start))
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        outcomes[sites] = strategy.recorder.rounds[1]

    bounded = outcomes[3]["mallory"]
    median = max(outcomes[3][s]["update-norm"] for s in ("hospital-00", "hospital-01"))  # of three norms
    assert bounded["train-status"] == "ok" and bounded["update-bound"] == pytest.approx(10 * median)
    assert outcomes[5]["mallory"]["train-status"] == "rejected"
    assert "clear outlier among 5 sites" in outcomes[5]["mallory"]["train-reason"]
    for rows in outcomes.values():  # the honest sites are aggregated as they are
        honest_rows = [row for site, row in rows.items() if site != "mallory"]
        assert all(row["train-status"] == "ok" and "update-scale" not in row for row in honest_rows)


def test_proximal_term_keeps_local_weights_near_the_global_model(tmp_path, two_sites, flower_identity):
    config = dict(TINY_RUN_CONFIG, **{"local-steps": 6, "learning-rate": 0.05})
    distances = {}
    for mu in (0.0, 50.0):
        model = build_model(manual_plan(RunConfig.from_mapping(config)).model_config())
        content = RecordDict({"arrays": model_to_arrays(model),
                              "config": ConfigRecord({"server-round": 1, "proximal-mu": mu})})
        node_config = {"site-id": "a", "datalist": str(two_sites[0]), "require-dp": False,
                       "state-dir": str(tmp_path / "state")}
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config)
        reply = handle_train(Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN), context)
        sent = arrays_to_state_dict(reply.content.array_records["arrays"])
        distances[mu] = sum(float(((sent[k] - v) ** 2).sum()) for k, v in model.state_dict().items())
    assert distances[50.0] < 0.5 * distances[0.0]
