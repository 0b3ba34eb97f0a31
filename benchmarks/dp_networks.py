"""The networks of issue 20 in ``python -m benchmarks.dp_step``: CPU-sized plans, which layers fall back, and
where a DP step's extra time goes per layer type.

``--models 2D-segresnet 3D-swinunetr ...`` (:data:`NETWORK_PLANS`) times them
into their own BENCHMARKS.md section; ``--profile`` adds per-layer-type
sampler seconds per DP step.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

# Sizes a CPU steps in about 0.4-7 s (non-DP, one thread): 2D 128x128 patches in batches of 8, 3D 64^3 in batches
# of 2; SGD. Widths: SegResNet and AttentionUnet 4 levels from 16 (2D) or 8 (3D) features (MONAI's SegResNet
# default is 8); FlexibleUNet with the default resnet10 encoder and MONAI's default decoder 16-256 (2D) or half of
# it (3D); SwinUNETR with MONAI's default feature size 24 (2D) or 12 (3D).
_COMMON = {"optimizer": "sgd", "learning-rate": 0.01}
NETWORK_PLANS: dict[str, dict[str, Any]] = {
    "2D-segresnet": {"model": "segresnet", "channels": "16,32,64,128", "strides": "2,2,2", "patch-size": 128,
                     "batch-size": 8, **_COMMON},
    "3D-segresnet": {"model": "segresnet", "spatial-dims": 3, "channels": "8,16,32,64", "strides": "2,2,2",
                     "patch-size": 64, "batch-size": 2, **_COMMON},
    "2D-attentionunet": {"model": "attentionunet", "channels": "16,32,64,128", "strides": "2,2,2", "patch-size": 128,
                         "batch-size": 8, **_COMMON},
    "3D-attentionunet": {"model": "attentionunet", "spatial-dims": 3, "channels": "8,16,32,64", "strides": "2,2,2",
                         "patch-size": 64, "batch-size": 2, **_COMMON},
    "2D-flexibleunet": {"model": "flexibleunet", "base-filters": 16, "max-filters": 256, "patch-size": 128,
                        "batch-size": 8, **_COMMON},
    "3D-flexibleunet": {"model": "flexibleunet", "spatial-dims": 3, "base-filters": 8, "max-filters": 128,
                        "patch-size": 64, "batch-size": 2, **_COMMON},
    "2D-swinunetr": {"model": "swinunetr", "base-filters": 24, "patch-size": 128, "batch-size": 8, **_COMMON},
    "3D-swinunetr": {"model": "swinunetr", "spatial-dims": 3, "base-filters": 12, "patch-size": 64, "batch-size": 2,
                     **_COMMON},
}
SETUP_TEXT = """Models (run config, `benchmarks.dp_networks.NETWORK_PLANS`, CPU-sized so that a non-DP step takes
0.4-7 s on one thread): 2D = 128x128 patches in batches of 8, 3D = 64^3 patches in batches of 2, SGD.
**segresnet** = MONAI SegResNet, 4 levels from 16 (2D) / 8 (3D) features, blocks 1-2-2-4, group norm;
**attentionunet** = MONAI AttentionUnet, 16-32-64-128 (2D) / 8-16-32-64 (3D), BatchNorm converted to GroupNorm,
PReLU in the merge blocks; **flexibleunet** = MONAI FlexibleUNet, resnet10 encoder (BatchNorm -> GroupNorm),
decoder 16-...-256 (2D, MONAI's default) / 8-...-128 (3D); **swinunetr** = MONAI SwinUNETR, feature size 24
(2D, MONAI's default) / 12 (3D), window 7, depths 2-2-2-2. One torch thread for every variant. Variants:
`non-DP`; `auto` = DP-SGD as shipped (Opacus hooks + fedseg's samplers: convolutions by the fastest of four exact
methods per layer and shape, group and instance norm on the batch folded into the groups, PReLU, windowed Linear,
window attention's bias table; per-sample gradients kept without Opacus' zero fill and copy; convolutions with
many weights at few pixels by ghost norms (Gram matrices) and one batch weight gradient of the clipped examples;
noise added in one buffer; backward from the summed loss to the first trained layers' outputs only; in-place ops on hooked outputs out of
place); `stock` = Opacus' own samplers (unfold convolution, its norm samplers, functorch for layers without a
sampler), its DPOptimizer and bookkeeping with a full
backward, fedseg's in-place fix kept (without it SegResNet and FlexibleUNet do not run at all under Opacus) and
its hooks in fedseg's "sum" mode (so stock skips the pass Opacus' "mean" makes over every output gradient: a
little faster than Opacus as shipped).
Medians over the repeats, all variants of a model interleaved in one process; CPU = thread time."""


def layer_report(model: Any) -> dict[str, list[str]]:
    """Parameterised layer types of ``model`` by what stock Opacus 1.6 does with them (call with stock samplers
    registered): its own sampler, its unfold convolution path, or the functorch fallback."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from torch import nn

    report: dict[str, set[str]] = collections.defaultdict(set)
    for module in model.modules():
        if not list(module.parameters(recurse=False)):
            continue
        name = type(module).__name__
        if type(module) not in GradSampleHooks.GRAD_SAMPLERS:
            report["functorch"].add(name)
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            report["unfold"].add(name)
        else:
            report["opacus"].add(name)
    return {kind: sorted(names) for kind, names in report.items()}


