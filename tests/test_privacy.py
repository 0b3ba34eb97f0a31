"""DP-SGD at a site: the ledger, the budget, clipping, weight names, and settings that name their key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from client.runtime.handlers import handle_train
from client.runtime.site_config import SiteConfig
from client.training.dp_sgd import DPPlan, make_private, plan_round
from client.training.local import make_loss, mean_loss, run_steps
from client.training.privacy_ledger import (
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    cumulative_epsilon,
)
from shared.config import RunConfig
from shared.errors import ConfigError, DataError
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import arrays_to_state_dict, model_to_arrays
from tests.conftest import REPO, TINY_RUN_CONFIG
from tests.per_sample import clipped_mean, dp_step, single_example_grads

DP_RUN = dict(TINY_RUN_CONFIG, **{"dp": True, "dp-noise-multiplier": 1.5, "dp-noise-from-budget": False,
                                  "batch-size": 2})
FROM_BUDGET = {"dp-noise-from-budget": True, "dp-noise-multiplier": 0.0}


def _context(datalist, state_dir, run_config=DP_RUN, **node):
    node_config = {"site-id": "site-a", "datalist": str(datalist), "state-dir": str(state_dir), **node}
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config=dict(run_config))


def _train_message(server_round=1):
    model = build_model(manual_plan(RunConfig.from_mapping(DP_RUN)).model_config())
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN), model


def test_epsilon_accumulates_over_stateless_rounds_like_one_accountant(two_sites, tmp_path, flower_identity):
    epsilons, names = [], []
    # a batch as large as the site: Poisson sampling at rate 1 never draws an all-empty round, which
    # the site refuses (test_an_empty_poisson_batch_still_takes_a_noisy_step); at rate 0.5 with ~4
    # cases that happened in ~1 of 60 rounds and made this test fail now and then
    run = dict(DP_RUN, **{"batch-size": 8, "local-steps": 1})
    for server_round in (1, 2, 3):  # a fresh Context each round, as Flower gives a stateless ClientApp
        msg, model = _train_message(server_round)
        reply = handle_train(msg, _context(two_sites[0], tmp_path / "state", run_config=run))
        metrics = reply.content.metric_records["metrics"]
        assert "refused" not in metrics, reply.content.config_records["site"]
        epsilons.append((metrics["epsilon"], metrics["epsilon-round"]))
        names.append(list(arrays_to_state_dict(reply.content.array_records["arrays"])) == list(model.state_dict()))
    assert all(names), "weight names sent with DP differ from the model's"
    totals = [total for total, _ in epsilons]
    assert totals[0] < totals[1] < totals[2]
    assert totals[0] == pytest.approx(epsilons[0][1])

    entries = PrivacyLedger(tmp_path / "state", delta=1e-5).entries()
    one_accountant = RDPAccountant()  # the same mechanisms, step by step in one process
    for entry in entries:
        for _ in range(entry.steps):
            one_accountant.step(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate)
    assert totals[-1] == pytest.approx(one_accountant.get_epsilon(delta=1e-5), rel=0.01)
    assert [e.server_round for e in entries] == [1, 2, 3] and {e.run_id for e in entries} == {11}


def test_ledger_epsilon_is_opacus_rdp_accountants_over_a_mixed_history():
    history = [(1.1, 0.25, 16), (2.5, 1.0, 4), (0.9, 0.5, 8), (1.1, 0.25, 16)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert cumulative_epsilon(history, delta=1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert cumulative_epsilon(history[:1], delta=1e-5) < cumulative_epsilon(history, delta=1e-5)


def test_ledger_survives_a_fresh_process(tmp_path):
    state = tmp_path / "state"
    charge_in_child = (
        "from client.training.privacy_ledger import PrivacyLedger\n"
        f"c = PrivacyLedger({str(state)!r}, delta=1e-5).charge(run_id=1, server_round=1, noise_multiplier=1.0,"
        " sample_rate=0.25, steps=8, max_epsilon=50)\n"
        "print(c.epsilon)\n"
    )
    out = subprocess.run([sys.executable, "-c", charge_in_child], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    ledger = PrivacyLedger(state, delta=1e-5)
    assert ledger.epsilon() == pytest.approx(float(out.strip().splitlines()[-1]))
    second = ledger.charge(run_id=2, server_round=1, noise_multiplier=1.0, sample_rate=0.25, steps=8, max_epsilon=50)
    assert second.epsilon > float(out.strip().splitlines()[-1])
    assert not list(state.glob("*.tmp")), "a temporary file was left behind"


def _charge_many(state: str) -> None:
    ledger = PrivacyLedger(state, delta=1e-5)
    for index in range(5):
        ledger.charge(run_id=index, server_round=1, noise_multiplier=2.0, sample_rate=0.1, steps=2, max_epsilon=1e6)


def test_concurrent_writers_lose_no_entry(tmp_path):
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_charge_many, [str(tmp_path)] * 2))
    assert len(PrivacyLedger(tmp_path, delta=1e-5).entries()) == 10


def test_a_site_at_its_budget_refuses_and_records_nothing(two_sites, tmp_path, flower_identity):
    state = tmp_path / "state"
    ledger = PrivacyLedger(state, delta=1e-5)
    first = ledger.charge(run_id=1, server_round=1, noise_multiplier=1.5, sample_rate=0.5, steps=2, max_epsilon=100)
    reply = handle_train(_train_message()[0], _context(two_sites[0], state, **{"max-epsilon": first.epsilon * 1.01}))
    assert reply.content.metric_records["metrics"]["refused"] == 1
    assert "max-epsilon" in reply.content.config_records["site"]["reason"]
    assert len(ledger.entries()) == 1
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(run_id=1, server_round=2, noise_multiplier=1.5, sample_rate=0.5, steps=2,
                      max_epsilon=first.epsilon * 1.01)


def test_a_site_requiring_dp_refuses_a_run_without_it(two_sites, tmp_path, flower_identity):
    run = dict(DP_RUN, dp=False)
    reply = handle_train(_train_message()[0], _context(two_sites[0], tmp_path, run_config=run))
    assert reply.content.metric_records["metrics"]["refused"] == 1
    assert "require-dp" in reply.content.config_records["site"]["reason"]


def test_an_unreadable_ledger_stops_training(two_sites, tmp_path, flower_identity):
    (tmp_path / "privacy-ledger.json").write_text('{"format": "fedseg-privacy-ledger/1", "entr')
    with pytest.raises(LedgerError, match="privacy-ledger.json"):
        PrivacyLedger(tmp_path, delta=1e-5).epsilon()
    reply = handle_train(_train_message()[0], _context(two_sites[0], tmp_path))
    assert reply.content.metric_records["metrics"]["refused"] == 1


def test_target_epsilon_sets_the_noise_for_one_round():
    config = RunConfig.from_mapping(dict(DP_RUN, **{"dp-target-epsilon": 2.0, "dp-noise-multiplier": 0.0,
                                                    "local-steps": 15}))
    plan = plan_round(config=config, plan=manual_plan(config), num_cases=10, delta=1e-5)
    one_round = RDPAccountant()
    one_round.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    assert plan.sample_rate == pytest.approx(1 / 5) and plan.steps == 15
    assert one_round.get_epsilon(delta=1e-5) == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize("num_cases", [10, 2])
def test_noise_from_budget_lets_every_site_train_all_rounds_within_its_budget(num_cases, tmp_path):
    config = RunConfig.from_mapping(dict(DP_RUN, **{**FROM_BUDGET, "num-rounds": 4}))
    plan = plan_round(config=config, plan=manual_plan(config), num_cases=num_cases, delta=1e-5, max_epsilon=3.0)
    ledger = PrivacyLedger(tmp_path, delta=1e-5)
    for server_round in range(1, 5):
        charge = ledger.charge(run_id=1, server_round=server_round, noise_multiplier=plan.noise_multiplier,
                               sample_rate=plan.sample_rate, steps=plan.steps, max_epsilon=3.0)
    assert charge.epsilon == pytest.approx(3.0, rel=0.02)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(run_id=1, server_round=5, noise_multiplier=plan.noise_multiplier,
                      sample_rate=plan.sample_rate, steps=plan.steps, max_epsilon=3.0)


def _charge_run(ledger, config, *, num_cases, max_epsilon, aware):
    """Plan and charge every round of a run as a site does; ``aware`` passes the ledger to the plan."""
    noises = []
    for server_round in range(1, config.num_rounds + 1):
        spent = [e.mechanism() for e in ledger.entries()] if aware else ()
        plan = plan_round(config=config, plan=manual_plan(config), num_cases=num_cases, delta=1e-5, max_epsilon=max_epsilon,
                          spent=spent, server_round=server_round)
        charge = ledger.charge(run_id=2, server_round=server_round, noise_multiplier=plan.noise_multiplier,
                               sample_rate=plan.sample_rate, steps=plan.steps, max_epsilon=max_epsilon)
        noises.append(plan.noise_multiplier)
    return charge, noises


def test_noise_from_budget_spends_what_earlier_runs_left_over_the_whole_run(tmp_path):
    config = RunConfig.from_mapping(dict(DP_RUN, **{**FROM_BUDGET, "num-rounds": 4}))
    for folder in ("aware", "unaware"):  # the same earlier run in two copies of the site's ledger
        PrivacyLedger(tmp_path / folder, delta=1e-5).charge(
            run_id=1, server_round=1, noise_multiplier=2.5, sample_rate=0.2, steps=15, max_epsilon=3.0)
    earlier = PrivacyLedger(tmp_path / "aware", delta=1e-5).epsilon()
    assert 0.5 < earlier < 2.5

    charge, noises = _charge_run(PrivacyLedger(tmp_path / "aware", delta=1e-5), config, num_cases=10,
                                 max_epsilon=3.0, aware=True)
    fresh = plan_round(config=config, plan=manual_plan(config), num_cases=10, delta=1e-5, max_epsilon=3.0)
    assert charge.epsilon <= 3.0 and charge.epsilon == pytest.approx(3.0, rel=0.01)
    assert min(noises) > fresh.noise_multiplier  # what is left is spread over the run: more noise per round
    assert max(noises) / min(noises) < 1.01  # evenly
    with pytest.raises(PrivacyBudgetExceeded):  # planning as if the ledger were empty runs out mid-run
        _charge_run(PrivacyLedger(tmp_path / "unaware", delta=1e-5), config, num_cases=10, max_epsilon=3.0,
                    aware=False)


def test_noise_from_budget_lets_a_site_first_sampled_in_the_last_round_spend_its_budget(tmp_path):
    config = RunConfig.from_mapping(dict(DP_RUN, **{**FROM_BUDGET, "num-rounds": 5}))
    last = plan_round(config=config, plan=manual_plan(config), num_cases=10, delta=1e-5, max_epsilon=3.0, server_round=5)
    first = plan_round(config=config, plan=manual_plan(config), num_cases=10, delta=1e-5, max_epsilon=3.0, server_round=1)
    charge = PrivacyLedger(tmp_path, delta=1e-5).charge(
        run_id=1, server_round=5, noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate,
        steps=last.steps, max_epsilon=3.0)
    assert last.noise_multiplier < first.noise_multiplier
    assert charge.epsilon == pytest.approx(3.0, rel=0.02)


def test_noise_from_budget_refuses_a_site_whose_ledger_holds_its_whole_budget(tmp_path):
    config = RunConfig.from_mapping(dict(DP_RUN, **{**FROM_BUDGET, "num-rounds": 3}))
    ledger = PrivacyLedger(tmp_path, delta=1e-5)
    ledger.charge(run_id=1, server_round=1, noise_multiplier=0.6, sample_rate=0.2, steps=15, max_epsilon=50.0)
    with pytest.raises(PrivacyBudgetExceeded, match="max-epsilon 3"):
        plan_round(config=config, plan=manual_plan(config), num_cases=10, delta=1e-5, max_epsilon=3.0,
                   spent=[e.mechanism() for e in ledger.entries()], server_round=2)


def test_noise_from_budget_is_larger_where_every_step_sees_every_case():
    config = RunConfig.from_mapping(dict(DP_RUN, **{**FROM_BUDGET, "local-steps": 4,
                                                    "num-rounds": 5}))
    large, small = (plan_round(config=config, plan=manual_plan(config), num_cases=n, delta=1e-5, max_epsilon=8.0) for n in (8, 2))
    assert small.sample_rate == 1.0 and large.sample_rate == pytest.approx(0.25)
    assert small.noise_multiplier > large.noise_multiplier
    with pytest.raises(ConfigError, match="'dp-noise-from-budget'.*'max-epsilon'"):
        plan_round(config=config, plan=manual_plan(config), num_cases=2, delta=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_are_clipped_like_single_example_backward(mode):
    torch.manual_seed(0)
    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    model = build_model(manual_plan(config).model_config())
    images = torch.randn(4, 1, 32, 32) * torch.tensor([1.0, 5.0, 0.2, 3.0]).view(4, 1, 1, 1)
    labels = (torch.rand(4, 1, 32, 32) > 0.7).float()
    loss_fn, clip = make_loss(), 0.05
    expected, norms = clipped_mean(single_example_grads(model, loss_fn, images, labels), clip=clip)

    # the training loop DP training runs (backward to the first trained layers only), one step at lr 0 without noise
    hooks = dp_step(model, loss_fn, images, labels, mode=mode, clip=clip)
    per_sample = torch.sqrt(sum((p.grad_sample.flatten(1) ** 2).sum(1) for p in model.parameters()))
    assert per_sample.tolist() == pytest.approx(norms, rel=1e-3)
    assert min(norms) > clip, "the test needs every example above the clipping norm"
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)
    hooks.cleanup()


def test_a_per_sample_backward_pass_skips_the_batch_weight_gradients():
    from client.training.local import train_step

    torch.manual_seed(0)
    model = build_model(manual_plan(RunConfig.from_mapping(TINY_RUN_CONFIG)).model_config())
    images, labels = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    outputs = []
    model.register_full_backward_hook(lambda module, grad_in, grad_out: outputs.append(grad_out[0]))
    train_step(model, images, labels, make_loss(), per_sample_grads=True)
    assert all(p.grad is None for p in model.parameters()), "autograd computed weight gradients DP discards"
    assert len(outputs) == 1 and outputs[0].shape == (2, 2, 32, 32), "backward hooks must still fire"
    train_step(model, images, labels, make_loss())
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("key", "value"), [
    ("dp-noise-multiplier", -1.0), ("dp-max-grad-norm", 0.0),
    ("dp-target-epsilon", -1.0), ("dp-grad-sample-mode", "ghost"), ("dp", "yes"), ("dp-noise-from-budget", 1),
])
def test_bad_dp_run_config_names_its_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize("other", [{"dp-target-epsilon": 1.0}, {"dp-noise-multiplier": 1.0},
                                   {"dp-noise-from-budget": False}])
def test_the_noise_has_exactly_one_source_and_the_error_names_the_keys(other):
    with pytest.raises(ConfigError, match="'dp-noise-from-budget', 'dp-target-epsilon', 'dp-noise-multiplier'"):
        RunConfig.from_mapping({**FROM_BUDGET, **other})
    assert RunConfig.from_mapping({**FROM_BUDGET, **other, "dp": False}).dp is False  # no DP: no noise needed


def test_dp_with_fedprox_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="'dp', 'strategy'"):
        RunConfig.from_mapping({"strategy": "fedprox"})
    assert RunConfig.from_mapping({"strategy": "fedprox", "dp": False}).strategy == "fedprox"


@pytest.mark.parametrize(("key", "value"), [
    ("dp-delta", 1.0), ("dp-delta", 0.0), ("max-epsilon", 0.0), ("max-epsilon", "lots"),
    ("max-epsilon", float("inf")), ("require-dp", "maybe"),
])
def test_bad_dp_node_config_names_its_key(key, value, tmp_path):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SiteConfig.from_node_config({"datalist": str(tmp_path / "d.json"), key: value})


def test_the_ledger_file_is_plain_json_an_auditor_can_read(tmp_path):
    PrivacyLedger(tmp_path, delta=1e-5).charge(run_id=3, server_round=2, noise_multiplier=1.1, sample_rate=0.2,
                                               steps=10, max_epsilon=100)
    data = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert data["accountant"] == "rdp" and data["delta"] == 1e-5
    entry = data["entries"][0]
    assert (entry["run_id"], entry["server_round"], entry["steps"]) == (3, 2, 10)
    assert entry["noise_multiplier"] == 1.1 and entry["sample_rate"] == 0.2 and entry["epsilon_after"] > 0


CONV_LAYERS = [  # (layer type, constructor arguments): strided, grouped, dilated, output padding, no bias
    (torch.nn.Conv2d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1,
                       "groups": 2}),
    (torch.nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "padding": 2, "dilation": 2,
                       "bias": False}),
    (torch.nn.Conv3d, {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}),
    (torch.nn.ConvTranspose2d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "stride": 2, "padding": 1,
                                "output_padding": 1}),
    (torch.nn.ConvTranspose2d, {"in_channels": 4, "out_channels": 6, "kernel_size": 2, "stride": 2, "groups": 2,
                                "bias": False}),
    (torch.nn.ConvTranspose3d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "stride": 2, "padding": 1,
                                "output_padding": 1}),
]


@pytest.mark.parametrize(("conv", "arguments"), CONV_LAYERS,
                         ids=[f"{conv.__name__}-{index}" for index, (conv, _) in enumerate(CONV_LAYERS)])
def test_convolution_grad_sampler_matches_single_example_backward(conv, arguments):
    from opacus import GradSampleModule
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    from client.training.dp_grad_samplers import conv_grad_sample

    torch.manual_seed(1)
    assert GradSampleHooks.GRAD_SAMPLERS[conv] is conv_grad_sample
    layer = conv(**arguments)
    dims = layer.weight.dim() - 2
    inputs = torch.randn((4, layer.in_channels) + (6,) * dims)
    expected = {name: [] for name, _ in layer.named_parameters()}
    for index in range(4):  # torch, one example at a time
        layer.zero_grad()
        (layer(inputs[index:index + 1]) ** 2).sum().backward()
        for name, param in layer.named_parameters():
            expected[name].append(param.grad.detach().clone())
    model = GradSampleModule(layer, loss_reduction="sum")
    (model(inputs) ** 2).sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad_sample, torch.stack(expected[name]), rtol=1e-4, atol=1e-5)


def test_optimizer_follows_run_config():
    from client.training.local import make_optimizer

    model = build_model(manual_plan(RunConfig.from_mapping(TINY_RUN_CONFIG)).model_config())
    sgd = make_optimizer(model, config=RunConfig.from_mapping(dict(TINY_RUN_CONFIG, optimizer="sgd")))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer(model, config=RunConfig.from_mapping(dict(TINY_RUN_CONFIG, optimizer="adam"))),
                      torch.optim.Adam)
    assert RunConfig.from_mapping(TINY_RUN_CONFIG).optimizer == "adam"  # the default preset's


def test_an_empty_poisson_batch_still_takes_a_noisy_step():
    torch.manual_seed(0)
    model = build_model(manual_plan(RunConfig.from_mapping(TINY_RUN_CONFIG)).model_config())
    images, labels = torch.randn(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) > 0.7).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=2)
    plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1, grad_sample_mode="hooks")
    hooks, dp_optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, plan=plan)
    before = [p.detach().clone() for p in model.parameters()]
    # Opacus yields [] for an empty first batch; a round of only empty batches has no loss but is not refused
    assert run_steps(model, [[], []], dp_optimizer, steps=2, device=torch.device("cpu")) == []
    moved = [float((p - b).abs().max()) for p, b in zip(model.parameters(), before)]
    assert all(m > 0 for m in moved), "the empty batches' steps added no noise"
    assert math.isnan(mean_loss([]))  # reported as train-loss NaN, which the server leaves out of its means
    with pytest.raises(DataError, match="no step"):  # a loader without a single batch is still an error
        run_steps(model, [], dp_optimizer, steps=1, device=torch.device("cpu"))
    hooks.cleanup()
