"""Deep supervision for DynUNet: MONAI's ``DeepSupervisionLoss`` fed DynUNet's stacked training output."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DeepSupervisionLoss


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` that also takes DynUNet's stacked output ``[B, outputs, C, ...]``.

    DynUNet (train mode, deep supervision on) stacks its outputs on dim 1 while
    ``DeepSupervisionLoss`` expects a list of them: the stack is split, then
    MONAI weights the outputs and resizes the target where an output is smaller.
    An output ``[B, C, ...]`` (eval mode) is scored by the wrapped loss alone.
    """

    def forward(self, input: Any, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's argument name)
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)


def nnunet_weights(outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights: ``1, 1/2, 1/4, ...`` (full resolution first), normalised to sum 1."""
    weights = [0.5 ** level for level in range(outputs)]
    return [weight / sum(weights) for weight in weights]
