"""A DP run in which no site can train any more stops after that round and says what to raise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.training.privacy_ledger import PrivacyBudgetExceeded
from server.budget_stop import BudgetStop
from server.polling_grid import PollingGrid
from server.rounds import run_rounds
from server.run_folder import RunRecorder
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.plan import manual_plan
from shared.protocol import BUDGET_REFUSAL, is_budget_refusal
from tests.conftest import TINY_RUN_CONFIG, live_processes_mentioning
from tests.fake_grid import AnsweringGrid

BUDGET_REASON = f"{BUDGET_REFUSAL}: privacy budget: this round would bring epsilon from 0.000 to 9.1 (delta 1e-05)"
NODES = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d"}


def _refused(reason: str = BUDGET_REASON) -> dict[str, str]:
    return {"train-status": "refused", "train-reason": reason}


def test_the_client_refusal_is_what_the_server_reads_as_a_budget_refusal():
    assert PrivacyBudgetExceeded.__name__ == BUDGET_REFUSAL  # the client's reason starts with the error's name
    assert is_budget_refusal(BUDGET_REASON) and is_budget_refusal(f"share_keys: {BUDGET_REASON}")
    assert not is_budget_refusal("DataError: no cases") and not is_budget_refusal("LedgerError: unreadable")


def test_stops_only_once_every_connected_site_refused_for_its_budget():
    config = RunConfig.from_mapping({"num-rounds": 5, "dp-noise-from-budget": False, "dp-noise-multiplier": 0.5})
    stop = BudgetStop(config=config, known_sites=NODES)
    # round 1 asked half the sites: the others may still have budget
    assert not stop.after_training(1, {"site-a": _refused(), "site-b": _refused()}, NODES)
    # a site that refused for another reason (its data) may train once that is fixed
    assert not stop.after_training(2, {"site-c": _refused("DataError: x"), "site-d": _refused()}, NODES)
    assert stop.line is None
    assert stop.after_training(3, {"site-c": _refused(), "site-a": _refused()}, NODES)
    assert stop.line.startswith("stopped after round 3 of 5: every site refused to train for its privacy budget")
    assert "'max-epsilon'" in stop.line and "'dp-noise-multiplier'" in stop.line and "\n" not in stop.line
    unknown = BudgetStop(config=config, known_sites={11: "site-a"})  # node 12 never answered: unknown
    assert not unknown.after_training(1, {"site-a": _refused()}, [11, 12])
    trained = BudgetStop(config=config, known_sites=NODES)
    assert not trained.after_training(1, {"site-a": _refused(), "site-b": {"train-status": "ok"}}, [11, 12])


class _RefusingGrid(AnsweringGrid):
    """Four sites, each refusing every training round for its budget; evaluation answers."""

    def get_node_ids(self):
        return list(NODES)

    def answer(self, msg: Message) -> Message:
        site = ConfigRecord({"site-id": NODES[msg.metadata.dst_node_id]})
        if msg.metadata.message_type == MessageType.TRAIN:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}),
                                  "site": ConfigRecord({**site, "reason": BUDGET_REASON})})
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": 0.1, "loss": 0.9}),
                                  "site": site})
        return Message(content=content, reply_to=msg)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(("fraction", "stopped_after"), [(1.0, 1), (0.5, None)])
def test_the_round_loop_ends_after_the_round_that_leaves_no_site_to_train(tmp_path, flower_identity, overlap,
                                                                          fraction, stopped_after):
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{
        "num-rounds": 4, "dp": True, "fraction-train": fraction, "fraction-evaluate": 1.0}))
    recorder = RunRecorder(tmp_path, config=config, plan=manual_plan(config))
    strategy = build_strategy(config, recorder)
    stop = BudgetStop(config=config, known_sites=strategy.known_sites)
    grid = PollingGrid(_RefusingGrid(), poll_interval_s=0.01)
    arrays = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    written: list[int] = []

    def close_round(server_round: int, arrays: ArrayRecord):
        return lambda: (recorder.end_round(server_round, arrays), written.append(server_round))

    run_rounds(strategy, grid, arrays=arrays, first_round=1, num_rounds=4, timeout=5.0, close_round=close_round,
               overlap_evaluation=overlap, stop_after=lambda r: stop.after_training(
                   r, recorder.rounds.get(r, {}), grid.get_node_ids()))
    rows = [json.loads(line) for line in recorder.metrics_path.read_text().splitlines()]
    if stopped_after is None:  # half the sites each round: round 1 leaves the other half untried
        assert len(written) >= 2 and written == list(range(1, len(written) + 1))
        assert (stop.line is not None) == (stop.out_of_budget == set(NODES.values()))
        assert stop.line is not None or written[-1] == 4
    else:
        assert written == [1] and stop.line.startswith("stopped after round 1 of 4")
        assert {r["site"]: r.get("evaluate-status") for r in rows} == {**{s: "ok" for s in NODES.values()},
                                                                       "global": None}


def _budget_too_small_args(tmp_path) -> list[str]:
    """One site whose budget (epsilon 0.5) no round of a fixed noise multiplier fits; three rounds asked."""
    tiny = [f"--run-config={key}={json.dumps(value)}" for key, value in TINY_RUN_CONFIG.items()
            if key not in ("dp", "num-rounds")]
    return ["--rounds", "3", "--out", str(tmp_path / "runs"), "--max-epsilon", "0.5", *tiny,
            "--run-config=dp=true", "--run-config=dp-noise-from-budget=false", "--run-config=dp-noise-multiplier=1.0"]


@pytest.mark.integration
def test_the_harness_stops_a_run_no_site_can_train_and_exits_non_zero(tmp_path, capsys):
    from simulations.__main__ import main

    code = main(["--sites", "1", "--min-cases", "3", "--max-cases", "3", "--timeout", "600",
                 *_budget_too_small_args(tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads(((tmp_path / "runs" / "latest").resolve() / "summary.json").read_text())
    assert code == 1 and summary["rounds"] == 1 and summary["stopped"].startswith("stopped after round 1 of 3")
    assert err[-1] == f"error: {summary['stopped']}" and "'max-epsilon'" in err[-1]


@pytest.mark.integration
def test_the_deployment_runner_stops_a_run_no_site_can_train_and_exits_non_zero(tmp_path, capsys):
    from deploy.run_federation import main

    code = main(["--sites", "1", "--insecure", *_budget_too_small_args(tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    work_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((work_dir / "run" / "summary.json").read_text())
    assert code == 1 and summary["rounds"] == 1 and summary["stopped"].startswith("stopped after round 1 of 3")
    assert err[-1] == f"error: {summary['stopped']}"
    assert live_processes_mentioning(str(work_dir)) == []
