"""Many virtual hospitals: 200 sites sampled 10 per round, and an existing Ray cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.processes import free_port, stop_process_group
from simulations.api import SimulationSpec, run_simulation
from simulations.flower_runtime import (
    Resources,
    SimulationError,
    check_machine_fits,
    logged_exceptions,
    ray_address_parts,
)
from tests.conftest import TINY_RUN_CONFIG


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_200_sites_with_10_sampled_per_round(tmp_path):
    spec = SimulationSpec(sites=200, sites_per_round=10, rounds=2, seed=4, out=tmp_path / "runs",
                          partition="quantity", pool_cases=450, timeout_s=900,
                          run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2}))
    progress: list[str] = []
    summary = run_simulation(spec, echo=False, on_progress=progress.append)
    run_dir = (tmp_path / "runs" / "latest").resolve()
    rows = _rows(run_dir)
    assert summary["rounds"] == 2
    round_lines = [line for line in progress if " | trained " in line]
    assert [line.split(" | ")[0] for line in round_lines] == ["[fedseg] round 1/2", "[fedseg] round 2/2"]
    assert all(re.search(r"\| \d+s elapsed, ~\d+s left$", line) for line in round_lines), round_lines
    for server_round in (1, 2):
        trained = [r for r in rows if r["round"] == server_round and r["site"] != "global"
                   and r.get("train-status") == "ok"]
        assert len(trained) == 10
        glob = next(r for r in rows if r["round"] == server_round and r["site"] == "global")
        assert glob["sites-train-ok"] == 10
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["scheme"] == "quantity" and len(partition["members"]) == 200
    assert len(json.loads((run_dir / "sites.json").read_text())["sites"]) == 200


def _sampled(run_dir: Path) -> list[tuple[list[str], list[str]]]:
    rows = [r for r in _rows(run_dir) if r["site"] != "global"]
    return [(sorted(r["site"] for r in rows if r["round"] == k and r.get("train-status") == "ok"),
             sorted(r["site"] for r in rows if r["round"] == k and r.get("evaluate-status") == "ok")) for k in (1, 2)]


@pytest.mark.integration
def test_a_seed_samples_the_same_sites_in_every_run(tmp_path):
    sampled = []
    for attempt in ("a", "b"):
        spec = SimulationSpec(sites=12, sites_per_round=3, rounds=2, seed=5, out=tmp_path / attempt, min_cases=2,
                              max_cases=3, timeout_s=600, run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2}))
        run_simulation(spec, echo=False)
        sampled.append(_sampled((tmp_path / attempt / "latest").resolve()))
    assert all(len(trained) == len(evaluated) == 3 for trained, evaluated in sampled[0])
    assert sampled[0] == sampled[1]


@pytest.fixture
def ray_head():
    """A local Ray head node standing in for a cluster; stopped (whole tree) afterwards."""
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="fsrh-"))
    ray = Path(sys.executable).parent / "ray"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    process = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         f"--temp-dir={temp_dir}",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(temp_dir.glob("session_*/logs/raylet.out")):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("the Ray head did not start")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_process_group(process)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.mark.integration
def test_simulation_joins_an_existing_ray_cluster(tmp_path, ray_head):
    address, head_dir = ray_head
    spec = SimulationSpec(sites=3, rounds=1, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=3,
                          timeout_s=600, run_config=dict(TINY_RUN_CONFIG), ray_address=address,
                          cpus_per_client=2.0)
    summary = run_simulation(spec, echo=False)
    assert summary["rounds"] == 1 and len(summary["per_site"]) == 3
    logs = head_dir / "session_latest" / "logs"
    assert list(logs.glob("python-core-driver-*.log")), "the simulation engine did not join the cluster"
    actor_logs = [path for path in logs.glob("worker-*.out")
                  if ":actor_name:ClientAppActor" in path.read_text()]
    assert len(actor_logs) == 1  # the virtual clients ran on the cluster, 2 of its 2 CPUs each


@pytest.mark.integration
def test_a_run_the_cluster_cannot_host_says_why(tmp_path, ray_head):
    address, _ = ray_head  # a head without GPUs: Flower's engine stops with an empty actor pool
    spec = SimulationSpec(sites=2, rounds=1, seed=1, out=tmp_path / "runs", min_cases=2, max_cases=2,
                          timeout_s=300, run_config=dict(TINY_RUN_CONFIG), ray_address=address,
                          gpus_per_client=0.5)
    with pytest.raises(SimulationError, match=r"(?s)without a summary.*ValueError: ActorPool is empty"):
        run_simulation(spec, echo=False)


@pytest.mark.parametrize("cpus, gpus, match", [
    (3.0, 0.0, "'--cpus-per-client' is 3 but this machine has 2 CPUs"),
    (1.0, 0.5, "'--gpus-per-client' is 0.5 but this machine has no GPU"),
    (1.0, 2.0, "'--gpus-per-client' is 2 but this machine has 1 GPU"),
])
def test_per_client_resources_the_machine_cannot_grant_are_named(cpus, gpus, match):
    resources = Resources(num_supernodes=1, num_cpus=cpus, num_gpus=gpus)
    with pytest.raises(ConfigError, match=match):
        check_machine_fits(resources, cpus=2, gpus=1 if gpus > 1 else 0)
    check_machine_fits(resources, cpus=4, gpus=2)  # enough of both


def test_resources_beyond_this_machine_are_refused_before_any_site_is_laid_out(tmp_path):
    spec = SimulationSpec(sites=2, out=tmp_path / "runs", cpus_per_client=float((os.cpu_count() or 1) + 1))
    with pytest.raises(ConfigError, match="'--cpus-per-client'"):
        run_simulation(spec, echo=False)
    assert not (tmp_path / "runs").exists()


def test_the_spec_refuses_bad_partition_options_so_no_run_folder_is_made():
    with pytest.raises(ConfigError, match="'--dirichlet-alpha'"):
        SimulationSpec(sites=4, partition="label", dirichlet_alpha=-1.0)
    with pytest.raises(ConfigError, match="'--pool-cases' 7 cannot give 4 sites"):
        SimulationSpec(sites=4, partition="quantity", pool_cases=7)


@pytest.mark.parametrize("field, value", [("gpus_per_client", -0.5), ("cpus_per_client", float("nan")),
                                          ("timeout_s", -1.0)])
def test_bad_resource_and_timeout_values_are_named(field, value):
    option = {"gpus_per_client": "--gpus-per-client", "cpus_per_client": "--cpus-per-client",
              "timeout_s": "--timeout"}[field]
    with pytest.raises(ConfigError, match=f"'{option}'"):
        SimulationSpec(**{field: value})


def test_ray_addresses_are_parsed_and_bad_ones_named():
    assert ray_address_parts("auto") is None
    assert ray_address_parts("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert ray_address_parts("ray://head.example.org:10001") == ("head.example.org", 10001)
    assert ray_address_parts("[::1]:6379") == ("::1", 6379)
    for bad in ("10.0.0.5", ":6379", "head:0", "head:port", "head:70000"):
        with pytest.raises(ConfigError, match="'--ray-address': expected host:port"):
            SimulationSpec(ray_address=bad)


def test_a_ray_address_where_nothing_answers_is_refused_before_any_site_is_laid_out(tmp_path):
    spec = SimulationSpec(sites=2, out=tmp_path / "runs", ray_address=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(SimulationError, match=r"'--ray-address' 127\.0\.0\.1:\d+: no Ray head answers there"):
        run_simulation(spec, echo=False)
    assert time.monotonic() - started < 10  # not Ray's retries until the run's timeout
    assert not (tmp_path / "runs").exists()


def test_the_last_distinct_exceptions_of_a_flower_log_are_read_in_order(tmp_path):
    log = tmp_path / "flower.log"
    log.write_text("\x1b[92mINFO \x1b[0m:      Starting\n"
                   # not at a line's start: not counted
                   "client failed: DataError: /data/a.nii.gz is not readable\n"
                   "\x1b[91mERROR \x1b[0m:     An exception occured!! ActorPool is empty.\n"
                   "ValueError: ActorPool is empty. Check `num_cpus`\n"
                   "  raise RuntimeError(\"Simulation Runtime crashed.\") from ex\n"
                   "RuntimeError: Simulation Runtime crashed.\n"
                   "ValueError: ActorPool is empty. Check `num_cpus`\n"
                   "shared.errors.ConfigError: 'batch-size' must be > 0\n")
    assert logged_exceptions(log) == ["RuntimeError: Simulation Runtime crashed.",
                                      "ValueError: ActorPool is empty. Check `num_cpus`",
                                      "ConfigError: 'batch-size' must be > 0"]
    assert logged_exceptions(log, last=1) == ["ConfigError: 'batch-size' must be > 0"]
    assert logged_exceptions(tmp_path / "missing.log") == []


def test_the_benchmark_plain_loop_fails_clearly_when_a_worker_cannot_warm_up(tmp_path):
    from benchmarks.scale_plain_loop import PlainLoop, SiteWork
    from shared.config import RunConfig

    missing = SiteWork(kind="train", datalist=str(tmp_path / "missing.json"), delta=1e-5, max_epsilon=8.0)
    with pytest.raises(RuntimeError, match="could not warm up"):  # not a pool re-spawning failed workers forever
        PlainLoop(run_config=RunConfig().to_mapping(), model_path=tmp_path / "model.pt", workers=1, warm_up=[missing])


def test_the_benchmark_times_each_overlapped_round_on_the_work_that_ran_in_it():
    from benchmarks.scale import round_steps

    rounds = [{"trained": [f"t{r}"], "evaluated": [f"e{r}"]} for r in (1, 2, 3)]
    assert round_steps(rounds, overlapped=False) == [[(["t1"], ["e1"])], [(["t2"], ["e2"])], [(["t3"], ["e3"])]]
    overlapped = round_steps(rounds, overlapped=True)
    # round 1 ends after round 2's training (sent with its evaluation); the last round is only its evaluation
    assert overlapped == [[(["t1"], []), (["t2"], ["e1"])], [(["t3"], ["e2"])], [([], ["e3"])]]
    done = [site for steps in overlapped for train, evaluate in steps for site in train + evaluate]
    assert sorted(done) == sorted(site for r in rounds for site in r["trained"] + r["evaluated"])


def test_the_benchmark_sampler_measures_spans_between_any_two_moments():
    from benchmarks.process_sampler import ProcessSampler

    sampler = ProcessSampler()  # not started: fed two samples by hand, 1 s apart
    sampler.samples = [(10.0, 100, 4.0), (11.0, 300, 6.0)]
    sampler.role_samples = [{"actors": 3.0, "engine": 1.0}, {"actors": 4.5, "engine": 1.5}]
    assert sampler.cpu_at(10.25) == pytest.approx(4.5)  # a quarter of the way: interpolated
    assert sampler.cpu_at(9.0) == 4.0 and sampler.cpu_at(12.0) == 6.0  # before the first / after the last sample
    assert sampler.cpu_by_role_at(10.5) == pytest.approx({"actors": 3.75, "engine": 1.25})
    assert sampler.peak_between(9.0, 11.0) == 300 and sampler.peak_between(10.2, 10.4) == 100
    unix_now = time.time()
    assert sampler.monotonic_of(unix_now) == pytest.approx(time.monotonic(), abs=0.05)


@pytest.mark.parametrize("keep_runs", [False, True])
def test_the_benchmark_keeps_only_the_last_simulations_run_folder_unless_told(tmp_path, monkeypatch, keep_runs):
    import argparse

    from benchmarks import scale

    order = []

    def simulate(args):
        run_dir = tmp_path / f"sim{order.count('S')}"
        (run_dir / "data").mkdir(parents=True)
        order.append("S")
        return {"run_dir": str(run_dir), "rounds": [], "peak_rss_gib": 1.0}

    def time_plain_loop(sim, *, workers):
        assert Path(sim["run_dir"]).is_dir()  # the plain loop reads the sites from the run folder
        order.append("P")
        return []

    monkeypatch.setattr(scale, "simulate", simulate)
    monkeypatch.setattr(scale, "time_plain_loop", time_plain_loop)
    scale.run(argparse.Namespace(repeats=3, keep_runs=keep_runs, sites=4, per_round=2, cpus_per_client=1.0,
                                 min_cases=2, max_cases=3))
    assert order == list("SPPSSP")
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == (["sim0", "sim1", "sim2"] if keep_runs else ["sim2"])


def test_the_benchmark_passes_run_config_values_to_the_simulation(tmp_path):
    import argparse

    from benchmarks.scale import simulation_spec

    args = argparse.Namespace(sites=4, per_round=2, rounds=3, seed=0, out=tmp_path, min_cases=2, max_cases=3,
                              cpus_per_client=1.0, stock_engine=False,
                              run_config=["local-steps=5", "preset=small-unet"])
    spec = simulation_spec(args)
    assert spec.run_config == {"local-steps": 5, "preset": "small-unet"}  # TOML values: 5 is an int
    assert (spec.sites, spec.sites_per_round, spec.rounds) == (4, 2, 3)
