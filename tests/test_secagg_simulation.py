"""A real 3-site, 2-round federation with secure aggregation through Flower's simulation engine."""

from __future__ import annotations

import dataclasses
import json

import pytest

from server.checkpoint import load_checkpoint
from shared.model_file import weights_digest
from simulations.api import SimulationSpec, run_simulation
from tests.conftest import TINY_RUN_CONFIG

STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]


@pytest.mark.integration
def test_three_sites_two_secure_rounds_through_flower(tmp_path):
    spec = SimulationSpec(sites=3, rounds=2, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config={**TINY_RUN_CONFIG, "num-rounds": 2, "local-steps": 30,
                                                     "learning-rate": 0.01, "secure-aggregation": True})
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    site_rows = [r for r in rows if r["site"] != "global"]
    assert len(site_rows) == 6 and all(r["train-status"] == "ok" for r in site_rows)
    assert all("update-norm" not in r for r in site_rows)  # the server never saw a plain update
    digests = [r["weights-sha256"] for r in rows if r["site"] == "global"]
    assert len(set(digests)) == 2  # each secure round changed the model
    assert not list(run_dir.glob(".spool-*"))
    checkpoint = load_checkpoint(run_dir / "checkpoint.ckpt")  # the global model, no site's update
    assert weights_digest(checkpoint.state_dict) == digests[-1] and checkpoint.strategy_state == {}
    assert all("update-norm" not in row for row in checkpoint.metrics_rows)
    for site in summary["sites"]:
        audit = [json.loads(line) for line in (run_dir / "state" / site / "egress-audit.jsonl").open()]
        train = [e for e in audit if e["message-type"] == "train"]
        assert [(e["round"], e["secagg-stage"]) for e in train] == [(r, s) for r in (1, 2) for s in STAGES]
        assert all(e["array-bytes"] == 0 and not e["blocked"] and not e["refused"] for e in train)
        assert all(e["site-checks"]["update-norm"] > 0 for e in train if e["secagg-stage"] == STAGES[2])

    plain = run_simulation(dataclasses.replace(spec, out=tmp_path / "plain",
                                               run_config={**spec.run_config, "secure-aggregation": False}),
                           echo=False)
    assert plain["rounds"] == 2 and plain["final_dice"] > plain["first_round_dice"] + 0.05  # it learned
    # the same sites, seed and training: only the quantisation of the secure sum differs
    assert summary["final_dice"] == pytest.approx(plain["final_dice"], abs=0.01)


@pytest.mark.integration
def test_hospital_level_dp_over_the_secure_sum(tmp_path):
    """dp-level = site with secure aggregation: sites clip before masking, the server noises the sum and
    accounts one release per round; no DP-SGD runs at the sites (no privacy ledger is charged)."""
    from opacus.accountants import RDPAccountant

    run_config = {**TINY_RUN_CONFIG, "num-rounds": 2, "secure-aggregation": True, "dp": True, "dp-level": "site",
                  "dp-site-clipping-norm": 0.05, "dp-site-noise-multiplier": 2.0}
    spec = SimulationSpec(sites=3, rounds=2, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config=run_config)
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    independent = RDPAccountant()
    independent.history = [(2.0, 1.0, 2)]
    assert summary["site_dp"]["rounds"] == 2
    assert summary["site_dp"]["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=0.02)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    global_rows = [r for r in rows if r["site"] == "global"]
    assert [r["site-dp-sampled"] for r in global_rows] == [3, 3]
    assert global_rows[0]["site-dp-noise-std"] == pytest.approx(2.0 * 0.05 / 3)
    assert all(r.get("epsilon") is None for r in rows if r["site"] != "global")  # no patient-level DP-SGD
    checkpoint = load_checkpoint(run_dir / "checkpoint.ckpt")
    assert int(checkpoint.strategy_state["site-dp"]["releases"].numpy()[0]) == 2
    for site in summary["sites"]:
        audit = [json.loads(line) for line in (run_dir / "state" / site / "egress-audit.jsonl").open()]
        masked = [e for e in audit if e.get("secagg-stage") == STAGES[2]]
        assert len(masked) == 2 and all("dp-site-clipping-norm" in " ".join(e["site-checks"].get("notes", []))
                                        or e["site-checks"]["update-norm"] <= 0.05 for e in masked)
