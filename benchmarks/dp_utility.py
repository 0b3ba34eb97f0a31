"""Utility of DP: final Dice of the same simulated federation with and without DP-SGD.

    .venv/bin/python -m benchmarks.dp_utility [--rounds 5] [--seed 0] [simulation options]

Runs the default simulated federation (``python -m simulations`` defaults, so
the run ``make run`` does) twice with the same seed, hospitals and rounds:
once with ``--no-dp`` and once with DP (default mechanism, every site's budget
``--max-epsilon``), and prints both final Dice scores, their ratio and the
largest cumulative epsilon any site reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.cli import exit_on_sigterm, parse_run_config
from simulations.__main__ import build_parser, privacy_overrides
from simulations.api import SimulationSpec, run_simulation


def spec_from(args: argparse.Namespace, *, dp: bool) -> SimulationSpec:
    """The simulation ``args`` describe, with DP on or off."""
    args.dp = dp
    overrides = parse_run_config(args.run_config)
    if args.local_steps is not None:
        overrides["local-steps"] = args.local_steps
    overrides.update(privacy_overrides(args))
    return SimulationSpec(sites=args.sites, rounds=args.rounds, spatial_dims=args.spatial_dims, seed=args.seed,
                          out=args.out, min_cases=args.min_cases, max_cases=args.max_cases,
                          cpus_per_client=args.cpus_per_client, timeout_s=args.timeout, run_config=overrides,
                          max_epsilon=args.max_epsilon, dp_delta=args.dp_delta)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed benchmark still stops the Flower/Ray processes it started
    parser = build_parser()
    parser.prog = "python -m benchmarks.dp_utility"
    parser.set_defaults(out=Path("runs/benchmarks"))
    args = parser.parse_args(argv)
    results = {}
    for label, dp in (("non-DP", False), ("DP", True)):
        summary = run_simulation(spec_from(args, dp=dp), echo=False)
        epsilons = [site["epsilon"] for site in summary.get("epsilon", {}).values() if site]
        results[label] = {"final_dice": summary["final_dice"], "first_round_dice": summary["first_round_dice"],
                          "max_epsilon": max(epsilons) if epsilons else None, "seconds": summary["seconds"]}
        print(json.dumps({label: results[label]}), flush=True)
    ratio = results["DP"]["final_dice"] / results["non-DP"]["final_dice"]
    print(f"\n| run | final Dice | round-1 Dice | max cumulative epsilon (delta {args.dp_delta:g}) | seconds |")
    print("|---|---|---|---|---|")
    for label, row in results.items():
        epsilon = "-" if row["max_epsilon"] is None else f"{row['max_epsilon']:.2f}"
        print(f"| {label} | {row['final_dice']:.4f} | {row['first_round_dice']:.4f} | {epsilon} | {row['seconds']} |")
    print(f"\nDP / non-DP final Dice: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
