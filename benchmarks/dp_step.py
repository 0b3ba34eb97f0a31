"""DP-SGD cost per training step: time and peak memory, DP vs non-DP, on fedseg's default models.

    .venv/bin/python -m benchmarks.dp_step [--repeats 20] [--threads 1] [--models ...] [--variants ...] [--write]

``--models 2D-dynunet 3D-dynunet`` measures DynUNet (nnU-Net's network) at
nnU-Net-like planned sizes (:data:`DYNUNET_PLANS`) into its own section;
``--models 2D-segresnet ... 3D-swinunetr`` the networks of issue 20 at CPU sizes
(:data:`benchmarks.dp_networks.NETWORK_PLANS`), ``--profile`` adding the
seconds each layer type's grad sampler takes per DP step.

Each model is trained on a fixed random batch of its run's patch and batch size
with the run's optimizer; a step is :func:`client.training.local.train_step` (forward,
backward) plus the optimizer step, as local training runs it. Variants:

- ``non-DP``: plain training;
- ``auto``: DP-SGD as fedseg ships it (Opacus hooks, fedseg's convolution grad
  samplers, backward to the first trained layers only);
- ``samplers-only``: fedseg's samplers, full backward (autograd also computes the
  batch weight gradients the DP optimizer discards; timing only: its backward
  starts from the mean loss, so its per-sample gradients are 1/batch of DP's);
- ``functorch``: Opacus' functorch mode (backward to the first trained layers only);
- ``stock``: Opacus as shipped (its unfold Conv sampler, functorch for transposed
  convolutions, its DPOptimizer, full backward): the baseline of issue 3.

All variants of a model are timed interleaved in one process, so machine load
hits them alike; medians of wall and CPU (thread) time. Peak memory is the
growth of peak RSS over 3 steps, each variant in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from benchmarks.dp_models import DYNUNET_PLANS, DYNUNET_SETUP_TEXT, MODEL_NAMES, SETUP_TEXT, UNET_RUNS
from benchmarks.dp_networks import NETWORK_PLANS, layers_and_profile
from benchmarks.dp_networks import SETUP_TEXT as NETWORK_SETUP_TEXT

# (mode, grad samplers, backward to the first trained layers only) per variant; mode None = no DP
VARIANTS: dict[str, tuple[str | None, str, bool]] = {
    "non-DP": (None, "fedseg", False), "auto": ("hooks", "fedseg", True),
    "samplers-only": ("hooks", "fedseg", False), "functorch": ("functorch", "fedseg", True),
    "stock": ("hooks", "stock", False),
}
#: Parameter-name prefixes trained by no variant (``--frozen``): what a DP step costs without those layers.
FROZEN: list[str] = []
def model_overrides(model_name: str) -> dict[str, Any]:
    """Run config of a measured model (a manual plan: no data needed)."""
    runs = {**UNET_RUNS, **DYNUNET_PLANS, **NETWORK_PLANS}
    return {"plan": "manual", "dp": False, **runs[model_name]}


def model_plan(model_name: str) -> Any:
    """(run config, plan) of a measured model."""
    from shared.config import RunConfig
    from shared.plan import manual_plan

    config = RunConfig.from_mapping(model_overrides(model_name))
    return config, manual_plan(config)


def use_samplers(kind: str) -> None:
    """Register fedseg's grad samplers and per-sample bookkeeping (``fedseg``) or Opacus' own (``stock``: unfold
    convolutions, its Linear and norm samplers, functorch for transposed convolutions, PReLU and window
    attention, a zero-filled copy of every per-sample gradient)."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
    from opacus.grad_sample.instance_norm import compute_instance_norm_grad_sample
    from opacus.grad_sample.linear import compute_linear_grad_sample
    from torch import nn

    from client.training import opacus_patches
    from client.training.dp_grad_samplers import CONV_LAYER_TYPES, conv_grad_sample, prelu_grad_sample
    from client.training.dp_norm_samplers import INSTANCE_NORM_TYPES, norm_grad_sample
    from client.training.dp_windows import (
        WindowAttention,
        window_attention_grad_sample,
        windowed_linear_grad_sample,
    )

    (opacus_patches.apply if kind == "fedseg" else opacus_patches.restore)()
    samplers = GradSampleHooks.GRAD_SAMPLERS
    samplers[nn.GroupNorm] = norm_grad_sample if kind == "fedseg" else compute_group_norm_grad_sample
    for layer_type in INSTANCE_NORM_TYPES:
        samplers[layer_type] = norm_grad_sample if kind == "fedseg" else compute_instance_norm_grad_sample
    for layer_type in CONV_LAYER_TYPES:
        if kind == "fedseg":
            samplers[layer_type] = conv_grad_sample
        elif issubclass(layer_type, nn.modules.conv._ConvTransposeNd):  # stock Opacus: functorch fallback
            samplers.pop(layer_type, None)
        else:
            samplers[layer_type] = compute_conv_grad_sample
    samplers[nn.Linear] = windowed_linear_grad_sample if kind == "fedseg" else compute_linear_grad_sample
    for layer_type, sampler in ((nn.PReLU, prelu_grad_sample), (WindowAttention, window_attention_grad_sample)):
        if kind == "fedseg":
            samplers[layer_type] = sampler
        else:
            samplers.pop(layer_type, None)


