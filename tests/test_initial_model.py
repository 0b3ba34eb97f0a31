"""Run config ``initial-model``: each source read, checked against the run's network, recorded; mismatches refused."""

from __future__ import annotations

import json

import pytest
import torch

from server.federation import run_federation
from shared.errors import ConfigError, WeightsError
from shared.model import build_model
from shared.model_file import read_model_file, save_model_file
from shared.model_sources import file_sha256, fit_to_network, open_model_source
from tests.conftest import TINY_RUN_CONFIG, tiny_plan
from tests.local_federation import HandlerGrid, server_context

OTHER = {"channels": "4,16"}  # same levels, other widths


def _trained_like(overrides=None, seed=1):
    torch.manual_seed(seed)
    return build_model(tiny_plan(overrides).model_config())


def _fedseg_file(path, overrides=None):
    model = _trained_like(overrides)
    plan = tiny_plan(overrides)
    save_model_file(path, state_dict=model.state_dict(), model_config=plan.model_config(),
                    extra={"plan": plan.to_dict()})
    return model


def _bundle(folder, *, channels=(4, 8), network=None, state=None):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    network = network or {"_target_": "UNet", "spatial_dims": "@spatial_dims", "in_channels": 1, "out_channels": 2,
               "channels": list(channels), "strides": [2], "num_res_units": 0, "norm": "INSTANCE", "act": "RELU"}
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1"}))
    (folder / "configs" / "inference.json").write_text(json.dumps({"spatial_dims": 2, "network_def": network}))
    model = _trained_like()
    torch.save(state if state is not None else model.state_dict(), folder / "models" / "model.pt")
    return model


def _equal(fitted, model):
    return list(fitted) == list(model.state_dict()) and all(
        torch.equal(fitted[k], v) for k, v in model.state_dict().items())


def test_a_fedseg_model_file_is_read_with_its_plan(tmp_path):
    model = _fedseg_file(tmp_path / "global_model.pt")
    source = open_model_source(tmp_path / "global_model.pt")
    assert source.kind == "fedseg-model" and source.plan is not None
    assert source.sha256 == file_sha256(tmp_path / "global_model.pt")
    assert _equal(fit_to_network(source, tiny_plan().model_config()), model)


def test_a_fedseg_model_of_another_architecture_is_refused_naming_the_field(tmp_path):
    _fedseg_file(tmp_path / "other.pt", OTHER)
    with pytest.raises(WeightsError, match=r"initial-model .*other\.pt.*channels \(4, 16\) \(run: \(4, 8\)\)"):
        fit_to_network(open_model_source(tmp_path / "other.pt"), tiny_plan().model_config())


def test_a_monai_bundle_is_built_by_monai_and_its_weights_fitted(tmp_path):
    model = _bundle(tmp_path / "bundle")
    source = open_model_source(tmp_path / "bundle")
    assert (source.kind, source.network_class) == ("monai-bundle", "UNet")
    assert source.sha256 == file_sha256(tmp_path / "bundle" / "models" / "model.pt")
    assert _equal(fit_to_network(source, tiny_plan().model_config()), model)


def test_a_bundle_of_another_network_or_width_is_refused_by_name(tmp_path):
    _bundle(tmp_path / "wide", channels=(4, 16))
    with pytest.raises(WeightsError, match=r"network_def and this run's network differ.*wrong shape \d+: 'model\.\S+'"):
        fit_to_network(open_model_source(tmp_path / "wide"), tiny_plan().model_config())
    other = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "features": [4, 4, 8, 8, 16, 4]}
    _bundle(tmp_path / "other", network=other, state={"w": torch.zeros(1)})
    with pytest.raises(WeightsError, match="network_def is BasicUNet, this run trains UNet"):
        fit_to_network(open_model_source(tmp_path / "other"), tiny_plan().model_config())
    (tmp_path / "empty" / "models").mkdir(parents=True)
    with pytest.raises(ConfigError, match="'initial-model'.*not a MONAI bundle"):
        open_model_source(tmp_path / "empty")


def test_a_state_dict_with_a_key_map_is_fitted_and_without_it_refused_naming_keys(tmp_path):
    model = _trained_like()
    torch.save({"epoch": torch.tensor(3), "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"missing \d+: model\.0\..*unexpected \d+: module\.model\.0\."):
        fit_to_network(open_model_source(tmp_path / "ckpt.pth"), tiny_plan().model_config())
    (tmp_path / "map.json").write_text(json.dumps({"module.": ""}))
    source = open_model_source(tmp_path / "ckpt.pth", key_map=str(tmp_path / "map.json"))
    assert source.kind == "state-dict" and _equal(fit_to_network(source, tiny_plan().model_config()), model)

    state = dict(model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(1, *state[first].shape[1:])
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=rf"wrong shape 1: '{first}'"):
        fit_to_network(open_model_source(tmp_path / "bad.pt"), tiny_plan().model_config())
    (tmp_path / "bad-map.json").write_text("[1]")
    with pytest.raises(ConfigError, match="'initial-model-key-map'"):
        open_model_source(tmp_path / "bad.pt", key_map=str(tmp_path / "bad-map.json"))
    with pytest.raises(ConfigError, match="'initial-model'.*does not exist"):
        open_model_source(tmp_path / "missing.pt")


def test_a_federation_starts_from_the_model_and_records_where_it_began(two_sites, tmp_path, flower_identity):
    source = tmp_path / "pretrained" / "global_model.pt"
    source.parent.mkdir()
    pretrained = _fedseg_file(source)
    run = dict(TINY_RUN_CONFIG, **{"initial-model": str(source), "plan": "auto", "run-dir": str(tmp_path / "run")})
    grid = HandlerGrid(two_sites, tmp_path / "sites", run)
    first_round = []
    grid.push_messages = _spy(grid.push_messages, first_round)
    run_federation(grid, server_context(run))

    sent = first_round[0].content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], v) for k, v in pretrained.state_dict().items())  # round 1 got the model
    assert all(kind != "query.fingerprint" for _, kind in grid.received)  # the model's own plan was used
    expected = {"path": str(source.resolve()), "kind": "fedseg-model", "sha256": file_sha256(source)}
    assert json.loads((tmp_path / "run" / "initial_model.json").read_text()) == expected
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["initial_model"] == expected
    final = read_model_file(tmp_path / "run" / "global_model.pt")
    assert final["final"] and final["initial_model"] == expected


def test_a_mismatched_model_is_refused_before_round_1(two_sites, tmp_path, flower_identity):
    _fedseg_file(tmp_path / "other.pt", OTHER)
    run = dict(TINY_RUN_CONFIG, **{"initial-model": str(tmp_path / "other.pt"), "run-dir": str(tmp_path / "run")})
    grid = HandlerGrid(two_sites, tmp_path / "sites", run)
    with pytest.raises(WeightsError, match="channels"):
        run_federation(grid, server_context(run))
    assert grid.received == []  # plan = manual: no site was asked anything


def _spy(push, seen):
    def push_and_keep(messages):
        messages = list(messages)
        seen.extend(m for m in messages if m.metadata.message_type == "train")
        return push(messages)

    return push_and_keep
