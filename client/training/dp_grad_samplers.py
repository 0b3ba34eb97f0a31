"""Per-sample gradients of (transposed) convolutions and PReLU for Opacus' ``hooks`` mode.

Opacus 1.6 has no grad sampler for ``ConvTranspose2d/3d`` or ``PReLU`` (it
falls back to functorch, which re-runs the layer per sample), and its
``Conv2d/3d`` sampler unfolds the layer input (``k^d`` copies of it) and
multiplies per sample. A convolution's per-sample weight gradient is computed
here by the fastest of three exact methods, measured once per layer and input
shape in the process (:func:`per_sample_weight_grad`):

- *folded*: ONE call of the weight-gradient kernel autograd itself uses
  (``aten::convolution_backward`` with only the weight output) on the batch
  folded into the channels: a batch of ``n`` samples becomes one sample with
  ``n * C`` channels and the convolution gets ``n`` times the groups, so group
  ``i`` sees only sample ``i`` (torch's expanded weights group the same way);
- *per example*: that kernel once per example, ungrouped;
- *channels-last per example*: the same on channels-last copies of the input
  and output gradient (2D and 3D), where oneDNN has a much faster kernel for
  few channels at large sizes;
- *unfold*: Opacus' own sampler (not for transposed convolutions).

No one of them wins everywhere on a CPU: oneDNN picks very different kernels
by shape (one thread: 16 -> 8 channels at 64^3, batch 2: folded 272 ms, per
example 62 ms; 16 -> 16 at 32^3: folded 8 ms, per example 85 ms; 512 -> 512 at
4x4, batch 8: unfold 33 ms, folded 95 ms; 8 -> 8 at 64^3, batch 2: channels-last
30 ms, the others 135 ms and more, as much as autograd's own batch weight gradient). Registered through Opacus' own
``register_grad_sampler``; tests compare every layer type with single-example
backward. Convolutions with string padding (``"same"``) or a ``padding_mode``
other than zeros always go to Opacus' own sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from client.training.dp_ghost import GhostGrad, ghost_weight_grad, takes_ghost_norms

CONV_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
WeightGrad = Callable[[ConvLayer, torch.Tensor, torch.Tensor], torch.Tensor]
#: Opacus' unfold copies the input ``k^d`` times: not tried when that copy would exceed this many elements.
UNFOLD_MAX_ELEMENTS = 2**25
#: Rounds of timing every candidate once; the fastest single run wins (one round's first runs pay cold caches and
#: fresh memory: 2D FlexibleUNet's picks summed 113 ms against the best 106 ms with one round).
SELECTION_ROUNDS = 2
#: (layer and shapes) -> the fastest method measured for them in this process.
_FASTEST: dict[tuple[object, ...], WeightGrad] = {}


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


def per_example_weight_grad(layer: ConvLayer, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient by the weight-gradient kernel called once per example, each written into one
    contiguous batch (no second copy of the batch, as stacking them would hold)."""
    grads = backprops.new_empty((inputs.shape[0], *layer.weight.shape))
    for i in range(inputs.shape[0]):
        grads[i] = torch.ops.aten.convolution_backward(
            backprops[i:i + 1], inputs[i:i + 1], layer.weight, None, layer.stride, layer.padding, layer.dilation,
            layer.transposed, layer.output_padding, layer.groups, [False, True, False])[1]
    return grads


def channels_last_weight_grad(layer: ConvLayer, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient by the kernel called once per example on channels-last copies (2D, 3D)."""
    memory_format = torch.channels_last_3d if inputs.dim() == 5 else torch.channels_last
    return per_example_weight_grad(layer, inputs.contiguous(memory_format=memory_format),
                                   backprops.contiguous(memory_format=memory_format))


def unfolded_weight_grad(layer: ConvLayer, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient by Opacus' unfold sampler, on a contiguous copy of a permuted input.

    Opacus 1.6's ``unfold2d`` strides over the padded input as if it were
    contiguous: for a channels-last view (SwinUNETR's hidden states, permuted
    from its tokens) it returned wrong gradients, with no error.
    """
    return compute_conv_grad_sample(layer, [inputs.contiguous()], backprops)[layer.weight]


def per_sample_weight_grad(layer: ConvLayer, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient by the method measured fastest for this layer and these shapes.

    The first call for a (layer configuration, input shape, output shape) runs
    every candidate :data:`SELECTION_ROUNDS` times in turn, keeps the one of
    least CPU time for the rest of the process and
    returns its result (holding no more than the best result so far beside the
    one being computed); all candidates are exact.
    """
    key = (type(layer), tuple(layer.weight.shape), layer.stride, layer.padding, layer.dilation, layer.groups,
           layer.output_padding, tuple(inputs.shape), tuple(backprops.shape), inputs.dtype, inputs.device)
    method = _FASTEST.get(key)
    if method is not None:
        return method(layer, inputs, backprops)
    candidates: list[WeightGrad] = [folded_weight_grad, per_example_weight_grad]
    if inputs.dim() in (4, 5):
        candidates.append(channels_last_weight_grad)
    kernel_volume = layer.weight[0, 0].numel()
    if not layer.transposed and inputs[0].numel() * kernel_volume * inputs.shape[0] <= UNFOLD_MAX_ELEMENTS:
        candidates.append(unfolded_weight_grad)
    best: tuple[float, WeightGrad, torch.Tensor] | None = None
    for _ in range(SELECTION_ROUNDS):
        for candidate in candidates:
            started = time.thread_time()  # CPU time: another process taking the core does not count
            result = candidate(layer, inputs, backprops)
            elapsed = time.thread_time() - started
            if best is None or elapsed < best[0]:
                best = (elapsed, candidate, result)
            del result  # a slower result goes at once: two batches of this layer's gradients at most, not four
    _, _FASTEST[key], result = best
    return result


def conv_grad_sample(layer: ConvLayer, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor | GhostGrad]:
    """Per-sample ``weight`` (and ``bias``) gradients of a convolution or transposed convolution; a large weight at
    few output positions of a model attached to :mod:`client.training.dp_ghost` gets its per-sample norms only."""
    inputs = activations[0].to(backprops.dtype)
    n = inputs.shape[0]
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":  # only convolutions allow these
        return compute_conv_grad_sample(layer, [inputs.contiguous()], backprops)  # see unfolded_weight_grad
    if n == 0:
        return {p: torch.zeros((0, *p.shape), dtype=backprops.dtype, device=backprops.device)
                for p in layer.parameters() if p.requires_grad}
    result: dict[nn.Parameter, torch.Tensor | GhostGrad] = {}
    if layer.weight.requires_grad and takes_ghost_norms(layer, inputs, backprops):
        result[layer.weight] = ghost_weight_grad(layer, inputs, backprops)  # norms now, the clipped sum at the step
    elif layer.weight.requires_grad:
        result[layer.weight] = per_sample_weight_grad(layer, inputs, backprops)
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
