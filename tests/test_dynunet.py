"""DynUNet (nnU-Net's network): config, deep supervision, exact per-sample gradients, weights, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import MessageType

from client.runtime.egress.guard import check_reply, expected_parameter_specs
from client.runtime.handlers import handle_train
from client.training.local import make_loss
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import ModelConfig, build_model
from shared.model_file import load_model, save_model_file
from shared.plan import manual_plan
from shared.weights import arrays_to_state_dict, load_arrays, model_to_arrays
from tests.conftest import TINY_RUN_CONFIG
from tests.per_sample import assert_exact_dp_step, assert_on_fast_samplers
from tests.test_client import _context, _message

# 2D: isotropic; 3D: anisotropic first stride and kernel (nnU-Net plans these for thick slices)
DYNUNET_2D = ModelConfig(2, 1, 3, (2, 4, 8), (2, 2), num_res_units=0, act="leakyrelu", name="dynunet",
                         deep_supervision=1)
DYNUNET_3D = ModelConfig(3, 2, 2, (2, 4, 8), ((2, 2, 1), 2), num_res_units=0, act="leakyrelu", name="dynunet",
                         kernels=((3, 3, 1), 3, 3), deep_supervision=1)
DYNUNET_RUN = dict(TINY_RUN_CONFIG, **{"model": "dynunet", "channels": "4,8,16", "strides": "2,2",
                                       "num-res-units": -1})


def _batch(config: ModelConfig, *, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (size,) * config.spatial_dims
    scales = torch.linspace(0.5, 3.0, n).view(n, *[1] * (len(shape) + 1))  # per-example gradient norms differ
    images = torch.randn(n, config.in_channels, *shape) * scales
    return images, torch.randint(0, config.num_classes, (n, 1, *shape)).float()


@pytest.mark.parametrize("config", [DYNUNET_2D, DYNUNET_3D], ids=["2D", "3D"])
def test_train_mode_stacks_the_deep_supervision_outputs_and_eval_mode_gives_one(config):
    model = build_model(config)
    images, _ = _batch(config, n=2, size=8)
    assert model.train()(images).shape == (2, 2, config.num_classes, *images.shape[2:])
    assert model.eval()(images).shape == (2, config.num_classes, *images.shape[2:])
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.affine for m in norms)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    assert not any(isinstance(m, (torch.nn.PReLU, torch.nn.modules.batchnorm._BatchNorm))
                   for m in model.modules())


def test_each_weight_is_stored_once_under_its_block_name():
    model = build_model(DYNUNET_2D)
    state = model.state_dict()
    assert list(state) == [name for name, _ in model.named_parameters()]  # MONAI's skip_layers held them twice
    assert not any(name.startswith("skip_layers") for name in state)
    assert "input_block.conv1.conv.weight" in state and "deep_supervision_heads.0.conv.conv.weight" in state


def test_config_round_trips_per_axis_strides_and_kernels():
    assert ModelConfig.from_dict(DYNUNET_3D.to_dict()) == DYNUNET_3D
    saved = DYNUNET_3D.to_dict()
    assert saved["strides"] == [[2, 2, 1], 2] and saved["kernels"] == [[3, 3, 1], 3, 3]
    unet = ModelConfig(3, 1, 2, (4, 8, 16), ((2, 2, 1), 2))  # MONAI's UNet takes per-axis strides too
    assert build_model(unet)(torch.randn(1, 1, 16, 16, 8)).shape == (1, 2, 16, 16, 8)
    assert ModelConfig.from_dict(unet.to_dict()) == unet and unet.to_dict()["strides"] == [[2, 2, 1], 2]


@pytest.mark.parametrize(("changes", "field"), [
    ({"kernels": (3, 3)}, "kernels"),                                # one per level
    ({"kernels": (3, (3, 3, 1), 3)}, "kernels"),                     # per-axis length != spatial_dims
    ({"kernels": (3, 2, 3)}, "kernels"),                             # even
    ({"strides": ((2, 2, 2), 2)}, "strides"),                        # per-axis length != spatial_dims
    ({"strides": (2, 0)}, "strides"),
    ({"deep_supervision": 2}, "deep_supervision"),                   # at most levels - 2
    ({"deep_supervision": -1}, "deep_supervision"),
    ({"channels": (4, 8), "strides": (2,), "deep_supervision": 0}, "channels"),  # DynUNet needs 3 levels
    ({"act": "prelu"}, "act"),
    ({"num_res_units": 1}, "num_res_units"),
    ({"name": "unet", "num_res_units": 1, "act": "relu", "kernels": (3, 3, 3), "deep_supervision": 0}, "kernels"),
    ({"name": "unet", "num_res_units": 1, "act": "relu"}, "deep_supervision"),
])
def test_bad_model_config_names_its_field(changes, field):
    with pytest.raises(ConfigError, match=f"model '{field}'"):
        dataclasses.replace(DYNUNET_2D, **changes)


def _network(run: dict) -> ModelConfig:
    return manual_plan(RunConfig.from_mapping(run)).model_config()


def test_run_config_model_keys():
    default = _network(DYNUNET_RUN)
    assert (default.name, default.deep_supervision, default.act) == ("dynunet", 0, "leakyrelu")
    assert default.num_res_units == 0  # nnU-Net's plain blocks
    with pytest.raises(ConfigError, match="'num-res-units', 'model'"):  # the U-Net's key: contradictory
        RunConfig.from_mapping(dict(DYNUNET_RUN, **{"num-res-units": 2}))
    five = _network(dict(DYNUNET_RUN, channels="4,8,16,32,64", strides="2,2,2,2", **{"patch-size": 64}))
    assert five.deep_supervision == 2  # nnU-Net's rule: levels - 3 heads
    assert _network(dict(DYNUNET_RUN, **{"deep-supervision": 1})).deep_supervision == 1
    unet = _network(TINY_RUN_CONFIG)
    assert (unet.name, unet.deep_supervision, unet.act) == ("unet", 0, "relu")


@pytest.mark.parametrize(("changes", "key"), [
    ({"model": "vnet"}, "model"),
    ({"model": 1}, "model"),
    ({"deep-supervision": 2}, "deep-supervision"),      # 3 levels: at most 1
    ({"deep-supervision": -2}, "deep-supervision"),
    ({"deep-supervision": 1, "model": "unet", "num-res-units": 0}, "deep-supervision"),
    ({"channels": "4,8", "strides": "2"}, "channels"),
    ({"patch-size": 4}, "patch-size"),                   # one voxel at the lowest level
])
def test_bad_run_config_model_keys_are_named(changes, key):
    with pytest.raises(ConfigError, match=f"run config keys? '{key}'"):
        RunConfig.from_mapping(dict(DYNUNET_RUN, **changes))


def test_deep_supervision_loss_is_nnunets_weighted_dice_ce_and_a_mean_over_cases():
    config = dataclasses.replace(DYNUNET_2D, channels=(2, 4, 8, 16), strides=(2, 2, 2), deep_supervision=2)
    outputs, labels = torch.randn(2, 3, 3, 16, 16), torch.randint(0, 3, (2, 1, 16, 16)).float()
    loss, dice_ce = make_loss(model_config=config), make_loss()
    expected = sum(w * dice_ce(outputs[:, i], labels) for i, w in enumerate((4 / 7, 2 / 7, 1 / 7)))
    torch.testing.assert_close(loss(outputs, labels), expected)
    per_case = [loss(outputs[i:i + 1], labels[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(loss(outputs, labels), sum(per_case) / 2)  # per-sample clipping relies on it
    torch.testing.assert_close(loss(outputs[:, 0], labels), dice_ce(outputs[:, 0], labels))  # eval-mode output


@pytest.mark.parametrize(("config", "size", "mode"), [(DYNUNET_2D, 16, "hooks"), (DYNUNET_3D, 8, "hooks"),
                                                      (DYNUNET_3D, 8, "functorch")],
                         ids=["2D", "3D", "3D-functorch"])
def test_per_sample_gradients_of_every_parameter_equal_single_example_backward(config, size, mode):
    torch.manual_seed(0)
    model = build_model(config)
    assert_on_fast_samplers(model)
    images, labels = _batch(config, n=3, size=size)
    assert_exact_dp_step(model, make_loss(model_config=config), images, labels, mode=mode, clip=0.01)


def test_weights_model_file_and_egress_specs(tmp_path):
    torch.manual_seed(0)
    source, target = build_model(DYNUNET_3D), build_model(DYNUNET_3D)
    arrays = model_to_arrays(source)
    load_arrays(target, arrays)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
    specs = expected_parameter_specs(DYNUNET_3D)
    assert list(specs) == list(arrays_to_state_dict(arrays))
    assert all(specs[name].shape == tuple(t.shape) for name, t in source.state_dict().items())
    path = save_model_file(tmp_path / "m.pt", state_dict=source.state_dict(), model_config=DYNUNET_3D)
    rebuilt, _ = load_model(path)
    image = torch.randn(1, 2, 8, 8, 8)
    assert torch.equal(source.eval()(image), rebuilt(image))


@pytest.mark.parametrize("dp", [False, True], ids=["no-DP", "DP"])
def test_a_site_trains_a_dynunet_with_deep_supervision(dp, two_sites, flower_identity):
    run = dict(DYNUNET_RUN, **{"deep-supervision": 1, "dp": dp, "dp-noise-multiplier": 0.5,
                               "dp-noise-from-budget": False})
    msg, model = _message(MessageType.TRAIN, run)
    reply = handle_train(msg, _context(two_sites[0], run, **{"max-epsilon": 1e4}))
    metrics = reply.content.metric_records["metrics"]
    assert "refused" not in metrics, reply.content.config_records["site"]
    assert metrics["dp"] == int(dp) and metrics["train-loss"] > 0
    sent = arrays_to_state_dict(reply.content.array_records["arrays"])
    assert list(sent) == list(model.state_dict())
    assert any(not torch.equal(sent[k], v) for k, v in model.state_dict().items())
    check_reply(reply.content, message_type="train",
                expected=expected_parameter_specs(_network(run)))
