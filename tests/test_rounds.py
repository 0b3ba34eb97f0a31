"""The round loop: with overlapped evaluation, the same work and results in fewer waits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.federation import resume_checkpoint, starting_point, write_round_checkpoint
from server.polling_grid import PollingGrid
from server.rounds import run_rounds
from server.run_folder import RunRecorder
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.model_file import weights_digest
from shared.plan import manual_plan
from tests.conftest import TINY_RUN_CONFIG
from tests.fake_grid import OfflineGrid

NODES = {101 + index: f"site-{index}" for index in range(6)}


class _SitesGrid(OfflineGrid):
    """Six sites that answer at once: an update (global + a site offset) or evaluation metrics.

    ``silent`` holds (node id, message type) pairs that never get an answer.
    ``pushes`` records each push as a list of (message type, node id).
    """

    def __init__(self, silent: frozenset[tuple[int, str]] = frozenset()) -> None:
        self.silent = silent
        self.pushes: list[list[tuple[str, int]]] = []
        self.events: list[tuple[str, int]] = []  # ("push", index), ("closed", round), ("written", round)
        self._replies: dict[str, Message] = {}

    def get_node_ids(self):  # noqa: ANN201
        return list(NODES)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids, push = [], []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            msg_id = f"m{sum(map(len, self.pushes)) + len(push)}"
            push.append((kind, node))
            ids.append(msg_id)
            if (node, kind) not in self.silent:
                reply = Message(content=_answer(node, msg), reply_to=msg)
                reply.metadata.__dict__["_reply_to_message_id"] = msg_id
                self._replies[msg_id] = reply
        self.pushes.append(push)
        self.events.append(("push", len(self.pushes)))
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


class _ServerDied(Exception):
    pass


def _answer(node: int, msg: Message) -> RecordDict:
    arrays = next(iter(msg.content.array_records.values()))
    weights = {name: array.numpy() for name, array in arrays.items()}
    site = ConfigRecord({"site-id": NODES[node]})
    if msg.metadata.message_type == MessageType.TRAIN:
        update = {name: (values + 0.01 * (node - 100)).astype(np.float32) for name, values in weights.items()}
        metrics = MetricRecord({"num-examples": node - 100, "train-loss": 1.0 / (node - 100)})
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}), "metrics": metrics,
                           "site": site})
    dice = float(np.mean([values.mean() for values in weights.values()])) + 0.001 * node
    return RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": dice, "loss": 1.0 - dice}),
                       "site": site})


def _run(tmp_path, name: str, *, overlap: bool, rounds: int = 3, grid: _SitesGrid | None = None,
         stop_after: int | None = None, **config: object):
    """Run the rounds (resuming if ``config`` has ``resume-from``), checkpointing after each like the server.

    ``stop_after``: the server dies right after writing that round's checkpoint.
    """
    run_config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{"num-rounds": rounds, "fraction-train": 0.5,
                                                                 "fraction-evaluate": 0.5, **config}))
    recorder = RunRecorder(tmp_path / name, config=run_config, plan=manual_plan(run_config))
    strategy = build_strategy(run_config, recorder)
    grid = grid or _SitesGrid()
    arrays, first_round = starting_point(run_config, strategy, recorder, resume_checkpoint(run_config))
    if not run_config.resume_from:
        arrays = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32)),
                              "b": Array(np.ones(4, dtype=np.float32))})
    closed: list[tuple[int, str]] = []

    def close_round(server_round: int, arrays: ArrayRecord):
        state, known_sites = strategy.strategy_state(), dict(strategy.known_sites)
        grid.events.append(("closed", server_round))

        def write_out() -> None:
            recorder.end_round(server_round, arrays)
            write_round_checkpoint(tmp_path / name, server_round, arrays, config=run_config, strategy_state=state,
                                   known_sites=known_sites, recorder=recorder)
            closed.append((server_round, weights_digest(dict(arrays.to_torch_state_dict()))))
            grid.events.append(("written", server_round))
            if server_round == stop_after:
                raise _ServerDied

        return write_out

    try:
        run_rounds(strategy, PollingGrid(grid, poll_interval_s=0.01), arrays=arrays, first_round=first_round,
                   num_rounds=rounds, timeout=0.3, close_round=close_round, overlap_evaluation=overlap)
    except _ServerDied:
        pass
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("round-seconds", None), row.pop("ended-at", None)
    return closed, rows, grid


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_overlapped_evaluation_gives_the_same_rounds_models_and_metrics(tmp_path, flower_identity, strategy):
    closed, rows, grid = _run(tmp_path, "sequential", overlap=False, strategy=strategy)
    closed_overlapped, rows_overlapped, grid_overlapped = _run(tmp_path, "overlapped", overlap=True,
                                                               strategy=strategy)
    assert [r for r, _ in closed] == [1, 2, 3]
    assert closed_overlapped == closed  # same global model after every round, rounds closed in order
    assert rows_overlapped == rows  # same sites sampled, same outcomes and metrics per round
    assert len({digest for _, digest in closed}) == 3  # the model does change from round to round
    assert len(grid.pushes) == 6  # train, evaluate per round
    assert len(grid_overlapped.pushes) == 4  # train 1 | train 2 + evaluate 1 | train 3 + evaluate 2 | evaluate 3
    # each round is written out once the next messages are out, so the sites never wait for the disk
    assert grid_overlapped.events == [("push", 1), ("push", 2), ("closed", 1), ("push", 3), ("written", 1),
                                      ("closed", 2), ("push", 4), ("written", 2), ("closed", 3), ("written", 3)]
    assert grid.events == [("push", 1), ("push", 2), ("closed", 1), ("written", 1), ("push", 3), ("push", 4),
                           ("closed", 2), ("written", 2), ("push", 5), ("push", 6), ("closed", 3), ("written", 3)]
    for push in grid_overlapped.pushes[1:3]:
        kinds = [kind for kind, _ in push]
        assert kinds == sorted(kinds, key=lambda kind: kind != MessageType.TRAIN)  # training first in the queue
        assert set(kinds) == {MessageType.TRAIN, MessageType.EVALUATE}


def test_a_site_silent_in_an_overlapped_evaluation_fails_only_that_evaluation(tmp_path, flower_identity):
    _, rows, _ = _run(tmp_path, "reference", overlap=True, rounds=2)
    evaluated_in_1 = next(r["site"] for r in rows if r["round"] == 1 and r.get("evaluate-status") == "ok")
    node = next(n for n, site in NODES.items() if site == evaluated_in_1)
    silent = _SitesGrid(silent=frozenset({(node, MessageType.EVALUATE)}))
    _, rows, _ = _run(tmp_path, "silent", overlap=True, rounds=2, grid=silent)
    row = next(r for r in rows if r["round"] == 1 and r["site"] == evaluated_in_1)
    assert row["evaluate-status"] == "failed" and "round-timeout" in row["evaluate-reason"]
    trained = [r for r in rows if r["site"] != "global" and "train-status" in r]
    assert trained and all(r["train-status"] == "ok" for r in trained)  # its training, if sampled, answered


def test_a_run_resumed_from_an_overlapped_checkpoint_continues_as_if_uninterrupted(tmp_path, flower_identity):
    uninterrupted, rows, _ = _run(tmp_path, "uninterrupted", overlap=True, strategy="fedadam")
    died, _, _ = _run(tmp_path, "died", overlap=True, strategy="fedadam", stop_after=1)
    assert died == uninterrupted[:1]
    resumed, resumed_rows, _ = _run(tmp_path, "resumed", overlap=True, strategy="fedadam",
                                    **{"resume-from": str(tmp_path / "died")})
    assert resumed == uninterrupted[1:]  # FedAdam's moments in the checkpoint are those of round 1's end
    assert resumed_rows == rows
