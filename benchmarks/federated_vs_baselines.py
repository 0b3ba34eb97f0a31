"""Benchmark: does the federation beat each hospital alone and come close to pooling?

Runs the default simulated federation (its heterogeneous synthetic sites:
a large centre and smaller clinics, each with its own scanner and population)
with ``--baselines pooled,local`` and reports, per site and on average, the
Dice of the federated model, of one model trained on all data pooled and of
each site's own local-only model, all evaluated on the same validation cases.
Differential privacy is off (the question is the federation itself; the DP
cost is measured in the privacy benchmark).

Usage (from the repo root, after ``make setup``)::

    .venv/bin/python -m benchmarks.federated_vs_baselines [--seeds 0 1]

Each seed is one run (hospitals, initial weights and sampling all follow the
seed); BENCHMARKS.md is rewritten after every seed, so a long run that is
stopped keeps the seeds it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.report import load_average, write_section
from shared.cli import exit_on_sigterm, quiet_optional_codec_notice
from shared.config import RunConfig
from simulations.api import SimulationSpec, run_simulation
from simulations.baselines import comparison_rows
from simulations.synthetic import site_sizes

TARGET_RATIO_TO_POOLED = 0.97


def non_dp_overrides() -> dict[str, Any]:
    """Run-config values that switch differential privacy off, if this version has it."""
    return {"dp": False} if "dp" in RunConfig().to_mapping() else {}


def run(seed: int, out: Path) -> dict[str, Any]:
    spec = SimulationSpec(seed=seed, out=out, baselines=("pooled", "local"), run_config=non_dp_overrides())
    run_simulation(spec, echo=True)
    run_dir = (out / "latest").resolve()
    rows = [r for r in comparison_rows(json.loads((run_dir / "baselines.json").read_text())) if not r["holdout"]]
    means = {kind: sum(r[kind]["dice"] for r in rows) / len(rows) for kind in ("federated", "pooled", "local")}
    return {"rows": rows, "means": means, "run_dir": str(run_dir),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": load_average(sep=" ", digits=2)}


def to_markdown(result: dict[str, Any], *, seed: int) -> str:
    """One seed's table and verdict."""
    means = result["means"]
    ratio = means["federated"] / means["pooled"]
    lines = [f"Seed {seed} (measured {result['date']}, load average {result['load']}):", "",
             "| site | federated Dice | pooled Dice | local-only Dice |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['site']} | {row['federated']['dice']:.4f} | {row['pooled']['dice']:.4f} "
                     f"| {row['local']['dice']:.4f} |")
    lines.append(f"| **mean** | **{means['federated']:.4f}** | **{means['pooled']:.4f}** | **{means['local']:.4f}** |")
    verdict = "met" if ratio >= TARGET_RATIO_TO_POOLED and means["federated"] > means["local"] else "NOT met"
    lines += ["", f"Federated / pooled = **{ratio:.3f}** (target >= {TARGET_RATIO_TO_POOLED}); federated - mean "
                  f"local-only = **{means['federated'] - means['local']:+.4f}** (target > 0): {verdict}. "
                  "Per-case bootstrap intervals are in the run's report.md."]
    return "\n".join(lines) + "\n"


def section(results: dict[int, dict[str, Any]], command: str) -> str:
    """The BENCHMARKS.md section: the command, then one table per seed."""
    spec = SimulationSpec()
    sizes = "/".join(map(str, site_sizes(spec.sites, min_cases=spec.cases_range[0], max_cases=spec.cases_range[1])))
    head = (f"Command: `{command}` (default federation: {spec.sites} synthetic hospitals with their own scanners "
            f"and populations and {sizes} cases (75% training), {spec.rounds} rounds, default 2D U-Net, no DP; "
            "baselines with the same model, seed and total epochs)\n")
    return "\n".join([head] + [to_markdown(result, seed=seed) for seed, result in results.items()])


def main() -> None:
    quiet_optional_codec_notice()
    exit_on_sigterm()  # a killed benchmark still stops the Flower/Ray processes it started
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/baselines"))
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    command = ".venv/bin/python -m benchmarks.federated_vs_baselines --seeds " + " ".join(map(str, args.seeds))
    results: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        results[seed] = run(seed, args.out)
        text = section(results, command)
        print(text, flush=True)
        if not args.no_write:
            write_section("federated-vs-baselines", "Federated vs pooled vs local-only (issue 7)", text)


if __name__ == "__main__":
    main()
