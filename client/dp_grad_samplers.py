"""Per-sample gradients of (transposed) convolutions for Opacus' ``hooks`` mode.

Opacus 1.6 has no grad sampler for ``ConvTranspose2d/3d`` (it falls back to
functorch, which re-runs the layer per sample), and its ``Conv2d/3d`` sampler
unfolds the layer input (``k^d`` copies of it) and multiplies per sample.
Both are replaced here by ONE call of the weight-gradient kernel autograd
itself uses (``aten::convolution_backward`` with only the weight output),
on the batch folded into the channels: a batch of ``n`` samples becomes one
sample with ``n * C`` channels and the convolution gets ``n`` times the groups,
so group ``i`` sees only sample ``i`` and its weight gradient is sample ``i``'s
gradient (torch's expanded weights use the same grouping for small batches).
Registered through Opacus' own ``register_grad_sampler``; tests compare every
layer type with single-example backward.

Convolutions with string padding (``"same"``) or a ``padding_mode`` other than
zeros go to Opacus' own sampler.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

CONV_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def folded_weight_grad(layer: ConvLayer, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient, shape ``(n, *layer.weight.shape)``, in one kernel call.

    Parameters
    ----------
    layer
        The (transposed) convolution; integer padding, zeros padding mode.
    inputs
        The layer's input, ``(n, in_channels, *spatial)``.
    backprops
        The gradient of the loss with respect to the layer's output, ``(n, out_channels, *spatial_out)``.

    Returns
    -------
    torch.Tensor
        Sample ``i``'s gradient of ``layer.weight`` at index ``i``.
    """
    n = inputs.shape[0]
    folded_shape = (n * layer.weight.shape[0], *layer.weight.shape[1:])
    weight = backprops.new_empty(1).expand(folded_shape)  # only its shape is read
    _, per_sample, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, -1, *backprops.shape[2:]), inputs.reshape(1, -1, *inputs.shape[2:]), weight,
        None, layer.stride, layer.padding, layer.dilation, layer.transposed, layer.output_padding,
        n * layer.groups, [False, True, False])
    return per_sample.view(n, *layer.weight.shape)


def conv_grad_sample(layer: ConvLayer, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``weight`` (and ``bias``) gradients of a convolution or transposed convolution."""
    inputs = activations[0].to(backprops.dtype)
    n = inputs.shape[0]
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":  # only convolutions allow these
        return compute_conv_grad_sample(layer, activations, backprops)
    if n == 0:
        return {p: torch.zeros((0, *p.shape), dtype=backprops.dtype, device=backprops.device)
                for p in layer.parameters() if p.requires_grad}
    result: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = folded_weight_grad(layer, inputs, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return result


register_grad_sampler(list(CONV_LAYER_TYPES))(conv_grad_sample)


def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of PReLU's slope(s): ``min(x, 0) * dL/dy`` summed over every position of its channel.

    Opacus has no PReLU sampler (functorch re-runs the layer per sample); MONAI
    puts a PReLU in every ``Convolution`` block by default (AttentionUnet's
    merge blocks, the U-Net with ``act = "prelu"``).
    """
    if not layer.weight.requires_grad:
        return {}
    contribution = activations[0].to(backprops.dtype).clamp(max=0) * backprops
    n = contribution.shape[0]
    if layer.num_parameters == 1:
        return {layer.weight: contribution.reshape(n, -1).sum(dim=1, keepdim=True)}
    return {layer.weight: contribution.reshape(n, layer.num_parameters, -1).sum(dim=2)}


register_grad_sampler(nn.PReLU)(prelu_grad_sample)
