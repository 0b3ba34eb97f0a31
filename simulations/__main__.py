"""``python -m simulations``: run a simulated federation of synthetic hospitals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import exit_on_sigterm, parse_run_config, quiet_optional_codec_notice
from shared.errors import FedSegError
from simulations.api import DEFAULT_CASES, SimulationSpec, run_simulation
from simulations.baselines import parse_baselines
from simulations.faults import FaultPlan

SPEC = SimulationSpec()  # the CLI's defaults are the spec's
FAULTS = FaultPlan()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Generate synthetic hospitals and train a U-Net across them with Flower's "
                    "simulation engine. Writes runs/<run-id>/ (metrics.jsonl, global_model.pt, "
                    "summary.json) and points runs/latest at it.")
    parser.add_argument("--sites", type=int, default=SPEC.sites,
                        help="number of virtual hospitals (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=SPEC.rounds,
                        help="federated rounds (default: the preset's run config num-rounds, 25 for 'default')")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=SPEC.spatial_dims,
                        help="2D images or 3D volumes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SPEC.seed,
                        help="seed for data, model and training (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=SPEC.out,
                        help="folder for run folders (default: %(default)s)")
    (min_2d, max_2d), (min_3d, max_3d) = DEFAULT_CASES[2], DEFAULT_CASES[3]
    parser.add_argument("--min-cases", type=int,
                        help=f"cases at the smallest hospital (default: {min_2d} in 2D, {min_3d} in 3D)")
    parser.add_argument("--max-cases", type=int,
                        help=f"cases at the largest hospital (default: {max_2d} in 2D, {max_3d} in 3D); "
                        "sizes in between are spread geometrically")
    parser.add_argument("--datalists", type=Path, nargs="+", default=[], metavar="SITE.json",
                        help="real multi-site data: one virtual hospital per datalist (site id = file name) "
                             "instead of synthetic hospitals")
    parser.add_argument("--partition", choices=("natural", "iid", "quantity", "label", "feature"),
                        default=SPEC.partition,
                        help="how cases are spread over sites: natural (one synthetic hospital or datalist per "
                             "site), feature (acquisition shifts only), or split a pool of cases: iid, "
                             "quantity (power-law sizes), label (Dirichlet skew of lesion burden) "
                             "(default: %(default)s)")
    parser.add_argument("--pool-cases", type=int, default=SPEC.pool_cases,
                        help="cases in the pool for iid/quantity/label (default: sites x mean of min/max cases)")
    parser.add_argument("--quantity-exponent", type=float, default=SPEC.quantity_exponent,
                        help="power-law exponent of site sizes for --partition quantity "
                             "(default: %(default)s)")
    parser.add_argument("--dirichlet-alpha", type=float, default=SPEC.dirichlet_alpha,
                        help="Dirichlet concentration for --partition label; small = more skew "
                             "(default: %(default)s)")
    parser.add_argument("--sites-per-round", type=int, default=SPEC.sites_per_round,
                        help="sites sampled for training and evaluation each round (default: all)")
    parser.add_argument("--ray-address", default=SPEC.ray_address,
                        help="join an existing Ray cluster (e.g. 10.0.0.5:6379) instead of starting one")
    parser.add_argument("--stock-engine", action="store_true",
                        help="run Flower's simulation engine unpatched (it finds messages by a 0.1 s sweep "
                             "over every node; by default each message is handed over when stored)")
    parser.add_argument("--baselines", default="", metavar="pooled,local",
                        help="also train a model on all sites' data pooled and/or one per site alone (same "
                             "plan, seed and total steps) and compare them per site in the report")
    parser.add_argument("--holdout-sites", type=int, default=SPEC.holdout_sites,
                        help="extra sites that never train; the final models are evaluated on them")
    parser.add_argument("--local-steps", type=int, help="optimisation steps per round (run config local-steps)")
    parser.add_argument("--model", type=Path, metavar="FILE",
                        help="start from this model (run config initial-model): a fedseg global_model.pt, a MONAI "
                             "bundle folder or a torch state dict")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate --model at every site and train nothing (run config evaluate-only)")
    parser.add_argument("--cpus-per-client", type=float, default=SPEC.cpus_per_client,
                        help="CPUs Ray reserves per virtual hospital (default: %(default)s)")
    parser.add_argument("--gpus-per-client", type=float, default=SPEC.gpus_per_client,
                        help="GPU share per virtual hospital, e.g. 0.25 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=SPEC.timeout_s,
                        help="give up after this many seconds (default: 0, as long as every phase may take: "
                             "(2 x num-rounds + 1) x round-timeout)")
    faults = parser.add_argument_group(
        "fault injection", "make simulated hospitals misbehave (N sites drawn with --fault-seed, or site ids "
                           "such as hospital-02,hospital-03)")
    faults.add_argument("--fail-sites", default="", metavar="N|IDS", help="sites whose ClientApp crashes mid-round")
    faults.add_argument("--slow-sites", default="", metavar="N|IDS",
                        help="sites that stall --slow-seconds before training (stragglers)")
    faults.add_argument("--poison-sites", default="", metavar="N|IDS", help="sites that send a bad update")
    faults.add_argument("--poison-kind", choices=("nan", "scale"), default=FAULTS.poison_kind,
                        help="NaN weights, or the update scaled by --poison-scale (default: %(default)s)")
    faults.add_argument("--poison-scale", type=float, default=FAULTS.poison_scale,
                        help="scale factor (default: %(default)s)")
    faults.add_argument("--slow-seconds", type=float, default=FAULTS.slow_seconds,
                        help="stall of slow sites (default: %(default)s)")
    faults.add_argument("--fault-seed", type=int, default=FAULTS.seed,
                        help="seed choosing faulty sites (default: %(default)s)")
    privacy = parser.add_argument_group("differential privacy (DP-SGD at every site; on by default)")
    privacy.add_argument("--dp", action=argparse.BooleanOptionalAction, default=None,
                         help="train with DP-SGD (Opacus) at every site (default: on; --no-dp for a baseline)")
    privacy.add_argument("--noise-multiplier", type=float, help="DP noise multiplier (run config dp-noise-multiplier)")
    privacy.add_argument("--max-grad-norm", type=float, help="per-case clipping norm (run config dp-max-grad-norm)")
    privacy.add_argument("--target-epsilon", type=float,
                         help="epsilon each round may spend; the noise is computed from it (run config "
                              "dp-target-epsilon)")
    privacy.add_argument("--max-epsilon", type=float, default=SPEC.max_epsilon,
                         help="every virtual hospital's total budget (node config max-epsilon; "
                              "default: %(default)s)")
    privacy.add_argument("--dp-delta", type=float, default=SPEC.dp_delta,
                         help="every virtual hospital's delta (node config dp-delta; default: %(default)s)")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run config value, e.g. --run-config learning-rate=0.001 (repeatable)")
    return parser


def fault_plan(args: argparse.Namespace) -> FaultPlan:
    """The fault-injection options as a :class:`FaultPlan`."""
    return FaultPlan(fail_sites=args.fail_sites, slow_sites=args.slow_sites, poison_sites=args.poison_sites,
                     poison_kind=args.poison_kind, poison_scale=args.poison_scale,
                     slow_seconds=args.slow_seconds, seed=args.fault_seed)


def privacy_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Run-config values of the DP options that were given.

    A noise multiplier or per-round epsilon given here replaces the harness'
    default of deriving each site's noise from its budget (``dp-noise-from-budget``).
    """
    values: dict[str, object] = {} if args.dp is None else {"dp": args.dp}
    for option, key in (("noise_multiplier", "dp-noise-multiplier"), ("max_grad_norm", "dp-max-grad-norm"),
                        ("target_epsilon", "dp-target-epsilon")):
        if getattr(args, option) is not None:
            values[key] = getattr(args, option)
    if args.noise_multiplier is not None or args.target_epsilon is not None:
        values["dp-noise-from-budget"] = False
    return values


