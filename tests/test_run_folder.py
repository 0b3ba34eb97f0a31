"""The run folder: per-site metrics lines, weighted global row, model and summary."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord

from server.federation import ProgressPrinter
from server.run_folder import RunRecorder, aggregate_sites
from server.site_replies import SortedReplies
from shared.atomic import atomic_write
from shared.config import RunConfig
from shared.model import build_model
from shared.model_file import load_model
from shared.plan import manual_plan
from shared.weights import model_to_arrays
from tests.conftest import TINY_RUN_CONFIG, tiny_recorder


def test_global_row_is_example_weighted_and_counts_outcomes():
    sites = {
        "a": {"dice": 0.8, "num-val-examples": 3, "train-status": "ok", "evaluate-status": "ok"},
        "b": {"dice": 0.4, "num-val-examples": 1, "train-status": "ok", "evaluate-status": "ok"},
        "c": {"train-status": "refused", "train-reason": "budget"},
    }
    row = aggregate_sites(sites)
    assert row["dice"] == pytest.approx(0.7)
    assert row["sites-train-ok"] == 2 and row["sites-train-refused"] == 1


def test_recorder_writes_metrics_model_and_summary(tmp_path):
    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    recorder = RunRecorder(tmp_path, config=config, plan=manual_plan(config))
    arrays: ArrayRecord = model_to_arrays(build_model(manual_plan(config).model_config()))
    for server_round, dice in ((1, 0.2), (2, 0.6)):
        recorder.record_phase(server_round, "train", SortedReplies(
            site_metrics={"a": {"num-examples": 4, "train-loss": 1.0}}, refused={"b": "no data"}))
        recorder.record_phase(server_round, "evaluate", SortedReplies(
            site_metrics={"a": {"num-examples": 2, "dice": dice, "loss": 0.5}}))
        recorder.end_round(server_round, arrays)
    summary = recorder.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["site"]) for r in rows] == [(1, "a"), (1, "b"), (1, "global"),
                                                      (2, "a"), (2, "b"), (2, "global")]
    assert rows[1]["train-status"] == "refused" and rows[1]["train-reason"] == "no data"
    assert summary["first_round_dice"] == pytest.approx(0.2) and summary["final_dice"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "summary.json").read_text())["sites"] == ["a", "b"]
    _, payload = load_model(tmp_path / "global_model.pt")
    assert payload["round"] == 2


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def explode(handle):
        handle.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_flushes_file_and_folder_unless_told_the_data_can_be_rebuilt(tmp_path, monkeypatch):
    import os

    flushes = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushes.append(fd) or real_fsync(fd))
    atomic_write(tmp_path / "durable.bin", lambda handle: handle.write(b"kept"))
    assert len(flushes) == 2  # the file, then its directory (the rename)
    atomic_write(tmp_path / "cache.bin", lambda handle: handle.write(b"derived"), durable=False)
    assert len(flushes) == 2
    assert (tmp_path / "cache.bin").read_bytes() == b"derived"


def test_a_rounds_metrics_lines_reach_the_disk_with_one_flush(tmp_path, monkeypatch):
    import os

    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    recorder = RunRecorder(tmp_path, config=config, plan=manual_plan(config))
    recorder.record_phase(1, "train", SortedReplies(
        site_metrics={site: {"num-examples": 4, "train-loss": 1.0} for site in "abcdef"}))
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    recorder.end_round(1, model_to_arrays(build_model(manual_plan(config).model_config())))
    assert flushed.count(str(tmp_path / "metrics.jsonl")) == 1  # not one per site
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["site"] for r in rows] == [*"abcdef", "global"]


def test_rows_of_a_node_are_filed_under_its_site_once_known(tmp_path):
    recorder = tiny_recorder(tmp_path)
    recorder.record_phase(1, "train", SortedReplies(failed={"node-5": "crashed"}))
    recorder.record_phase(1, "evaluate", SortedReplies(site_metrics={"site-x": {"dice": 0.5, "num-examples": 1}}))
    recorder.name_nodes(1, {5: "site-x"})
    assert recorder.rounds[1] == {"site-x": {"train-status": "failed", "train-reason": "crashed",
                                             "evaluate-status": "ok", "dice": 0.5, "num-val-examples": 1}}
def test_epsilons_land_per_site_per_round_and_in_the_summary(tmp_path):
    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    recorder = RunRecorder(tmp_path, config=config, plan=manual_plan(config))
    arrays: ArrayRecord = model_to_arrays(build_model(manual_plan(config).model_config()))
    for server_round, epsilon in ((1, 1.5), (2, 2.25)):
        recorder.record_phase(server_round, "train", SortedReplies(
            site_metrics={"a": {"num-examples": 4, "train-loss": 1.0, "epsilon": epsilon, "epsilon-round": 1.5,
                                "dp-delta": 1e-5}},
            refused={"b": "privacy budget: ... above the site's max-epsilon 1"}))
        recorder.end_round(server_round, arrays)
    summary = recorder.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    a_rows = [r for r in rows if r["site"] == "a"]
    assert [(r["epsilon"], r["epsilon-round"]) for r in a_rows] == [(1.5, 1.5), (2.25, 1.5)]
    assert [r["max-epsilon"] for r in rows if r["site"] == "global"] == [1.5, 2.25]
    assert summary["epsilon"] == {"a": {"epsilon": 2.25, "delta": 1e-5, "round": 2}, "b": None}


def test_a_site_without_training_loss_is_left_out_of_the_mean_and_written_as_null(tmp_path):
    # A tiny DP site whose every Poisson batch came up empty sends its (noise-only) update with train-loss NaN.
    config = RunConfig.from_mapping(TINY_RUN_CONFIG)
    recorder = RunRecorder(tmp_path, config=config, plan=manual_plan(config))
    recorder.record_phase(1, "train", SortedReplies(site_metrics={
        "a": {"num-examples": 4, "train-loss": 1.5}, "tiny": {"num-examples": 2, "train-loss": float("nan")}}))
    row = recorder.end_round(1, model_to_arrays(build_model(manual_plan(config).model_config())))
    assert row["train-loss"] == pytest.approx(1.5) and row["sites-train-ok"] == 2
    rows = {r["site"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert rows["tiny"]["train-loss"] is None and rows["global"]["train-loss"] == pytest.approx(1.5)


def _global_row(server_round: int, **counts) -> dict:
    row = {"round": server_round, "sites-train-ok": 3, "sites-train-refused": 0, "sites-train-failed": 1,
           "sites-train-rejected": 0, "sites-evaluate-ok": 4, "dice": 0.5, "train-loss": None}
    return {**row, **counts}


def test_progress_line_estimates_the_time_left_from_the_rounds_this_run_did(capsys):
    clock = iter([100.0, 130.0, 190.0])  # start; round 4 ends after 30 s, round 5 after 90 s
    printer = ProgressPrinter(10, first_round=4, clock=lambda: next(clock))  # resumed after round 3
    printer.report(_global_row(4), {"hospital-01": {"train-status": "failed", "train-reason": "no reply"}})
    printer.report(_global_row(5, **{"max-epsilon": 1.234}), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[fedseg] round 4/10 | trained 3/4 sites | evaluated 4 | dice 0.5000")
    assert "train-loss n/a" in lines[0] and lines[0].endswith("30s elapsed, ~180s left")  # 6 rounds at 30 s
    assert lines[1] == "[fedseg]   hospital-01 failed train: no reply"
    assert "max epsilon 1.23" in lines[2] and lines[2].endswith("90s elapsed, ~225s left")  # 5 rounds at 45 s


def test_progress_line_names_the_bounded_sites(capsys):
    printer = ProgressPrinter(2, clock=lambda: 10.0)
    note = "update norm 0.86 is more than 10 x the round's median 0.075: scaled by 0.872 to 0.75"
    sites = {"hospital-01": {"train-status": "ok"},
             "hospital-02": {"train-status": "ok", "update-scale": 0.872, "train-note": note}}
    counts = {"sites-train-ok": 2, "sites-train-failed": 0, "sites-train-bounded": 1}
    printer.report(_global_row(1, **counts), sites)
    lines = capsys.readouterr().out.splitlines()
    assert "| trained 2/2 sites (1 bounded) |" in lines[0]
    assert lines[1:] == [f"[fedseg]   hospital-02 bounded train: {note}"]
