"""Whole-volume inference: sliding window for a 3D model, slice by slice for a 2D model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SLICES_PER_BATCH = 16


def predict_volume(model: torch.nn.Module, volume: torch.Tensor, *, spatial_dims: int, patch_size: Sequence[int],
                   sw_batch_size: int = 4) -> torch.Tensor:
    """Return logits ``[1, K, X, Y, Z]`` for a preprocessed volume ``[C, X, Y, Z]``.

    A 3D model runs MONAI's sliding-window inference over the volume; a 2D
    model runs it over each axial slice and the slices are stacked back.
    """
    import torch
    from monai.inferers import sliding_window_inference

    if volume.ndim != 4:
        raise ValueError(f"volume must be [C, X, Y, Z], got shape {tuple(volume.shape)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size needs {spatial_dims} entries, got {tuple(patch_size)}")

    def run(batch: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(batch, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                        predictor=model, overlap=0.25, mode="gaussian")

    if spatial_dims == 3:
        return run(volume.unsqueeze(0))
    slices = volume.permute(3, 0, 1, 2)  # [Z, C, X, Y]: slices as a batch
    logits = torch.cat([run(slices[start:start + SLICES_PER_BATCH])
                        for start in range(0, slices.shape[0], SLICES_PER_BATCH)])
    return logits.permute(1, 2, 3, 0).unsqueeze(0)
