"""shared/protocol.py is the one contract: the egress allow-list is derived from it, both sides read it,
and the node config it describes survives the trip through Flower's --node-config and the sites manifest."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import parse_config_args
from flwr.serverapp.strategy import FedAvg

from client.runtime.egress.guard import EgressBlocked, check_metrics, check_reply, check_site
from client.runtime.replies import refusal_content
from client.runtime.site_config import SiteConfig
from deploy.processes import node_config_argument
from server.site_replies import refused_because, site_of
from shared import protocol
from shared.protocol import (
    METRIC_KEYS,
    NODE_CONFIG_KEYS,
    NODE_FAULT,
    REASON,
    SITE_ID,
    SITE_KEY_LIMITS,
    is_refusal,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_egress_allow_list_is_the_protocol():
    check_metrics(MetricRecord({key: 1.0 for key in METRIC_KEYS}))
    check_metrics(MetricRecord({"dice-class-3": 0.5, "hd95-class-2-ci-high": 4.0, "dice-ci-low": 0.1}))
    check_site(ConfigRecord({key: "x" * limit for key, limit in SITE_KEY_LIMITS.items()}))
    with pytest.raises(EgressBlocked, match="not on the allow-list"):
        check_metrics(MetricRecord({"patient-count": 3.0}))  # named nowhere in the protocol
    with pytest.raises(EgressBlocked, match="not on the allow-list"):
        check_site(ConfigRecord({"hostname": "ward-3"}))
    with pytest.raises(EgressBlocked, match="characters"):
        check_site(ConfigRecord({REASON: "x" * (SITE_KEY_LIMITS[REASON] + 1)}))


def test_message_kinds_and_record_names_are_flowers(flower_identity):
    assert (protocol.TRAIN, protocol.EVALUATE) == (MessageType.TRAIN, MessageType.EVALUATE)
    assert protocol.FINGERPRINT_QUERY == f"{MessageType.QUERY}.{protocol.FINGERPRINT_ACTION}"
    flower = FedAvg()  # what Flower's strategies read from a reply unless told otherwise
    assert (flower.weighted_by_key, flower.arrayrecord_key, flower.configrecord_key) == (
        protocol.NUM_EXAMPLES, protocol.ARRAYS, protocol.CONFIG)


def test_a_refusal_leaves_the_site_and_is_read_by_the_server(flower_identity):
    asked = Message(content=RecordDict(), dst_node_id=7, message_type=protocol.TRAIN)
    content = refusal_content(asked, None, "PrivacyBudgetExceeded: privacy budget: /data/ward/case-1 is over")
    check_reply(content, message_type=protocol.TRAIN, expected=None)  # the guard lets it out
    reply = Message(content=content, reply_to=asked)
    assert is_refusal(dict(content[protocol.METRICS]))
    reason = refused_because(reply)
    assert reason == "PrivacyBudgetExceeded: privacy budget: case-1 is over" and protocol.is_budget_refusal(reason)
    assert site_of(reply, {}) == "unknown"  # no site resolved: the label the site sends instead of its id
    plain = Message(content=RecordDict({protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 3}),
                                        protocol.SITE: ConfigRecord({SITE_ID: "ward"})}), reply_to=asked)
    assert refused_because(plain) is None and site_of(plain, {}) == "ward"


def test_the_node_config_round_trips_through_flower_and_the_sites_manifest(tmp_path):
    site = SiteConfig(site_id="ward 3", datalist=tmp_path / "my data" / "datalist.json",
                      state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", max_epsilon=2.5, dp_delta=1e-6,
                      require_dp=False, require_secure_aggregation=True)
    values = site.to_node_config()
    assert set(values) <= set(NODE_CONFIG_KEYS) and NODE_FAULT not in values
    assert SiteConfig.from_node_config(parse_config_args([node_config_argument(values)])) == site  # --node-config
    assert SiteConfig.from_node_config(json.loads(json.dumps(values))) == site  # sites.json
    defaults = SiteConfig(site_id="a", datalist=tmp_path / "d.json", state_dir=tmp_path)
    for key, value in defaults.to_node_config().items():
        if NODE_CONFIG_KEYS[key].default is not None:
            assert value == NODE_CONFIG_KEYS[key].default, key


def test_every_node_config_key_is_documented_for_hospital_it():
    readme = (REPO / "README.md").read_text()
    assert [key for key in NODE_CONFIG_KEYS if f"`{key}`" not in readme] == []


def test_the_deployment_and_the_harness_write_the_node_config_the_site_reads(tmp_path):
    from deploy.processes import NodeSettings
    from simulations.api import SimulationSpec, site_privacy, write_sites_manifest

    node = NodeSettings(site_id="a", datalist=tmp_path / "a.json", state_dir=tmp_path / "a", private_key=None,
                        root_certificates=None, require_dp=False, max_epsilon=3.0)
    expected = dataclasses.replace(node.site(), cache_dir=(tmp_path / "a" / "cache").resolve())  # the default
    assert SiteConfig.from_node_config(parse_config_args([node.node_config()])) == expected
    manifest = write_sites_manifest(tmp_path, [("b", tmp_path / "b.json")],
                                    privacy=site_privacy(SimulationSpec(max_epsilon=4.0)))
    [entry] = json.loads(manifest.read_text())["sites"]
    read = SiteConfig.from_node_config(entry)
    assert (read.site_id, read.max_epsilon, read.require_dp, read.state_dir) == ("b", 4.0, True,
                                                                                (tmp_path / "state" / "b").resolve())


def test_a_run_folders_sites_are_read_back_as_its_nodes_read_them(tmp_path):
    from simulations.api import read_sites_manifest, write_sites_manifest

    manifest = write_sites_manifest(tmp_path, [("b", tmp_path / "b.json"), ("c", tmp_path / "c.json")])
    assert read_sites_manifest(tmp_path) == [SiteConfig.from_node_config(e)
                                             for e in json.loads(manifest.read_text())["sites"]]
    assert [(s.site_id, s.cache_dir) for s in read_sites_manifest(tmp_path)] == [
        ("b", (tmp_path / "state" / "b" / "cache").resolve()), ("c", (tmp_path / "state" / "c" / "cache").resolve())]


#: Wire strings that only shared/protocol.py spells out (other formats that reuse a word are listed apart).
WIRE_STRINGS = ('"site-id"', '"num-examples"', '"server-round"', '"proximal-mu"', '"query.fingerprint"',
                '"max-epsilon"', '"dp-delta"', '"require-dp"', '"state-dir"')
OTHER_FORMATS = {  # file -> why it may spell one of them
    "client/runtime/egress/audit_log.py": "the audit entry's own 'site-id' field",
    "client/commands/finetune.py": "the fine-tuned model file's 'finetune' record",
    "server/federation.py": "the global row's 'max-epsilon' (the run folder's column)",
    "server/run_folder.py": "the run folder's columns ('max-epsilon', 'dp-delta' of summary.json)",
    "server/dashboard/pages.py": "reads the run folder's 'max-epsilon' column",
    "shared/fingerprint.py": "the fingerprint's own 'dp-delta' entry",
}


def test_wire_strings_are_spelled_out_only_in_the_protocol():
    found = []
    for package in ("client", "server", "simulations", "deploy", "shared"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = str(path.relative_to(REPO))
            if name == "shared/protocol.py" or name in OTHER_FORMATS:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if any(word in line for word in WIRE_STRINGS) and not re.match(r"\s*(#|\"\"\"|help=)", line):
                    found.append(f"{name}:{number}: {line.strip()}")
    assert found == []
