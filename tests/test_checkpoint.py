"""Checkpoints: round trip, corrupt/truncated/mismatched files refused, strategy state restored exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.checkpoint import Checkpoint, CheckpointError, check_resumable, load_checkpoint, save_checkpoint
from server.federation import resume_checkpoint, starting_point, write_round_checkpoint
from server.run_folder import RunRecorder
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.model_file import weights_digest
from shared.plan import manual_plan
from tests.conftest import TINY_RUN_CONFIG


def _checkpoint(round_=2):
    return Checkpoint(round=round_, state_dict={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
                      run_config=RunConfig.from_mapping(TINY_RUN_CONFIG).to_mapping(),
                      strategy_state={"m_t": {"w": torch.ones(2, 3)}},
                      metrics_rows=[{"round": 1, "site": "global", "dice": 0.5}], known_sites={7: "site-a"})


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path, _checkpoint())
    loaded = load_checkpoint(path)
    assert loaded.round == 2 and torch.equal(loaded.state_dict["w"], _checkpoint().state_dict["w"])
    assert loaded.metrics_rows == _checkpoint().metrics_rows and loaded.known_sites == {7: "site-a"}
    assert torch.equal(loaded.strategy_state["m_t"]["w"], torch.ones(2, 3))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: raw[:-10], "truncated"),
    (lambda raw: raw[:len(raw) // 2], "truncated"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum mismatch"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not a fedseg checkpoint"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, _checkpoint())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="resume-from"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_of_a_different_setup_is_refused(tmp_path):
    checkpoint = _checkpoint()
    other_model = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, channels="8,16"))
    with pytest.raises(CheckpointError, match="channels='4,8'"):
        check_resumable(checkpoint, other_model, path=tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="strategy"):
        check_resumable(checkpoint, RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy="fedadam")),
                        path=tmp_path / "c.ckpt")
    longer = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{"num-rounds": 9, "round-timeout": 5.0}))
    check_resumable(checkpoint, longer, path=tmp_path / "c.ckpt")


class _TwoNodes:
    """Stands in for the network: Flower's sampling only asks which nodes are connected."""

    def get_node_ids(self):
        return [11, 12]


def _replies(server_round, arrays):
    replies = []
    for node, site, examples in ((11, "site-a", 3), (12, "site-b", 5)):
        rng = np.random.default_rng(server_round * 100 + node)
        update = {k: (v.numpy() + rng.normal(0, 0.1, v.numpy().shape)).astype(np.float32) for k, v in arrays.items()}
        instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                              "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                              "site": ConfigRecord({"site-id": site})})
        replies.append(Message(content=content, reply_to=instruction))
    return replies


def _rounds(strategy, arrays, rounds):
    digests = {}
    for server_round in rounds:
        strategy.configure_train(server_round, arrays, ConfigRecord(), _TwoNodes())
        arrays, _ = strategy.aggregate_train(server_round, _replies(server_round, arrays))
        digests[server_round] = weights_digest(dict(arrays.to_torch_state_dict()))
    return arrays, digests


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_resumed_server_optimiser_continues_bitwise(tmp_path, flower_identity, name):
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, strategy=name, **{"num-rounds": 3}))
    initial = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32)), "b": Array(np.ones(4, dtype=np.float32))})
    _, uninterrupted = _rounds(build_strategy(config, RunRecorder(tmp_path / "a", config=config, plan=manual_plan(config))), initial, [1, 2, 3])

    first = build_strategy(config, recorder := RunRecorder(tmp_path / "b", config=config, plan=manual_plan(config)))
    arrays, _ = _rounds(first, initial, [1])
    recorder.end_round(1, arrays)
    write_round_checkpoint(tmp_path / "b", 1, arrays, config=config, strategy_state=first.strategy_state(),
                           known_sites=first.known_sites, recorder=recorder)

    resumed_config = RunConfig.from_mapping({**config.to_mapping(), "resume-from": str(tmp_path / "b")})
    resumed = build_strategy(resumed_config, RunRecorder(tmp_path / "c", config=resumed_config, plan=manual_plan(resumed_config)))
    arrays, first_round = starting_point(resumed_config, resumed, resumed.recorder, resume_checkpoint(resumed_config))
    assert first_round == 2 and resumed.aggregator.flower.m_t is not None and resumed.aggregator.flower.v_t is not None
    _, after_resume = _rounds(resumed, arrays, [2, 3])
    assert after_resume == {r: uninterrupted[r] for r in (2, 3)}

    forgetful = build_strategy(resumed_config, RunRecorder(tmp_path / "d", config=resumed_config, plan=manual_plan(resumed_config)))
    _, without_state = _rounds(forgetful, arrays, [2, 3])
    assert without_state[2] != uninterrupted[2]  # the moments matter: losing them changes the model


def test_check_checkpoint_command(tmp_path, capsys):
    from server.__main__ import main

    save_checkpoint(tmp_path, _checkpoint(round_=4))
    assert main(["check-checkpoint", str(tmp_path)]) == 0
    assert "continues at round 5" in capsys.readouterr().out
    path = tmp_path / "checkpoint.ckpt"
    path.write_bytes(path.read_bytes()[:-3])
    assert main(["check-checkpoint", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_a_resumed_simulation_copies_each_sites_records_and_links_its_case_cache(tmp_path):
    from simulations.api import carry_site_state

    old, new = tmp_path / "old", tmp_path / "new"
    site = old / "state" / "site-a"
    (site / "cache" / "ab").mkdir(parents=True)
    (site / "cache" / "ab" / "abcd.pt").write_bytes(b"preprocessed case")
    (site / "privacy-ledger.json").write_text('{"epsilon": 1.5}')
    (site / "egress-audit.jsonl").write_text('{"round": 1}\n')

    assert carry_site_state(old, new, ["site-a", "site-b"]) == ["site-a"]
    carried = new / "state" / "site-a"
    assert (carried / "cache" / "ab" / "abcd.pt").stat().st_ino == (site / "cache" / "ab" / "abcd.pt").stat().st_ino
    for name in ("privacy-ledger.json", "egress-audit.jsonl"):  # appended to by the resumed run: copies
        assert (carried / name).read_text() == (site / name).read_text()
        assert (carried / name).stat().st_ino != (site / name).stat().st_ino
    with (carried / "egress-audit.jsonl").open("a") as log:
        log.write('{"round": 2}\n')
    assert (site / "egress-audit.jsonl").read_text() == '{"round": 1}\n'
