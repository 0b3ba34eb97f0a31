"""A real 2-site, 1-round federation through Flower's simulation engine."""

from __future__ import annotations

import json

import pytest

from shared.errors import ConfigError
from shared.flower_compat import actor_pipeline
from shared.flower_compat.engine import ANNOUNCEMENT
from shared.model_file import load_model
from simulations.__main__ import build_parser, spec_from_args
from simulations.api import SimulationSpec, run_simulation
from tests.conftest import TINY_RUN_CONFIG, live_processes_mentioning

# nnU-Net's network at a tiny size, planned from the sites' fingerprints (what a real run does by default)
PLANNED_TINY = {**TINY_RUN_CONFIG, "model": "dynunet", "plan": "auto", "channels": "auto", "strides": "auto",
                "num-res-units": -1, "patch-size": "auto", "batch-size": 0, "base-filters": 4, "max-filters": 8,
                "memory-budget-mb": 64}


@pytest.mark.integration
def test_two_sites_one_round_through_flower(tmp_path):
    spec = SimulationSpec(sites=2, rounds=1, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, run_config=dict(PLANNED_TINY))
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    assert summary["rounds"] == 1 and summary["sites"] == ["hospital-01", "hospital-02"]
    assert 0.0 <= summary["final_dice"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rows} == {(1, "hospital-01"), (1, "hospital-02"), (1, "global")}
    for row in rows:
        assert {"round", "site", "dice", "loss", "dice-class-1", "hd95", "hd95-class-1"} <= set(row)
    site_rows = [r for r in rows if r["site"] != "global"]
    assert all(r["train-status"] == "ok" and r["evaluate-status"] == "ok" for r in site_rows)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {site: entry["status"] for site, entry in plan["sites"].items()} == {"hospital-01": "ok", "hospital-02": "ok"}
    assert plan["pooled-fingerprint"]["cases"] == sum(entry["cases"] for entry in plan["sites"].values())
    audit = [json.loads(line) for line in (run_dir / "state" / "hospital-01" / "egress-audit.jsonl").open()]
    assert audit[0]["message-type"] == "query.fingerprint" and audit[0]["metrics"]["cases"] >= 2
    model, payload = load_model(run_dir / "global_model.pt")
    assert payload["round"] == 1 and payload["model_config"]["name"] == "dynunet"
    assert payload["plan"] == plan["plan"] and payload["model_config"]["channels"][0] == 4
    assert payload["final"] and payload["class_names"] == ["background", "lesion"]
    assert set(payload["per_site"]) >= {"hospital-01", "hospital-02"} and payload["sha256"]
    assert live_processes_mentioning(str(run_dir / "flwr-home")) == []
    engine_log = (run_dir / "flower.log").read_text()
    assert ANNOUNCEMENT in engine_log and actor_pipeline.ANNOUNCEMENT in engine_log  # fedseg's engine patches ran
    assert (run_dir / "report.md").exists() and (run_dir / "plots" / "dice.png").exists()
    assert (run_dir / "plots" / "examples.png").stat().st_size > 5000 and list((run_dir / "tb").glob("events.*"))


def test_cli_documents_the_main_options():
    text = build_parser().format_help()
    for option in ("--sites", "--rounds", "--spatial-dims", "--seed", "--out"):
        assert option in text


def test_the_cli_defaults_are_the_specs():
    assert spec_from_args(build_parser().parse_args([])) == SimulationSpec()
    text = " ".join(build_parser().format_help().split())
    assert "--sites-per-round" in text and "(default: 3)" in text and "(default: 60 in 2D, 48 in 3D)" in text
    given = spec_from_args(build_parser().parse_args(["--sites", "7", "--gpus-per-client", "0.25",
                                                      "--slow-seconds", "2", "--local-steps", "3"]))
    assert (given.sites, given.gpus_per_client, given.faults.slow_seconds) == (7, 0.25, 2.0)
    assert given.run_config == {"local-steps": 3}


