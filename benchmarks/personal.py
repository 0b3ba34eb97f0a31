"""Benchmark (issue 21): personal models against the global model and each site's local-only model.

Feature-skewed sites (default: the harness' ``--partition feature``, synthetic hospitals that share
one lesion population and differ only in acquisition; ``--task donors``: the real-anatomy task,
each site one real donor's brain seen by its own scanner, one T2-weighted). No DP anywhere, so
every model is trained alike. Four models per site, all scored by the same function
(``simulations.baselines.evaluate_on_sites``) on the same validation cases:

- ``global``: the FedAvg federation's model;
- ``fedbn``: a ``local-norm = true`` federation's global model with the site's own norm weights
  (FedBN), as the site evaluates it in every round;
- ``finetuned``: FedAvg's global model fine-tuned at the site (``python -m client finetune``,
  ``--finetune-epochs`` passes over its training cases);
- ``local``: a model trained at the site alone (the harness' ``--baselines local``: the same plan,
  seed and as many steps as the site takes in the federation).

The most shifted site is the one where the global model does worst (lowest Dice). Usage::

    .venv/bin/python -m benchmarks.personal --rounds 25 --out benchmarks/out/personal

Results go to ``--out``/results.json and are printed as Markdown; run again with the same
``--out`` and finished parts are read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.real_data import MissingRequirements
from benchmarks.resume import finished_run
from shared.atomic import atomic_write_json
from shared.cli import exit_on_sigterm, quiet_optional_codec_notice
from shared.errors import FedSegError

DEFAULT_OUT = Path("benchmarks/out/personal")
TASKS = ("feature", "donors")
PERSONAL = ("fedbn", "finetuned")


def federate(name: str, *, task_spec: dict[str, Any], out: Path, rounds: int, seed: int,
             run_config: dict[str, Any], baselines: tuple[str, ...]) -> Path:
    """One federation through the harness (read back when it finished before); its run folder."""
    from simulations.api import SimulationSpec, run_simulation

    if finished_run(out / name) is None:
        spec = SimulationSpec(rounds=rounds, seed=seed, out=out / name, run_config=run_config,
                              baselines=baselines, **task_spec)
        print(f"[personal] {name}: {rounds} rounds, {run_config}", flush=True)
        run_simulation(spec, echo=True)
    return (out / name / "latest").resolve()


def personal_scores(run_dir: Path) -> dict[str, Any]:
    """A ``local-norm`` run's personal model (global + the site's own norm weights) scored at each site."""
    from simulations.api import read_sites_manifest
    from simulations.baselines import run_baselines

    if not (run_dir / "baselines.json").is_file():
        run_baselines(run_dir, [(s.site_id, s.datalist) for s in read_sites_manifest(run_dir)], kinds=())
    return json.loads((run_dir / "baselines.json").read_text())["personal"]


def finetuned_scores(run_dir: Path, *, out: Path, epochs: int, seed: int) -> dict[str, Any]:
    """FedAvg's global model fine-tuned at each site (``client finetune``), scored at that site."""
    from client.commands.finetune import finetune
    from shared.device import resolve_device
    from shared.model_file import load_model
    from shared.plan import read_plan_file
    from simulations.api import read_sites_manifest
    from simulations.baselines import evaluate_on_sites

    plan = read_plan_file(run_dir / "plan.json")
    scores = {}
    for site in read_sites_manifest(run_dir):
        model_file = out / f"{site.site_id}.pt"
        if not model_file.is_file():  # a state folder of its own: the federation's stays as the run left it
            here = dataclasses.replace(site, state_dir=out / "state" / site.site_id)
            result = finetune(model_path=run_dir / "global_model.pt", site=here, out=model_file, epochs=epochs)
            print(f"[personal] fine-tuned {site.site_id}: {result.steps} steps, validation Dice "
                  f"{result.dice_global:.3f} -> {result.dice_personal:.3f}", flush=True)
        scores[site.site_id] = evaluate_on_sites(load_model(model_file)[0], [(site.site_id, site.datalist)], plan,
                                                 seed=seed, device=resolve_device("auto"),
                                                 caches={site.datalist: site.cache_dir})[site.site_id]
    return scores


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per-site Dice of each model, the most shifted site (lowest global Dice) and the claims read off them."""
    models = ["global", *[k for k in PERSONAL if k in results], "local"]
    dice = {m: {site: results[m][site]["dice"] for site in results["global"]} for m in models}
    mean = {m: sum(d.values()) / len(d) for m, d in dice.items()}
    shifted = min(dice["global"], key=dice["global"].get)
    personal = [m for m in PERSONAL if m in dice]
    return {"dice": dice, "mean": mean, "most-shifted-site": shifted,
            "beats-global-at-most-shifted": {m: dice[m][shifted] > dice["global"][shifted] for m in personal},
            "not-worse-than-local-on-average": {m: mean[m] >= mean["local"] for m in personal}}


def markdown(results: dict[str, Any]) -> str:
    """Per-site Dice of every model (Markdown), the mean, and the claims."""
    s = summary(results)
    models = list(s["dice"])
    lines = ["| site | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for site in s["dice"]["global"]:
        mark = " (most shifted)" if site == s["most-shifted-site"] else ""
        lines.append(f"| {site}{mark} | " + " | ".join(f"{s['dice'][m][site]:.3f}" for m in models) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{s['mean'][m]:.3f}**" for m in models) + " |")
    for m in s["beats-global-at-most-shifted"]:
        lines.append(f"\n{m}: beats the global model at the most shifted site: "
                     f"{'yes' if s['beats-global-at-most-shifted'][m] else 'no'}; at least local-only on average: "
                     f"{'yes' if s['not-worse-than-local-on-average'][m] else 'no'}.")
    return "\n".join(lines)


def run(*, task: str, rounds: int, seed: int, finetune_epochs: int, out: Path,
        run_config: dict[str, Any], train_cases: int = 100, val_cases: int = 6) -> dict[str, Any]:
    """Both federations, fine-tuning and the scores; ``results.json`` in ``out``."""
    if task == "feature":
        task_spec: dict[str, Any] = {"partition": "feature"}
    else:
        from benchmarks.real_data import prepare_task

        task_spec = {"datalists": tuple(prepare_task("donors", seed=seed, training=train_cases,
                                                     validation=val_cases))}
    plain = {**run_config, "dp": False}
    fedavg = federate("fedavg", task_spec=task_spec, out=out, rounds=rounds, seed=seed, run_config=plain,
                      baselines=("local",))
    if not (fedavg / "baselines.json").is_file():  # the federation finished, its baselines were cut short
        from simulations.api import read_sites_manifest
        from simulations.baselines import run_baselines

        run_baselines(fedavg, [(s.site_id, s.datalist) for s in read_sites_manifest(fedavg)], kinds=("local",))
    baselines = json.loads((fedavg / "baselines.json").read_text())
    results: dict[str, Any] = {"task": task, "rounds": rounds, "seed": seed, "finetune-epochs": finetune_epochs,
                               "run_config": plain, "runs": {"fedavg": str(fedavg)},
                               "global": baselines["federated"],
                               "local": {site: model[site] for site, model in baselines["local"].items()}}
    fedbn = federate("fedbn", task_spec=task_spec, out=out, rounds=rounds, seed=seed,
                     run_config={**plain, "local-norm": True}, baselines=())
    results["runs"]["fedbn"] = str(fedbn)
    results["fedbn"] = personal_scores(fedbn)
    results["finetuned"] = finetuned_scores(fedavg, out=out / "finetuned", epochs=finetune_epochs, seed=seed)
    results["summary"] = summary(results)
    atomic_write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    quiet_optional_codec_notice()
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.personal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="feature",
                        help="feature: the harness' --partition feature (synthetic); donors: real anatomy")
    parser.add_argument("--rounds", type=int, default=25, help="rounds of both federations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=5, help="passes over a site's cases when fine-tuning")
    parser.add_argument("--train-cases", type=int, default=100, help="--task donors: training cases per site")
    parser.add_argument("--val-cases", type=int, default=6, help="--task donors: validation cases per site")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="run config for both federations (repeatable); dp is always false")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from shared.cli import parse_run_config

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        results = run(task=args.task, rounds=args.rounds, seed=args.seed, finetune_epochs=args.finetune_epochs,
                      out=args.out.resolve(), run_config=parse_run_config(args.run_config),
                      train_cases=args.train_cases, val_cases=args.val_cases)
    except (FedSegError, MissingRequirements) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