def spec_from_args(args: argparse.Namespace) -> SimulationSpec:
    """The :class:`SimulationSpec` that parsed command-line options ask for."""
    overrides = parse_run_config(args.run_config)
    if args.local_steps is not None:
        overrides["local-steps"] = args.local_steps
    overrides.update(privacy_overrides(args))
    if args.model is not None:
        overrides["initial-model"] = str(args.model)
    if args.evaluate_only:
        if "initial-model" not in overrides:
            raise FedSegError("--evaluate-only needs the model to evaluate: --model FILE")
        overrides["evaluate-only"] = True
    return SimulationSpec(sites=args.sites, rounds=args.rounds, spatial_dims=args.spatial_dims,
                          seed=args.seed, out=args.out, min_cases=args.min_cases, max_cases=args.max_cases,
                          cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client,
                          timeout_s=args.timeout, run_config=overrides,
                          datalists=tuple(args.datalists), partition=args.partition,
                          pool_cases=args.pool_cases, quantity_exponent=args.quantity_exponent,
                          dirichlet_alpha=args.dirichlet_alpha, sites_per_round=args.sites_per_round,
                          ray_address=args.ray_address, stock_engine=args.stock_engine,
                          baselines=parse_baselines(args.baselines),
                          holdout_sites=args.holdout_sites, faults=fault_plan(args),
                          max_epsilon=args.max_epsilon, dp_delta=args.dp_delta)


def main(argv: list[str] | None = None) -> int:
    quiet_optional_codec_notice()
    exit_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        summary = run_simulation(spec_from_args(args))
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the run's processes were stopped on the way out (context managers)
        print("interrupted: the run's Flower and Ray processes were stopped; to go on from its last "
              "checkpoint, run again with --run-config resume-from=<run folder>", file=sys.stderr)
        return 130
    if summary.get("stopped"):  # no site could train: not a result to take for one
        print(f"error: {summary['stopped']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
