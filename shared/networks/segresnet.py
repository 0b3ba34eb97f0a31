"""MONAI's ``SegResNet`` (Myronenko's residual encoder-decoder): group norm, ReLU, filters doubling per level."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from shared.networks.base import (
    ACTIVATIONS,
    Levels,
    Network,
    all_twos,
    doubling,
    halvings,
    levels_within,
    require,
)

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

#: MONAI's SegResNet group norm: 8 groups (fewer when the first level has fewer features than a multiple of 8).
GROUPS = 8


def blocks_down(levels: int) -> tuple[int, ...]:
    """Residual blocks per encoder level: 1 at full resolution, 4 at the bottom, 2 between.

    MONAI's default ``(1, 2, 2, 4)`` is this rule at 4 levels.
    """
    return (1, *(2,) * (levels - 2), 4)


def segresnet_levels(levels: Levels, *, max_filters: int, **_context: Any) -> Levels:
    """SegResNet doubles its features at every level and halves every axis: it takes the plan's first
    features and as many of its levels as stay within ``max_filters``."""
    dims = len(levels.kernels[0])
    count = levels_within(levels.channels[0], max_filters=max_filters, levels=len(levels.channels))
    return Levels(strides=halvings(count - 1, dims=dims), kernels=((3,) * dims,) * count,
                  channels=doubling(levels.channels[0], count))


def check_segresnet(config: ModelConfig) -> None:
    """Features doubling from the first level; every stride halves every axis (MONAI fixes both)."""
    require(config.channels == doubling(config.channels[0], len(config.channels)), "channels",
            "must double at every level for model 'segresnet' (MONAI's SegResNet: the first is init_filters)",
            config.channels)
    require(all_twos(config.strides), "strides",
            "must all be 2 for model 'segresnet' (MONAI's SegResNet halves every axis at each level)",
            config.strides)


def build_segresnet(config: ModelConfig) -> torch.nn.Module:
    """``monai.networks.nets.SegResNet``: ``init_filters`` = the first level's features, blocks by
    :func:`blocks_down`, one block per decoder level, group norm, out-of-place ``config.act``."""
    from monai.networks.nets import SegResNet

    levels = len(config.channels)
    return SegResNet(spatial_dims=config.spatial_dims, init_filters=config.channels[0],
                     in_channels=config.in_channels, out_channels=config.num_classes,
                     act=(ACTIVATIONS[config.act], {"inplace": False} if config.act != "prelu" else {}),
                     norm=("GROUP", {"num_groups": math.gcd(GROUPS, config.channels[0])}),
                     blocks_down=blocks_down(levels), blocks_up=(1,) * (levels - 1))


SEGRESNET = Network(build=build_segresnet, acts=("relu", "leakyrelu", "prelu"), check=check_segresnet,
                    levels=segresnet_levels, decoder=r"(up_layers|up_samples|conv_final)\..*")
