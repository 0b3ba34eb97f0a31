"""benchmarks.personal: what it reads off the scores, and the order in which it trains and scores."""

from __future__ import annotations

import json

from benchmarks import personal


def scores(**dice):
    return {site: {"dice": value, "hd95": 1.0} for site, value in dice.items()}


def test_the_most_shifted_site_is_where_the_global_model_does_worst_and_the_claims_are_read_there():
    results = {"global": scores(a=0.80, b=0.50, c=0.70),
               "fedbn": scores(a=0.79, b=0.60, c=0.70),
               "finetuned": scores(a=0.85, b=0.49, c=0.75),
               "local": scores(a=0.82, b=0.55, c=0.71)}
    s = personal.summary(results)
    assert s["most-shifted-site"] == "b"
    assert s["beats-global-at-most-shifted"] == {"fedbn": True, "finetuned": False}
    # means: fedbn 0.6967, finetuned 0.6967, local 0.6933
    assert s["not-worse-than-local-on-average"] == {"fedbn": True, "finetuned": True}
    results["local"] = scores(a=0.90, b=0.55, c=0.71)
    assert personal.summary(results)["not-worse-than-local-on-average"] == {"fedbn": False, "finetuned": False}
    table = personal.markdown(results)
    assert "| b (most shifted) | 0.500 | 0.600 | 0.490 | 0.550 |" in table
    assert "fedbn: beats the global model at the most shifted site: yes; at least local-only on average: no." in table


def test_run_trains_fedavg_with_local_baselines_then_fedbn_then_fine_tunes_fedavgs_model(tmp_path, monkeypatch):
    calls = []

    def federate(name, *, task_spec, out, rounds, seed, run_config, baselines):
        calls.append((name, run_config, baselines, task_spec))
        run_dir = tmp_path / name
        run_dir.mkdir(exist_ok=True)
        if name == "fedavg":
            (run_dir / "baselines.json").write_text(json.dumps({
                "federated": scores(a=0.8, b=0.5), "local": {"a": scores(a=0.7, b=0.1), "b": scores(a=0.2, b=0.6)}}))
        return run_dir

    monkeypatch.setattr(personal, "federate", federate)
    monkeypatch.setattr(personal, "personal_scores", lambda run_dir: (calls.append(("fedbn-scores", run_dir)),
                                                                       scores(a=0.81, b=0.65))[1])
    monkeypatch.setattr(personal, "finetuned_scores", lambda run_dir, **kw: (calls.append(("finetune", run_dir)),
                                                                              scores(a=0.79, b=0.62))[1])
    results = personal.run(task="feature", rounds=2, seed=0, finetune_epochs=1, out=tmp_path,
                           run_config={"dp": True, "local-steps": 5})
    assert [c[0] for c in calls] == ["fedavg", "fedbn", "fedbn-scores", "finetune"]
    assert calls[0][1:] == ({"dp": False, "local-steps": 5}, ("local",), {"partition": "feature"})
    assert calls[1][1] == {"dp": False, "local-steps": 5, "local-norm": True} and calls[1][2] == ()
    assert calls[2][1] == tmp_path / "fedbn" and calls[3][1] == tmp_path / "fedavg"
    # each site's local-only model scored at that site only
    assert results["local"] == {"a": {"dice": 0.7, "hd95": 1.0}, "b": {"dice": 0.6, "hd95": 1.0}}
    assert results["summary"]["most-shifted-site"] == "b"
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
