"""A real simulated round: every reply a site sent is in its audit log: weights + allowed scalars only."""

from __future__ import annotations

import json

import pytest

from client.__main__ import main as client_main
from client.runtime.egress.audit_log import read_entries
from shared.config import RunConfig
from shared.model import build_model
from shared.plan import manual_plan
from shared.protocol import SITE_ID, SITE_KEY_LIMITS, metric_key_allowed
from simulations.api import SimulationSpec, run_simulation
from tests.conftest import TINY_RUN_CONFIG


@pytest.mark.integration
@pytest.mark.parametrize("sites", [1, 2])
def test_every_reply_of_a_simulated_round_is_audited_and_allowed(tmp_path, capsys, sites):
    # two rounds with every site sampled: with the harness's overlapped evaluation each site gets round 2's
    # training and round 1's evaluation at once, and both replies must be logged whole. With one site the
    # two Ray actors run both of its messages side by side (its audit log, privacy ledger and case cache)
    spec = SimulationSpec(sites=sites, rounds=2, seed=2, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2}))
    summary = run_simulation(spec, echo=False)
    run_dir = (tmp_path / "runs" / "latest").resolve()
    state = build_model(manual_plan(RunConfig.from_mapping(TINY_RUN_CONFIG)).model_config()).state_dict()
    parameters = [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()]
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    server_rows = {row["site"]: row for row in rows if row["round"] == 1}

    run_ids = set()
    for site in summary["sites"]:
        entries = [entry for _, entry in read_entries(run_dir / "state" / site / "egress-audit.jsonl")]
        logged = [(e["message-type"], e["round"]) for e in entries]
        assert logged[0] == ("train", 1) and logged[-1] == ("evaluate", 2)
        assert sorted(logged) == [("evaluate", 1), ("evaluate", 2), ("train", 1), ("train", 2)]
        train, evaluate = (next(e for e in entries if (e["message-type"], e["round"]) == (kind, 1))
                           for kind in ("train", "evaluate"))
        assert [(a["name"], a["shape"], a["dtype"]) for a in train["arrays"]] == parameters
        assert all(a["bytes"] == state[a["name"]].numel() * state[a["name"]].element_size()
                   for a in train["arrays"])
        assert train["array-bytes"] == sum(t.numel() * t.element_size() for t in state.values())
        assert evaluate["arrays"] == [] and evaluate["array-bytes"] == 0
        for entry in entries:
            assert not entry["blocked"] and not entry["refused"] and entry["server"] is None
            metrics = entry["metrics"].items()
            assert all(metric_key_allowed(k) and isinstance(v, int | float) for k, v in metrics)
            assert set(entry["site"]) <= set(SITE_KEY_LIMITS) and entry["site"][SITE_ID] == site
            run_ids.add(entry["run-id"])
        assert set(train["metrics"]) == {"num-examples", "train-loss", "steps", "dp"}
        # what the site logged is what the server received
        assert server_rows[site]["train-loss"] == train["metrics"]["train-loss"]
        assert server_rows[site]["dice"] == evaluate["metrics"]["dice"]

        assert client_main(["audit", "--state-dir", str(run_dir / "state" / site)]) == 0
        out = capsys.readouterr().out
        assert "2 round(s) trained" in out and f"{2 * train['array-bytes']:,} B" in out and "0 blocked" in out
    assert len(run_ids) == 1
