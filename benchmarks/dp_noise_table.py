"""How much noise DP-SGD must add at a site, by its number of cases, batch and steps (no training).

Run from the repo root: ``.venv/bin/python -m benchmarks.dp_noise_table``; it prints a Markdown
table (``--write``: also into its section of BENCHMARKS.md). For each site size N, batch B and run
length T (steps per site over the whole run) it asks Opacus for the noise multiplier sigma that
spends ``--epsilon`` at ``--delta`` with Poisson sampling rate B/N (what each site's privacy
ledger charges), and reports sigma / B: the standard deviation of the noise on the averaged
clipped gradient in units of the clipping norm, the figure that decides whether a step carries
signal. At fixed N and T it hardly depends on B (a larger batch needs a proportionally larger
sigma once B/N is large), so only more cases per site, or fewer trained weights, lower it.
"""

from __future__ import annotations

import argparse
import warnings

from benchmarks.report import publish


def noise_per_example(*, cases: int, batch: int, steps: int, epsilon: float, delta: float) -> float:
    """sigma / B for a site of ``cases`` cases spending ``epsilon`` over ``steps`` steps of ``batch``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' "optimal order is the largest alpha" at high noise
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=batch / cases,
                                     steps=steps, accountant="rdp")
    return sigma / batch


def table(*, cases: list[int], batches: list[int], steps: list[int], epsilon: float, delta: float) -> str:
    header = "| cases per site | " + " | ".join(f"B={b}, T={t}" for t in steps for b in batches) + " |"
    lines = [header, "|---|" + "---|" * (len(batches) * len(steps))]
    for n in cases:
        cells = [f"{noise_per_example(cases=n, batch=b, steps=t, epsilon=epsilon, delta=delta):.3f}"
                 for t in steps for b in batches if b <= n]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 34])
    parser.add_argument("--steps", type=int, nargs="+", default=[250, 1250])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    text = table(cases=args.cases, batches=args.batches, steps=args.steps, epsilon=args.epsilon, delta=args.delta)
    body = (f"sigma / B (noise on the averaged clipped gradient, in clipping norms) that spends epsilon "
            f"{args.epsilon:g} at delta {args.delta:g} over T steps of batch B (Opacus RDP, Poisson rate B/N). "
            f"Command: `.venv/bin/python -m benchmarks.dp_noise_table --write`.\n\n{text}")
    publish("dp-noise-table", "DP-SGD: noise per step by site size, batch and run length (issue 19)", body,
            write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
