"""Per-sample gradient norms of large convolutions at small activations, without their per-sample gradients.

A ResNet encoder's last stages hold most of its weights at a few pixels
(2D FlexibleUNet: 512 x 512 x 3 x 3 at 4 x 4): materialising their per-sample
gradients writes ``batch x weights`` floats that DP-SGD then reads for the
norms and again for clipping, far more than the layer's own work
(BENCHMARKS.md). Following ghost clipping and its book-keeping variant
(Li et al. 2022; Bu et al., "Differentially private optimization on large
model at small cost", 2023), such a layer keeps only its input and output
gradient in :class:`GhostGrad`:

- an example's weight gradient is ``B U^T``, ``U`` its unfolded input
  (in-channels * kernel x output positions), ``B`` its output gradient
  (out-channels x output positions), so its squared norm is
  ``sum(U^T U * B^T B)``: two positions x positions Gram matrices, cheap when
  the output has few positions (:func:`gram_squared_norms`; ``U^T U`` from
  the padded input's own Gram matrix where that is smaller);
- once every example's clipping factor is known, the clipped sum of its
  per-sample gradients is ONE batch weight gradient of the output gradient
  scaled per example (:meth:`GhostGrad.clipped_sum`), autograd's own kernel.

Opacus' ghost mode (``grad_sample_mode="ghost"``) gets the clipped sum from a
second backward pass over the whole network instead, and has norm samplers
for Linear and Embedding only. :class:`client.training.dp_optimizer.FedsegDPOptimizer`
clips these records beside materialised per-sample gradients: the same flat
clipping (one norm over all parameters per example), noise and accounting.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass

import torch
from opacus.utils.tensor_utils import unfold3d
from torch import nn

#: A layer takes ghost norms when its Gram matrices cost at most 1 / GRAM_ADVANTAGE of its per-sample gradients
#: (positions * (in-channels * kernel + out-channels) vs out-channels * in-channels * kernel per example).
GRAM_ADVANTAGE = 2
#: Convolutions of models attached by :func:`attach` (only fedseg's DP optimizer knows :class:`GhostGrad`).
_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class GhostGrad:
    """A convolution's per-sample weight gradients, held as the layer's input and output gradient."""

    layer: nn.Conv2d | nn.Conv3d
    inputs: torch.Tensor
    backprops: torch.Tensor
    squared_norms: torch.Tensor  # (n,): every example's squared gradient norm of ``layer.weight``
    processed: bool = False  # used by an optimizer step (Opacus' guard against reusing gradients)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``sum_i factors[i] * (example i's weight gradient)``: one batch weight gradient of scaled backprops."""
        layer = self.layer
        scaled = self.backprops * factors.to(self.backprops.dtype).view(-1, *[1] * (self.backprops.dim() - 1))
        return torch.ops.aten.convolution_backward(
            scaled, self.inputs, layer.weight, None, layer.stride, layer.padding, layer.dilation, False,
            [0] * len(layer.stride), layer.groups, [False, True, False])[1]


