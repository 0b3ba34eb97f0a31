"""Per-round wall time: the process deployment (TLS, node auth) vs the simulation, same model and data.

``.venv/bin/python -m benchmarks.deploy_latency --rounds 4``

Runs, one after the other on the same two synthetic hospitals and tiny U-Net:

- ``simulation``: Flower's simulation engine (``python -m simulations``);
- ``deploy-subprocess``: real SuperLink + 2 SuperNodes (TLS, node auth),
  Flower's default isolation (a fresh ``flwr-clientapp`` per message);
- ``deploy-process-warm``: same, ``--isolation process`` with the warm
  ClientApp executor (``deploy/clientapp_executor.py``).

A round's wall time is the time between consecutive ``[fedseg] round N``
lines (round 1, which includes start-up, is left out). Local compute is
``handle_train`` + ``handle_evaluate`` of one site, timed in this process
after a warm-up (slowest site); overhead = round time - local compute.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROUND_LINE = re.compile(r"\[fedseg\] round (\d+)/\d+")
BENCH_RUN_CONFIG = {"channels": "4,8", "strides": "2", "num-res-units": 0, "patch-size": 32,
                    "local-epochs": 1, "batch-size": 2}


def round_times(run: Callable[[Callable[[str], None]], Any]) -> list[float]:
    """Call ``run(on_line)``; return the seconds between consecutive round lines."""
    stamps: dict[int, float] = {}

    def on_line(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match:
            stamps[int(match.group(1))] = time.monotonic()

    run(on_line)
    rounds = sorted(stamps)
    return [stamps[r] - stamps[r - 1] for r in rounds[1:]]


def local_compute_s(datalists: list[Path], run_config: dict[str, Any], *, repeats: int = 3) -> float:
    """Slowest site's median train + evaluate time, in this (warm) process."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.handlers import handle_evaluate, handle_train
    from shared.config import RunConfig
    from shared.model import build_unet
    from shared.weights import model_to_arrays

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    arrays = model_to_arrays(build_unet(RunConfig.from_mapping(run_config).model_config()))
    per_site = []
    for datalist in datalists:
        context = Context(run_id=1, node_id=1, node_config={"site-id": datalist.parent.name,
                                                            "datalist": str(datalist)},
                          state=RecordDict(), run_config=dict(run_config))
        times = []
        for _ in range(repeats + 1):  # the first one warms up
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
            started = time.perf_counter()
            handle_train(Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), context)
            handle_evaluate(Message(content=content, dst_node_id=1, message_type=MessageType.EVALUATE), context)
            times.append(time.perf_counter() - started)
        per_site.append(statistics.median(times[1:]))
    return max(per_site)


def main(argv: list[str] | None = None) -> int:
    """Run the three variants and print the table."""
    from deploy.run_federation import DeploymentSpec, run_local_federation
    from simulations.api import SimulationSpec, run_simulation

    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-latency"))
    args = parser.parse_args(argv)
    config = dict(BENCH_RUN_CONFIG, **{"num-rounds": args.rounds})
    common = {"seed": 1, "rounds": args.rounds, "min_cases": 3, "max_cases": 4, "run_config": config}
    variants: dict[str, Callable[[Callable[[str], None]], Any]] = {
        "simulation": lambda on_line: run_simulation(
            SimulationSpec(sites=2, out=args.out / "simulation", **common), echo=False, on_progress=on_line),
        "deploy-subprocess": lambda on_line: run_local_federation(
            DeploymentSpec(out=args.out / "deploy-subprocess", sites=2, **common), echo=on_line),
        "deploy-process-warm": lambda on_line: run_local_federation(
            DeploymentSpec(out=args.out / "deploy-process", sites=2, isolation="process", **common), echo=on_line),
    }
    results = {name: round_times(run) for name, run in variants.items()}
    datalists = sorted((args.out / "deploy-subprocess").glob("*/data/*/datalist.json"))
    compute = local_compute_s(datalists, config)
    print(f"\nlocal compute per round (slowest site, train + evaluate, warm): {compute:.2f} s\n")
    print("| variant | per-round wall time, median (rounds 2..N) | overhead beyond local compute |")
    print("|---|---|---|")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.1f} s ({', '.join(f'{t:.1f}' for t in times)}) | {median - compute:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
