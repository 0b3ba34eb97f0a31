"""Baselines: bootstrap intervals, and pooled/local models evaluated like the federated one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import build_model
from shared.model_file import save_model_file
from shared.plan import manual_plan
from simulations.baselines import (
    bootstrap_interval,
    comparison_rows,
    parse_baselines,
    run_baselines,
    summarise,
)
from tests.conftest import TINY_RUN_CONFIG


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_cases():
    rng = np.random.default_rng(0)
    few, many = list(rng.normal(0.7, 0.1, 10)), list(rng.normal(0.7, 0.1, 400))
    low, high = bootstrap_interval(few, seed=1)
    assert low < np.mean(few) < high
    low_many, high_many = bootstrap_interval(many, seed=1)
    assert high_many - low_many < high - low
    assert bootstrap_interval([float("nan")]) != bootstrap_interval([float("nan")])  # NaN, NaN


def test_summary_has_each_foreground_class_with_its_interval():
    per_case = [{"dice": [0.9, 0.1], "hd95": [1.0, float("nan")]}, {"dice": [0.7, 0.3], "hd95": [3.0, 5.0]}]
    summary = summarise(per_case, seed=0)
    assert summary["dice"] == pytest.approx(0.5)
    first, second = summary["per-class"]
    assert first["dice"] == pytest.approx(0.8) and second["dice"] == pytest.approx(0.2)
    assert first["dice-ci"][0] <= 0.8 <= first["dice-ci"][1]
    assert second["hd95"] == pytest.approx(5.0)  # a NaN case (class absent) is left out, not counted as 0


def test_unknown_baseline_is_named():
    assert parse_baselines("pooled, local") == ("pooled", "local")
    with pytest.raises(ConfigError, match="centralised"):
        parse_baselines("pooled,centralised")


def _finished_run(run_dir, *, rounds: int) -> RunConfig:
    """What a finished federation leaves in its run folder for the baselines: model, summary, plan."""
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{"num-rounds": rounds}))
    plan = manual_plan(config)
    save_model_file(run_dir / "global_model.pt", state_dict=build_model(plan.model_config()).state_dict(),
                    model_config=plan.model_config())
    (run_dir / "summary.json").write_text(json.dumps({"run_config": config.to_mapping()}))
    (run_dir / "plan.json").write_text(json.dumps({"plan": plan.to_dict()}))
    return config


def test_baselines_train_and_evaluate_on_the_same_cases(tmp_path, two_sites):
    config = _finished_run(tmp_path, rounds=2)
    sites = [("a", two_sites[0])]
    results = run_baselines(tmp_path, sites, kinds=("pooled", "local"), holdout=[("h", two_sites[1])])
    assert results["steps"] == 2 * config.local_steps
    for kind in ("federated", "pooled"):
        assert set(results[kind]) == {"a", "h"}
        assert results[kind]["a"]["cases"] == len(json.loads(two_sites[0].read_text())["validation"])
    assert set(results["local"]["a"]) == {"a", "h"}
    rows = {r["site"]: r for r in comparison_rows(results)}
    assert rows["h"]["holdout"] and not rows["a"]["holdout"]
    assert rows["a"]["local"] == results["local"]["a"]["a"]
    assert (tmp_path / "baselines.json").exists()


def test_a_site_whose_data_cannot_be_read_is_left_out_of_the_baselines_and_the_overlays(tmp_path, two_sites):
    from simulations.run_logs import write_example_overlays

    _finished_run(tmp_path, rounds=1)
    broken = json.loads(two_sites[1].read_text())
    broken["validation"][0]["label"] = "labels/missing.nii.gz"
    (tmp_path / "broken.json").write_text(json.dumps(broken).replace('"images/', f'"{two_sites[1].parent}/images/')
                                          .replace('"labels/', f'"{two_sites[1].parent}/labels/'))
    sites = [("good", two_sites[0]), ("broken", tmp_path / "broken.json")]
    results = run_baselines(tmp_path, sites, kinds=("pooled",))
    assert set(results["federated"]) == {"good"} and "missing.nii.gz" in results["unreadable"]["broken"]
    assert write_example_overlays(tmp_path, sites).exists()


def test_baselines_cut_short_go_on_from_the_last_model_done(tmp_path, two_sites, monkeypatch):
    from simulations import baselines

    _finished_run(tmp_path, rounds=1)
    sites = [("a", two_sites[0]), ("b", two_sites[1])]
    trained, real_train = [], baselines.train_model

    def train_until_cut(datalists, *args, **kwargs):
        if len(trained) == 2:  # the machine goes away while the second local model trains
            raise KeyboardInterrupt
        trained.append(list(datalists))
        return real_train(datalists, *args, **kwargs)

    monkeypatch.setattr(baselines, "train_model", train_until_cut)
    with pytest.raises(KeyboardInterrupt):
        run_baselines(tmp_path, sites, kinds=("pooled", "local"))
    assert not (tmp_path / "baselines.json").exists()  # readers never see a part
    assert trained == [[two_sites[0], two_sites[1]], [two_sites[0]]]

    monkeypatch.setattr(baselines, "train_model", lambda datalists, *a, **k: trained.append(list(datalists))
                        or real_train(datalists, *a, **k))
    results = run_baselines(tmp_path, sites, kinds=("pooled", "local"))
    assert trained[2:] == [[two_sites[1]]]  # only the model not done before
    assert set(results["local"]) == {"a", "b"} and set(results["pooled"]) == {"a", "b"}
    assert json.loads((tmp_path / "baselines.json").read_text()) == results
    assert not (tmp_path / baselines.PROGRESS_FILE).exists()


def test_a_local_norm_run_reports_each_sites_personal_model_beside_the_global_one(tmp_path, two_sites):
    import torch

    from client.inference.site_weights import keep_local_weights
    from shared.local_weights import local_weight_names
    from simulations.report import comparison_text

    run = dict(TINY_RUN_CONFIG, **{"model": "dynunet", "channels": "4,8,16", "strides": "2,2", "num-res-units": -1,
                                   "deep-supervision": 0, "local-norm": True, "num-rounds": 1})
    config = RunConfig.from_mapping(run)
    plan = manual_plan(config)
    save_model_file(tmp_path / "global_model.pt", state_dict=build_model(plan.model_config()).state_dict(),
                    model_config=plan.model_config())
    (tmp_path / "summary.json").write_text(json.dumps({"run_config": config.to_mapping()}))
    (tmp_path / "plan.json").write_text(json.dumps({"plan": plan.to_dict()}))
    sites = [("a", two_sites[0]), ("b", two_sites[1])]
    local = local_weight_names(plan.model_config(), local_norm=True)
    mine = build_model(plan.model_config())
    with torch.no_grad():  # site a's own norm weights: the first norm's sign flipped, everything else the same
        for name, parameter in mine.named_parameters():
            if name in local:
                parameter.mul_(-1.0)
    keep_local_weights(mine, tmp_path / "state" / "a" / "local-weights" / "run-4.pt", names=local,
                       model_config=plan.model_config())
    with pytest.raises(ConfigError, match=r"state/b/local-weights.*found 0"):
        run_baselines(tmp_path, sites, kinds=())
    keep_local_weights(build_model(plan.model_config()), tmp_path / "state" / "b" / "local-weights" / "run-4.pt",
                       names=local, model_config=plan.model_config())
    results = run_baselines(tmp_path, sites, kinds=())
    assert set(results["personal"]) == {"a", "b"}
    assert results["personal"]["b"] == results["federated"]["b"]  # b kept the global model's own norm weights
    assert results["personal"]["a"]["dice"] != results["federated"]["a"]["dice"]
    rows = {r["site"]: r for r in comparison_rows(results)}
    assert rows["a"]["personal"] == results["personal"]["a"]
    assert "personal Dice" in comparison_text(tmp_path)


def test_the_example_slices_show_the_uncertainty_map_below_each_case(tmp_path, two_sites):
    from PIL import Image

    from simulations.run_logs import write_example_overlays

    _finished_run(tmp_path, rounds=1)
    sites = [("a", two_sites[0]), ("b", two_sites[1])]
    plain = np.asarray(Image.open(write_example_overlays(tmp_path, sites, uncertainty=False)).convert("RGB"))
    shown = np.asarray(Image.open(write_example_overlays(tmp_path, sites)).convert("RGB"))
    assert shown.shape == (2 * plain.shape[0], plain.shape[1], 3)  # a second row of panels
    lower = shown[shown.shape[0] // 2 + 30:].reshape(-1, 3)
    magma = (lower[:, 0] > 150) & (lower[:, 1] > 60) & (lower[:, 2] < 150)  # orange to yellow: not gray, red or lime
    assert magma.sum() > 100
