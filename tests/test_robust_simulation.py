"""A real Flower simulation with ``strategy = krum``: the site that sends a scaled-up update is left out."""

from __future__ import annotations

import json
import math

import pytest

from shared.model_file import load_model
from simulations.api import SimulationSpec, run_simulation
from simulations.faults import FaultPlan
from tests.conftest import TINY_RUN_CONFIG


@pytest.mark.integration
def test_krum_simulation_leaves_the_poisoned_site_out(tmp_path):
    from monai.utils import set_determinism

    from shared.model import ModelConfig, build_model

    # the norm rule off, so that Krum alone has to tell the poisoned update from the honest ones
    run_config = {**TINY_RUN_CONFIG, "num-rounds": 1, "strategy": "krum", "malicious-sites": 0,
                  "min-train-nodes": 3, "min-available-nodes": 3, "update-norm-bound-factor": 0.0,
                  "outlier-min-sites": 0}
    faults = FaultPlan(poison_sites="hospital-02", poison_kind="scale", poison_scale=1000.0)
    spec = SimulationSpec(sites=3, rounds=1, seed=3, out=tmp_path, min_cases=3, max_cases=3, timeout_s=600,
                          faults=faults, run_config=run_config)
    assert run_simulation(spec, echo=False)["rounds"] == 1

    run_dir = (tmp_path / "latest").resolve()
    rows = {r["site"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert {rows[f"hospital-0{i}"]["train-status"] for i in (1, 2, 3)} == {"ok"}  # every update passed the checks
    norms = {site: rows[site]["update-norm"] for site in ("hospital-01", "hospital-02", "hospital-03")}
    assert norms["hospital-02"] > 100 * max(norms["hospital-01"], norms["hospital-03"])

    model, payload = load_model(run_dir / "global_model.pt")
    set_determinism(seed=payload["run_config"]["seed"])  # the server's round-1 model: the same seeded network
    initial = build_model(ModelConfig.from_dict(payload["model_config"])).state_dict()
    moved = math.sqrt(sum(float(((v.double() - initial[k].double()) ** 2).sum()) for k, v in model.state_dict().items()))
    # Krum's aggregate is one honest site's update: the global model moved exactly as far as that site's did
    assert min(abs(moved - norms[s]) / norms[s] for s in ("hospital-01", "hospital-03")) < 1e-4