@pytest.mark.integration
def test_a_site_with_broken_data_refuses_and_the_federation_goes_on(tmp_path, two_sites):
    """Two datalists written here: CT volumes as DICOM series, and a NIfTI site with a broken label."""
    import shutil

    import nibabel as nib
    import numpy as np

    from client.commands.predict import predict_scan
    from tests.data_cases import ct_volume, write_datalist, write_dicom_case

    good_dir = tmp_path / "good"
    entries = [write_dicom_case(good_dir, f"d{i}", *ct_volume(i)) for i in range(4)]
    good = write_datalist(good_dir, entries[:3], validation=entries[3:], name="good.json")
    shutil.copytree(two_sites[1].parent, tmp_path / "broken")
    broken = tmp_path / "broken" / "broken.json"
    shutil.copy(tmp_path / "broken" / "datalist.json", broken)
    training = json.loads(broken.read_text())["training"]
    label_path = tmp_path / "broken" / training[0]["label"]
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values[0, 0] = 9
    nib.save(nib.Nifti1Image(values, label.affine), label_path)

    spec = SimulationSpec(seed=1, out=tmp_path / "runs", timeout_s=600, datalists=(good, broken),
                          run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2}))
    summary = run_simulation(spec, echo=False)

    run_dir = (tmp_path / "runs" / "latest").resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    broken_rows = [r for r in rows if r["site"] == "broken"]
    good_rows = [r for r in rows if r["site"] == "good"]
    assert summary["rounds"] == 2 and len(broken_rows) == 2 and len(good_rows) == 2
    assert all(r["train-status"] == "refused" and label_path.name in r["train-reason"] for r in broken_rows)
    assert all(r["train-status"] == "ok" and r["evaluate-status"] == "ok" for r in good_rows)
    assert all(0.0 <= r["dice"] <= 1.0 and r["num-train-examples"] == 3 for r in good_rows)
    assert summary["per_site"]["good"]["round"] == 2 and 0.0 <= summary["per_site"]["good"]["dice"] <= 1.0
    assert list((run_dir / "state" / "good" / "cache").rglob("*.pt"))  # decoded DICOM cached at the site

    series = good_dir / entries[3]["image"]
    result = predict_scan(model_path=run_dir / "global_model.pt", input_path=series,
                          output_path=tmp_path / "mask.nii.gz", device="cpu")
    assert result.shape == (20, 18, 8) and result.modality == "CT"


def test_datalists_set_channels_and_classes_unless_overridden(tmp_path):
    from simulations.api import build_run_config

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    brats = {"modality": {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}, "training": [],
             "labels": {"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing"}}
    a.write_text(json.dumps(brats))
    b.write_text(json.dumps({"training": []}))  # declares nothing: no disagreement
    spec = SimulationSpec(datalists=(a, b), out=tmp_path)
    config = build_run_config(spec, tmp_path, tmp_path / "sites.json", num_sites=2)
    assert (config.in_channels, config.num_classes) == (4, 4)
    spec = SimulationSpec(datalists=(a, b), out=tmp_path, run_config={"num-classes": 2})
    assert build_run_config(spec, tmp_path, tmp_path / "sites.json", num_sites=2).num_classes == 2
    b.write_text(json.dumps({"training": [], "labels": {"0": "background", "1": "tumour"}}))
    with pytest.raises(ConfigError, match="all sites must agree"):
        build_run_config(SimulationSpec(datalists=(a, b), out=tmp_path), tmp_path, tmp_path / "s.json", num_sites=2)


@pytest.mark.integration
def test_a_site_past_its_budget_refuses_and_the_others_train_with_dp(tmp_path):
    spec = SimulationSpec(sites=2, rounds=2, seed=2, out=tmp_path / "runs", min_cases=3, max_cases=4,
                          timeout_s=600, max_epsilon=20.0, site_node_config={"hospital-02": {"max-epsilon": 0.5}},
                          # a fixed noise (a budget-derived one would fit any site's budget)
                          run_config=dict(TINY_RUN_CONFIG, **{"dp": True, "num-rounds": 2, "dp-noise-from-budget": False,
                                                              "dp-noise-multiplier": 1.0}))
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


@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_harness_stopped_with_a_signal_stops_every_process_it_started(tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    signum = getattr(signal, signal_name)
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "simulations", "--sites", "2", "--rounds", "50", "--min-cases", "3",
               "--max-cases", "4", "--out", str(out), "--run-config", 'model="unet"', "--run-config",
               'channels="4,8"', "--run-config", 'strides="2"', "--run-config", "batch-size=2", "--no-dp"]
    # a shell's background job inherits SIGINT ignored; the harness must see it as a terminal's Ctrl-C would
    harness = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in harness.stdout:  # wait until Flower runs rounds
            if "round 1/50" in line:
                break
        run_dir = (out / "latest").resolve()
        assert live_processes_mentioning(str(run_dir / "flwr-home"))
        harness.send_signal(signum)
        assert harness.wait(timeout=120) == 128 + signum
        rest = harness.stdout.read()
        assert "Traceback" not in rest
        if signum == signal.SIGINT:
            assert "interrupted: the run's Flower and Ray processes were stopped" in rest
        deadline = time.monotonic() + 30
        while live_processes_mentioning(str(run_dir / "flwr-home")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert live_processes_mentioning(str(run_dir / "flwr-home")) == []
    finally:
        harness.kill()
        harness.wait()


@pytest.mark.parametrize(("options", "from_budget", "noise"), [
    ([], True, 0.0), (["--noise-multiplier", "1.5"], False, 1.5), (["--target-epsilon", "2"], False, 0.0),
])
def test_2d_sites_derive_their_noise_from_their_budget_unless_the_noise_is_given(tmp_path, options, from_budget,
                                                                                  noise):
    from simulations.__main__ import privacy_overrides
    from simulations.api import build_run_config

    spec = SimulationSpec(out=tmp_path, run_config=privacy_overrides(build_parser().parse_args(options)))
    config = build_run_config(spec, tmp_path, tmp_path / "sites.json", num_sites=3)
    assert (config.dp_noise_from_budget, config.dp_noise_multiplier) == (from_budget, noise)
    assert spec.cases_range == (60, 600)
