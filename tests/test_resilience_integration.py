"""Real Flower simulations: kill the server and resume bitwise; crashed, slow and poisoned sites; every strategy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.model_file import load_model
from shared.processes import descendants, stop_process_group
from simulations.api import SimulationSpec, run_simulation
from simulations.faults import FaultPlan
from tests.conftest import REPO, TINY_RUN_CONFIG, live_processes_mentioning

SIM_ARGS = ["--sites", "2", "--seed", "4", "--min-cases", "3", "--max-cases", "4"]
ROUNDS = 4  # of the killed and resumed runs


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _global_digests(run_dir: Path) -> dict[int, str]:
    return {r["round"]: r["weights-sha256"] for r in _rows(run_dir) if r["site"] == "global"}


def _spec(out: Path, rounds: int, **run_config) -> SimulationSpec:
    return SimulationSpec(sites=2, rounds=rounds, seed=4, out=out, min_cases=3, max_cases=4, timeout_s=600,
                          run_config={**TINY_RUN_CONFIG, "num-rounds": rounds, **run_config})


def _start_until_first_checkpoint(out: Path, rounds: int) -> tuple[subprocess.Popen, Path]:
    """Start the harness as a command; return it and its checkpoint path once that exists (or it ended)."""
    overrides = [f"--run-config={k}={json.dumps(v)}" for k, v in TINY_RUN_CONFIG.items() if k != "num-rounds"]
    # one site stalls 1 s before each training (a sleep: the results stay bitwise those of the runs compared),
    # so the rounds after the first checkpoint last long enough to be killed in, however fast the machine
    command = [sys.executable, "-m", "simulations", *SIM_ARGS, "--rounds", str(rounds), "--out", str(out),
               "--slow-sites", "1", "--slow-seconds", "1", *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoint = out / "latest" / "checkpoint.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process, checkpoint


def _start_and_kill_after_first_checkpoint(out: Path) -> Path:
    process, checkpoint = _start_until_first_checkpoint(out, ROUNDS)
    try:
        for pid in [process.pid, *descendants(process.pid)]:  # a crash: everything dies at once, no clean-up
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        stop_process_group(process)
    assert checkpoint.exists(), "no checkpoint was written"
    run_dir = checkpoint.parent.resolve()
    assert _kill_stragglers(str(run_dir / "flwr-home")) == [], "the killed run left processes behind"
    return run_dir


def _kill_stragglers(fragment: str, timeout_s: float = 30.0) -> list[int]:
    """SIGKILL every process mentioning ``fragment`` until none is left; return any alive after ``timeout_s``.

    One snapshot of the tree misses a process forked while the kill went out (a Ray worker, an app
    process), and a killed process with a large heap takes a moment to die: the resumed run must not
    start beside either.
    """
    deadline = time.monotonic() + timeout_s
    while (left := live_processes_mentioning(fragment)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return left


@pytest.mark.integration
def test_killed_server_resumes_bitwise_like_an_uninterrupted_run(tmp_path):
    # the harness overlaps evaluation: round 1's checkpoint comes after round 2's training
    killed = _start_and_kill_after_first_checkpoint(tmp_path / "killed")
    done_before_kill = max(_global_digests(killed))
    assert done_before_kill < ROUNDS
    audits = {p.parent.name: p.read_text() for p in killed.glob("state/*/egress-audit.jsonl")}

    run_simulation(_spec(tmp_path / "resumed", ROUNDS, **{"resume-from": str(killed)}), echo=False)
    resumed = (tmp_path / "resumed" / "latest").resolve()
    assert len(audits) == 2  # each site's state went on from where it was (as a deployed site's would)
    for site, before in audits.items():
        assert (resumed / "state" / site / "egress-audit.jsonl").read_text().startswith(before)
        assert (killed / "state" / site / "egress-audit.jsonl").read_text() == before
    run_simulation(_spec(tmp_path / "straight", ROUNDS), echo=False)
    straight = (tmp_path / "straight" / "latest").resolve()

    assert _global_digests(resumed) == _global_digests(straight)
    assert sorted(_global_digests(resumed)) == list(range(1, ROUNDS + 1))
    rounds_sites = [(r["round"], r["site"]) for r in _rows(resumed)]
    assert len(rounds_sites) == len(set(rounds_sites)) == 3 * ROUNDS  # per round 2 sites + global, no duplicates
    resumed_model, payload = load_model(resumed / "global_model.pt")
    straight_model, _ = load_model(straight / "global_model.pt")
    assert payload["round"] == ROUNDS
    for (name, a), (_, b) in zip(resumed_model.state_dict().items(), straight_model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.integration
def test_a_killed_harness_takes_its_superlink_down(tmp_path):
    # SIGKILL (or the OOM killer) runs none of the harness's clean-up: its SuperLink must not serve on, orphaned
    process, checkpoint = _start_until_first_checkpoint(tmp_path / "killed", rounds=20)
    process.kill()  # the harness only
    process.wait()
    assert checkpoint.exists(), "the run never got going"
    flwr_home = str(checkpoint.parent.resolve() / "flwr-home")
    try:
        deadline = time.monotonic() + 20
        while _flower_servers(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _flower_servers(flwr_home) == []
    finally:
        _kill_stragglers(flwr_home)  # the engine and Ray follow on their own, more slowly


def _flower_servers(fragment: str) -> list[str]:
    """Command names of the live SuperLink / SuperExec processes mentioning ``fragment``."""
    names = []
    for pid in live_processes_mentioning(fragment):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            names += [name for name in ("flower-superlink", "flower-superexec") if name in command]
    return names


@pytest.mark.integration
def test_crashed_slow_and_poisoned_sites_do_not_stall_the_run(tmp_path):
    faults = FaultPlan(fail_sites="hospital-01", slow_sites="hospital-02", poison_sites="hospital-03",
                       poison_kind="nan", slow_seconds=50.0)
    spec = SimulationSpec(sites=4, rounds=1, seed=2, out=tmp_path, min_cases=3, max_cases=4, timeout_s=600,
                          faults=faults,
                          run_config=dict(TINY_RUN_CONFIG, **{"round-timeout": 40.0, "num-rounds": 1}))
    started = time.monotonic()
    summary = run_simulation(spec, echo=False)
    assert time.monotonic() - started < 300
    rows = {r["site"]: r for r in _rows((tmp_path / "latest").resolve())}
    assert rows["hospital-01"]["train-status"] == "failed" and "simulated site failure" in rows["hospital-01"]["train-reason"]
    assert rows["hospital-02"]["train-status"] == "failed" and "round-timeout" in rows["hospital-02"]["train-reason"]
    assert rows["hospital-03"]["train-status"] == "rejected" and "non-finite" in rows["hospital-03"]["train-reason"]
    assert rows["hospital-04"]["train-status"] == "ok"
    assert rows["global"]["sites-train-ok"] == 1 and rows["global"]["sites-train-rejected"] == 1
    assert summary["rounds"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"])
def test_each_strategy_runs_two_rounds(tmp_path, strategy):
    summary = run_simulation(_spec(tmp_path, 2, strategy=strategy), echo=False)
    run_dir = (tmp_path / "latest").resolve()
    digests = _global_digests(run_dir)
    assert summary["rounds"] == 2 and sorted(digests) == [1, 2] and digests[1] != digests[2]
    assert all(r["train-status"] == "ok" for r in _rows(run_dir) if r["site"] != "global")
    _, payload = load_model(run_dir / "global_model.pt")
    assert payload["run_config"]["strategy"] == strategy and payload["round"] == 2
