"""Peak server memory and time to aggregate K site updates: fedseg's spooled mean vs Flower's FedAvg.

Each (model, K, method) case runs in a fresh subprocess so peaks do not mix.
Updates are generated one at a time, as they would arrive from sites; Flower's
FedAvg gets them as the list that ``Grid.send_and_receive`` returns (all held
at once), fedseg's strategy takes them one by one through its collector
(checked, spooled to disk, dropped) and averages from the spool.

Peak memory is reported above the baseline taken just before the first update
arrives (after one warm-up round of 2 updates, so that lazy imports and caches
are not counted), as a multiple of the model size: ``tracemalloc`` (Python + numpy
allocations; held replies count, making the next reply does not) and the RSS
resident set size sampled every millisecond (includes the benchmark's own reply
making, and can miss spikes shorter than a millisecond).
Time is the server's work only (taking in the replies and aggregating).

Run: ``.venv/bin/python -m benchmarks.server_memory`` (add ``--write`` to
update BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from shared.plan import manual_plan
from shared.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SITE, SITE_ID

MODELS = {  # name -> (run config overrides, K values)
    "harness 3D default (8,16,32)": ({"spatial-dims": 3, "channels": "8,16,32", "strides": "2,2",
                                      "patch-size": 32}, (10, 50, 200)),
    "RunConfig default channels in 3D (16,32,64,128)": ({"spatial-dims": 3}, (10, 50, 200)),
}
METHODS = ("fedseg", "flower")
SECTION = "## Server aggregation memory (issue 6)"
READING = (
    "Reading it: Flower's FedAvg holds every reply, so its peak grows linearly with K. fedseg holds "
    'one reply at a time plus a few KB of bookkeeping per site (site id, metrics, spool file name): '
    'for the 2.4 MB model the peak stays near 2.2-2.4x the model for any K (the target is < 3x). The'
    ' 0.14 MB harness model has one tensor that is most of the model, so per-tensor working copies '
    '(decoding, the float64 check, the serialised result) weigh more than the model itself and the '
    'bookkeeping is visible; in absolute terms its peak stays about 1 MB at K = 200. fedseg is '
    'slower because it checks every update and writes it to disk; FedMedian and trimmed mean hold '
    'all updates (not measured here).'
)


def measure(overrides: dict, k: int, method: str) -> dict:
    """Aggregate ``k`` synthetic updates with ``method``; return peak memory and time."""
    import time
    import tracemalloc

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from server.run_folder import RunRecorder
    from server.strategies.strategy import FedSegStrategy
    from shared.config import RunConfig
    from shared.model import build_model
    from shared.weights import model_to_arrays

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = RunConfig.from_mapping(overrides)
    global_arrays = model_to_arrays(build_model(manual_plan(config).model_config()))
    model_bytes = sum(a.numpy().nbytes for a in global_arrays.values())
    rng = np.random.default_rng(0)

    def reply(i: int) -> Message:
        arrays = ArrayRecord()
        for name, array in global_arrays.items():
            values = rng.standard_normal(tuple(array.shape), dtype=np.float32)
            values *= 1e-3
            values += array.numpy()
            arrays[name] = Array(values)
        content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: 1 + i % 7}),
                              SITE: ConfigRecord({SITE_ID: f"site-{i:04d}"})})
        return Message(content=content, dst_node_id=i + 1, message_type=MessageType.TRAIN)

    with tempfile.TemporaryDirectory(dir=".") as run_dir:
        strategy = FedSegStrategy(recorder=RunRecorder(Path(run_dir), config=config, plan=manual_plan(config)))
        strategy.expect_updates_of(global_arrays)
        warm_up = strategy.train_collector()  # one small round first: lazy imports are not the aggregation's memory
        for i in range(2):
            warm_up.add(reply(i))
        strategy.aggregate_closed(0, warm_up.close())
        FedAvg().aggregate_train(0, [reply(0), reply(1)])
        tracemalloc.start()
        base_traced = tracemalloc.get_traced_memory()[0]
        rss = RssSampler()
        peak_traced, seconds = 0, 0.0

        def timed(step: Any) -> Any:
            # Only the server's work is timed and traced; making the next reply (the "network") is not.
            nonlocal peak_traced, seconds
            tracemalloc.reset_peak()
            started = time.perf_counter()
            value = step()
            seconds += time.perf_counter() - started
            peak_traced = max(peak_traced, tracemalloc.get_traced_memory()[1] - base_traced)
            return value

        if method == "fedseg":
            collector = strategy.train_collector()
            for i in range(k):
                message = reply(i)
                timed(lambda: collector.add(message))  # noqa: B023 - called at once
                del message
            result, _ = timed(lambda: strategy.aggregate_closed(1, collector.close()))
        else:
            replies = [reply(i) for i in range(k)]  # what Grid.send_and_receive returns
            result, _ = timed(lambda: FedAvg().aggregate_train(1, replies))
        peak_rss = rss.stop()
    assert result is not None and set(result) == set(global_arrays)
    return {"model_mb": model_bytes / 1e6, "traced_mb": peak_traced / 1e6, "traced_x": peak_traced / model_bytes,
            "rss_x": max(peak_rss, 0) / model_bytes, "seconds": seconds}


class RssSampler:
    """Samples this process's resident memory every millisecond; :meth:`stop` returns the peak above the start."""

    def __init__(self) -> None:
        import threading

        from client.runtime.memory import resident_bytes

        self._rss = resident_bytes
        self.base = self._rss()
        self.peak = self.base
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, self._rss()) - self.base


