"""Hospital-level DP (run config ``dp-level = "site"``): Dice against noise and epsilon.

Run from the repo root: ``.venv/bin/python -m benchmarks.site_dp_utility --sites 10 --rounds 5``;
it prints a table and writes it to its section of BENCHMARKS.md (``--no-write``: print only).
On synthetic sites (the harness's discs, ``small-unet`` preset, no patient-level DP) it runs the
same federation (same seed and sites; 10 local steps of 32 slices per round, to keep it short)
first without DP, then with hospital-level DP at each
``--noise`` multiplier. The clipping norm is the median ``update-norm`` of the plain run's
site updates (the rule the README gives: near the sites' typical norm). Each run reports its
final mean Dice over sites, the epsilon at delta 1e-5 after its rounds (Flower's accountant, from
``summary.json``) and the noise's standard deviation on the mean change.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import load_average, publish
from simulations.api import SimulationSpec, run_simulation


def simulate(*, sites: int, rounds: int, out: Path, site_dp: dict[str, Any]) -> dict[str, Any]:
    """One federation; its final Dice, update norms and hospital-level DP figures."""
    run_config = {"preset": "small-unet", "num-rounds": rounds, "local-steps": 10, "batch-size": 32,
                  "dp": bool(site_dp), **site_dp}
    spec = SimulationSpec(sites=sites, rounds=rounds, seed=2, out=out, min_cases=8, max_cases=12,
                          run_config=run_config)
    summary = run_simulation(spec, echo=False)
    rows = [json.loads(line) for line in ((out / "latest").resolve() / "metrics.jsonl").read_text().splitlines()]
    norms = [r["update-norm"] for r in rows if r["site"] != "global" and "update-norm" in r]
    last = [r for r in rows if r["site"] == "global"][-1]
    return {"dice": summary["final_dice"], "norms": norms, "epsilon": (summary.get("site_dp") or {}).get("epsilon"),
            "noise_std": last.get("site-dp-noise-std"),
            "trained": sum(1 for r in rows if r["site"] != "global" and r.get("train-status") == "ok")}


def table(plain: dict[str, Any], noisy: dict[float, dict[str, Any]], *, clip: float, sites: int,
          rounds: int) -> str:
    lines = [("| noise multiplier z | epsilon (delta 1e-5) | noise std on the mean change | final Dice | "
              "Dice / no-DP | site-rounds trained |"), "|---|---|---|---|---|---|",
             f"| no site-level DP | - | - | {plain['dice']:.3f} | 1.00 | {plain['trained']}/{sites * rounds} |"]
    for z, result in sorted(noisy.items()):
        lines.append(f"| {z:g} | {result['epsilon']:.2f} | {result['noise_std']:.4f} | {result['dice']:.3f} | "
                     f"{result['dice'] / plain['dice']:.2f} | {result['trained']}/{sites * rounds} |")
    return "\n".join(lines) + f"\n\nClipping norm {clip:.3g} (median update norm of the run without DP)."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    load = load_average()
    scratch = Path(tempfile.mkdtemp(prefix="site-dp-"))
    try:
        plain = simulate(sites=args.sites, rounds=args.rounds, out=scratch / "plain", site_dp={})
        clip = statistics.median(plain["norms"])
        noisy = {z: simulate(sites=args.sites, rounds=args.rounds, out=scratch / f"z{z:g}",
                             site_dp={"dp-level": "site", "dp-site-clipping-norm": clip,
                                      "dp-site-noise-multiplier": z}) for z in args.noise}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = table(plain, noisy, clip=clip, sites=args.sites, rounds=args.rounds)
    command = (f".venv/bin/python -m benchmarks.site_dp_utility --sites {args.sites} --rounds {args.rounds} "
               f"--noise {' '.join(f'{z:g}' for z in args.noise)}")
    body = (f"Synthetic data (the harness's discs), {args.sites} sites, {args.rounds} rounds of 10 steps of 32 "
            "slices, preset small-unet, "
            f"no patient-level DP; load average at the start / end: {load} / {load_average()}. "
            f"Command: `{command}`.\n\n{text}")
    publish("site-dp-utility", "Hospital-level DP: utility against noise (issue 22)", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
