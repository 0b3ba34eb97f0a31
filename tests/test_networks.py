"""Every network from config and plan: keys named when wrong, weights and model file round trips, predict."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client.commands.predict import predict_scan
from client.runtime.egress.guard import check_reply, expected_parameter_specs
from client.runtime.handlers import handle_train
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import ModelConfig, build_model
from shared.model_file import load_model, read_model_file, save_model_file
from shared.plan import Plan, manual_plan
from shared.weights import arrays_to_state_dict, load_arrays, model_to_arrays
from tests.data_cases import ct_volume, write_nifti_case
from tests.networks import CASES, NEW_NETWORKS, RUNS, SHAPES, tiny_config
from tests.test_client import _context, _message


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_a_manual_plan_builds_the_network_at_its_patch(name, dims):
    plan = manual_plan(RunConfig.from_mapping(dict(RUNS[name], **{"spatial-dims": dims})))
    config = plan.model_config()
    assert config.name == name and Plan.from_json(plan.to_json()) == plan
    divisor = [np.prod([s[a] for s in config.strides]) for a in range(dims)]
    assert all(size % d == 0 and size // d >= 2 for size, d in zip(plan.patch_size, divisor))
    model = build_model(config).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *plan.patch_size)).shape == (1, 2, *plan.patch_size)


def test_each_network_maps_the_plans_levels_to_its_own():
    def plan_of(name: str, **keys: object) -> ModelConfig:
        return manual_plan(RunConfig.from_mapping(dict(RUNS[name], **keys))).model_config()

    # SegResNet: the first features doubling, as many levels as max-filters allows (base 16, max 64: three)
    seg = plan_of("segresnet", channels="auto", strides="auto", **{"base-filters": 16, "max-filters": 64})
    assert seg.channels == (16, 32, 64) and seg.strides == ((2, 2), (2, 2))
    flex = plan_of("flexibleunet", **{"base-filters": 16, "max-filters": 256, "flexible-backbone": "resnet50"})
    assert flex.channels == (16, 32, 64, 128, 256, 2048) and flex.backbone == "resnet50"  # MONAI's default decoder
    assert flex.norm_conversion == "batchnorm-to-groupnorm"
    swin = plan_of("swinunetr", **{"base-filters": 16})
    assert swin.channels == (24, 24, 48, 96, 192, 384)  # feature size: 16 rounded up to a multiple of 12
    derived = manual_plan(RunConfig.from_mapping(dict(RUNS["flexibleunet"], **{"patch-size": "auto"})))
    assert derived.patch_size == (64, 64)  # the manual 64 already fits 2**5, twice


@pytest.mark.parametrize(("name", "changes", "keys"), [
    ("segresnet", {"model": "vnet"}, "'model'"),
    ("segresnet", {"flexible-backbone": "resnet18"}, "'flexible-backbone', 'model'"),
    ("flexibleunet", {"flexible-backbone": "efficientnet-b0"}, "'flexible-backbone'"),
    ("swinunetr", {"channels": "12,24", "strides": "2"}, "'channels', 'strides', 'model'"),
    ("flexibleunet", {"patch-size": 48}, "'patch-size', 'model'"),
    ("swinunetr", {"patch-size": 32}, "'patch-size', 'model'"),
    ("swinunetr", {"dp": True, "dp-grad-sample-mode": "functorch"}, "'dp-grad-sample-mode', 'model'"),
    ("segresnet", {"channels": "4,8,12", "strides": "2,2"}, "'channels'"),
    ("segresnet", {"strides": "4"}, "'strides'"),
    ("segresnet", {"num-res-units": 2}, "'num-res-units', 'model'"),
    ("attentionunet", {"deep-supervision": 1}, "'deep-supervision', 'model'"),
])
def test_a_bad_model_or_a_key_the_network_does_not_take_is_named(name, changes, keys):
    with pytest.raises(ConfigError, match=f"run config keys? {keys}"):
        RunConfig.from_mapping(dict(RUNS[name], **changes))


def test_a_plan_whose_patch_the_network_cannot_divide_is_refused_naming_the_keys():
    plan = manual_plan(RunConfig.from_mapping(RUNS["flexibleunet"]))
    with pytest.raises(ConfigError, match="'patch_size'.*'patch-size'.*flexibleunet"):
        dataclasses.replace(plan, patch_size=(48, 64))
    segresnet = dict(RUNS["segresnet"], channels="auto", strides="auto", **{"base-filters": 4, "max-filters": 32})
    with pytest.raises(ConfigError, match="run config keys 'patch-size', 'model'"):
        # thick slices: nnU-Net's strides skip the second axis at first, SegResNet halves it at every level
        manual_plan(RunConfig.from_mapping(dict(segresnet, **{"patch-size": "32,20", "target-spacing": "1,3"})))


@pytest.mark.parametrize(("name", "changes", "field"), [
    ("segresnet", {"backbone": "resnet10"}, "backbone"),            # FlexibleUNet's only
    ("segresnet", {"channels": (2, 4, 6)}, "channels"),             # SegResNet doubles
    ("flexibleunet", {"norm_conversion": ""}, "norm_conversion"),
    ("flexibleunet", {"channels": (2, 4, 4, 4, 4, 256)}, "channels"),  # resnet10 ends with 512 features
    ("flexibleunet", {"backbone": "resnet9"}, "backbone"),
    ("flexibleunet", {"strides": (2, 2, 2, 2, (1, 2))}, "strides"),  # MONAI halves every axis
    ("flexibleunet", {"act": "prelu"}, "act"),
    ("swinunetr", {"channels": (16, 16, 32, 64, 128, 256)}, "channels"),  # feature size: a multiple of 12
])
def test_bad_model_config_names_its_field(name, changes, field):
    with pytest.raises(ConfigError, match=f"model '{field}'"):
        dataclasses.replace(tiny_config(name, 2), **changes)


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_weights_model_file_and_egress_specs_round_trip(name, dims, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(name, dims)
    source, target = build_model(config), build_model(config)
    load_arrays(target, model_to_arrays(source))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(),
                                                   strict=True))
    specs = expected_parameter_specs(config)  # built on "meta": what the egress guard lets leave a site
    assert list(specs) == list(source.state_dict())
    assert all(specs[key].shape == tuple(t.shape) for key, t in source.state_dict().items())
    path = save_model_file(tmp_path / "m.pt", state_dict=source.state_dict(), model_config=config)
    saved = read_model_file(path)["model_config"]
    assert saved["norm_conversion"] == config.norm_conversion and saved["backbone"] == config.backbone
    rebuilt, _ = load_model(path)
    image = torch.randn(1, 1, *SHAPES[name, dims])
    with torch.no_grad():
        assert torch.equal(source.eval()(image), rebuilt(image))


@pytest.mark.parametrize("name", NEW_NETWORKS)
def test_a_checkpoint_resumes_each_network_from_its_plan(name, tmp_path):
    config = RunConfig.from_mapping(RUNS[name])
    plan = manual_plan(config)
    weights = build_model(plan.model_config()).state_dict()
    saved = Checkpoint(round=1, state_dict=weights, run_config=config.to_mapping(), strategy_state={},
                       metrics_rows=[], known_sites={}, plan=plan.to_json())
    loaded = load_checkpoint(save_checkpoint(tmp_path, saved))
    resumed = build_model(Plan.from_json(loaded.plan).model_config())  # what the resumed server builds
    resumed.load_state_dict(loaded.state_dict, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), weights.values(), strict=True))


@pytest.mark.parametrize("name", NEW_NETWORKS)
def test_predict_writes_a_mask_with_each_network(name, tmp_path):
    config = RunConfig.from_mapping(RUNS[name])
    model_config = manual_plan(config).model_config()
    path = save_model_file(tmp_path / "global_model.pt", state_dict=build_model(model_config).state_dict(),
                           model_config=model_config, extra={"run_config": config.to_mapping()})
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    result = predict_scan(model_path=path, input_path=tmp_path / entry["image"], output_path=tmp_path / "mask.nii.gz",
                          device="cpu")
    written = nib.load(tmp_path / "mask.nii.gz")
    assert written.shape == image.shape == result.shape and set(np.unique(written.get_fdata())) <= {0.0, 1.0}


@pytest.mark.parametrize("name", NEW_NETWORKS)
def test_a_site_trains_each_network_with_dp(name, two_sites, flower_identity):
    run = dict(RUNS[name], **{"dp": True, "dp-noise-multiplier": 0.5, "dp-noise-from-budget": False})
    msg, model = _message(MessageType.TRAIN, run)
    reply = handle_train(msg, _context(two_sites[0], run, **{"max-epsilon": 1e4}))
    metrics = reply.content.metric_records["metrics"]
    assert "refused" not in metrics, reply.content.config_records["site"]
    assert metrics["dp"] == 1 and metrics["train-loss"] > 0
    sent = arrays_to_state_dict(reply.content.array_records["arrays"])
    assert list(sent) == list(model.state_dict())
    check_reply(reply.content, message_type="train",
                expected=expected_parameter_specs(manual_plan(RunConfig.from_mapping(run)).model_config()))
