"""MONAI's ``FlexibleUNet`` with a ResNet encoder (run config ``flexible-backbone``); BatchNorm converted to GroupNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.networks.base import Levels, Network, all_twos, halvings, require
from shared.networks.conversions import GROUPNORM, batchnorm_to_groupnorm

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

#: The encoder's five halvings: its stem convolution (stride 2), max pooling, then three ResNet stages.
HALVINGS = 5
#: ResNet backbones (no pretrained weights can be downloaded here: always trained from scratch).
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
DEFAULT_BACKBONE = "resnet10"  # the smallest: fedseg trains on CPUs


def encoder_features(backbone: str) -> int:
    """Features of the ResNet's coarsest output (512, or 2048 for the bottleneck ResNets)."""
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    return FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"][-1]


def flexibleunet_levels(levels: Levels, *, max_filters: int, backbone: str, **_context: Any) -> Levels:
    """Six levels: the decoder's five widths (the plan's first features doubling, capped at ``max_filters``;
    MONAI's default 16-32-64-128-256 is the default preset's) above the encoder's coarsest output."""
    dims = len(levels.kernels[0])
    decoder = tuple(min(max_filters, levels.channels[0] * 2 ** level) for level in range(HALVINGS))
    return Levels(strides=halvings(HALVINGS, dims=dims), kernels=((3,) * dims,) * (HALVINGS + 1),
                  channels=(*decoder, encoder_features(backbone)))


def check_flexibleunet(config: ModelConfig) -> None:
    """A ResNet backbone, six levels (five decoder widths, then the encoder's), five halvings."""
    require(config.backbone in BACKBONES, "backbone", f"must be one of {BACKBONES} for model 'flexibleunet'",
            config.backbone)
    require(len(config.channels) == HALVINGS + 1 and config.channels[-1] == encoder_features(config.backbone),
            "channels", f"needs {HALVINGS + 1} levels for model 'flexibleunet': the decoder's {HALVINGS} widths, "
            f"finest first, then the {config.backbone} encoder's {encoder_features(config.backbone)}", config.channels)
    require(all_twos(config.strides), "strides",
            "must all be 2 for model 'flexibleunet' (the ResNet encoder halves every axis 5 times)", config.strides)


def build_flexibleunet(config: ModelConfig) -> torch.nn.Module:
    """``monai.networks.nets.FlexibleUNet``: untrained ResNet encoder, decoder widths from ``config.channels``,
    affine instance norm and ReLU in the decoder; the encoder's hard-coded BatchNorm becomes GroupNorm."""
    from monai.networks.nets import FlexibleUNet

    model = FlexibleUNet(in_channels=config.in_channels, out_channels=config.num_classes, backbone=config.backbone,
                         pretrained=False, decoder_channels=tuple(reversed(config.channels[:HALVINGS])),
                         spatial_dims=config.spatial_dims, norm=("instance", {"affine": True}),
                         act=("relu", {"inplace": False}))
    return batchnorm_to_groupnorm(model)


FLEXIBLEUNET = Network(build=build_flexibleunet, acts=("relu",), takes=frozenset({"backbone"}),
                       check=check_flexibleunet, levels=flexibleunet_levels, fixed_halvings=HALVINGS,
                       norm_conversion=GROUPNORM, decoder=r"(decoder|segmentation_head)\..*")
