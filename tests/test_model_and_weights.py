"""The U-Net factory (2D and 3D) and weight conversion to and from Flower ArrayRecord."""

from __future__ import annotations

import pytest
import torch

from shared.errors import ConfigError, WeightsError
from shared.model import ModelConfig, build_unet
from shared.model_file import load_model, save_model_file
from shared.weights import arrays_to_state_dict, load_arrays, model_to_arrays


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 1, 32, 32)), (3, (1, 1, 16, 16, 16))])
def test_unet_output_has_one_channel_per_class(dims, shape):
    model = build_unet(ModelConfig(spatial_dims=dims, in_channels=1, num_classes=3,
                                   channels=(4, 8, 16), strides=(2, 2), num_res_units=1))
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_model_has_no_batchnorm():
    model = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_model_config_rejects_mismatched_strides():
    with pytest.raises(ConfigError, match="strides"):
        ModelConfig(2, 1, 2, (4, 8, 16), (2,))


def test_weights_round_trip_through_arrayrecord():
    torch.manual_seed(0)
    source = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    target = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    load_arrays(target, model_to_arrays(source))
    for (name, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert name == other and torch.equal(a, b)


def test_loading_weights_of_another_architecture_fails_clearly():
    small = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    wider = build_unet(ModelConfig(2, 1, 2, (4, 16), (2,)))
    with pytest.raises(WeightsError, match="expected"):
        load_arrays(wider, model_to_arrays(small))


def test_missing_weight_is_named():
    model = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    arrays = model_to_arrays(model)
    state = arrays_to_state_dict(arrays)
    dropped = next(iter(state))
    del state[dropped]
    from flwr.app import ArrayRecord
    with pytest.raises(WeightsError, match="missing"):
        load_arrays(model, ArrayRecord(state))


def test_model_file_rebuilds_identical_predictions(tmp_path):
    config = ModelConfig(2, 1, 2, (4, 8), (2,))
    model = build_unet(config).eval()
    path = save_model_file(tmp_path / "m.pt", state_dict=model.state_dict(), model_config=config,
                           extra={"round": 3})
    rebuilt, payload = load_model(path)
    image = torch.randn(1, 1, 32, 32)
    assert payload["round"] == 3
    assert torch.equal(model(image), rebuilt(image))


def test_corrupt_model_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="broken.pt"):
        load_model(path)


def test_default_activation_has_no_weights_and_old_files_rebuild_with_prelu():
    model = build_unet(ModelConfig(2, 1, 2, (4, 8), (2,)))
    assert not any(isinstance(m, torch.nn.PReLU) for m in model.modules())
    old = ModelConfig.from_dict({"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "channels": [4, 8],
                                 "strides": [2]})
    assert old.act == "prelu" and any(isinstance(m, torch.nn.PReLU) for m in build_unet(old).modules())
    assert ModelConfig.from_dict(ModelConfig(2, 1, 2, (4, 8), (2,)).to_dict()).act == "relu"
