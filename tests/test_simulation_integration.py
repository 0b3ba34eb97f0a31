"""A real 2-site, 1-round federation through Flower's simulation engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared.model_file import load_model
from simulations.__main__ import build_parser
from simulations.api import SimulationSpec, run_simulation
from tests.conftest import TINY_RUN_CONFIG


def _processes_with_env(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue  # a zombie is dead; PID 1 of a container may never reap it
            if fragment.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_two_sites_one_round_through_flower(tmp_path):
    spec = SimulationSpec(sites=2, rounds=1, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config=dict(TINY_RUN_CONFIG))
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    assert summary["rounds"] == 1 and summary["sites"] == ["hospital-01", "hospital-02"]
    assert 0.0 <= summary["final_dice"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rows} == {(1, "hospital-01"), (1, "hospital-02"), (1, "global")}
    for row in rows:
        assert {"round", "site", "dice", "loss"} <= set(row)
    site_rows = [r for r in rows if r["site"] != "global"]
    assert all(r["train-status"] == "ok" and r["evaluate-status"] == "ok" for r in site_rows)
    model, payload = load_model(run_dir / "global_model.pt")
    assert payload["round"] == 1 and payload["model_config"]["channels"] == [4, 8]
    assert _processes_with_env(str(run_dir / "flwr-home")) == []


def test_cli_documents_the_main_options():
    text = build_parser().format_help()
    for option in ("--sites", "--rounds", "--spatial-dims", "--seed", "--out"):
        assert option in text


@pytest.mark.integration
def test_a_site_with_broken_data_refuses_and_the_federation_goes_on(tmp_path, two_sites):
    import shutil

    import nibabel as nib
    import numpy as np

    datalists = []
    for name, source in (("good", two_sites[0]), ("broken", two_sites[1])):
        site_dir = tmp_path / name
        shutil.copytree(source.parent, site_dir)
        datalists.append(site_dir / f"{name}.json")
        shutil.copy(site_dir / "datalist.json", datalists[-1])
    training = json.loads(datalists[1].read_text())["training"]
    label_path = tmp_path / "broken" / training[0]["label"]
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values[0, 0] = 9
    nib.save(nib.Nifti1Image(values, label.affine), label_path)

    spec = SimulationSpec(seed=1, out=tmp_path / "runs", timeout_s=600, datalists=tuple(datalists),
                          run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2}))
    summary = run_simulation(spec, echo=False)

    rows = [json.loads(line) for line in (tmp_path / "runs" / "latest" / "metrics.jsonl").read_text().splitlines()]
    broken = [r for r in rows if r["site"] == "broken"]
    good = [r for r in rows if r["site"] == "good"]
    assert summary["rounds"] == 2 and len(broken) == 2 and len(good) == 2
    assert all(r["train-status"] == "refused" and label_path.name in r["train-reason"] for r in broken)
    assert all(r["train-status"] == "ok" for r in good)
    assert summary["per_site"]["good"]["round"] == 2


@pytest.mark.integration
def test_a_site_past_its_budget_refuses_and_the_others_train_with_dp(tmp_path):
    spec = SimulationSpec(sites=2, rounds=2, seed=2, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config=dict(TINY_RUN_CONFIG, **{"dp": True, "num-rounds": 2}), max_epsilon=20.0,
                          site_node_config={"hospital-02": {"max-epsilon": 0.5}})
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spender = [r for r in rows if r["site"] == "hospital-01"]
    capped = [r for r in rows if r["site"] == "hospital-02"]
    assert [r["train-status"] for r in spender] == ["ok", "ok"]
    assert 0 < spender[0]["epsilon"] < spender[1]["epsilon"] <= 20.0
    assert spender[0]["epsilon-round"] == pytest.approx(spender[0]["epsilon"])
    assert all(r["train-status"] == "refused" and "max-epsilon" in r["train-reason"] for r in capped)
    assert summary["rounds"] == 2 and summary["epsilon"]["hospital-01"]["epsilon"] == spender[1]["epsilon"]
    assert summary["epsilon"]["hospital-02"] is None
    ledger = json.loads((run_dir / "state" / "hospital-01" / "privacy-ledger.json").read_text())
    assert [e["server_round"] for e in ledger["entries"]] == [1, 2]
    assert not (run_dir / "state" / "hospital-02" / "privacy-ledger.json").exists()
