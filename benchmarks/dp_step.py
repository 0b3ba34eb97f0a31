"""DP-SGD cost per training step: time and peak memory, DP vs non-DP, 2D and 3D default models.

    .venv/bin/python -m benchmarks.dp_step [--repeats 15] [--threads 1]

Each row trains the default U-Net of that dimension (2D: run config defaults;
3D: the simulation harness' 3D defaults) on a fixed random batch of the
run's patch size and batch size. A DP step is Opacus' real one (per-sample
gradients, clipping, noise, Adam) through :func:`client.dp_training.make_private`.
Times are medians over ``--repeats`` steps, measured interleaved with the
non-DP step in one process so machine load hits both alike. Peak memory is the
growth of the process' peak RSS over its steps, each variant in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "2D": {},  # RunConfig defaults
    "3D": {"spatial-dims": 3, "patch-size": 32, "channels": "8,16,32", "strides": "2,2", "batch-size": 2},
}
VARIANTS = ("non-DP", "hooks", "functorch")


def _setup(model_name: str, variant: str, act: str, stock: bool = False) -> Any:
    """Return a function running one training step of ``model_name`` in ``variant``."""
    import dataclasses

    import torch

    from client.dp_training import DPPlan, make_private
    from client.training import make_loss
    from shared.config import RunConfig
    from shared.model import build_unet

    config = RunConfig.from_mapping(MODELS[model_name])
    model_config = config.model_config()
    model = build_unet(dataclasses.replace(model_config, act=act))
    shape = (config.batch_size, config.in_channels) + (config.patch_size,) * config.spatial_dims
    images = torch.randn(shape)
    labels = (torch.rand((config.batch_size, 1) + shape[2:]) > 0.8).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if variant != "non-DP":
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                             batch_size=config.batch_size)
        plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, grad_sample_mode=variant)
        if stock:  # Opacus as shipped: functorch for transposed convolutions (for the whole process)
            import client.dp_grad_samplers  # noqa: F401  (registered once, then removed)
            from opacus.grad_sample.grad_sample_module import GradSampleHooks

            for conv in (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d):
                GradSampleHooks.GRAD_SAMPLERS.pop(conv, None)
        _, optimizer, _ = make_private(model, optimizer, loader, plan=plan)
    loss_fn = make_loss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return step


def time_model(model_name: str, *, repeats: int, act: str, stock: bool) -> dict[str, float]:
    """Median step seconds per variant, measured interleaved."""
    steps = {variant: _setup(model_name, variant, act, stock) for variant in VARIANTS}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant, step in steps.items():
            started = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - started)
    return {variant: statistics.median(values) for variant, values in times.items()}


def peak_memory_mb(model_name: str, variant: str, act: str, stock: bool, threads: int) -> float:
    """Peak RSS growth (MB) over a few steps of one variant, in a fresh process (Linux)."""
    code = (f"import torch; torch.set_num_threads({threads}); import json\n"
            f"from benchmarks.dp_step import _setup, _status_kb\n"
            f"step = _setup({model_name!r}, {variant!r}, {act!r}, {stock!r})\n"
            "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM)\n"
            "before = _status_kb('VmRSS')\n"
            "for _ in range(3): step()\n"
            "print(json.dumps((_status_kb('VmHWM') - before) / 1024))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field in kB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dp_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (default: 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a simulated site)")
    parser.add_argument("--act", default="relu", choices=("relu", "prelu"),
                        help="U-Net activation (default: relu, fedseg's; prelu is MONAI's default)")
    parser.add_argument("--stock", action="store_true",
                        help="Opacus as shipped: no fedseg grad sampler for transposed convolutions")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models:
        seconds = time_model(model_name, repeats=args.repeats, act=args.act, stock=args.stock)
        for variant in VARIANTS:
            memory = peak_memory_mb(model_name, variant, args.act, args.stock, args.threads)
            label = f"{variant} (stock Opacus)" if args.stock and variant == "hooks" else variant
            rows.append({"model": model_name, "act": args.act, "variant": label,
                         "step_ms": round(seconds[variant] * 1000, 1),
                         "time_ratio": round(seconds[variant] / seconds["non-DP"], 2),
                         "peak_mb": round(memory, 1)})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["model"]: r["peak_mb"] for r in rows if r["variant"] == "non-DP"}
    print("\n| model | act | mode | step ms | DP/non-DP time | peak MB | DP/non-DP memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mem_ratio = r["peak_mb"] / base[r["model"]] if base[r["model"]] > 0 else float("nan")
        print(f"| {r['model']} | {r['act']} | {r['variant']} | {r['step_ms']} | {r['time_ratio']}x "
              f"| {r['peak_mb']} | {mem_ratio:.2f}x |")
    print(f"\nmax RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