def unfolded(layer: nn.Conv2d | nn.Conv3d, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(n, in_channels * kernel volume, output positions)`` (torch's / Opacus' unfold)."""
    if inputs.dim() == 4:
        return nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                    stride=layer.stride)
    return unfold3d(inputs, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                    dilation=layer.dilation)


def tap_positions(layer: nn.Conv2d | nn.Conv3d, padded: tuple[int, ...], out: tuple[int, ...]) -> torch.Tensor:
    """``(kernel volume, output positions)``: where in the flattened padded input each kernel tap of each output
    position reads (stride and dilation included)."""
    grid = torch.arange(math.prod(padded)).view(padded)
    taps = []
    for offsets in itertools.product(*(range(k) for k in layer.kernel_size)):
        window = tuple(slice(o * d, o * d + s * (t - 1) + 1, s)
                       for o, d, s, t in zip(offsets, layer.dilation, layer.stride, out, strict=True))
        taps.append(grid[window].reshape(-1))
    return torch.stack(taps)


def input_gram(layer: nn.Conv2d | nn.Conv3d, inputs: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
    """``U^T U`` per example, ``(n, T, T)``, ``U`` the unfolded input (in-channels * kernel, T output positions):
    by :func:`padded_input_gram` when the padded input has fewer positions than the kernel volume times the
    output's (a stride-1 convolution at few pixels), else from ``U`` itself."""
    padded = tuple(size + 2 * pad for size, pad in zip(inputs.shape[2:], layer.padding, strict=True))
    if math.prod(padded) ** 2 < math.prod(layer.kernel_size) * math.prod(out) ** 2:
        return padded_input_gram(layer, inputs, out)
    columns = unfolded(layer, inputs)
    return torch.bmm(columns.transpose(1, 2), columns)


def padded_input_gram(layer: nn.Conv2d | nn.Conv3d, inputs: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
    """``U^T U`` from the padded input's own Gram matrix ``X^T X``: entry ``(t, s)`` sums ``X^T X`` over the
    kernel's taps at the positions ``t`` and ``s`` read with that tap (:func:`tap_positions`), without writing the
    ``kernel volume`` copies of the input that ``U`` is."""
    n, channels = inputs.shape[:2]
    padded = tuple(size + 2 * pad for size, pad in zip(inputs.shape[2:], layer.padding, strict=True))
    pads = [pad for pad in reversed(layer.padding) for _ in range(2)]
    flat = nn.functional.pad(inputs, pads).reshape(n, channels, -1)
    grams = torch.bmm(flat.transpose(1, 2), flat)  # (n, P, P)
    taps = tap_positions(layer, padded, out).to(inputs.device)
    total = grams[:, taps[0][:, None], taps[0][None, :]]
    for tap in taps[1:]:
        total += grams[:, tap[:, None], tap[None, :]]
    return total


def gram_squared_norms(layer: nn.Conv2d | nn.Conv3d, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Every example's squared Frobenius norm of its weight gradient ``B^T U``: ``sum(U^T U * B^T B)``."""
    n = inputs.shape[0]
    outputs = backprops.reshape(n, backprops.shape[1], -1)  # (n, O, T)
    grams = input_gram(layer, inputs, tuple(backprops.shape[2:]))
    return (grams * torch.bmm(outputs.transpose(1, 2), outputs)).sum(dim=(1, 2))


def takes_ghost_norms(layer: nn.Module, inputs: torch.Tensor, backprops: torch.Tensor) -> bool:
    """True for an attached, ungrouped 2D/3D convolution whose Gram matrices are much cheaper than its per-sample
    gradients, called once in this forward pass (a second call would accumulate into the first's gradients)."""
    if layer not in _ATTACHED or layer.groups != 1 or inputs.dim() not in (4, 5):
        return False
    weight = layer.weight
    if getattr(weight, "_forward_counter", 1) != 1 or hasattr(weight, "_current_grad_sample"):
        return False
    positions = backprops[0, 0].numel()
    fan_in = weight[0].numel()
    return GRAM_ADVANTAGE * positions * (fan_in + weight.shape[0]) <= weight.shape[0] * fan_in


def ghost_weight_grad(layer: nn.Conv2d | nn.Conv3d, inputs: torch.Tensor, backprops: torch.Tensor) -> GhostGrad:
    """The layer's :class:`GhostGrad` (its per-sample norms computed now, while the hook has the tensors)."""
    return GhostGrad(layer, inputs, backprops, gram_squared_norms(layer, inputs, backprops))


class _Detach:
    """A hook handle (``remove()``) that takes a model's convolutions out of the ghost path."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            _ATTACHED.discard(layer)


def attach(model: nn.Module) -> _Detach:
    """Let ``model``'s convolutions take ghost norms (its optimizer must be
    :class:`client.training.dp_optimizer.FedsegDPOptimizer`); return the handle that undoes it."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    _ATTACHED.update(layers)
    return _Detach(layers)
