"""The site's egress audit log: what it records, that it only grows, and ``python -m client audit``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client.__main__ import main as client_main
from client.commands.audit import summarise_audit_log
from client.runtime.egress.audit_log import append_entry, make_entry, read_entries
from client.runtime.handlers import handle_train
from shared.config import RunConfig
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG

REPO = Path(__file__).resolve().parent.parent


def test_a_real_training_reply_is_recorded_with_its_bytes_and_hashes(two_sites, tmp_path, flower_identity):
    model = build_model(manual_plan(RunConfig.from_mapping(TINY_RUN_CONFIG)).model_config())
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": 2})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    node_config = {"site-id": "site-a", "datalist": str(two_sites[0]), "state-dir": str(tmp_path / "state"),
                   "superlink": "fl.consortium.example:9092", "require-dp": False}
    context = Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=dict(TINY_RUN_CONFIG))
    reply = handle_train(msg, context)

    entries = [e for _, e in read_entries(tmp_path / "state" / "egress-audit.jsonl")]
    assert len(entries) == 1
    entry = entries[0]
    sent = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    assert [a["name"] for a in entry["arrays"]] == list(sent)
    for logged in entry["arrays"]:
        values = sent[logged["name"]]
        assert logged["shape"] == list(values.shape) and logged["dtype"] == str(values.dtype)
        assert logged["bytes"] == values.nbytes
        assert logged["sha256"] == hashlib.sha256(values.tobytes()).hexdigest()
    assert entry["array-bytes"] == sum(v.nbytes for v in sent.values()) > 0
    assert entry["metrics"] == dict(reply.content["metrics"])
    assert (entry["run-id"], entry["round"], entry["message-type"]) == (42, 2, "train")
    assert entry["server"] == "fl.consortium.example:9092" and entry["site-id"] == "site-a"
    assert entry["blocked"] is False and entry["refused"] is False and entry["epsilon"] is None


_APPEND_IN_A_NEW_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
from flwr.app import MetricRecord, RecordDict
from client.runtime.egress.audit_log import append_entry, make_entry
content = RecordDict({"metrics": MetricRecord({"num-examples": 3, "dice": float(sys.argv[3])})})
append_entry(sys.argv[2], make_entry(content=content, run_id=5, server_round=int(sys.argv[4]),
                                     message_type="evaluate", server=None))
"""


def _append_in_new_process(state_dir: Path, dice: float, server_round: int) -> None:
    subprocess.run([sys.executable, "-c", _APPEND_IN_A_NEW_PROCESS, str(REPO), str(state_dir), str(dice),
                    str(server_round)], check=True, timeout=120)


def test_the_log_survives_a_restart_and_only_grows(tmp_path):
    state_dir = tmp_path / "state"
    _append_in_new_process(state_dir, 0.5, 1)
    first = (state_dir / "egress-audit.jsonl").read_bytes()
    _append_in_new_process(state_dir, 0.7, 2)
    after = (state_dir / "egress-audit.jsonl").read_bytes()
    assert after.startswith(first) and len(after) > len(first)
    entries = [e for _, e in read_entries(state_dir / "egress-audit.jsonl")]
    assert [(e["round"], e["metrics"]["dice"]) for e in entries] == [(1, 0.5), (2, 0.7)]


def _record_run(state_dir: Path) -> int:
    """A 3-round run: trained in rounds 1 and 3, blocked in 2, one refused evaluation; returns bytes sent."""
    weights = ArrayRecord({"w": Array(np.ones((10, 10), dtype=np.float32)),
                           "b": Array(np.zeros(5, dtype=np.float32))})
    site = ConfigRecord({"site-id": "site-a"})
    refusal = RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}),
                          "site": ConfigRecord({"site-id": "site-a", "reason": "EgressBlocked: x"})})
    replies = [
        (1, "train", RecordDict({"arrays": weights, "site": site,
                                 "metrics": MetricRecord({"num-examples": 4, "epsilon": 0.8})}), None),
        (1, "evaluate", RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": 0.4})}), None),
        (2, "train", refusal, "array 'image-batch' is not a model parameter"),
        (3, "train", RecordDict({"arrays": weights, "site": site,
                                 "metrics": MetricRecord({"num-examples": 4, "epsilon": 1.25})}), None),
        (3, "evaluate", RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1})}), None),
    ]
    for server_round, kind, content, blocked in replies:
        entry = make_entry(content=content, run_id=9, server_round=server_round, message_type=kind,
                           server="fl.example:9092", blocked_reason=blocked)
        append_entry(state_dir, entry)
    append_entry(state_dir, make_entry(content=replies[1][2], run_id=10, server_round=1,
                                       message_type="evaluate", server=None))
    return 2 * (400 + 20)


def test_client_audit_prints_the_totals_of_a_recorded_run(tmp_path, capsys):
    sent = _record_run(tmp_path)
    code = client_main(["audit", "--state-dir", str(tmp_path), "--run", "9"])
    out = capsys.readouterr().out
    assert code == 1  # a blocked reply is something to look at
    assert "5 replies in 1 run(s)" in out and f"{sent:,} B" in out
    assert "2 round(s) trained" in out and "epsilon spent 1.25" in out
    assert "1 refusal(s), 1 blocked" in out and "BLOCKED by the egress guard" in out
    summary = summarise_audit_log(path=tmp_path / "egress-audit.jsonl", run_id=9).runs[9]
    assert summary.rounds_trained == [1, 3] and summary.rounds[2].outcomes == {"train": "blocked"}
    assert summary.rounds[3].outcomes == {"train": "sent", "evaluate": "refused"}


def test_client_audit_json_and_a_torn_last_line(tmp_path, capsys):
    _record_run(tmp_path)
    with open(tmp_path / "egress-audit.jsonl", "a") as handle:
        handle.write('{"run-id": 9, "arr')
    code = client_main(["audit", "--state-dir", str(tmp_path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["unreadable_lines"] == [7]
    assert set(data["runs"]) == {"9", "10"} and data["runs"]["10"]["array_bytes"] == 0
    assert data["runs"]["9"]["rounds-trained"] == [1, 3] and data["runs"]["9"]["server"] == "fl.example:9092"


def test_client_audit_names_a_missing_log(tmp_path, capsys):
    assert client_main(["audit", "--state-dir", str(tmp_path / "nothing")]) == 1
    assert "nothing/egress-audit.jsonl does not exist" in capsys.readouterr().err
    assert client_main(["audit"]) == 1
    assert "--state-dir" in capsys.readouterr().err


def test_a_reply_that_cannot_be_audited_is_withheld(tmp_path, flower_identity):
    from client.runtime.handlers import send_reply
    from client.runtime.site_config import SiteConfig

    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    update = RecordDict({"arrays": model_to_arrays(build_model(manual_plan(config).model_config())),
                         "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.4, "steps": 2})})
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("a file where the state directory should be")
    site = SiteConfig(site_id="site-a", datalist=tmp_path / "d.json", state_dir=not_a_directory)
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = send_reply(msg, content=update, context=context, site=site, plan=manual_plan(config))
    assert "arrays" not in reply.content.array_records
    assert reply.content["metrics"]["refused"] == 1
    assert reply.content["site"]["reason"].startswith("AuditLogError")
