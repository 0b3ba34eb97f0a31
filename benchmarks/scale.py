"""Benchmark: a federation of many virtual hospitals on one machine.

Measures:

1. peak memory (RSS summed over the harness and every process it starts:
   SuperLink, simulation engine, Ray workers) per round, and seconds per round;
2. framework overhead: wall time of a simulated round divided by the wall
   time of the same sites' work in a plain loop (``benchmarks/scale_plain_loop.py``:
   same sites, same steps, as many warm worker processes as the simulation had
   Ray actors); and the CPU seconds both used (every process of the simulation
   vs the plain loop's workers).

The speed of these shared machines drifts by 10% and more within minutes, so
simulations (S) and plain loops (P) alternate in an ABBA order that cancels a
steady drift: with ``--repeats 2`` (default) S P P S, with 3 S P P S S P. The
runs share their seed, so every simulation samples the same sites in the same
rounds (checked), and the headline ratio pools all of them. Without
``--no-write`` the run replaces the generated part of BENCHMARKS.md's scale
section (between its markers); the notes after it are kept. Only the last
simulation's run folder is kept (``--out``/latest) unless ``--keep-runs``.

Usage (from the repo root, after ``make setup``)::

    .venv/bin/python -m benchmarks.scale --sites 1000 --per-round 20 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.process_sampler import ProcessSampler
from benchmarks.report import write_section
from benchmarks.scale_plain_loop import PlainLoop, SiteWork
from shared.cli import exit_on_sigterm, parse_run_config, quiet_optional_codec_notice
from shared.protocol import NODE_DP_DELTA, NODE_MAX_EPSILON, NODE_SITE_ID
from simulations.api import SimulationSpec, run_simulation


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``args.repeats`` simulations and as many plain loops over their sites, in ABBA order."""
    sims: list[dict[str, Any]] = []
    plain: list[list[dict[str, float]]] = []
    load_before = os.getloadavg()
    for index in range(args.repeats):
        if index % 2:  # P S: the plain loop first, on the sites every simulation samples
            plain.append(time_plain_loop(sims[-1], workers=_workers(args)))
        sims.append(simulate(args))
        _check_same_sites(sims[0], sims[-1])
        if index % 2 == 0:
            plain.append(time_plain_loop(sims[-1], workers=_workers(args)))
    if not args.keep_runs:
        remove_run_folders(sims[:-1])
    return {"sites": args.sites, "per_round": args.per_round, "workers": _workers(args), "cores": os.cpu_count(),
            "min_cases": args.min_cases, "max_cases": args.max_cases, "sims": sims, "plain": plain,
            "peak_rss_gib": max(sim["peak_rss_gib"] for sim in sims),
            "load": [round(x, 1) for x in (load_before[0], os.getloadavg()[0])]}


def remove_run_folders(sims: list[dict[str, Any]]) -> None:
    """Delete the run folders of ``sims``: each holds every site's generated data (~1.3 GiB at 1000 sites)."""
    for sim in sims:
        shutil.rmtree(sim["run_dir"])


def _check_same_sites(reference: dict[str, Any], sim: dict[str, Any]) -> None:
    sites = [[(r["trained"], r["evaluated"]) for r in s["rounds"]] for s in (reference, sim)]
    if sites[0] != sites[1]:
        raise RuntimeError(f"{sim['run_dir']} sampled other sites than {reference['run_dir']} with the same seed: "
                           "the repeats would time different work")


def _workers(args: argparse.Namespace) -> int:
    return max(1, int((os.cpu_count() or 1) / args.cpus_per_client))  # Ray actors the simulation has


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """One simulation: per round its sites, wall and CPU seconds and peak RSS; CPU by process role.

    A round's CPU seconds and peak RSS are measured between the moments the server
    ended the round before and this one (``ended-at`` in ``metrics.jsonl``).
    """
    sampler = ProcessSampler()
    spec = simulation_spec(args)
    sampler.start()
    started = time.monotonic()
    try:
        run_simulation(spec, echo=True)
    finally:
        sampler.stopped.set()
        sampler.join()
    run_dir = (args.out / "latest").resolve()
    rounds = simulated_rounds(run_dir, sampler, started=started)
    first, last = (sampler.cpu_by_role_at(rounds[index]["ended"]) for index in (0, -1))
    return {"run_dir": str(run_dir), "rounds": rounds,
            "cpu_by_role": {role: round(last[role] - first.get(role, 0.0), 2) for role in last},
            "peak_rss_gib": round(max(rss for _, rss, _ in sampler.samples) / 2**30, 3)}


