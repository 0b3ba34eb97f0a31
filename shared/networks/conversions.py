"""Conversions that make MONAI's networks trainable with DP-SGD, named in every ModelConfig that needs one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: ``ModelConfig.norm_conversion`` of a network built with Opacus' BatchNorm fixer.
GROUPNORM = "batchnorm-to-groupnorm"


def batchnorm_to_groupnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm of ``model`` replaced by ``GroupNorm(gcd(32, C), C)`` (Opacus' ``ModuleValidator.fix``).

    BatchNorm mixes the examples of a batch (no per-example gradient, and its
    running statistics would leave a hospital unclipped and unnoised); group
    norm normalises each example alone. Names and every other module stay.
    """
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)
