"""The U-Net factory (2D and 3D) and weight conversion to and from Flower ArrayRecord."""

from __future__ import annotations

import pytest
import torch

from shared.errors import ConfigError, WeightsError
from shared.model import ModelConfig, build_model
from shared.model_file import load_model, save_model_file
from shared.plan import manual_plan
from shared.weights import arrays_to_state_dict, load_arrays, model_to_arrays


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 1, 32, 32)), (3, (1, 1, 16, 16, 16))])
def test_unet_output_has_one_channel_per_class(dims, shape):
    model = build_model(ModelConfig(spatial_dims=dims, in_channels=1, num_classes=3,
                                   channels=(4, 8, 16), strides=(2, 2), num_res_units=1))
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_model_has_no_batchnorm():
    model = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_model_config_rejects_mismatched_strides():
    with pytest.raises(ConfigError, match="strides"):
        ModelConfig(2, 1, 2, (4, 8, 16), (2,))


def test_weights_round_trip_through_arrayrecord():
    torch.manual_seed(0)
    source = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    target = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    load_arrays(target, model_to_arrays(source))
    for (name, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert name == other and torch.equal(a, b)


def test_loading_weights_of_another_architecture_fails_clearly():
    small = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    wider = build_model(ModelConfig(2, 1, 2, (4, 16), (2,)))
    with pytest.raises(WeightsError, match="expected"):
        load_arrays(wider, model_to_arrays(small))


def test_missing_weight_is_named():
    model = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    arrays = model_to_arrays(model)
    state = arrays_to_state_dict(arrays)
    dropped = next(iter(state))
    del state[dropped]
    from flwr.app import ArrayRecord
    with pytest.raises(WeightsError, match="missing"):
        load_arrays(model, ArrayRecord(state))


def test_model_file_rebuilds_identical_predictions(tmp_path):
    config = ModelConfig(2, 1, 2, (4, 8), (2,))
    model = build_model(config).eval()
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


def test_hd95_is_in_millimetres_nan_where_absent_and_the_diagonal_where_missed():
    from shared.metrics import hd95_per_class

    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[0, 0, 10:20, 10:20] = 1
    label[0, 0, 25:28, 25:28] = 3
    shifted = torch.zeros(1, 4, 32, 32)
    shifted[0, 0] = 1.0
    shifted[0, 0, 13:23, 10:20] = 0.0
    shifted[0, 1, 13:23, 10:20] = 5.0  # class 1 predicted 3 voxels off; class 2 absent everywhere
    distances = hd95_per_class(shifted, label, num_classes=4, spacing=2.0)
    assert distances.shape == (1, 3)
    assert distances[0, 0].item() == pytest.approx(6.0, abs=0.5)
    assert torch.isnan(distances[0, 1])
    diagonal = (2 * (32 * 2.0) ** 2) ** 0.5
    assert distances[0, 2].item() == pytest.approx(diagonal)  # class 3 is there but never predicted
    spurious = shifted.clone()
    spurious[0, 2, 0:2, 0:2] = 9.0  # class 2 predicted where there is none
    assert hd95_per_class(spurious, label, num_classes=4, spacing=(2.0, 2.0))[0, 1].item() == pytest.approx(diagonal)


def test_content_hash_changes_with_a_weight_and_tampering_is_refused(tmp_path):
    from shared.model_file import read_model_file, weights_digest

    config = ModelConfig(2, 1, 2, (4, 8), (2,))
    state = build_model(config).state_dict()
    before = weights_digest(state)
    name = next(iter(state))
    changed = dict(state)
    changed[name] = state[name].clone()
    changed[name].view(-1)[0] += 1e-3
    assert weights_digest(changed) != before and weights_digest(dict(state)) == before

    path = save_model_file(tmp_path / "m.pt", state_dict=state, model_config=config)
    payload = read_model_file(path)
    assert payload["sha256"] == before
    payload["state_dict"][name].view(-1)[0] += 1.0
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="content hash"):
        load_model(path)


def test_final_export_describes_the_model(tmp_path):
    from server.export import export_final_model
    from shared.config import RunConfig

    run_config = RunConfig.from_mapping({"model": "unet", "channels": "4,8", "strides": "2", "patch-size": 32,
                                         "class-names": "background,lesion"})
    model = build_model(manual_plan(run_config).model_config())
    path = save_model_file(tmp_path / "global_model.pt", state_dict=model.state_dict(),
                           model_config=manual_plan(run_config).model_config(), extra={"round": 2})
    rounds = {1: {"a": {"dice": 0.5, "epsilon": 1.0}}, 2: {"a": {"dice": 0.7, "hd95": 3.0, "epsilon": 2.0}}}
    export_final_model(path, config=run_config, plan=manual_plan(run_config), rounds=rounds)
    rebuilt, payload = load_model(path)
    assert payload["class_names"] == ["background", "lesion"] and payload["round"] == 2
    assert payload["per_site"]["a"]["dice"] == 0.7 and payload["per_site"]["a"]["epsilon"] == 2.0
    assert payload["plan"]["patch_size"] == [32, 32] and payload["run_config"]["patch-size"] == "32"
    image = torch.randn(1, 1, 32, 32)
    assert torch.equal(model.eval()(image), rebuilt(image))
def test_default_activation_has_no_weights_and_old_files_rebuild_with_prelu():
    model = build_model(ModelConfig(2, 1, 2, (4, 8), (2,)))
    assert not any(isinstance(m, torch.nn.PReLU) for m in model.modules())
    old = ModelConfig.from_dict({"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "channels": [4, 8],
                                 "strides": [2]})
    assert old.act == "prelu" and any(isinstance(m, torch.nn.PReLU) for m in build_model(old).modules())
    assert ModelConfig.from_dict(ModelConfig(2, 1, 2, (4, 8), (2,)).to_dict()).act == "relu"
