"""Before round 1: the server asks every site for its fingerprint (real ClientApp handlers) and writes plan.json."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message, RecordDict

from client.runtime.handlers import handle_fingerprint
from server.plan_phase import establish_plan
from server.polling_grid import PollingGrid
from shared.config import RunConfig
from shared.errors import ConfigError
from tests.conftest import TINY_RUN_CONFIG
from tests.fake_grid import AnsweringGrid


class _HospitalsGrid(AnsweringGrid):
    """Nodes that answer a fingerprint query with fedseg's own ClientApp handler and their node config."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        super().__init__()
        self.node_configs, self.run_config = node_configs, run_config

    def get_node_ids(self):  # noqa: ANN201
        return list(self.node_configs)

    def answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = Context(run_id=5, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                          run_config=self.run_config)
        return handle_fingerprint(msg, context)


def _node(site: str, datalist, tmp_path) -> dict:
    return {"site-id": site, "datalist": str(datalist), "state-dir": str(tmp_path / "state" / site),
            "require-dp": False}


def test_the_plan_comes_from_the_sites_that_answer_and_plan_json_records_the_one_that_refused(
        two_sites, tmp_path, flower_identity):
    run_config = {**TINY_RUN_CONFIG, "plan": "auto", "channels": "auto", "strides": "auto", "model": "dynunet",
                  "num-res-units": -1, "patch-size": "auto", "base-filters": 4, "max-filters": 8, "dp": True,
                  "batch-size": 0, "memory-budget-mb": 64}
    missing = tmp_path / "missing.json"
    grid = _HospitalsGrid({1: _node("a", two_sites[0], tmp_path), 2: _node("b", two_sites[1], tmp_path),
                           3: _node("broken", missing, tmp_path)}, run_config)
    said: list[str] = []
    plan = establish_plan(PollingGrid(grid, poll_interval_s=0.01), RunConfig.from_mapping(run_config),
                          run_dir=tmp_path / "run", known_sites={}, say=said.append)
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["plan"] == plan.to_dict() and plan.model == "dynunet"
    assert {s: e["status"] for s, e in written["sites"].items()} == {"a": "ok", "b": "ok", "broken": "refused"}
    assert "missing.json" in written["sites"]["broken"]["reason"]
    assert written["pooled-fingerprint"]["cases"] == written["sites"]["a"]["cases"] + written["sites"]["b"]["cases"]
    assert written["sites"]["a"]["dp"]["noise_multiplier"] > 0  # each site's DP outlook
    assert any("broken refused fingerprint" in line for line in said)
    audit = [json.loads(line) for line in (tmp_path / "state" / "a" / "egress-audit.jsonl").open()]
    assert audit[-1]["message-type"] == "query.fingerprint" and not audit[-1]["blocked"]


def test_no_usable_fingerprint_stops_the_run_naming_every_site(tmp_path, flower_identity):
    run_config = {**TINY_RUN_CONFIG, "plan": "auto"}
    grid = _HospitalsGrid({1: _node("x", tmp_path / "x.json", tmp_path)}, run_config)
    with pytest.raises(ConfigError, match="no site sent a usable fingerprint.*x: .*x.json"):
        establish_plan(PollingGrid(grid, poll_interval_s=0.01), RunConfig.from_mapping(run_config),
                       run_dir=tmp_path / "run", known_sites={}, say=lambda _: None)


def test_a_manual_plan_asks_no_site(tmp_path, flower_identity):
    grid = _HospitalsGrid({}, dict(TINY_RUN_CONFIG))
    plan = establish_plan(PollingGrid(grid, poll_interval_s=0.01), RunConfig.from_mapping(TINY_RUN_CONFIG),
                          run_dir=tmp_path, known_sites={}, say=lambda _: None)
    assert grid.pushed == 0 and plan.source == "manual"
    assert json.loads((tmp_path / "plan.json").read_text())["plan"] == plan.to_dict()