def simulation_spec(args: argparse.Namespace) -> SimulationSpec:
    """The simulation the arguments ask for; ``--run-config`` pairs go into its run config as ``flwr run`` takes them."""
    return SimulationSpec(sites=args.sites, sites_per_round=args.per_round, rounds=args.rounds, seed=args.seed,
                          out=args.out, min_cases=args.min_cases, max_cases=args.max_cases, timeout_s=7200,
                          cpus_per_client=args.cpus_per_client, stock_engine=args.stock_engine,
                          run_config=parse_run_config(args.run_config))


def simulated_rounds(run_dir: Path, sampler: ProcessSampler, *, started: float) -> list[dict[str, Any]]:
    """Per round: the sites that trained and evaluated, wall seconds, CPU seconds, peak RSS."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds, previous = [], started
    for row in sorted((r for r in rows if r["site"] == "global"), key=lambda r: r["round"]):
        site_rows = [r for r in rows if r["round"] == row["round"] and r["site"] != "global"]
        ended = sampler.monotonic_of(row["ended-at"])
        rounds.append({"round": row["round"], "round_seconds": row["round-seconds"], "ended": ended,
                       "trained": [r["site"] for r in site_rows if r.get("train-status") == "ok"],
                       "evaluated": [r["site"] for r in site_rows if r.get("evaluate-status") == "ok"],
                       "simulation_cpu_seconds": round(sampler.cpu_at(ended) - sampler.cpu_at(previous), 2),
                       "peak_rss_gib": round(sampler.peak_between(previous, ended) / 2**30, 3)})
        previous = ended
    return rounds


def time_plain_loop(sim: dict[str, Any], *, workers: int) -> list[dict[str, float]]:
    """The plain loop's wall and CPU seconds for every round of ``sim`` (``benchmarks/scale_plain_loop.py``)."""
    run_dir = Path(sim["run_dir"])
    manifest = {s[NODE_SITE_ID]: s for s in json.loads((run_dir / "sites.json").read_text())["sites"]}
    summary = json.loads((run_dir / "summary.json").read_text())

    def work(kind: str, site: str) -> SiteWork:
        entry = manifest[site]
        return SiteWork(kind=kind, datalist=entry["datalist"], delta=float(entry[NODE_DP_DELTA]),
                        max_epsilon=float(entry[NODE_MAX_EPSILON]))

    used = {s for r in sim["rounds"] for s in r["trained"] + r["evaluated"]}
    spare = next((s for s in manifest if s not in used), next(iter(manifest)))
    warm_up = [work("train", spare), work("evaluate", spare)]
    timings = []
    overlapped = bool(summary["run_config"].get("overlap-evaluation"))
    with PlainLoop(run_config=summary["run_config"], model_path=run_dir / "global_model.pt", workers=workers,
                   warm_up=warm_up) as loop:
        for steps in round_steps(sim["rounds"], overlapped=overlapped):
            timed = [loop.time_step(train=[work("train", s) for s in train],
                                    evaluate=[work("evaluate", s) for s in evaluate], together=overlapped)
                     for train, evaluate in steps]
            timings.append({"wall_s": round(sum(t.wall_s for t in timed), 3),
                            "cpu_s": round(sum(t.cpu_s for t in timed), 2)})
    return timings


def round_steps(rounds: list[dict[str, Any]], *, overlapped: bool) -> list[list[tuple[list[str], list[str]]]]:
    """Per round, the (sites trained, sites evaluated) phases that ran between its start and its end.

    A round ends when its metrics are written. Without overlap that is after its own
    training then evaluation. With ``overlap-evaluation`` round r's evaluation runs
    with round r+1's training and the round ends after both: the first round spans
    training 1 and (training 2 + evaluation 1), round r > 1 spans training r+1 +
    evaluation r, and the last round only its evaluation.
    """
    if not overlapped:
        return [[(r["trained"], r["evaluated"])] for r in rounds]
    steps = []
    for index, r in enumerate(rounds):
        following = rounds[index + 1]["trained"] if index + 1 < len(rounds) else []
        steps.append(([(r["trained"], [])] if index == 0 else []) + [(following, r["evaluated"])])
    return steps


