"""The egress guard: what may leave a site, what is blocked, and that no reply bypasses it."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client.runtime import handlers
from client.runtime.egress.guard import EgressBlocked, check_reply, expected_parameter_specs
from server.site_replies import sort_replies
from shared.config import RunConfig
from shared.model import build_model
from shared.plan import manual_plan
from shared.protocol import metric_key_allowed
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG

REPO = Path(__file__).resolve().parent.parent
CONFIG = RunConfig.from_mapping(TINY_RUN_CONFIG)


@pytest.fixture(scope="module")
def expected():
    return expected_parameter_specs(manual_plan(CONFIG).model_config())


def _update(**extra_metrics) -> RecordDict:
    arrays = model_to_arrays(build_model(manual_plan(CONFIG).model_config()))
    metrics = MetricRecord({"num-examples": 4, "train-loss": 0.5, "steps": 2, **extra_metrics})
    return RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"site-id": "site-a"})})


def test_specs_are_the_models_state_dict(expected):
    state = build_model(manual_plan(CONFIG).model_config()).state_dict()
    assert list(expected) == list(state)
    assert all(expected[k].shape == tuple(v.shape) for k, v in state.items())
    assert {spec.dtype for spec in expected.values()} == {"float32"}


def test_specs_are_kept_per_architecture_and_cannot_be_changed(expected):
    import dataclasses

    assert expected_parameter_specs(manual_plan(CONFIG).model_config()) is expected  # built once per process
    three_classes = expected_parameter_specs(dataclasses.replace(manual_plan(CONFIG).model_config(), num_classes=3))
    assert list(three_classes) == list(expected)
    assert [s.shape for s in three_classes.values()] != [s.shape for s in expected.values()]
    with pytest.raises(TypeError):
        expected["extra"] = expected[next(iter(expected))]  # type: ignore[index]


def test_a_real_update_and_evaluation_pass(expected):
    check_reply(_update(epsilon=1.5, **{"epsilon-round": 0.3, "train-seconds": 2.0}),
                message_type="train", expected=expected)
    metrics = {"num-examples": 2, "dice": 0.8, "loss": 0.3, "dice-class-1": 0.8,
               "hd95": 3.0, "hd95-class-1": 3.0}
    evaluation = RecordDict({"metrics": MetricRecord(metrics)})
    check_reply(evaluation, message_type="evaluate", expected=None)


def test_an_extra_array_such_as_an_image_batch_is_blocked(expected):
    content = _update()
    content["arrays"]["image-batch"] = Array(np.zeros((2, 1, 32, 32), dtype=np.float32))
    with pytest.raises(EgressBlocked, match="array 'image-batch' is not a model parameter"):
        check_reply(content, message_type="train", expected=expected)


def test_an_image_in_a_second_array_record_is_blocked(expected):
    content = _update()
    content["images"] = ArrayRecord({"x": torch.zeros(1, 32, 32)})
    with pytest.raises(EgressBlocked, match="record 'images'"):
        check_reply(content, message_type="train", expected=expected)


@pytest.mark.parametrize(("name", "change", "message"), [
    ("model.0.conv.weight", lambda t: t.reshape(-1), "expected \\(4, 1, 3, 3\\) float32"),
    ("model.0.conv.weight", lambda t: t.double(), "float64"),
])
def test_a_parameter_with_another_shape_or_dtype_is_blocked(expected, name, change, message):
    content = _update()
    content["arrays"][name] = Array(change(torch.from_numpy(content["arrays"][name].numpy())))
    with pytest.raises(EgressBlocked, match=message):
        check_reply(content, message_type="train", expected=expected)


def test_bytes_hidden_after_an_arrays_values_are_blocked(expected):
    content = _update()
    honest = content["arrays"]["model.0.conv.bias"]
    content["arrays"]["model.0.conv.bias"] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                                                   data=honest.data + b"patient-0042 scan bytes")
    with pytest.raises(EgressBlocked, match="bytes beyond its values"):
        check_reply(content, message_type="train", expected=expected)


def test_missing_parameters_and_weights_in_an_evaluate_reply_are_blocked(expected):
    content = _update()
    del content["arrays"]["model.2.conv.bias"]
    with pytest.raises(EgressBlocked, match="'model.2.conv.bias' is missing"):
        check_reply(content, message_type="train", expected=expected)
    with pytest.raises(EgressBlocked, match="'evaluate' reply may not carry arrays"):
        check_reply(_update(), message_type="evaluate", expected=expected)


@pytest.mark.parametrize(("content", "message"), [
    (RecordDict({"metrics": MetricRecord({"dice": [0.1, 0.9]})}), "metric 'dice' is not a scalar"),
    (RecordDict({"metrics": MetricRecord({"patient-age": 54})}), "'patient-age' is not on the allow-list"),
    (RecordDict({"metrics": MetricRecord({"dice-class-x": 0.5})}), "'dice-class-x' is not on the allow-list"),
    (RecordDict({"site": ConfigRecord({"reason": "x" * 301})}), "301 characters \\(limit 300\\)"),
    (RecordDict({"site": ConfigRecord({"file": "case_001.nii.gz"})}), "site key 'file'"),
    (RecordDict({"site": ConfigRecord({"reason": b"raw"})}), "not a string"),
    (RecordDict({"config": ConfigRecord({"site-id": "a"})}), "record 'config'"),
])
def test_metrics_and_site_values_off_the_allow_list_are_blocked(content, message):
    with pytest.raises(EgressBlocked, match=message):
        check_reply(content, message_type="evaluate", expected=None)


def _message(kind: str) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 3})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(tmp_path: Path, datalist: Path | str = "/nowhere/datalist.json") -> Context:
    node_config = {"site-id": "site-a", "datalist": str(datalist), "state-dir": str(tmp_path / "state"),
                   "require-dp": False}
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=dict(TINY_RUN_CONFIG))


@pytest.mark.parametrize(("kind", "content", "logged"), [
    ("train", "image", "array 'image-batch' is not a model parameter"),
    ("evaluate", RecordDict({"metrics": MetricRecord({"dice": [0.2, 0.4]})}), "'dice' is not a scalar"),
    ("evaluate", RecordDict({"metrics": MetricRecord({"mrn": 123456})}), "metric key 'mrn'"),
])
def test_a_blocked_reply_becomes_a_refusal_the_server_sees(tmp_path, caplog, flower_identity,
                                                           kind, content, logged):
    if content == "image":
        content = _update()
        content["arrays"]["image-batch"] = Array(np.ones((2, 1, 32, 32), dtype=np.float32))
    msg = _message(kind)
    site = handlers.resolve_site(_context(tmp_path).node_config, "")
    with caplog.at_level(logging.CRITICAL, logger="fedseg.client"):
        reply = handlers.send_reply(msg, content=content, context=_context(tmp_path), site=site,
                                    plan=manual_plan(CONFIG))

    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("EGRESS BLOCKED" in line and logged in line for line in critical)
    assert list(reply.content.array_records) == []
    seen = sort_replies([reply], {})
    assert seen.accepted == [] and logged in seen.refused["site-a"]
    entry = json.loads((tmp_path / "state" / "egress-audit.jsonl").read_text().splitlines()[-1])
    assert entry["blocked"] and logged in entry["blocked-reason"] and entry["arrays"] == []
    assert entry["round"] == 3 and entry["run-id"] == 11 and entry["message-type"] == kind
    withheld = entry["withheld"]  # what would have left, for the site's eyes
    assert withheld["metrics"] == {k: v for r in content.metric_records.values() for k, v in r.items()}
    withheld_bytes = {a["name"]: a["bytes"] for a in withheld["arrays"]}
    assert withheld_bytes.get("image-batch") == (2 * 32 * 32 * 4 if kind == "train" else None)


def test_a_training_code_path_that_adds_the_image_batch_is_blocked(two_sites, tmp_path, monkeypatch,
                                                                   flower_identity):
    real_train = handlers._train

    def leaky_train(msg, context, config, site, plan):
        content = real_train(msg, context, config, site, plan)
        content["arrays"]["image-batch"] = Array(np.random.default_rng(0).random((2, 1, 32, 32)))
        return content

    monkeypatch.setattr(handlers, "_train", leaky_train)
    msg = _message(MessageType.TRAIN)
    msg.content["arrays"] = model_to_arrays(build_model(manual_plan(CONFIG).model_config()))
    reply = handlers.handle_train(msg, _context(tmp_path, two_sites[0]))
    assert reply.content.metric_records["metrics"]["refused"] == 1
    assert "EgressBlocked" in reply.content.config_records["site"]["reason"]
    assert "arrays" not in reply.content.array_records


def test_an_unexpected_exception_becomes_a_refusal_without_its_message(tmp_path, monkeypatch,
                                                                       flower_identity):
    def crash(msg, context, config, site, plan):
        raise RuntimeError("patient Jane Doe, MRN 0042")

    monkeypatch.setattr(handlers, "_evaluate", crash)
    reply = handlers.handle_evaluate(_message(MessageType.EVALUATE), _context(tmp_path))
    reason = reply.content.config_records["site"]["reason"]
    assert "RuntimeError" in reason and "Jane" not in reason and not reply.has_error()


def test_every_message_the_client_builds_is_built_in_send_reply():
    builders = []
    for path in sorted((REPO / "client").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("Message", "create_reply", "create_error_reply"):
                    builders.append((path.name, function.name))
    # besides send_reply, only the plain reply handed to Flower's secaggplus_mod inside the site (which
    # masks it; what leaves is rebuilt from the masked record and goes through send_reply)
    assert builders == [("replies.py", "send_reply"), ("secagg.py", "run_secure_stage"),
                        ("secagg.py", "masked_training")]


def test_the_allow_list_is_documented_for_hospital_it():
    readme = (REPO / "README.md").read_text()
    from shared.protocol import METRIC_KEYS, SITE_KEY_LIMITS

    for key in (*METRIC_KEYS, *SITE_KEY_LIMITS, "dice-class-N", "hd95-class-N"):
        assert f"`{key}`" in readme, key
    assert metric_key_allowed("dice-class-12") and not metric_key_allowed("dice-class-")
