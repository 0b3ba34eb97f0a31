"""Bring network outputs from the preprocessed grid back onto the input scan's own voxel grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: Affine entries closer than this to an integer count as that integer (voxels, unit-free).
TOLERANCE = 1e-3


def exact_view(source_affine: Any, target_affine: Any, source_shape: Sequence[int],
               target_shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function taking ``[..., X, Y, Z]`` on the source grid to the target grid, when every target voxel
    is a source voxel (the grids differ by axis order, flips and padding only: the scan was reoriented and
    padded but not resampled); else ``None``.

    Taking the voxels themselves is what a resampler returns at integer positions, without interpolating
    K channels of a whole CT.
    """
    mapping = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    linear, shift = np.round(mapping[:3, :3]), np.round(mapping[:3, 3])
    if not (np.allclose(mapping[:3, :3], linear, atol=TOLERANCE) and np.allclose(mapping[:3, 3], shift, atol=TOLERANCE)):
        return None
    if not ((np.abs(linear).sum(axis=0) == 1).all() and (np.abs(linear).sum(axis=1) == 1).all()):
        return None
    picks, flips, order = [], [], [0, 0, 0]
    for axis in range(3):  # source axis `axis` runs along target axis `other`, forwards or backwards
        other = int(np.flatnonzero(linear[axis])[0])
        sign, first, count = int(linear[axis, other]), int(shift[axis]), int(target_shape[other])
        low, high = min(first, first + sign * (count - 1)), max(first, first + sign * (count - 1))
        if low < 0 or high >= source_shape[axis]:
            return None
        picks.append(slice(low, high + 1))
        if sign < 0:
            flips.append(axis)
        order[other] = axis

    def view(tensor: torch.Tensor) -> torch.Tensor:
        import torch

        lead = tensor.ndim - 3
        picked = tensor[(Ellipsis, *picks)]
        if flips:
            picked = torch.flip(picked, [lead + a for a in flips])
        return picked.permute(*range(lead), *(lead + a for a in order)).contiguous()

    return view


def resample_to_match(values: torch.Tensor, affine: Any, raw: Any) -> torch.Tensor:
    """Resample ``values`` ``[K, X, Y, Z]`` (on the grid of ``affine``) onto ``raw``'s grid, bilinearly."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    if isinstance(values, MetaTensor):
        values = values.as_tensor()
    resampled = ResampleToMatch(mode="bilinear", padding_mode="border")(MetaTensor(values, affine=affine), img_dst=raw)
    return resampled.as_tensor()