def run_case(overrides: dict, k: int, method: str) -> dict:
    """:func:`measure` in a fresh interpreter."""
    code = ("import json, sys; from benchmarks.server_memory import measure; "
            f"print(json.dumps(measure(json.loads(sys.argv[1]), {k}, {method!r})))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table() -> str:
    """Run every case; return a markdown table."""
    lines = ["| model (size) | K | fedseg peak traced | fedseg peak RSS | fedseg s "
             "| Flower FedAvg peak traced | Flower FedAvg peak RSS | Flower s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (overrides, ks) in MODELS.items():
        for k in ks:
            ours, theirs = (run_case(overrides, k, method) for method in METHODS)
            lines.append(f"| {name} ({ours['model_mb']:.2f} MB) | {k} "
                         f"| {ours['traced_x']:.2f}x ({ours['traced_mb']:.1f} MB) | {ours['rss_x']:.2f}x "
                         f"| {ours['seconds']:.2f} | {theirs['traced_x']:.2f}x ({theirs['traced_mb']:.1f} MB) "
                         f"| {theirs['rss_x']:.2f}x | {theirs['seconds']:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    result = table()
    if args.write:
        write_section(Path("BENCHMARKS.md"), result)
    return 0


def write_section(path: Path, result: str) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, leaving other sections alone."""
    from benchmarks.report import write_section as write_benchmark_section

    body = ("Command: `.venv/bin/python -m benchmarks.server_memory --write`\n\n"
            "Peak memory above the server's baseline while aggregating K updates, as a multiple of the "
            "model size (and in MB); time to take in and aggregate all K updates. *fedseg* is the "
            "server's path for mean strategies (each reply checked for keys/shapes/dtypes/NaN/norm, "
            "spooled to disk in the run folder, then averaged chunk by chunk in site order); *Flower "
            "FedAvg* is `flwr.serverapp.strategy.FedAvg.aggregate_train` on the list of replies that "
            "`Grid.send_and_receive` returns. Traced = tracemalloc (Python + numpy allocations of the "
            "server's work); RSS = resident memory sampled every ms.\n\n" + result + "\n\n" + READING + "\n")
    write_benchmark_section("server-memory", SECTION.removeprefix("## "), body, path=path)


if __name__ == "__main__":
    sys.exit(main())
