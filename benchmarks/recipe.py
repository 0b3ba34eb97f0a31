"""Benchmark: which recipe learns a real task in a CPU budget (one model on all sites' cases pooled).

For each ``--compare`` variant (run-config values, comma-separated ``KEY=VALUE``), the plan is
derived from the task's sites exactly as a federation would (``plan = "auto"``), one model of
that plan is trained on every site's training cases pooled for ``--steps`` steps (no DP), and
evaluated on every site's validation cases. This is how the default preset's optimizer and
round length were chosen; the federated comparisons are ``benchmarks.real_tasks``.

    .venv/bin/python -m benchmarks.recipe --task donors --steps 1500 \\
        --compare optimizer=adam,learning-rate=0.001 optimizer=sgd,learning-rate=0.05 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.real_data import TASKS, prepare_task, task_sites
from benchmarks.report import load_average, write_section
from shared.cli import quiet_optional_codec_notice


def run_variant(datalists: list[Path], overrides: dict[str, Any], *, steps: int, seed: int) -> dict[str, Any]:
    """Plan from the sites' fingerprints, train pooled for ``steps`` steps; per-site Dice and time."""
    import torch

    from client.data.site_fingerprint import site_fingerprint
    from server.plan_phase import describe
    from server.planning import derive_plan
    from shared.config import RunConfig
    from simulations.baselines import evaluate_on_sites, train_model

    fingerprints = {path.stem: site_fingerprint(path) for path in datalists}
    classes = next(iter(fingerprints.values())).classes
    config = RunConfig.from_mapping({"num-classes": classes, "seed": seed, **overrides, "dp": False})
    plan, _ = derive_plan(config, fingerprints)
    started = time.monotonic()
    model = train_model(list(datalists), plan, config, steps=steps, seed=seed, device=torch.device("cpu"))
    seconds = time.monotonic() - started
    sites = evaluate_on_sites(model, [(p.stem, p) for p in datalists], plan, seed=seed, device=torch.device("cpu"))
    return {"plan": describe(plan), "train_seconds": round(seconds, 1), "sites": sites}


def markdown(results: dict[str, dict[str, Any]], *, class_names: tuple[str, ...]) -> list[str]:
    """A table per variant: mean Dice of sites and per class."""
    lines = ["| variant | mean Dice of sites | " + " | ".join(class_names[1:]) + " | train min |",
             "|---" * (len(class_names) + 2) + "|"]
    for name, result in results.items():
        sites = list(result["sites"].values())
        mean = sum(s["dice"] for s in sites) / len(sites)
        per_class = [sum(s["per-class"][k]["dice"] for s in sites) / len(sites) for k in range(len(class_names) - 1)]
        lines.append(f"| {name} | **{mean:.3f}** | " + " | ".join(f"{v:.2f}" for v in per_class)
                     + f" | {result['train_seconds'] / 60:.1f} |")
    return lines + ["", "Plans: " + "; ".join(f"{name}: {r['plan']}" for name, r in results.items()) + "."]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from shared.cli import parse_run_config

    quiet_optional_codec_notice()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, default="donors")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs="+", default=[""], metavar="KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as one site's process in the benchmarks of the federation
    datalists = prepare_task(args.task, seed=args.seed)
    results = {}
    for variant in args.compare:
        overrides = parse_run_config([item for item in variant.split(",") if item])
        results[variant or "defaults"] = run_variant(datalists, overrides, steps=args.steps, seed=args.seed)
        print(f"[recipe] {variant or 'defaults'}: {results[variant or 'defaults']['train_seconds']} s", flush=True)
    _, class_names = task_sites(args.task)
    lines = markdown(results, class_names=class_names)
    print("\n".join(lines))
    if args.write:
        command = ".venv/bin/python -m benchmarks.recipe " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(f"recipe-{args.task}", f"Recipe: pooled training on the {args.task} task in a CPU budget",
                      "\n".join([f"Command: `{command}` (one torch thread; load average {load_average()}).",
                                 f"{args.steps} steps, seed {args.seed}, no DP; the plan derived from the sites' "
                                 "fingerprints as in a federation.", ""] + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