def setup_step(model_name: str, variant: str, act: str | None, *, keep_samplers: bool = False) -> Any:
    """Return a function running one training step of ``model_name`` in ``variant`` (``act`` None: the model's;
    ``keep_samplers``: the step leaves the grad-sampler registry as it finds it)."""
    import dataclasses

    import torch

    from client.training.dp_sgd import DPPlan, make_private
    from client.training.local import make_loss, make_optimizer, train_step
    from shared.model import build_model

    mode, samplers, per_sample_grads = VARIANTS[variant]
    config, plan_of_model = model_plan(model_name)
    model_config = dataclasses.replace(plan_of_model.model_config(), act=act or plan_of_model.model_config().act)
    model = build_model(model_config)
    for name, param in model.named_parameters():
        param.requires_grad_(not any(name.startswith(prefix) for prefix in FROZEN))
    shape = (plan_of_model.batch_size, config.in_channels) + plan_of_model.patch_size
    images = torch.randn(shape)
    labels = (torch.rand((plan_of_model.batch_size, 1) + shape[2:]) > 0.8).float()
    optimizer = make_optimizer(model, config=config)
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                             batch_size=plan_of_model.batch_size)
        plan = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1, grad_sample_mode=mode)
        use_samplers(samplers)  # Opacus prepares functorch for layers without a sampler when hooks attach
        _, optimizer, _ = make_private(model, optimizer, loader, plan=plan)
        if samplers == "stock":  # Opacus' own clipping and noise (stock samplers make no ghost records)
            from opacus.optimizers import DPOptimizer

            optimizer.__class__ = DPOptimizer
    loss_fn = make_loss(model_config=model_config)

    def step() -> None:
        if not keep_samplers:
            use_samplers(samplers)  # the registry is global: set it for this variant
        optimizer.zero_grad(set_to_none=True)
        train_step(model, images, labels, loss_fn, per_sample_grads=per_sample_grads)
        optimizer.step()

    return step


