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


def nanmean(values: list[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
