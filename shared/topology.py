"""Network topology from spacing and patch size, the way nnU-Net derives it; memory per example.

:func:`pool_and_conv_props` follows nnU-Net v2's ``get_pool_and_conv_props``
(``nnunetv2/experiment_planning/experiment_planners/network_topology.py``,
Apache-2.0): an axis is downsampled while its feature map stays at least
``2 x min_feature_map`` voxels and its spacing is within a factor 2 of the
finest; a kernel is 3 along an axis once that axis is within a factor 2 of the
finest spacing, else 1 (so thick slices are not convolved across early).
nnU-Net is not a dependency of fedseg (it would bring its own training stack),
so the rule is restated here, tested on nnU-Net's own examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: nnU-Net's smallest edge of a bottleneck feature map.
MIN_FEATURE_MAP = 4


@dataclass(frozen=True)
class Topology:
    """Downsampling and kernels of an encoder-decoder network for one patch size."""

    strides: tuple[tuple[int, ...], ...]   # between consecutive levels: len = levels - 1
    kernels: tuple[tuple[int, ...], ...]   # per level: len = levels
    patch_size: tuple[int, ...]            # the patch, padded to be divisible by the total stride

    @property
    def levels(self) -> int:
        return len(self.kernels)

    @property
    def divisor(self) -> tuple[int, ...]:
        """What every patch edge must be divisible by (the product of the strides per axis)."""
        return tuple(math.prod(level[axis] for level in self.strides) for axis in range(len(self.patch_size)))


def pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[int], *,
                        min_feature_map: int = MIN_FEATURE_MAP, max_levels: int = 999) -> Topology:
    """nnU-Net's topology for ``patch_size`` voxels at ``spacing`` mm (see the module docstring).

    The returned patch size is ``patch_size`` rounded up to the nearest size the
    strides divide. ``max_levels`` caps the number of levels (downsamplings + 1).
    """
    dims = len(spacing)
    if len(patch_size) != dims:
        raise ValueError(f"patch_size {tuple(patch_size)} and spacing {tuple(spacing)} differ in length")
    current_spacing, current_size = list(map(float, spacing)), list(map(float, patch_size))
    kernel, pools_per_axis = [1] * dims, [0] * dims
    strides: list[tuple[int, ...]] = []
    kernels: list[tuple[int, ...]] = []
    while len(strides) + 1 < max_levels:
        valid = [a for a in range(dims) if current_size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for axis in range(dims):
            if kernel[axis] != 3 and current_spacing[axis] / min(current_spacing) < 2:
                kernel[axis] = 3
        strides.append(tuple(2 if a in valid else 1 for a in range(dims)))
        kernels.append(tuple(kernel))
        for axis in valid:
            pools_per_axis[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = math.ceil(current_size[axis] / 2)
    kernels.append((3,) * dims)  # the bottleneck
    divisor = [2 ** n for n in pools_per_axis]
    padded = tuple(int(math.ceil(size / d) * d) for size, d in zip(patch_size, divisor))
    return Topology(strides=tuple(strides), kernels=tuple(kernels), patch_size=padded)


def filters_per_level(levels: int, *, base: int, maximum: int) -> tuple[int, ...]:
    """nnU-Net's feature counts: ``base`` doubling per level, capped at ``maximum``."""
    return tuple(min(maximum, base * 2 ** level) for level in range(levels))


def training_bytes_per_example(model: torch.nn.Module, *, in_channels: int, patch_size: Sequence[int],
                               per_sample_grads: bool) -> int:
    """Memory one example of a batch costs in training: activations kept for backward (x 2 for their
    gradients) and, with per-sample gradients (DP-SGD), one gradient per weight.

    Counted by running ``model`` on torch's ``meta`` device (shapes only, no
    memory, no compute), the way nnU-Net counts feature maps.
    """
    import torch

    elements = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal elements
        if isinstance(output, torch.Tensor):
            elements += output.numel()

    meta_model = _on_meta(model)
    leaves = [m for m in meta_model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        meta_model.train()
        with torch.no_grad():
            meta_model(torch.empty((1, in_channels, *patch_size), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    weights = sum(p.numel() for p in model.parameters()) if per_sample_grads else 0
    return 4 * (2 * elements + weights)


def _on_meta(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    if next(model.parameters()).device.type == "meta":
        return model
    return copy.deepcopy(model).to("meta")
