"""Segmentation metrics computed with MONAI (never hand-written)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def dice_per_class(logits: torch.Tensor, label: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """Return the Dice of each foreground class for each image, shape ``[B, C-1]``.

    ``logits`` is the network output ``[B, C, *spatial]``; ``label`` holds class
    indices ``[B, 1, *spatial]``. A class absent from both prediction and ground
    truth yields NaN (MONAI's ``ignore_empty``), which callers skip when averaging.
    """
    from monai.metrics import DiceMetric

    prediction = logits.argmax(dim=1, keepdim=True)
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes)
    return metric(y_pred=prediction, y=label)


def hd95_per_class(logits: torch.Tensor, label: torch.Tensor, *, num_classes: int,
                   spacing: float | tuple[float, ...] = 1.0) -> torch.Tensor:
    """Return the 95th-percentile Hausdorff distance (mm) of each foreground class, ``[B, C-1]``.

    Computed by MONAI on one-hot maps with the voxel ``spacing``. NaN where the
    class is absent from the ground truth or the prediction (the distance is
    undefined there); callers skip NaN when averaging.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    prediction = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=num_classes)
    truth = one_hot(label.long(), num_classes=num_classes)
    empty = (prediction.flatten(2).sum(-1) == 0) | (truth.flatten(2).sum(-1) == 0)
    distances = compute_hausdorff_distance(prediction, truth, include_background=False, percentile=95,
                                           spacing=spacing).float()
    distances[empty[:, 1:] | ~torch.isfinite(distances)] = float("nan")
    return distances


def nanmean(values: list[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
