"""CPU work of the planned DynUNet's sliding window per ``predict`` configuration (issue 24), robust to load.

Run: ``.venv/bin/python -m benchmarks.inference_cpu_probe [--shape 160x160x64] [--repeats 3]``.
One torch thread and process time (CPU seconds, not wall seconds), so other jobs on a shared machine change
the figures far less than they change :mod:`benchmarks.inference`'s wall times; configurations run
interleaved, the median is printed with the voxels whose class differs from ``before``'s. The network is
untrained (its time does not depend on its weights; near-ties between classes are commoner than in a
trained one, so the differing voxels are an upper bound).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.inference import planned_plan
    from client.inference.whole_volume import inference_context, inplace_activations, predict_volume
    from shared.model import build_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference_cpu_probe", description=__doc__)
    parser.add_argument("--shape", default="160x160x64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plan = planned_plan((512, 512, 200), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    plain = build_model(plan.model_config()).eval()
    inplace = inplace_activations(copy.deepcopy(plain))
    volume = torch.randn(1, *(int(n) for n in args.shape.split("x")))
    configs = {"before (4 per pass, no_grad)": (plain, 4, None), "8 per pass, in place (as merged)": (inplace, 8, "float32"),
               "4 per pass, in place (now)": (inplace, 4, "float32"), "4 per pass, bfloat16": (inplace, 4, "bfloat16")}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    masks = {}
    for _ in range(args.repeats):
        for name, (network, per_pass, precision) in configs.items():
            started = time.process_time()
            with torch.no_grad() if precision is None else inference_context(torch.device("cpu"), precision):
                logits = predict_volume(network, volume, spatial_dims=3, patch_size=plan.patch_size,
                                        sw_batch_size=per_pass)
            seconds[name].append(time.process_time() - started)
            masks[name] = logits[0].float().argmax(0)
    first = next(iter(configs))
    reference = sorted(seconds[first])[len(seconds[first]) // 2]
    for name, values in seconds.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name}: {median:.1f} CPU s (median of {len(values)}), {reference / median:.2f}x before, "
              f"{int((masks[name] != masks[first]).sum())} of {masks[first].numel()} voxels differ from before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
