"""``python -m client finetune``: a personal model at the site, DP charged to the site's own ledger."""

from __future__ import annotations

import pytest
import torch

from client.__main__ import main
from client.commands.finetune import FINETUNE_RUN_ID, finetune
from client.runtime.site_config import SiteConfig
from client.training.privacy_ledger import PrivacyBudgetExceeded, PrivacyLedger
from shared.local_weights import frozen_weight_names
from shared.model import build_model
from shared.model_file import load_model, save_model_file
from shared.model_sources import file_sha256
from tests.conftest import tiny_config_with, tiny_plan


def _global_model(path):
    torch.manual_seed(8)
    model = build_model(tiny_plan().model_config())
    save_model_file(path, state_dict=model.state_dict(), model_config=tiny_plan().model_config(),
                    extra={"plan": tiny_plan().to_dict(), "run_config": tiny_config_with().to_mapping()})
    return model


def _site(datalist, state_dir, **policy):
    return SiteConfig.from_node_config({"datalist": str(datalist), "state-dir": str(state_dir), **policy})


def test_dp_finetuning_is_charged_to_the_sites_ledger(two_sites, tmp_path):
    _global_model(tmp_path / "global.pt")
    site = _site(two_sites[0], tmp_path / "state")
    ledger = PrivacyLedger(site.state_dir, delta=site.dp_delta)
    ledger.charge(run_id=77, server_round=1, noise_multiplier=2.0, sample_rate=0.5, steps=10, max_epsilon=8.0)
    federated = ledger.epsilon()

    result = finetune(model_path=tmp_path / "global.pt", site=site, out=tmp_path / "mine.pt", epochs=2, dp=True,
                      epsilon=1.0)
    entries = ledger.entries()
    assert [(e.run_id, e.server_round) for e in entries] == [(77, 1), (FINETUNE_RUN_ID, 1)]
    assert entries[-1].steps == result.steps > 0
    assert result.epsilon == pytest.approx(ledger.epsilon()) and federated < result.epsilon <= federated + 1.0 + 0.02
    _, payload = load_model(tmp_path / "mine.pt")  # a model file predict can use, sha256 verified
    assert payload["finetuned_from"]["sha256"] == file_sha256(tmp_path / "global.pt")
    assert payload["finetune"]["dp"] == 1 and payload["plan"]["local_steps"] == result.steps


def test_dp_finetuning_past_the_budget_is_refused_and_writes_nothing(two_sites, tmp_path):
    _global_model(tmp_path / "global.pt")
    site = _site(two_sites[0], tmp_path / "state", **{"max-epsilon": 0.5})
    with pytest.raises(PrivacyBudgetExceeded, match="max-epsilon 0.5"):
        finetune(model_path=tmp_path / "global.pt", site=site, out=tmp_path / "mine.pt", epochs=1, dp=True,
                 epsilon=1.0)
    assert not (tmp_path / "mine.pt").exists() and not PrivacyLedger(site.state_dir, delta=1e-5).entries()


def test_the_command_fine_tunes_the_decoder_only(two_sites, tmp_path, capsys):
    start = _global_model(tmp_path / "global.pt").state_dict()
    code = main(["finetune", "--model", str(tmp_path / "global.pt"), "--datalist", str(two_sites[1]),
                 "--out", str(tmp_path / "mine.pt"), "--epochs", "2", "--train-layers", "decoder",
                 "--state-dir", str(tmp_path / "state")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "global model" in printed and "personal model" in printed
    tuned, _ = load_model(tmp_path / "mine.pt")
    frozen = frozen_weight_names(tiny_plan().model_config(), train_layers="decoder")
    after = tuned.state_dict()
    assert all(torch.equal(after[n], start[n]) for n in frozen)
    assert any(not torch.equal(after[n], start[n]) for n in set(start) - frozen)
    assert not PrivacyLedger(tmp_path / "state", delta=1e-5).entries()  # no DP asked: nothing charged
    assert main(["finetune", "--model", str(tmp_path / "global.pt"), "--datalist", str(two_sites[1]),
                 "--out", str(tmp_path / "x.pt"), "--dp"]) == 1
    assert "'--epsilon'" in capsys.readouterr().err
