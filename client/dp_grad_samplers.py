"""Per-sample gradients of transposed convolutions for Opacus' ``hooks`` mode.

Opacus 1.6 has no grad sampler for ``ConvTranspose2d/3d``; it falls back to
functorch, which re-runs the layer per sample and is the largest single DP cost
of the U-Net's up path (benchmarks/dp_step.py). A transposed convolution
scatters input position ``p`` to output positions ``s*p - pad + k``, so its
weight gradient is the correlation of the layer input with the *unfolded*
output gradient: ``dW[i, o, k] = sum_p x[i, p] * g[o, s*p - pad + k]``.
Unfolding ``g`` with the layer's kernel, stride, padding and dilation yields
exactly one block per input position (``output_padding < stride``), and one
``einsum`` gives every sample's gradient. Registered through Opacus' own
``register_grad_sampler``; tests check it against single-example backward.
Grouped transposed convolutions are not supported (the U-Net has none).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn


def conv_transpose_grad_sample(layer: nn.ConvTranspose2d | nn.ConvTranspose3d, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``weight`` (and ``bias``) gradients of an ungrouped transposed convolution."""
    inputs = activations[0].to(backprops.dtype)
    n = inputs.shape[0]
    if layer.groups != 1:
        raise NotImplementedError(f"{layer}: grouped transposed convolutions need grad-sample mode 'functorch'")
    result: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if n == 0:
            result[layer.weight] = torch.zeros((0, *layer.weight.shape), dtype=backprops.dtype)
        else:
            unfold = unfold2d if isinstance(layer, nn.ConvTranspose2d) else unfold3d
            blocks = unfold(backprops, kernel_size=layer.kernel_size, padding=layer.padding,
                            stride=layer.stride, dilation=layer.dilation)  # (n, out * prod(k), positions)
            flat_inputs = inputs.reshape(n, layer.in_channels, -1)  # (n, in, positions)
            if blocks.shape[-1] != flat_inputs.shape[-1]:
                raise RuntimeError(f"{layer}: unfolded gradient has {blocks.shape[-1]} blocks for "
                                   f"{flat_inputs.shape[-1]} input positions")
            per_sample = torch.einsum("nip,nkp->nik", flat_inputs, blocks)
            result[layer.weight] = per_sample.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return result


register_grad_sampler([nn.ConvTranspose2d, nn.ConvTranspose3d])(conv_transpose_grad_sample)
