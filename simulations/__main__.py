"""``python -m simulations``: run a simulated federation of synthetic hospitals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import FedSegError
from simulations.api import SimulationSpec, run_simulation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Generate synthetic hospitals and train a U-Net across them with Flower's "
                    "simulation engine. Writes runs/<run-id>/ (metrics.jsonl, global_model.pt, "
                    "summary.json) and points runs/latest at it.")
    parser.add_argument("--sites", type=int, default=3, help="number of virtual hospitals (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default: 5)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                        help="2D images or 3D volumes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, model and training (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders (default: runs)")
    parser.add_argument("--min-cases", type=int, help="fewest cases at a hospital (default: 400 in 2D, 48 in 3D)")
    parser.add_argument("--max-cases", type=int, help="most cases at a hospital (default: 600 in 2D, 80 in 3D)")
    parser.add_argument("--datalists", type=Path, nargs="+", default=[], metavar="SITE.json",
                        help="real multi-site data: one virtual hospital per datalist (site id = file name) "
                             "instead of synthetic hospitals")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (run config local-epochs)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="CPUs Ray reserves per virtual hospital (default: 1)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="GPU share per virtual hospital, e.g. 0.25 (default: 0)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    privacy = parser.add_argument_group("differential privacy (DP-SGD at every site; on by default)")
    privacy.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True,
                         help="train with DP-SGD (Opacus) at every site (default: on; --no-dp for a baseline)")
    privacy.add_argument("--noise-multiplier", type=float, help="DP noise multiplier (run config dp-noise-multiplier)")
    privacy.add_argument("--max-grad-norm", type=float, help="per-case clipping norm (run config dp-max-grad-norm)")
    privacy.add_argument("--target-epsilon", type=float,
                         help="epsilon each round may spend; the noise is computed from it (run config "
                              "dp-target-epsilon)")
    privacy.add_argument("--max-epsilon", type=float, default=8.0,
                         help="every virtual hospital's total budget (node config max-epsilon; default: 8)")
    privacy.add_argument("--dp-delta", type=float, default=1e-5,
                         help="every virtual hospital's delta (node config dp-delta; default: 1e-5)")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run config value, e.g. --run-config learning-rate=0.001 (repeatable)")
    return parser


def parse_run_config(pairs: list[str]) -> dict[str, object]:
    """Parse ``KEY=VALUE`` pairs with TOML value syntax (bare words are strings)."""
    import tomllib

    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise FedSegError(f"--run-config expects KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def privacy_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Run-config values of the DP options that were given."""
    values: dict[str, object] = {"dp": args.dp}
    for option, key in (("noise_multiplier", "dp-noise-multiplier"), ("max_grad_norm", "dp-max-grad-norm"),
                        ("target_epsilon", "dp-target-epsilon")):
        if getattr(args, option) is not None:
            values[key] = getattr(args, option)
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = parse_run_config(args.run_config)
        if args.local_epochs is not None:
            overrides["local-epochs"] = args.local_epochs
        overrides.update(privacy_overrides(args))
        spec = SimulationSpec(sites=args.sites, rounds=args.rounds, spatial_dims=args.spatial_dims,
                              seed=args.seed, out=args.out, min_cases=args.min_cases, max_cases=args.max_cases,
                              cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client,
                              timeout_s=args.timeout, run_config=overrides,
                              datalists=tuple(args.datalists), max_epsilon=args.max_epsilon,
                              dp_delta=args.dp_delta)
        run_simulation(spec)
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
