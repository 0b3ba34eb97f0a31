"""MONAI's ``AttentionUnet`` (Oktay et al.): attention gates on the skips; BatchNorm converted to GroupNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.networks.base import Network
from shared.networks.conversions import GROUPNORM, batchnorm_to_groupnorm

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig


def build_attentionunet(config: ModelConfig) -> torch.nn.Module:
    """``monai.networks.nets.AttentionUnet`` with the plan's features and (per-axis) strides, kernels 3.

    MONAI hard-codes BatchNorm and ReLU in its blocks and a PReLU with instance
    norm in each merge convolution; the BatchNorm becomes GroupNorm
    (:func:`batchnorm_to_groupnorm`), the rest is MONAI's.
    """
    from monai.networks.nets import AttentionUnet

    return batchnorm_to_groupnorm(AttentionUnet(spatial_dims=config.spatial_dims, in_channels=config.in_channels,
                                                out_channels=config.num_classes, channels=config.channels,
                                                strides=config.strides))


ATTENTIONUNET = Network(build=build_attentionunet, acts=("relu",), norm_conversion=GROUPNORM)
