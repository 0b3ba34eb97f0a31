"""MONAI's ``UNet``: residual units, instance norm, ReLU (not MONAI's default PReLU, see below)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.networks.base import ACTIVATIONS, Network

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig


def build_unet(config: ModelConfig) -> torch.nn.Module:
    """``monai.networks.nets.UNet`` with instance norm (no running statistics) and ``config.act``.

    ReLU by default: fedseg's PReLU grad sampler (``client/training/dp_grad_samplers.py``)
    makes PReLU exact and fast under DP too, but ReLU is also faster without DP
    (benchmarks/dp_step.py).
    """
    from monai.networks.nets import UNet

    return UNet(spatial_dims=config.spatial_dims, in_channels=config.in_channels, out_channels=config.num_classes,
                channels=config.channels, strides=config.strides, num_res_units=config.num_res_units,
                norm="INSTANCE", act=ACTIVATIONS[config.act])


# MONAI nests each level as Sequential(down, SkipConnection(next level), up): the "up" halves are the decoder
UNET = Network(build=build_unet, acts=("relu", "prelu", "leakyrelu"), takes=frozenset({"num_res_units"}),
               decoder=r"model(\.1\.submodule)*\.2\..*")