def to_markdown(result: dict[str, Any], command: str) -> str:
    sims, plain = result["sims"], result["plain"]
    header = (f"{result['sites']} virtual sites ({result['min_cases']}-{result['max_cases']} cases each), "
              f"{result['per_round']} sampled per round, default 2D model and harness settings (DP on), "
              f"{result['cores']} CPU cores, {result['workers']} Ray actors and as many plain-loop workers; "
              f"{len(sims)} simulations (S) and plain loops (P) in the order {_order(len(sims))}; "
              f"load average at the start / end: {' / '.join(map(str, result['load']))}. "
              f"Peak RSS of the whole simulation: **{result['peak_rss_gib']} GiB**.")
    lines = [f"Command: `{command}`", "", header, "", "Steady state (rounds after the first), run by run:", "",
             ("| simulation | round s | plain loop s (the one next to it) | round / plain loop | CPU ratio "
              "| peak RSS GiB |"),
             "|---|---|---|---|---|---|"]
    for index, (sim, loop) in enumerate(zip(sims, plain)):
        wall, loop_wall, cpu, loop_cpu = _steady_sums(sim, loop)
        lines.append(f"| {index + 1} | {wall / _steady_count(sim):.2f} | {loop_wall / _steady_count(sim):.2f} "
                     f"| {_ratio(wall, loop_wall)} | {_ratio(cpu, loop_cpu)} | {sim['peak_rss_gib']:.3f} |")
    sums = [sum(values) for values in zip(*(_steady_sums(s, p) for s, p in zip(sims, plain)))]
    if sums and sums[1]:
        lines += ["", (f"All runs pooled: simulated round / plain loop = **{sums[0] / sums[1]:.2f}** (overhead "
                       f"{100 * (sums[0] / sums[1] - 1):.0f}%); CPU seconds, simulation / plain loop = "
                       f"**{sums[2] / sums[3]:.2f}**.")]
    lines += ["", "Per round, simulation 1 and the plain loop after it:", "",
              ("| round | sites trained / evaluated | round s | plain loop s | round / plain loop "
               "| simulation CPU s | plain loop CPU s | CPU ratio | peak RSS GiB |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for r, t in zip(sims[0]["rounds"], plain[0]):
        lines.append(f"| {r['round']} | {len(r['trained'])} / {len(r['evaluated'])} | {r['round_seconds']:.2f} "
                     f"| {t['wall_s']:.2f} | {_ratio(r['round_seconds'], t['wall_s'])} "
                     f"| {r['simulation_cpu_seconds']:.1f} | {t['cpu_s']:.1f} "
                     f"| {_ratio(r['simulation_cpu_seconds'], t['cpu_s'])} | {r['peak_rss_gib']:.3f} |")
    return "\n".join(lines + _cpu_by_role(sims, plain)) + "\n"


def _order(repeats: int) -> str:
    return " ".join("S P" if index % 2 == 0 else "P S" for index in range(repeats))


def _steady_count(sim: dict[str, Any]) -> int:
    return max(1, sum(1 for r in sim["rounds"] if r["round"] > 1))


def _steady_sums(sim: dict[str, Any], loop: list[dict[str, float]]) -> tuple[float, float, float, float]:
    """Wall and CPU seconds of the rounds after the first: simulation, plain loop, simulation CPU, plain CPU."""
    pairs = [(r, t) for r, t in zip(sim["rounds"], loop) if r["round"] > 1]
    return (sum(r["round_seconds"] for r, _ in pairs), sum(t["wall_s"] for _, t in pairs),
            sum(r["simulation_cpu_seconds"] for r, _ in pairs), sum(t["cpu_s"] for _, t in pairs))


def _cpu_by_role(sims: list[dict[str, Any]], plain: list[list[dict[str, float]]]) -> list[str]:
    loop_cpu = _mean(_steady_sums(s, p)[3] for s, p in zip(sims, plain))
    if not loop_cpu:
        return []
    roles = {role for sim in sims for role in sim["cpu_by_role"]}
    by_role = {role: _mean(sim["cpu_by_role"].get(role, 0.0) for sim in sims) for role in roles}
    lines = ["", "Where a simulation's CPU seconds went in those rounds (mean over the simulations):", "",
             "| process | CPU s | / plain loop CPU |", "|---|---|---|"]
    lines += [f"| {role} | {cpu_s:.1f} | {cpu_s / loop_cpu:.2f} |"
              for role, cpu_s in sorted(by_role.items(), key=lambda item: -item[1])]
    return lines + [f"| plain loop workers (same sites, same work) | {loop_cpu:.1f} | 1.00 |"]


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def main() -> None:
    quiet_optional_codec_notice()
    exit_on_sigterm()  # a killed benchmark still stops the Flower/Ray processes it started
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--min-cases", type=int, default=2)
    parser.add_argument("--max-cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="simulations (and plain loops), in ABBA order")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scale"))
    parser.add_argument("--stock-engine", action="store_true", help="Flower's simulation engine unpatched")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a run config value, e.g. --run-config local-steps=5 (repeatable; default: the "
                             "run config's own, planned from the sites)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep every simulation's run folder (default: only the last one, under --out/latest)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    result = run(args)
    command = (f".venv/bin/python -m benchmarks.scale --sites {args.sites} --per-round {args.per_round} "
               f"--rounds {args.rounds} --min-cases {args.min_cases} --max-cases {args.max_cases} "
               f"--repeats {args.repeats}" + (" --stock-engine" if args.stock_engine else "")
               + "".join(f" --run-config {pair}" for pair in args.run_config))
    text = to_markdown(result, command)
    print(text)
    if not args.no_write:
        write_section("scale", "Many virtual hospitals (issue 8)", text)


if __name__ == "__main__":
    main()
