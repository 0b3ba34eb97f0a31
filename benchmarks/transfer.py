"""Benchmark (issue 21): starting from a trained model, training part of it, personal norm layers.

On a real-image task (``--task``; ``benchmarks/real_data.py``): ``donors`` (default; six real donors'
brains, each hospital its own synthetic scanner, one T2-weighted) or ``template`` (one real T1 image,
four hospitals that differ only in acquisition: coronal, sagittal, axial thick slices, isotropic).
The first half of the task's sites train a model ("pretrained"), and the other half fine-tune it;
every run goes through fedseg's harness. After the pretrained model is trained it is evaluated, untrained,
at the other sites (``target-zero-shot``: an ``evaluate-only`` run):

- ``transfer``: the other sites train from a random start and from that model, for the same rounds.
  Reported: the round at which each reaches the random start's final Dice, and both final Dice.
- ``dp-decoder``: the other sites from the pretrained model training ``decoder+norm`` only,
  with DP (each site's budget ``--max-epsilon``) and without; then from a random start (every
  weight) with DP and without.
- ``dp-local-norm``: the non-DP ``decoder+norm`` run, then the DP one with ``local-norm``: each site keeps its own
  norm weights (still trained under DP), so a site whose contrast differs need not move the shared ones.
- ``dp-norm``: the other sites from the pretrained model training the norm layers only (3 k of the
  network's 1.9 M weights: DP-SGD's noise grows with the square root of the trained weights), with DP and without.
- ``fedbn``: all sites without DP, ``local-norm`` false and true: per-site final Dice (the
  T2 site can absorb its inverted contrast in its own first norm layer).

Usage (after the set-up step of ``benchmarks/README.md``, real images)::

    .venv/bin/python -m benchmarks.transfer --parts transfer dp-decoder dp-local-norm dp-norm fedbn --rounds 25

Results go to ``--out``/results.json and are printed as Markdown tables; run again with the same
``--out``, finished federations are read back and one cut short resumes from its checkpoint. Each federation takes what
a ``benchmarks.real_tasks`` run of the same rounds takes (hours for 25 rounds on CPU): 12 federations
in all (pretrain once, then 2 + 4 + 1 + 2 + 2 less the two runs parts share) and one evaluation round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.real_data import DATA_DIR, PACKAGES_DIR, TASKS, MissingRequirements, prepare_task
from benchmarks.resume import finished_run, newest_checkpoint_run
from shared.cli import exit_on_sigterm, quiet_optional_codec_notice
from shared.config import RunConfig
from shared.errors import FedSegError

DEFAULT_OUT = Path("benchmarks/out/transfer")
PARTS = ("transfer", "dp-decoder", "dp-local-norm", "dp-norm", "fedbn")


def federate(name: str, datalists: list[Path], *, out: Path, rounds: int, seed: int, max_epsilon: float,
             run_config: dict[str, Any]) -> dict[str, Any]:
    """One federation through the harness; its global Dice per round, final per-site Dice and model file.

    A federation that finished in ``out`` before (its ``latest`` run has a summary) is read, not rerun;
    one cut short with a checkpoint goes on from it (``resume-from``), so a run of hours can span sittings.
    """
    from simulations.api import SimulationSpec, run_simulation

    finished = finished_run(out / name)
    if finished is not None:
        print(f"[transfer] {name}: finished before in {finished}; read, not rerun", flush=True)
    else:
        earlier = newest_checkpoint_run(out / name)
        carry_on = {"resume-from": str(earlier)} if earlier else {}
        spec = SimulationSpec(datalists=tuple(datalists), rounds=rounds, seed=seed, out=out / name,
                              max_epsilon=max_epsilon, run_config={**run_config, **carry_on})
        print(f"[transfer] {name}: {len(datalists)} sites, {rounds} rounds, {run_config}"
              f"{', resuming ' + str(earlier) if carry_on else ''}", flush=True)
        run_simulation(spec, echo=True)
    run_dir = (out / name / "latest").resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    curve = [row["dice"] for row in rows if row["site"] == "global"]
    final_round = max(row["round"] for row in rows)
    sites = {row["site"]: row.get("dice") for row in rows if row["site"] != "global" and row["round"] == final_round}
    return {"run_dir": str(run_dir), "model": str(run_dir / "global_model.pt"), "dice_per_round": curve,
            "final_dice": curve[-1] if curve else None, "site_dice": sites, "run_config": run_config}


def rounds_to(curve: list[float | None], target: float) -> int | None:
    """The first round (1-based) whose global Dice reaches ``target`` (None: never)."""
    return next((r for r, dice in enumerate(curve, start=1) if dice is not None and dice >= target), None)


def run_parts(parts: list[str], *, datalists: list[Path], out: Path, rounds: int, seed: int,
              max_epsilon: float, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run the asked parts in the order given; the pretrained model is trained once for those that need it."""
    source, target = datalists[:len(datalists) // 2], datalists[len(datalists) // 2:]
    plain, dp = {**run_config, "dp": False}, {**run_config, "dp": True}
    results: dict[str, Any] = {}

    def run(name: str, sites: list[Path], extra: dict[str, Any], rounds: int = rounds) -> dict[str, Any]:
        results[name] = federate(name, sites, out=out, rounds=rounds, seed=seed, max_epsilon=max_epsilon,
                                 run_config=extra)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        return results[name]

    if set(parts) - {"fedbn"}:  # every part but fedbn starts from (or is compared with) the pretrained model
        pretrained = run("pretrain", source, plain)["model"]
        # the pretrained model at the target sites before any training there: what fine-tuning adds to
        run("target-zero-shot", target, {**plain, "initial-model": pretrained, "evaluate-only": True}, rounds=1)
        decoder = {"initial-model": pretrained, "train-layers": "decoder+norm"}
    for part in parts:  # in the order asked: a sitting of a few hours runs what matters most first
        if part == "transfer":
            from_model = run("target-pretrained", target, {**plain, "initial-model": pretrained})
            random = run("target-random", target, plain)
            goal = random["final_dice"]
            results["transfer-summary"] = {
                "rounds_random": rounds_to(random["dice_per_round"], goal),
                "rounds_pretrained": rounds_to(from_model["dice_per_round"], goal)}
        elif part == "dp-decoder":
            run("target-dp-pretrained-decoder", target, {**dp, **decoder})
            run("target-pretrained-decoder", target, {**plain, **decoder})
            run("target-dp-random", target, dp)
            run("target-random", target, plain)  # the DP random start's twin (read back if transfer ran it)
        elif part == "dp-local-norm":  # its non-DP twin first: read back, not rerun, if dp-decoder ran it
            run("target-pretrained-decoder", target, {**plain, **decoder})
            run("target-dp-pretrained-decoder-local-norm", target, {**dp, **decoder, "local-norm": True})
        elif part == "dp-norm":
            norm = {"initial-model": pretrained, "train-layers": "norm"}
            run("target-dp-pretrained-norm", target, {**dp, **norm})
            run("target-pretrained-norm", target, {**plain, **norm})
        elif part == "fedbn":
            run("all-fedavg", datalists, plain)
            run("all-fedbn", datalists, {**plain, "local-norm": True})
    results["dp-summary"] = dp_ratios(results)
    results["dp-gain-kept"] = dp_gains_kept(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# Each DP run against the run that differs from it only in DP.
DP_PAIRS = {"target-dp-pretrained-decoder": "target-pretrained-decoder",
            "target-dp-pretrained-decoder-local-norm": "target-pretrained-decoder",
            "target-dp-pretrained-norm": "target-pretrained-norm",
            "target-dp-random": "target-random"}


def dp_ratios(results: dict[str, Any]) -> dict[str, float]:
    """Final Dice of each DP run over that of its non-DP twin, for the pairs both present."""
    ratios = {}
    for dp_run, plain_run in DP_PAIRS.items():
        dp_dice = results.get(dp_run, {}).get("final_dice")
        plain_dice = results.get(plain_run, {}).get("final_dice")
        if dp_dice is not None and plain_dice:
            ratios[dp_run] = dp_dice / plain_dice
    return ratios


def dp_gains_kept(results: dict[str, Any]) -> dict[str, float]:
    """For each DP run from the pretrained model: its gain over the untrained model (``target-zero-shot``)
    as a share of its non-DP twin's gain. A DP/non-DP Dice ratio near 1 says little when the pretrained
    model needs little training at the target sites; this says how much of what training adds DP keeps."""
    zero = results.get("target-zero-shot", {}).get("final_dice")
    kept = {}
    for dp_run, plain_run in DP_PAIRS.items():
        dp_dice = results.get(dp_run, {}).get("final_dice")
        plain_dice = results.get(plain_run, {}).get("final_dice")
        if "pretrained" in dp_run and None not in (zero, dp_dice, plain_dice) and plain_dice != zero:
            kept[dp_run] = (dp_dice - zero) / (plain_dice - zero)
    return kept


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: final global Dice per run, then per-site Dice."""
    runs = {name: r for name, r in results.items() if "final_dice" in r}
    lines = ["| run | final Dice | Dice per round |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(r['final_dice'])} | {' '.join(_fmt(d) for d in r['dice_per_round'])} |"
              for name, r in runs.items()]
    if "transfer-summary" in results:
        s = results["transfer-summary"]
        lines += ["", (f"Rounds to the random start's final Dice: random {s['rounds_random']}, "
                       f"pretrained {s['rounds_pretrained']}.")]
    if results.get("dp-summary"):
        lines += ["", "DP over non-DP final Dice: " + ", ".join(
            f"{name} {ratio:.2f}x (against {DP_PAIRS[name]})" for name, ratio in results["dp-summary"].items())]
    if results.get("dp-gain-kept"):
        lines += ["", "Share of the non-DP run's gain over the untrained pretrained model that DP keeps: " + ", ".join(
            f"{name} {share:.2f}" for name, share in results["dp-gain-kept"].items())]
    sites = sorted({site for r in runs.values() for site in r["site_dice"]})
    lines += ["", "| site | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {site} | " + " | ".join(_fmt(r["site_dice"].get(site)) for r in runs.values()) + " |"
              for site in sites]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    quiet_optional_codec_notice()
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run, in this order (default: %(default)s)")
    parser.add_argument("--task", choices=TASKS, default="donors", help="the real-image task (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=RunConfig().num_rounds, help="rounds of every federation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epsilon", type=float, default=8.0, help="each site's budget in the DP runs")
    parser.add_argument("--train-cases", type=int, default=12, help="training cases per site")
    parser.add_argument("--val-cases", type=int, default=4, help="validation cases per site")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where the task's sites are written")
    parser.add_argument("--packages", type=Path, default=PACKAGES_DIR, help="the set-up step's packages folder")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="run config for every run (repeatable), e.g. --run-config local-steps=20")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from shared.cli import parse_run_config

    try:
        datalists = prepare_task(args.task, seed=args.seed, training=args.train_cases, validation=args.val_cases,
                                 data_dir=args.data_dir, packages=args.packages)
        args.out.mkdir(parents=True, exist_ok=True)
        results = run_parts(args.parts, datalists=datalists, out=args.out.resolve(), rounds=args.rounds,
                            seed=args.seed, max_epsilon=args.max_epsilon,
                            run_config=parse_run_config(args.run_config))
    except (FedSegError, MissingRequirements) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
