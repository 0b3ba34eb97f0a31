"""The run report: per-site table, plots and Markdown/HTML pages."""

from __future__ import annotations

import json

from simulations.report import final_site_table, read_rows, write_report


def _run_folder(tmp_path, with_epsilon=True):
    rows = []
    for server_round in (1, 2, 3):
        for site, base in (("hospital-01", 0.3), ("hospital-02", 0.5)):
            row = {"round": server_round, "site": site, "dice": base + 0.1 * server_round, "loss": 1.0 / server_round,
                   "train-loss": 1.2 / server_round, "train-status": "ok", "evaluate-status": "ok"}
            if with_epsilon:
                row["epsilon"] = 0.5 * server_round
            rows.append(row)
        rows.append({"round": server_round, "site": "global", "dice": 0.4 + 0.1 * server_round,
                     "loss": 1.0 / server_round, "train-loss": 1.2 / server_round})
    rows.append({"round": 3, "site": "hospital-03", "train-status": "refused", "train-reason": "budget"})
    bounded = next(r for r in rows if (r["round"], r["site"]) == (3, "hospital-02"))  # aggregated, scaled down
    bounded.update({"update-norm": 0.86, "update-bound": 0.75, "update-scale": 0.872, "train-note": "scaled"})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps(
        {"rounds": 3, "sites": ["hospital-01", "hospital-02", "hospital-03"], "first_round_dice": 0.5,
         "final_dice": 0.7}))
    return tmp_path


def test_report_has_every_site_and_every_plot(tmp_path):
    run_dir = _run_folder(tmp_path)
    report = write_report(run_dir).read_text()
    for site in ("hospital-01", "hospital-02", "hospital-03", "global"):
        assert site in report
    for plot in ("dice", "loss", "train-loss", "epsilon"):
        path = run_dir / "plots" / f"{plot}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"plots/{plot}.png" in report
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "hospital-02" in page


def test_no_epsilon_plot_without_dp(tmp_path):
    run_dir = _run_folder(tmp_path, with_epsilon=False)
    write_report(run_dir)
    assert not (run_dir / "plots" / "epsilon.png").exists()


def test_site_table_takes_each_sites_latest_values(tmp_path):
    table = {e["site"]: e for e in final_site_table(read_rows(_run_folder(tmp_path)))}
    assert abs(table["hospital-02"]["dice"] - 0.8) < 1e-9 and table["hospital-02"]["dice-round"] == 3
    assert "refused" in table["hospital-03"]["note"]
    assert table["hospital-02"]["note"] == "round 3: update bounded (x0.872)"
    assert list(table)[-1] == "global"


def test_comparison_table_from_baselines(tmp_path):
    from simulations.report import comparison_text

    run_dir = _run_folder(tmp_path)
    site = {"cases": 2, "dice": 0.8, "dice-ci": [0.7, 0.9], "hd95": 2.0, "hd95-ci": [1.0, 3.0]}
    (run_dir / "baselines.json").write_text(json.dumps({
        "federated": {"a": site, "h": site}, "pooled": {"a": site, "h": site},
        "local": {"a": {"a": dict(site, dice=0.6), "h": dict(site, dice=0.5)}}, "holdout": ["h"], "epochs": 10}))
    text = comparison_text(run_dir)
    assert "h (held out)" in text and "0.8000 [0.7000, 0.9000]" in text and "0.6000" in text
    write_report(run_dir)
    assert "Federated vs baselines" in (run_dir / "report.md").read_text()
    assert "held out" in (run_dir / "report.html").read_text()


def test_tensorboard_scalars_per_site_and_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simulations.run_logs import write_tensorboard

    run_dir = _run_folder(tmp_path)
    log_dir = write_tensorboard(run_dir, read_rows(run_dir))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    dice = events.Scalars("dice/hospital-02")
    assert [e.step for e in dice] == [1, 2, 3]
    assert abs(dice[-1].value - 0.8) < 1e-6
    assert "epsilon/hospital-01" in events.Tags()["scalars"]