def profile_samplers(step: Any, *, steps: int, top: int = 3) -> dict[str, Any]:
    """CPU seconds per step of ``step`` (an ``auto`` DP step) in each layer type's grad sampler, in its ``top``
    costliest layers, and in Opacus' clipping and noise (``DPOptimizer.pre_step``)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.optimizers.optimizer import DPOptimizer

    by_type: dict[str, float] = collections.defaultdict(float)
    by_layer: dict[str, float] = collections.defaultdict(float)
    originals, pre_step = dict(GradSampleHooks.GRAD_SAMPLERS), DPOptimizer.pre_step

    def timed(sampler: Any) -> Any:
        @functools.wraps(sampler)
        def wrapper(layer: Any, activations: Any, backprops: Any) -> Any:
            started = time.thread_time()
            result = sampler(layer, activations, backprops)
            elapsed = time.thread_time() - started
            by_type[type(layer).__name__] += elapsed
            weights = tuple(next(layer.parameters(recurse=False)).shape)
            by_layer[f"{type(layer).__name__}{weights} at {tuple(backprops.shape[1:])}"] += elapsed
            return result
        return wrapper

    def timed_pre_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        result = pre_step(self, *args, **kwargs)
        by_type["Opacus clip + noise"] += time.thread_time() - started
        return result

    try:
        for layer_type, sampler in originals.items():
            GradSampleHooks.GRAD_SAMPLERS[layer_type] = timed(sampler)
        DPOptimizer.pre_step = timed_pre_step
        step()  # warm-up (fedseg's convolution sampler measures its methods on first use)
        by_type.clear()
        by_layer.clear()
        for _ in range(steps):
            step()
    finally:
        GradSampleHooks.GRAD_SAMPLERS.update(originals)
        DPOptimizer.pre_step = pre_step
    costliest = sorted(by_layer.items(), key=lambda kv: -kv[1])[:top]
    return {"by type": {name: round(total / steps, 3) for name, total in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "costliest layers": {name: round(total / steps, 3) for name, total in costliest}}


def layers_and_profile(model_name: str, *, profile: bool) -> str:
    """A markdown paragraph: which layer types stock Opacus sends where, and (``profile``) per-layer-type sampler
    seconds of one ``auto`` DP step of ``model_name``."""
    from benchmarks.dp_step import model_plan, setup_step, use_samplers
    from shared.model import build_model

    use_samplers("stock")
    text = f"- {model_name}: stock Opacus {layer_report(build_model(model_plan(model_name)[1].model_config()))}"
    if profile:
        step = setup_step(model_name, "auto", None, keep_samplers=True)  # profile_samplers times the registry's
        text += f"; fedseg's samplers, CPU s per DP step: {profile_samplers(step, steps=2)}"
    return text + "\n"