def time_model(model_name: str, *, repeats: int, act: str | None,
               variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of a step per variant, measured interleaved; a variant that fails (stock
    Opacus on SwinUNETR's windows) gets its error instead."""
    steps, failed = {}, {}
    for variant in variants:
        try:
            steps[variant] = setup_step(model_name, variant, act)
            steps[variant]()  # warm-up
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other variants go on
            failed[variant] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            steps.pop(variant, None)
    wall: dict[str, list[float]] = {variant: [] for variant in steps}
    cpu: dict[str, list[float]] = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            started, started_cpu = time.perf_counter(), time.thread_time()
            step()
            cpu[variant].append(time.thread_time() - started_cpu)
            wall[variant].append(time.perf_counter() - started)
    return {**failed, **{variant: {"wall": statistics.median(wall[variant]), "cpu": statistics.median(cpu[variant])}
                         for variant in steps}}


def peak_memory_mb(model_name: str, variant: str, act: str | None, threads: int) -> float:
    """Peak RSS growth (MB) over a few steps of one variant, in a fresh process (Linux)."""
    code = (f"import torch; torch.set_num_threads({threads}); import json\n"
            f"from benchmarks import dp_step; dp_step.FROZEN[:] = {FROZEN!r}\n"
            f"from benchmarks.dp_step import setup_step, _status_kb\n"
            f"step = setup_step({model_name!r}, {variant!r}, {act!r})\n"
            "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM)\n"
            "before = _status_kb('VmRSS')\n"
            "for _ in range(3): step()\n"
            "print(json.dumps((_status_kb('VmHWM') - before) / 1024))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field in kB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(model_name: str, *, repeats: int, act: str | None, threads: int,
            variants: tuple[str, ...] = tuple(VARIANTS), memory: bool = True) -> list[dict[str, Any]]:
    """One row per variant of ``model_name`` (``non-DP`` always): times, ratios to non-DP, peak memory
    (``memory`` False: not measured); a failed variant's row holds its error."""
    variants = ("non-DP", *(v for v in variants if v != "non-DP"))
    seconds = time_model(model_name, repeats=repeats, act=act, variants=variants)
    ran = [variant for variant in variants if "error" not in seconds[variant]]
    peaks = {variant: peak_memory_mb(model_name, variant, act, threads) if memory else float("nan") for variant in ran}
    base = seconds["non-DP"]
    act = act or model_plan(model_name)[1].model_config().act
    rows = [{"model": model_name, "act": act, "variant": variant, "error": seconds[variant]["error"]}
            for variant in variants if variant not in ran]
    return rows + [{"model": model_name, "act": act, "variant": variant,
                    "wall_ms": round(seconds[variant]["wall"] * 1000, 1),
                    "wall_ratio": round(seconds[variant]["wall"] / base["wall"], 2),
                    "cpu_ms": round(seconds[variant]["cpu"] * 1000, 1),
                    "cpu_ratio": round(seconds[variant]["cpu"] / base["cpu"], 2),
                    "peak_mb": round(peaks[variant], 1),
                    "memory_ratio": round(peaks[variant] / peaks["non-DP"], 2) if peaks["non-DP"] > 0 else None}
                   for variant in ran]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    header = ("| model | act | variant | step ms (wall) | DP/non-DP wall | step ms (CPU) | DP/non-DP CPU "
              "| peak MB | DP/non-DP memory |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['act']} | {r['variant']} | fails: {r['error']} | | | | | |")
            continue
        bold = "**" if r["variant"] == "auto" else ""
        memory = (f"{r['peak_mb']} | {r['memory_ratio']}x" if r["memory_ratio"] is not None
                  else "not measured | ")
        lines.append(f"| {r['model']} | {r['act']} | {bold}{r['variant']}{bold} | {r['wall_ms']} "
                     f"| {bold}{r['wall_ratio']}x{bold} | {r['cpu_ms']} | {r['cpu_ratio']}x | {memory} |")
    return "\n".join(lines)


TARGET = 1.6  # issue 3: DP/non-DP step time on the 2D default
NETWORK_TARGET = 1.25  # issue 20: DP/non-DP step time of every network, 2D and 3D
def section(rows: list[dict[str, Any]], *, command: str, loads: tuple[str, str], notes: str = "") -> str:
    """The BENCHMARKS.md section: command, date, load, setup, table, the target verdict and ``notes``."""
    networks = all(r["model"] in NETWORK_PLANS for r in rows)
    target = NETWORK_TARGET if networks else TARGET
    verdicts = []
    for r in rows:  # judged on the 2D U-Net default, DynUNet at its planned sizes, every network of issue 20
        if r["variant"] == "auto" and "error" not in r and (
                r["model"].startswith("2D") or r["model"] in DYNUNET_PLANS or networks):
            met = "met" if r["wall_ratio"] <= target else "NOT met"
            stock = [s.get("wall_ratio", "fails") for s in rows if s["model"] == r["model"] and s["variant"] == "stock"]
            verdicts.append(f"- {r['model']}: DP/non-DP {r['wall_ratio']}x wall, {r['cpu_ratio']}x CPU "
                            f"(stock Opacus in the same run: {stock[0] if stock else 'not run'}"
                            f"{'x' if stock and stock[0] != 'fails' else ''}): target <= {target}x {met}.")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    setup = NETWORK_SETUP_TEXT if networks else DYNUNET_SETUP_TEXT if all(
        r["model"] in DYNUNET_PLANS for r in rows) else SETUP_TEXT
    return (f"```bash\n{command}\n```\n\nMeasured {date}, 2 shared CPU cores, load average {loads[0]} before and "
            f"{loads[1]} after.\n\n{setup}\n\n{markdown(rows)}\n\n" + "\n".join(verdicts) + "\n" + notes)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import load_average, write_section

    parser = argparse.ArgumentParser(prog="python -m benchmarks.dp_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a simulated site)")
    parser.add_argument("--act", choices=("relu", "prelu"),
                        help="U-Net activation (default: the model's, relu; prelu is MONAI's default)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES),
                        choices=MODEL_NAMES + tuple(DYNUNET_PLANS) + tuple(NETWORK_PLANS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=tuple(VARIANTS),
                        help="variants to time (non-DP always; default: all)")
    parser.add_argument("--write", action="store_true",
                        help="write the table to BENCHMARKS.md (section dp-step, dp-step-dynunet for DynUNet, "
                             "dp-step-networks for the networks of issue 20)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes (faster)")
    parser.add_argument("--frozen", nargs="+", default=[], metavar="PREFIX",
                        help="freeze the parameters whose names start with PREFIX in every variant")
    parser.add_argument("--profile", action="store_true",
                        help="networks: where stock Opacus sends each layer type, and fedseg's sampler seconds")
    args = parser.parse_args(argv)
    if args.frozen and args.write:
        parser.error("--frozen measures a probe, not the table: use it without --write")

    import torch

    FROZEN[:] = args.frozen
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_average(sep=" / ")
    rows = []
    for model_name in args.models:
        for row in measure(model_name, repeats=args.repeats, act=args.act, threads=args.threads,
                           variants=tuple(args.variants), memory=not args.no_memory):
            rows.append(row)
            print(json.dumps(row), flush=True)
    notes = "".join(layers_and_profile(name, profile=args.profile) for name in args.models if name in NETWORK_PLANS)
    text = section(rows, command=" ".join([".venv/bin/python -m benchmarks.dp_step"] + (argv or sys.argv[1:])),
                   loads=(load_before, load_average(sep=" / ")),
                   notes="\nLayer types with weights, by where stock Opacus computes their per-sample "
                         "gradients:\n\n" + notes if notes else "")
    print("\n" + text)
    if args.write and all(model_name in NETWORK_PLANS for model_name in args.models):
        write_section("dp-step-networks", "Differential privacy (issue 20): DP-SGD step time of every network", text)
    elif args.write and all(model_name in DYNUNET_PLANS for model_name in args.models):
        write_section("dp-step-dynunet", "Differential privacy: DP-SGD step time of DynUNet (nnU-Net's network)",
                      text)
    elif args.write:
        write_section("dp-step", "Differential privacy (issue 3): DP-SGD step time and peak memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
