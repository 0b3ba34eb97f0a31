"""What secure aggregation costs: seconds per round and bytes each site sends, with and without it.

Run from the repo root: ``.venv/bin/python -m benchmarks.secagg_overhead --sites 3 10 50``;
it prints a table and writes it to its section of BENCHMARKS.md (``--no-write``: print only).
For each site count it runs the same simulated federation (same seed, the tiny U-Net of the
tests, no DP, ``overlap-evaluation`` off in both so the rounds are alike) twice, plain and with
``secure-aggregation = true``, and reads from each run folder the steady rounds' seconds
(``metrics.jsonl``, rounds after the first: the first also starts the engine) and, from every
site's egress audit log, the bytes of weights or masked vectors and of protocol keys and shares
it sent per round. The ratio is secure / plain round time.
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

TINY = {"model": "unet", "channels": "4,8", "strides": "2", "num-res-units": 0, "patch-size": 32,
        "local-steps": 2, "batch-size": 2, "plan": "manual", "dp": False, "overlap-evaluation": False}


def measure(*, sites: int, rounds: int, out: Path, secure: bool) -> dict[str, Any]:
    """One simulation; its steady seconds per round and per-site bytes per round."""
    spec = SimulationSpec(sites=sites, rounds=rounds, seed=1, out=out, min_cases=3, max_cases=4, timeout_s=3600,
                          run_config={**TINY, "num-rounds": rounds, "secure-aggregation": secure})
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
    return {"round_s": statistics.median(steady), "update_bytes": statistics.mean(update),
            "protocol_bytes": statistics.mean(protocol), "trained": trained, "expected": sites * rounds}


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
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    load = load_average()
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for sites in args.sites:
        results[sites] = {}
        for mode, secure in (("plain", False), ("secure", True)):
            out = Path(tempfile.mkdtemp(prefix=f"secagg-{sites}-{mode}-"))
            try:
                results[sites][mode] = measure(sites=sites, rounds=args.rounds, out=out, secure=secure)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"{sites} sites, {mode}: {results[sites][mode]}", flush=True)
    body = (f"Command: `.venv/bin/python -m benchmarks.secagg_overhead --sites {' '.join(map(str, args.sites))} "
            f"--rounds {args.rounds}`\n\nTiny 2D U-Net (4-8 filters, 2 local steps), 3-4 cases per site, no DP, "
            f"every site in every round, overlap-evaluation off in both; round seconds are the median of the "
            f"rounds after the first. Load average at the start / end: {load} / {load_average()}.\n\n"
            f"{table(results)}\n")
    publish("secagg-overhead", "Secure aggregation: round time and bytes per site (issue 22)", body,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
