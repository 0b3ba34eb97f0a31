"""Run config ``train-layers``: frozen weights stay bit-identical, get no DP noise and never travel."""

from __future__ import annotations

import json
import re

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.runtime.egress.audit_log import read_entries
from client.runtime.handlers import _received_model, handle_train
from client.runtime.private_round import train_private
from client.runtime.site_config import resolve_site
from server.federation import run_federation
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.local_weights import frozen_weight_names, staying_weight_names, weight_names
from shared.model import build_model
from shared.model_file import read_model_file, save_model_file
from shared.plan import manual_plan
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG
from tests.local_federation import HandlerGrid, server_context

DYNUNET = dict(TINY_RUN_CONFIG, **{"model": "dynunet", "channels": "4,8,16", "strides": "2,2", "num-res-units": -1,
                                   "deep-supervision": 0})
DECODER = dict(DYNUNET, **{"train-layers": "decoder"})
DP = {"dp": True, "dp-noise-multiplier": 1.0, "dp-noise-from-budget": False}


def _model_config(run):
    return manual_plan(RunConfig.from_mapping(run)).model_config()


def _frozen(run):
    return frozen_weight_names(_model_config(run), train_layers=RunConfig.from_mapping(run).train_layers)


def test_groups_and_patterns_name_what_trains():
    names = weight_names(_model_config(DYNUNET))
    assert _frozen(DYNUNET) == frozenset()
    frozen = _frozen(DECODER)
    assert frozen == {n for n in names if n.startswith(("input_block.", "downsamples.", "bottleneck."))}
    with_norm = _frozen(dict(DYNUNET, **{"train-layers": "decoder+norm"}))
    assert with_norm == {n for n in frozen if ".norm" not in n} and with_norm < frozen
    assert _frozen(dict(DYNUNET, **{"train-layers": "upsamples.*,output_block.*"})) == frozen
    unet = dict(TINY_RUN_CONFIG, **{"channels": "4,8,16", "strides": "2,2", "train-layers": "decoder"})
    trained = set(weight_names(_model_config(unet))) - _frozen(unet)
    assert trained and all(re.match(r"model(\.1\.submodule)*\.2\.", n) for n in trained)


@pytest.mark.parametrize(("value", "message"), [
    ("nothing.*", "'train-layers': 'nothing.\\*' matches no weight"),
    ("norm", "'train-layers', 'local-norm': no weight would be trained and shared"),
])
def test_what_cannot_train_is_refused_by_key(value, message):
    run = dict(DYNUNET, **{"train-layers": value, "local-norm": True})
    with pytest.raises(ConfigError, match=message):
        staying_weight_names(_model_config(run), local_norm=True, train_layers=value)


def test_an_empty_value_or_an_undefined_decoder_is_refused_by_key():
    with pytest.raises(ConfigError, match="'train-layers'"):
        RunConfig.from_mapping({"train-layers": " + "})
    attention = dict(TINY_RUN_CONFIG, **{"model": "attentionunet", "num-res-units": -1, "train-layers": "decoder"})
    with pytest.raises(ConfigError, match="'train-layers': model 'attentionunet' has no decoder"):
        _frozen(attention)


def _context(datalist, state_dir, run):
    node_config = {"site-id": "site-a", "datalist": str(datalist), "state-dir": str(state_dir), "require-dp": False}
    return Context(run_id=9, node_id=7, node_config=node_config, state=RecordDict(), run_config=dict(run))


def _message(run):
    torch.manual_seed(4)
    content = RecordDict({"arrays": model_to_arrays(build_model(_model_config(run))),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_frozen_weights_are_bit_identical_after_dp_training(two_sites, tmp_path, flower_identity):
    run = dict(DECODER, **DP)
    config = RunConfig.from_mapping(run)
    site = resolve_site(_context(two_sites[0], tmp_path, run).node_config, "")
    msg = _message(run)
    model, _, _ = _received_model(msg, _context(two_sites[0], tmp_path, run), config, site, manual_plan(config))
    from client.data.site_data import load_training_cases

    cases, augment = load_training_cases(site.datalist, manual_plan(config), cache_dir=site.cache_dir)
    train_private(model, cases, augment, config=config, plan=manual_plan(config), site=site,
                  device=torch.device("cpu"), run_id=9, server_round=1)
    sent, after = msg.content["arrays"].to_torch_state_dict(), model.state_dict()
    frozen = _frozen(run)
    assert all(torch.equal(after[n], sent[n]) for n in frozen)  # no step, no noise
    assert all(not torch.equal(after[n], sent[n]) for n in set(after) - frozen)  # noise reaches every trained one


def test_a_reply_and_its_audit_entry_hold_only_the_trained_weights(two_sites, tmp_path, flower_identity):
    run = dict(DECODER, **DP)
    reply = handle_train(_message(run), _context(two_sites[0], tmp_path, run))
    assert reply.content["metrics"]["dp"] == 1 and "refused" not in reply.content["metrics"]
    trained = [n for n in weight_names(_model_config(run)) if n not in _frozen(run)]
    assert list(reply.content["arrays"]) == trained
    [entry] = [e for _, e in read_entries(tmp_path / "egress-audit.jsonl")]
    assert [a["name"] for a in entry["arrays"]] == trained


def test_a_federation_fine_tunes_the_decoder_of_a_starting_model(two_sites, tmp_path, flower_identity):
    torch.manual_seed(6)
    start = build_model(_model_config(DECODER)).state_dict()
    plan = manual_plan(RunConfig.from_mapping(DECODER))
    save_model_file(tmp_path / "start.pt", state_dict=start, model_config=plan.model_config(),
                    extra={"plan": plan.to_dict()})
    run = dict(DECODER, **{"initial-model": str(tmp_path / "start.pt"), "run-dir": str(tmp_path / "run")})
    run_federation(HandlerGrid(two_sites, tmp_path / "sites", run), server_context(run))
    final = read_model_file(tmp_path / "run" / "global_model.pt")["state_dict"]
    frozen = _frozen(DECODER)
    assert all(torch.equal(final[n], start[n]) for n in frozen)
    assert any(not torch.equal(final[n], start[n]) for n in set(start) - frozen)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {r["train-status"] for r in rows if r["site"] != "global"} == {"ok"}


def test_the_dp_outlook_counts_only_the_trained_weights():
    from server.dp_sizing import trained_weights

    plan = manual_plan(RunConfig.from_mapping(DYNUNET))
    model = build_model(plan.model_config())
    frozen = _frozen(DECODER)
    assert trained_weights(plan) == sum(p.numel() for p in model.parameters())
    assert trained_weights(plan, train_layers="decoder") == sum(
        p.numel() for n, p in model.named_parameters() if n not in frozen) < trained_weights(plan)
