"""The ClientApp's train/evaluate handlers on tiny real data, and their refusals."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.runtime.handlers import handle_evaluate, handle_train
from client.runtime.site_config import resolve_site
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import build_model
from shared.plan import manual_plan
from shared.weights import arrays_to_state_dict, model_to_arrays
from tests.conftest import TINY_RUN_CONFIG

NO_DP = {"dp": False}


def _context(datalist, run_config=None, **node):
    import tempfile

    run_config = dict(TINY_RUN_CONFIG, **NO_DP) if run_config is None else run_config
    state_dir = tempfile.mkdtemp(prefix="fedseg-state-")  # never inside the shared read-only test data
    node_config = {"site-id": "site-a", "datalist": str(datalist), "require-dp": False, "state-dir": state_dir,
                   **node}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=dict(run_config))


def _message(kind, config=None):
    model = build_model(manual_plan(RunConfig.from_mapping(config or TINY_RUN_CONFIG)).model_config())
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=kind), model


def test_train_returns_updated_weights_with_the_same_names(two_sites, flower_identity):
    msg, model = _message(MessageType.TRAIN)
    reply = handle_train(msg, _context(two_sites[0]))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] > 0 and metrics["train-loss"] > 0 and "refused" not in metrics
    sent = arrays_to_state_dict(reply.content.array_records["arrays"])
    before = model.state_dict()
    assert list(sent) == list(before)
    assert any(not torch.equal(sent[k], before[k]) for k in before)
    assert reply.content.config_records["site"]["site-id"] == "site-a"


def test_training_reduces_the_loss(two_sites, flower_identity):
    config = dict(TINY_RUN_CONFIG, **NO_DP, **{"local-steps": 2})
    short = handle_train(_message(MessageType.TRAIN, config)[0], _context(two_sites[0], config))
    config = dict(TINY_RUN_CONFIG, **NO_DP, **{"local-steps": 30})
    long = handle_train(_message(MessageType.TRAIN, config)[0], _context(two_sites[0], config))
    assert long.content.metric_records["metrics"]["train-loss"] < short.content.metric_records["metrics"]["train-loss"]


def test_evaluate_returns_dice_between_0_and_1(two_sites, flower_identity):
    msg, _ = _message(MessageType.EVALUATE)
    reply = handle_evaluate(msg, _context(two_sites[1]))
    metrics = reply.content.metric_records["metrics"]
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["num-examples"] >= 1
    assert metrics["dice-class-1"] == metrics["dice"]
    assert metrics["hd95-class-1"] == metrics["hd95"] or math.isnan(metrics["hd95"])
    assert math.isnan(metrics["hd95"]) or metrics["hd95"] >= 0.0
    assert "arrays" not in reply.content.array_records


def _corrupt_copy(datalist, tmp_path, edit):
    site = tmp_path / "site"
    shutil.copytree(datalist.parent, site)
    data = json.loads((site / "datalist.json").read_text())
    target = site / data["training"][0]["label"]
    edit(site, data, target)
    return site / "datalist.json", target


def test_label_out_of_range_is_refused_naming_the_file(two_sites, tmp_path, flower_identity):
    def edit(site, data, label_path):
        label = nib.load(label_path)
        values = np.asarray(label.dataobj).copy()
        values[0, 0] = 5
        nib.save(nib.Nifti1Image(values, label.affine), label_path)

    datalist, bad = _corrupt_copy(two_sites[0], tmp_path, edit)
    reply = handle_train(_message(MessageType.TRAIN)[0], _context(datalist))
    assert reply.content.metric_records["metrics"]["refused"] == 1
    reason = reply.content.config_records["site"]["reason"]
    assert "outside the configured classes" in reason and bad.name in reason
    assert str(bad.parent) not in reason  # folder names (often patient ids) stay at the site


def test_corrupt_image_is_refused_naming_the_file(two_sites, tmp_path, flower_identity):
    def edit(site, data, label_path):
        image = site / data["training"][0]["image"]
        image.write_bytes(image.read_bytes()[:100])

    datalist, _ = _corrupt_copy(two_sites[0], tmp_path, edit)
    reply = handle_train(_message(MessageType.TRAIN)[0], _context(datalist))
    assert reply.content.metric_records["metrics"]["refused"] == 1
    assert "case_" in reply.content.config_records["site"]["reason"]


def test_missing_datalist_node_config_is_refused(flower_identity):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=dict(TINY_RUN_CONFIG))
    reply = handle_train(_message(MessageType.TRAIN)[0], context)
    assert "datalist" in reply.content.config_records["site"]["reason"]


def test_node_config_wins_over_simulation_manifest(tmp_path):
    manifest = tmp_path / "sites.json"
    manifest.write_text(json.dumps({"sites": [{"site-id": "sim", "datalist": "/sim/d.json"}]}))
    own = resolve_site({"partition-id": 0, "datalist": "/real/d.json", "site-id": "real"}, str(manifest))
    assert own.site_id == "real"
    simulated = resolve_site({"partition-id": 0}, str(manifest))
    assert simulated.site_id == "sim" and str(simulated.datalist) == "/sim/d.json"
    with pytest.raises(ConfigError, match="partition-id 3"):
        resolve_site({"partition-id": 3}, str(manifest))


def test_a_rewritten_simulation_manifest_is_read_again(tmp_path):
    import os

    manifest = tmp_path / "sites.json"
    manifest.write_text(json.dumps({"sites": [{"site-id": "first", "datalist": "/a/d.json"}]}))
    assert resolve_site({"partition-id": 0}, str(manifest)).site_id == "first"
    manifest.write_text(json.dumps({"sites": [{"site-id": "second", "datalist": "/b/d.json"}]}))
    os.utime(manifest, ns=(1, 1))  # a new version even on a file system with coarse timestamps
    assert resolve_site({"partition-id": 0}, str(manifest)).site_id == "second"
    manifest.write_text("not json")
    with pytest.raises(ConfigError, match="not a sites manifest"):
        resolve_site({"partition-id": 0}, str(manifest))


def test_a_datalist_disagreeing_with_the_model_is_refused(two_sites, tmp_path, flower_identity):
    def edit(site, data, label_path):
        data["modality"] = {"0": "T1", "1": "FLAIR"}
        (site / "datalist.json").write_text(json.dumps(data))

    datalist, _ = _corrupt_copy(two_sites[0], tmp_path, edit)
    for handle in (handle_train, handle_evaluate):
        reply = handle(_message(MessageType.TRAIN)[0], _context(datalist))
        reason = reply.content.config_records["site"]["reason"]
        assert reply.content.metric_records["metrics"]["refused"] == 1
        assert datalist.name in reason and str(datalist.parent) not in reason and "in-channels = 1" in reason


def test_a_site_of_dicom_series_trains_and_fills_its_cache(tmp_path, flower_identity):
    from tests.data_cases import ct_volume, write_datalist, write_dicom_case

    entries = [write_dicom_case(tmp_path, f"d{i}", *ct_volume(i)) for i in range(3)]
    datalist = write_datalist(tmp_path, entries)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=dict(TINY_RUN_CONFIG),
                      node_config={"datalist": str(datalist), "cache-dir": str(tmp_path / "cache"),
                                   "require-dp": False})
    reply = handle_train(_message(MessageType.TRAIN)[0], context)
    assert reply.content.metric_records["metrics"]["num-examples"] == 2
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_cache_dir_is_node_config_with_a_default_under_the_state_dir(tmp_path):
    from client.runtime.site_config import SiteConfig

    default = SiteConfig.from_node_config({"datalist": str(tmp_path / "d.json"), "state-dir": str(tmp_path / "s")})
    assert default.cache_dir == tmp_path / "s" / "cache"
    own = SiteConfig.from_node_config({"datalist": str(tmp_path / "d.json"), "cache-dir": str(tmp_path / "c")})
    assert own.cache_dir == tmp_path / "c"


def test_the_loss_scores_a_missed_lesion_as_a_full_dice_miss():
    """Dice leaves background out: predicting "no lesion" on a lesion patch costs Dice 1, not 0.5."""
    from client.training.local import make_loss

    label = torch.zeros(2, 1, 16, 16)
    label[:, :, 4:8, 4:8] = 1
    nothing = torch.stack([torch.full((16, 16), 20.0), torch.full((16, 16), -20.0)]).expand(2, 2, 16, 16)
    perfect = torch.cat([(1 - label) * 40 - 20, label * 40 - 20], dim=1)
    loss = make_loss()
    assert float(loss.dice(nothing, label)) == pytest.approx(1.0, abs=1e-3)
    assert float(loss.dice(perfect, label)) == pytest.approx(0.0, abs=1e-3)
