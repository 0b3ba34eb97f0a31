"""Benchmark: a federation of many virtual hospitals on one machine.

Measures, in one run:

1. peak memory (RSS summed over the harness and every process it starts:
   SuperLink, simulation engine, Ray workers) per round, and seconds per round;
2. framework overhead: wall time of a simulated round divided by the compute
   of the same sampled sites' work done in a plain loop (load data, build the
   model, train the same steps, evaluate), measured right after the run.

Usage (from the repo root, after ``make setup``)::

    .venv/bin/python -m benchmarks.scale --sites 1000 --per-round 20 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_section
from shared.cli import quiet_optional_codec_notice
from simulations.api import SimulationSpec, run_simulation
from shared.processes import descendants

ROUND_LINE = re.compile(r"round (\d+)/\d+")


class MemorySampler(threading.Thread):
    """Samples the summed RSS of this process and all its descendants."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            pids = [os.getpid(), *descendants(os.getpid())]
            self.samples.append((time.monotonic(), sum(_rss_bytes(pid) for pid in pids)))
            time.sleep(self.interval_s)

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plain_loop_seconds(run_dir: Path, sites: list[str]) -> float:
    """Seconds to do the sampled sites' round of work in a plain loop (no Flower)."""
    import torch

    from client.loading import training_loader
    from client.site_data import load_training_cases, load_validation_cases
    from client.training import evaluate_local, train_local
    from shared.config import RunConfig
    from shared.model_file import load_model

    manifest = {s["site-id"]: s for s in json.loads((run_dir / "sites.json").read_text())["sites"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    config = RunConfig.from_mapping(summary["run_config"])
    device = torch.device("cpu")
    torch.set_num_threads(1)  # as each simulated client: Ray gives an actor with num_cpus=1 one thread
    started = time.perf_counter()
    for site in sites:
        datalist = Path(manifest[site]["datalist"])
        model, _ = load_model(run_dir / "global_model.pt")
        cases, augment = load_training_cases(datalist, config)
        loader = training_loader(cases, augment, batch_size=config.batch_size, generator=torch.Generator().manual_seed(0))
        train_local(model, loader, config=config, device=device, num_examples=len(cases))
        evaluate_local(model, load_validation_cases(datalist, config), config=config, device=device)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    marks: list[tuple[float, int]] = []

    def on_progress(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match and "trained" in line:
            marks.append((time.monotonic(), int(match.group(1))))

    spec = SimulationSpec(sites=args.sites, sites_per_round=args.per_round, rounds=args.rounds, seed=args.seed,
                          out=args.out, min_cases=args.min_cases, max_cases=args.max_cases, timeout_s=7200)
    sampler = MemorySampler()
    sampler.start()
    started = time.monotonic()
    run_simulation(spec, echo=True, on_progress=on_progress)
    sampler.stopped.set()
    sampler.join()
    run_dir = (args.out / "latest").resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = []
    previous = started
    for mark_time, server_round in marks:
        sites = [r["site"] for r in rows if r["round"] == server_round and r["site"] != "global"
                 and r.get("train-status") == "ok"]
        wall = next(r["round-seconds"] for r in rows if r["round"] == server_round and r["site"] == "global")
        compute = plain_loop_seconds(run_dir, sites)
        rounds.append({"round": server_round, "sites": len(sites), "round_seconds": wall,
                       "plain_loop_seconds": round(compute, 3),
                       "peak_rss_gib": round(sampler.peak_between(previous, mark_time) / 2**30, 3)})
        previous = mark_time
    return {"sites": args.sites, "per_round": args.per_round, "rounds": rounds,
            "peak_rss_gib": round(max(r for _, r in sampler.samples) / 2**30, 3),
            "workers": int(os.cpu_count() or 1)}


def to_markdown(result: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"{result['sites']} virtual sites, {result['per_round']} sampled per round, default 2D model, "
             f"{result['workers']} CPU cores; peak RSS of the whole simulation: **{result['peak_rss_gib']} GiB**.", "",
             "| round | sites | round s | plain loop s (sequential) | round / plain loop | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        ratio = r["round_seconds"] / r["plain_loop_seconds"] if r["plain_loop_seconds"] else float("nan")
        lines.append(f"| {r['round']} | {r['sites']} | {r['round_seconds']:.2f} | {r['plain_loop_seconds']:.2f} "
                     f"| {ratio:.2f} | {r['peak_rss_gib']:.3f} |")
    steady = [r for r in result["rounds"] if r["round"] > 1]
    if steady:
        wall = sum(r["round_seconds"] for r in steady)
        loop = sum(r["plain_loop_seconds"] for r in steady)
        lines += ["", f"Steady state (rounds after the first): simulated round / sequential plain loop = "
                      f"**{wall / loop:.2f}**; against the plain loop spread ideally over "
                      f"{result['workers']} cores: **{wall / (loop / result['workers']):.2f}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    quiet_optional_codec_notice()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-cases", type=int, default=2)
    parser.add_argument("--max-cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scale"))
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args)
    command = (f".venv/bin/python -m benchmarks.scale --sites {args.sites} --per-round {args.per_round} "
               f"--rounds {args.rounds}")
    text = to_markdown(result, command)
    print(text)
    if not args.no_write:
        write_section("scale", "Many virtual hospitals (issue 8)", text)


if __name__ == "__main__":
    main()
