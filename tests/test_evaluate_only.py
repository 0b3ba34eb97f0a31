"""Run config ``evaluate-only``: one model evaluated at every site, nothing trained, no privacy budget spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.training.privacy_ledger import PrivacyLedger
from server.federation import run_federation
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import build_model
from shared.model_file import read_model_file, save_model_file
from tests.conftest import TINY_RUN_CONFIG, tiny_plan
from tests.local_federation import HandlerGrid, server_context


def test_evaluate_only_trains_nothing_and_leaves_the_ledger_unchanged(two_sites, tmp_path, flower_identity):
    torch.manual_seed(2)
    model = build_model(tiny_plan().model_config())
    save_model_file(tmp_path / "model.pt", state_dict=model.state_dict(), model_config=tiny_plan().model_config(),
                    extra={"plan": tiny_plan().to_dict()})
    run = dict(TINY_RUN_CONFIG, **{"evaluate-only": True, "initial-model": str(tmp_path / "model.pt"),
                                   "dp": True, "run-dir": str(tmp_path / "run"), "class-names": "bg,lesion"})
    grid = HandlerGrid([_validating_all(d, tmp_path) for d in two_sites], tmp_path / "sites", run,
                       **{"require-dp": True})
    ledger = PrivacyLedger(tmp_path / "sites" / "site-0", delta=1e-5)  # spent in an earlier run
    ledger.charge(run_id=1, server_round=1, noise_multiplier=2.0, sample_rate=0.5, steps=10, max_epsilon=8.0)
    before = ledger.path.read_bytes()

    run_federation(grid, server_context(run))

    assert {kind for _, kind in grid.received} == {"evaluate"} and len(grid.received) == 2
    assert ledger.path.read_bytes() == before
    assert not PrivacyLedger(tmp_path / "sites" / "site-1", delta=1e-5).entries()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    sites = {row["site"]: row for row in rows if row["site"] != "global"}
    assert set(sites) == {"site-0", "site-1"}
    for row in sites.values():
        assert row["evaluate-status"] == "ok" and "train-status" not in row
        assert 0 <= row["dice-class-1"] <= 1 and "hd95-class-1" in row and "epsilon" not in row
        assert row["dice-ci-low"] <= row["dice"] <= row["dice-ci-high"]  # the site's mean inside its interval
        assert row["dice-class-1-ci-low"] <= row["dice-class-1"] <= row["dice-class-1-ci-high"]
    assert not any(key.endswith("-ci-low") for key in rows[-1])  # no mean of intervals over sites
    final = read_model_file(tmp_path / "run" / "global_model.pt")
    assert all(torch.equal(final["state_dict"][k], v) for k, v in model.state_dict().items())  # unchanged
    assert final["per_site"]["site-0"]["dice"] == sites["site-0"]["dice"]


def _validating_all(datalist, tmp_path):
    """A copy of ``datalist`` (absolute paths) whose every case is also a validation case: intervals need several."""
    raw = json.loads(datalist.read_text())
    cases = [{k: str(datalist.parent / v) for k, v in case.items()} for case in raw["training"]]
    copy = tmp_path / f"{datalist.parent.name}.json"
    copy.write_text(json.dumps({**raw, "training": cases, "validation": cases}))
    return copy


def test_evaluate_only_needs_a_model():
    with pytest.raises(ConfigError, match="'evaluate-only', 'initial-model'"):
        RunConfig.from_mapping({"evaluate-only": True})


def test_the_harness_options_set_the_run_config(tmp_path):
    from shared.errors import FedSegError
    from simulations.__main__ import build_parser, spec_from_args
    from simulations.api import build_run_config

    with pytest.raises(FedSegError, match="--evaluate-only needs .*--model"):
        spec_from_args(build_parser().parse_args(["--evaluate-only"]))
    spec = spec_from_args(build_parser().parse_args(["--evaluate-only", "--model", "runs/7/global_model.pt"]))
    assert spec.run_config == {"initial-model": "runs/7/global_model.pt", "evaluate-only": True}
    config = build_run_config(spec, tmp_path, tmp_path / "sites.json", num_sites=3)
    assert config.evaluate_only and config.initial_model == str(Path.cwd() / "runs/7/global_model.pt")


def test_an_interval_needs_two_cases_with_a_spread():
    from shared.metrics import case_intervals, mean_interval

    low, high = mean_interval([0.2, 0.4, 0.5, 0.9, float("nan")])
    assert 0.2 <= low < 0.5 < high <= 0.9
    assert mean_interval([0.5]) is None and mean_interval([0.5, 0.5]) is None
    cases = [{"dice": [0.2, 0.8], "hd95": [3.0, float("inf")]}, {"dice": [0.4, 0.6], "hd95": [5.0, 2.0]},
             {"dice": [0.3, 0.9], "hd95": [4.0, float("nan")]}]
    found = case_intervals(cases)
    assert {"dice-ci-low", "dice-class-1-ci-high", "dice-class-2-ci-low", "hd95-class-1-ci-low"} <= set(found)
    assert "hd95-class-2-ci-low" not in found  # one finite value only
