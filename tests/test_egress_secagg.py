"""The egress guard on secure-aggregation replies: each stage's protocol record and nothing else."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.runtime.egress.guard import EgressBlocked, check_reply, expected_parameter_specs
from client.runtime.handlers import send_reply
from client.runtime.secagg import SecureStep
from client.runtime.site_config import SiteConfig
from tests.conftest import tiny_plan

SPECS = expected_parameter_specs(tiny_plan().model_config())


def _npy(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, values, allow_pickle=False)
    return out.getvalue()


def _masked(*, dtype=np.int64, extra: bytes = b"", drop_last: bool = False) -> list[bytes]:
    shapes = [(1,)] + [spec.shape for spec in SPECS.values()]
    payloads = [_npy(np.full(shape, 7, dtype=dtype)) for shape in shapes]
    payloads[-1] += extra
    return payloads[:-1] if drop_last else payloads


def _content(stage_record: dict, **records) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage_record), "site": ConfigRecord({"site-id": "a"}),
                       **records})


SHARE_REQUEST = {"11": [b"k1", b"k2"], "12": [b"k1", b"k2"], Key.STAGE: Stage.SHARE_KEYS}
UNMASK_REQUEST = {Key.ACTIVE_NODE_ID_LIST: [11, 12], Key.DEAD_NODE_ID_LIST: [13], Key.STAGE: Stage.UNMASK}
ALLOWED = [
    (Stage.SETUP, {}, {Key.PUBLIC_KEY_1: b"p" * 178, Key.PUBLIC_KEY_2: b"q" * 178}),
    (Stage.SHARE_KEYS, SHARE_REQUEST, {Key.DESTINATION_LIST: [12], Key.CIPHERTEXT_LIST: [b"c" * 600]}),
    (Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: _masked()}),
    (Stage.UNMASK, UNMASK_REQUEST, {Key.NODE_ID_LIST: [11, 13], Key.SHARE_LIST: [b"s" * 60, b"t" * 300]}),
]


@pytest.mark.parametrize(("stage", "request_record", "reply"), ALLOWED, ids=[a[0] for a in ALLOWED])
def test_each_stage_may_send_exactly_its_protocol_record(stage, request_record, reply):
    check_reply(_content(reply), message_type="train", expected=SPECS,
                step=SecureStep(stage=stage, request=request_record))


BLOCKED = [
    ("an extra key", Stage.SETUP, {}, {Key.PUBLIC_KEY_1: b"p", Key.PUBLIC_KEY_2: b"q", "note": b"x"}, "holds keys"),
    ("an oversized key", Stage.SETUP, {}, {Key.PUBLIC_KEY_1: b"p" * 5000, Key.PUBLIC_KEY_2: b"q"}, "bytes"),
    ("a share for an unlisted node", Stage.SHARE_KEYS, SHARE_REQUEST,
     {Key.DESTINATION_LIST: [99], Key.CIPHERTEXT_LIST: [b"c"]}, "did not list"),
    ("unpaired shares", Stage.SHARE_KEYS, SHARE_REQUEST,
     {Key.DESTINATION_LIST: [11, 12], Key.CIPHERTEXT_LIST: [b"c"]}, "one length"),
    ("a float (plain) vector", Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: _masked(dtype=np.float32)},
     "expected integers"),
    ("a vector short of a parameter", Stage.COLLECT_MASKED_VECTORS, {},
     {Key.MASKED_PARAMETERS: _masked(drop_last=True)}, "must be"),
    ("bytes after a masked array", Stage.COLLECT_MASKED_VECTORS, {},
     {Key.MASKED_PARAMETERS: _masked(extra=b"patient")}, "beyond its values"),
    ("a share of an unlisted node", Stage.UNMASK, UNMASK_REQUEST,
     {Key.NODE_ID_LIST: [11, 77], Key.SHARE_LIST: [b"s", b"t"]}, "did not list"),
    ("a vector at the unmask stage", Stage.UNMASK, UNMASK_REQUEST, {Key.MASKED_PARAMETERS: _masked()},
     "holds keys"),
]


@pytest.mark.parametrize(("stage", "request_record", "reply", "why"), [b[1:] for b in BLOCKED],
                         ids=[b[0] for b in BLOCKED])
def test_anything_else_in_a_protocol_reply_is_blocked(stage, request_record, reply, why):
    with pytest.raises(EgressBlocked, match=why):
        check_reply(_content(reply), message_type="train", expected=SPECS,
                    step=SecureStep(stage=stage, request=request_record))


def test_plain_weights_never_leave_with_a_protocol_reply():
    weights = ArrayRecord({name: Array(np.zeros(spec.shape, dtype=spec.dtype)) for name, spec in SPECS.items()})
    content = _content({Key.MASKED_PARAMETERS: _masked()}, arrays=weights)
    with pytest.raises(EgressBlocked, match="'arrays'"):
        check_reply(content, message_type="train", expected=SPECS,
                    step=SecureStep(stage=Stage.COLLECT_MASKED_VECTORS, request={}))


def test_a_protocol_record_outside_the_protocol_is_blocked():
    content = _content({Key.PUBLIC_KEY_1: b"p", Key.PUBLIC_KEY_2: b"q"})
    with pytest.raises(EgressBlocked, match="secaggplus_configs"):
        check_reply(content, message_type="train", expected=SPECS)
    with pytest.raises(EgressBlocked, match="secaggplus_configs"):
        check_reply(content, message_type="evaluate", expected=None,
                    step=SecureStep(stage=Stage.SETUP, request={}))


def test_a_blocked_protocol_reply_becomes_a_refusal_and_is_audited(tmp_path, flower_identity):
    request = Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP}),
                                          "config": ConfigRecord({"server-round": 3})}),
                      dst_node_id=5, message_type=MessageType.TRAIN)
    step = SecureStep.of(request)
    site = SiteConfig(site_id="a", datalist=tmp_path / "d.json", state_dir=tmp_path / "state")
    context = Context(run_id=9, node_id=5, node_config={}, state=RecordDict(), run_config={})
    content = _content({Key.PUBLIC_KEY_1: b"p", Key.PUBLIC_KEY_2: b"q", "smuggled": b"x"},
                       metrics=MetricRecord({"num-examples": 3}))
    reply = send_reply(request, content=content, context=context, site=site, plan=None, step=step)

    assert RECORD_KEY_CONFIGS not in reply.content.config_records
    assert reply.content["metrics"]["refused"] == 1
    [entry] = [json.loads(line) for line in (tmp_path / "state" / "egress-audit.jsonl").open()]
    assert entry["blocked"] and entry["secagg-stage"] == Stage.SETUP and entry["round"] == 3
    assert "holds keys" in entry["blocked-reason"]
