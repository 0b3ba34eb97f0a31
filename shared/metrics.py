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

    Computed by MONAI on one-hot maps with the voxel ``spacing``. A class absent
    from both prediction and ground truth is NaN (nothing to measure; callers skip
    NaN when averaging). A class in only one of them (missed entirely, or predicted
    where there is none) scores the image's diagonal in mm, the largest distance
    the image allows, as challenge evaluations do: skipping it would let a model
    that never finds a structure look better than one that finds it roughly.
    """
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    prediction = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=num_classes)
    truth = one_hot(label.long(), num_classes=num_classes)
    predicted_empty = (prediction.flatten(2).sum(-1) == 0)[:, 1:]
    truth_empty = (truth.flatten(2).sum(-1) == 0)[:, 1:]
    distances = compute_hausdorff_distance(prediction, truth, include_background=False, percentile=95,
                                           spacing=spacing).float()
    distances[predicted_empty != truth_empty] = image_diagonal_mm(label.shape[2:], spacing)
    distances[predicted_empty & truth_empty] = float("nan")
    return distances


def image_diagonal_mm(shape: tuple[int, ...] | torch.Size, spacing: float | tuple[float, ...]) -> float:
    """Length in mm of the diagonal of an image of ``shape`` voxels of ``spacing`` mm."""
    steps = (spacing,) * len(shape) if isinstance(spacing, (int, float)) else tuple(spacing)
    if len(steps) != len(shape):
        raise ValueError(f"spacing has {len(steps)} values for an image of {len(shape)} dimensions")
    return math.sqrt(sum((n * float(d)) ** 2 for n, d in zip(shape, steps, strict=True)))


def nanmean(values: list[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def mean_interval(values: list[float], *, confidence: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap (BCa, scipy) confidence interval of the mean of ``values``, NaN and Inf left out.

    None when fewer than two values remain or they are all equal (no spread to resample).
    """
    import numpy as np
    from scipy.stats import bootstrap

    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size < 2 or np.all(finite == finite[0]):
        return None
    result = bootstrap((finite,), np.mean, confidence_level=confidence, n_resamples=2000, method="BCa",
                       random_state=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def case_intervals(per_case: list[dict[str, list[float]]], *, keys: tuple[str, ...] = ("dice", "hd95"),
                   seed: int = 0) -> dict[str, float]:
    """95% intervals of a site's mean per metric and class over its cases, as metric keys.

    ``per_case`` holds each case's per-class values under ``keys``; the result has
    ``{key}-ci-low``/``-ci-high`` for the mean over classes and
    ``{key}-class-K-ci-low``/``-ci-high`` per class (only where an interval exists).
    """
    out: dict[str, float] = {}
    for key in keys:
        classes = len(per_case[0][key]) if per_case else 0
        columns = {f"{key}-class-{k + 1}": [case[key][k] for case in per_case] for k in range(classes)}
        columns[key] = [nanmean(case[key]) for case in per_case]
        for name, values in columns.items():
            interval = mean_interval(values, seed=seed)
            if interval is not None:
                out[f"{name}-ci-low"], out[f"{name}-ci-high"] = interval
    return out
