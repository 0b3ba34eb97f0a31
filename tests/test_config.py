"""Run config: defaults, agreement with pyproject.toml, and errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import PRESETS, RunConfig
from shared.errors import ConfigError
from shared.plan import manual_plan

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_defaults_equal_dataclass_defaults():
    listed = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert listed == RunConfig.declared_defaults()


def test_from_mapping_overrides_and_keeps_defaults():
    config = RunConfig.from_mapping({"num-rounds": 7, "learning-rate": 1})
    assert config.num_rounds == 7
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.batch_size == RunConfig().batch_size


@pytest.mark.parametrize(("key", "value"), [
    ("num-rounds", -1),
    ("learning-rate", -0.1),
    ("spatial-dims", 4),
    ("num-classes", 1),
    ("device", "tpu"),
    ("strategy", "fedsomething"),
    ("fraction-train", 1.5),
    ("channels", "16,x"),
    ("strides", "2,2"),
    ("patch-size", "0"),
    ("patch-size", "64,64,64"),
    ("target-spacing", "1,x"),
    ("preset", "fast"),
    ("plan", "sometimes"),
    ("model", "vnet"),
    ("slicing", "diagonal"),
    ("batch-size", "8"),
    ("local-steps", True),
    ("class-names", "background,a,b"),
    ("optimizer", "rmsprop"),
    ("update-norm-bound-factor", 0.5),  # a bound below the median would scale the majority down
    ("outlier-norm-factor", 5.0),  # below the bound factor: would reject updates it does not even bound
    ("outlier-min-sites", 3),  # two or three sites are never told apart on norm
])
def test_bad_value_names_its_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping({key: value})


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'num-round'"):
        RunConfig.from_mapping({"num-round": 3})


def test_model_config_follows_run_config():
    config = RunConfig.from_mapping({"model": "unet", "channels": "8,16,32", "strides": "2,2", "spatial-dims": 3})
    model = manual_plan(config).model_config()
    assert model.channels == (8, 16, 32) and model.strides == ((2, 2, 2),) * 2 and model.spatial_dims == 3


def test_the_update_norm_rule_can_be_turned_off():
    config = RunConfig.from_mapping(
        {"update-norm-bound-factor": 0, "outlier-min-sites": 0, "outlier-norm-factor": 1})
    assert (config.update_norm_bound_factor, config.outlier_min_sites) == (0.0, 0)


def test_the_default_preset_fills_what_the_run_config_leaves_unset():
    from shared.config import PRESETS

    config = RunConfig()
    for key, value in PRESETS["default"].items():
        assert config.to_mapping()[key] == value
    assert RunConfig.from_mapping({"learning-rate": 0.5, "model": "unet"}).to_mapping()["learning-rate"] == 0.5
    assert RunConfig.from_mapping(RunConfig().to_mapping()) == RunConfig()  # a resolved config reads back as itself
    assert config.patch_size == "auto" and config.batch_size == 0  # left to the plan


def test_flwr_run_and_the_harness_start_from_the_same_preset(tmp_path):
    from simulations.api import SimulationSpec, build_run_config

    listed = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    deployed = RunConfig.from_mapping(listed)  # what `flwr run` and deploy.run_federation send
    harness = build_run_config(SimulationSpec(out=tmp_path), tmp_path, tmp_path / "sites.json", num_sites=3)
    recipe = ("preset", "plan", "model", "optimizer", "learning-rate", "num-rounds", "local-steps", "batch-size",
              "patch-size", "target-spacing", "base-filters", "max-filters", "dp", "dp-noise-from-budget")
    assert {k: harness.to_mapping()[k] for k in recipe} == {k: deployed.to_mapping()[k] for k in recipe}
    assert (harness.num_rounds, harness.local_steps) == (PRESETS["default"]["num-rounds"],
                                                         PRESETS["default"]["local-steps"])


def test_the_deployment_runner_and_the_harness_take_the_task_from_the_datalists(tmp_path):
    import json

    from deploy.run_federation import DeploymentSpec, _write_run_config
    from simulations.api import SimulationSpec, build_run_config

    datalists = []
    for site in ("a", "b"):
        path = tmp_path / f"{site}.json"
        path.write_text(json.dumps({"modality": {"0": "T1"}, "labels": {"0": "background", "1": "grey", "2": "white",
                                                                       "3": "csf"}, "training": [], "validation": []}))
        datalists.append(path)
    harness = build_run_config(SimulationSpec(out=tmp_path, datalists=tuple(datalists)), tmp_path,
                               tmp_path / "sites.json", num_sites=2)
    spec = DeploymentSpec(out=tmp_path, datalists=tuple(datalists), rounds=1)
    written = _write_run_config(spec, tmp_path, tmp_path / "run", datalists=datalists)
    deployed = RunConfig.from_mapping(tomllib.loads(written.read_text()))
    assert (deployed.num_classes, deployed.class_names) == (harness.num_classes, harness.class_names)
    assert deployed.num_classes == 4 and deployed.class_names == "background,grey,white,csf"
    overridden = DeploymentSpec(out=tmp_path, datalists=tuple(datalists), rounds=1, run_config={"num-classes": 3})
    written = _write_run_config(overridden, tmp_path, tmp_path / "run", datalists=datalists)
    assert RunConfig.from_mapping(tomllib.loads(written.read_text())).num_classes == 3  # names dropped, not refused


def test_the_preset_owns_the_number_of_rounds_unless_the_run_config_sets_it():
    assert RunConfig.from_mapping({"preset": "small-unet"}).num_rounds == PRESETS["small-unet"]["num-rounds"]
    assert RunConfig.from_mapping({"num-rounds": 3}).num_rounds == 3
    with pytest.raises(ConfigError, match="'num-rounds': must be > 0, got -2"):
        RunConfig.from_mapping({"num-rounds": -2})


def test_a_preset_and_an_explicit_override_that_contradict_it_are_named_together():
    small = RunConfig.from_mapping({"preset": "small-unet"})
    assert (small.model, small.channels, small.batch_size) == ("unet", "8,16,32", 128)
    with pytest.raises(ConfigError, match="'num-res-units', 'model'"):
        RunConfig.from_mapping({"preset": "small-unet", "model": "dynunet"})
    with pytest.raises(ConfigError, match="'channels', 'strides'"):
        RunConfig.from_mapping({"channels": "8,16,32"})
