"""What secure aggregation costs: seconds per round and bytes each site sends, with and without it.

Run from the repo root: ``.venv/bin/python -m benchmarks.secagg_overhead --sites 3 10 50``;
it prints a table and writes it to its section of BENCHMARKS.md (``--no-write``: print only).
For each site count it runs the same simulated federation (same seed, synthetic 2D hospitals of
3-4 cases, no DP, ``overlap-evaluation`` off in both so the rounds are alike) twice, plain and with
``secure-aggregation = true``, and reads from each run folder the steady rounds' seconds
(``metrics.jsonl``, rounds after the first: the first also starts the engine) and, from every
site's egress audit log, the bytes of weights or masked vectors and of protocol keys and shares
it sent per round. The ratio is secure / plain round time.

The model is the tiny U-Net of the tests (2 local steps), which makes a round's fixed
per-message costs look large; ``--run-config preset=default`` (any run config values, as for
``python -m simulations``) measures a run config's own model instead, e.g. the default preset's
planned DynUNet and its 50 local steps, and writes its own section. ``--repeats N`` runs each
pair N times, alternating which of the two runs first (the machine's load drifts), and reports
the median.
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
from shared.cli import parse_run_config
from simulations.api import SimulationSpec, run_simulation

#: What every measured run sets whatever its model: rounds alike in both modes (see the module docstring).
ALIKE = {"dp": False, "overlap-evaluation": False}
TINY = {"model": "unet", "channels": "4,8", "strides": "2", "num-res-units": 0, "patch-size": 32,
        "local-steps": 2, "batch-size": 2, "plan": "manual", **ALIKE}


def measure(*, sites: int, rounds: int, out: Path, secure: bool, run_config: dict[str, Any]) -> dict[str, Any]:
    """One simulation of ``run_config``; its steady seconds per round and per-site bytes per round."""
    spec = SimulationSpec(sites=sites, rounds=rounds, seed=1, out=out, min_cases=3, max_cases=4, timeout_s=3600,
                          run_config={**run_config, "num-rounds": rounds, "secure-aggregation": secure})
    run_simulation(spec, echo=False)
    run_dir = (out / "latest").resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["round-seconds"] for r in rows if r["site"] == "global" and r["round"] > 1]
    update, protocol = [], []
    for log in sorted(run_dir.glob("state/*/egress-audit.jsonl")):
        entries = [json.loads(line) for line in log.open() if '"train"' in line]
        update.append(sum(e["array-bytes"] + _bytes(e, "masked_params") for e in entries) / rounds)
        protocol.append(sum(_bytes(e, None) for e in entries) / rounds)
    trained = sum(1 for r in rows if r["site"] != "global" and r.get("train-status") == "ok")
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    return {"round_s": statistics.median(steady), "update_bytes": statistics.mean(update),
            "protocol_bytes": statistics.mean(protocol), "trained": trained, "expected": sites * rounds,
            "plan": describe_plan(plan)}


def describe_plan(plan: dict[str, Any]) -> str:
    """One line naming the planned model, e.g. "unet 2D 4-8 filters, patch 32x32, batch 2, 2 local steps"."""
    return (f"{plan['model']} {plan['spatial_dims']}D {'-'.join(map(str, plan['channels']))} filters, patch "
            f"{'x'.join(map(str, plan['patch_size']))}, batch {plan['batch_size']}, {plan['local_steps']} local steps")


def measure_pair(*, sites: int, rounds: int, run_config: dict[str, Any], repeats: int) -> dict[str, dict[str, Any]]:
    """Plain and secure runs, ``repeats`` times each in alternating order; each mode's median round seconds."""
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    for repeat in range(repeats):
        order = [("plain", False), ("secure", True)]
        for mode, secure in order if repeat % 2 == 0 else order[::-1]:
            out = Path(tempfile.mkdtemp(prefix=f"secagg-{sites}-{mode}-"))
            try:
                runs[mode].append(measure(sites=sites, rounds=rounds, out=out, secure=secure, run_config=run_config))
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"{sites} sites, {mode}: {runs[mode][-1]}", flush=True)
    return {mode: {**results[-1], "round_s": statistics.median(r["round_s"] for r in results),
                   "all_round_s": [r["round_s"] for r in results]} for mode, results in runs.items()}


def _bytes(entry: dict[str, Any], key: str | None) -> int:
    """Bytes of the protocol record's ``key`` (None: every field but the masked vector)."""
    fields = entry.get("secagg") or {}
    chosen = [v for k, v in fields.items() if (k == key if key else k != "masked_params")]
    return sum(int(v.get("bytes", 0)) for v in chosen if isinstance(v, dict))


def table(results: dict[int, dict[str, dict[str, Any]]]) -> str:
    header = ("| sites | plain round s | secure round s | secure / plain | update bytes per site per round "
              "(plain / secure) | keys and shares per site per round | sites trained (plain / secure) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for sites, pair in sorted(results.items()):
        plain, secure = pair["plain"], pair["secure"]
        lines.append(f"| {sites} | {plain['round_s']:.2f} | {secure['round_s']:.2f} | "
                     f"{secure['round_s'] / plain['round_s']:.2f} | {plain['update_bytes']:,.0f} / "
                     f"{secure['update_bytes']:,.0f} | {secure['protocol_bytes']:,.0f} | "
                     f"{plain['trained']}/{plain['expected']} / {secure['trained']}/{secure['expected']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pair, alternating which runs first")
    parser.add_argument("--run-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="measure this run config (e.g. preset=default) instead of the tiny U-Net")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    run_config = {**parse_run_config(args.run_config), **ALIKE} if args.run_config else TINY
    load = load_average()
    results = {sites: measure_pair(sites=sites, rounds=args.rounds, run_config=run_config, repeats=args.repeats)
               for sites in args.sites}
    command = (f"`.venv/bin/python -m benchmarks.secagg_overhead --sites {' '.join(map(str, args.sites))} "
               f"--rounds {args.rounds}" + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
               + (f" --run-config {' '.join(args.run_config)}`" if args.run_config else "`"))
    plans = sorted({pair["plain"]["plan"] for pair in results.values()})
    body = (f"Command: {command}\n\nModel as planned: {'; '.join(plans)}. Synthetic 2D hospitals "
            f"(simulations/synthetic.py), 3-4 cases per site, no DP, every site in every round, overlap-evaluation "
            f"off in both; round seconds are the median of the rounds after the first"
            + (f" and of {args.repeats} runs per mode, alternating which mode ran first" if args.repeats > 1 else "")
            + f". Load average at the start / end: {load} / {load_average()} (2 cores, shared).\n\n{table(results)}\n")
    key, title = (("secagg-overhead-model", "Secure aggregation with a run config's own model (issue 22)")
                  if args.run_config else ("secagg-overhead", "Secure aggregation: round time and bytes per site (issue 22)"))
    publish(key, title, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
