"""Tiny configurations of every network (seconds on a CPU) and the run configs that plan them, for the tests."""

from __future__ import annotations

import pytest
import torch

from shared.model import DEFAULT_ACT, ModelConfig
from shared.networks.flexibleunet import encoder_features
from shared.networks.swinunetr import swin_channels
from tests.conftest import TINY_RUN_CONFIG

#: The networks issue 20 added; "unet" and "dynunet" have their own tests.
NEW_NETWORKS = ("segresnet", "attentionunet", "flexibleunet", "swinunetr")
#: name -> ModelConfig fields beside spatial_dims; 3D configs swap in per-axis strides where a network takes them.
FIELDS = {
    "segresnet": {"channels": (2, 4, 8), "strides": (2, 2)},
    "attentionunet": {"channels": (2, 4, 8), "strides": (2, 2)},
    "flexibleunet": {"channels": (2, 4, 4, 4, 4, encoder_features("resnet10")), "strides": (2,) * 5,
                     "backbone": "resnet10"},
    "swinunetr": {"channels": swin_channels(12), "strides": (2,) * 5},
}
#: Input edges per network and dimension: the fixed-downsampling networks need multiples of 32
#: (FlexibleUNet's group norm works on one voxel at the bottom; SwinUNETR's instance norm needs two).
SHAPES = {
    ("segresnet", 2): (16, 16), ("segresnet", 3): (8, 8, 8),
    ("attentionunet", 2): (16, 16), ("attentionunet", 3): (8, 8, 4),
    ("flexibleunet", 2): (32, 32), ("flexibleunet", 3): (32, 32, 32),
    ("swinunetr", 2): (64, 64), ("swinunetr", 3): (64, 32, 32),
}
#: Run config of each network for manual plans (MONAI's levels where it fixes them).
RUNS = {
    "segresnet": dict(TINY_RUN_CONFIG, **{"model": "segresnet", "channels": "4,8", "strides": "2",
                                          "num-res-units": -1}),
    "attentionunet": dict(TINY_RUN_CONFIG, **{"model": "attentionunet", "num-res-units": -1}),
    "flexibleunet": dict(TINY_RUN_CONFIG, **{"model": "flexibleunet", "channels": "auto", "strides": "auto",
                                             "num-res-units": -1, "patch-size": 64, "base-filters": 4,
                                             "max-filters": 8}),
    "swinunetr": dict(TINY_RUN_CONFIG, **{"model": "swinunetr", "channels": "auto", "strides": "auto",
                                          "num-res-units": -1, "patch-size": 64, "base-filters": 12}),
}


def tiny_config(name: str, dims: int) -> ModelConfig:
    """The tiny :class:`ModelConfig` of ``name`` in ``dims`` dimensions (3D AttentionUnet: anisotropic strides)."""
    fields = dict(FIELDS[name])
    if (name, dims) == ("attentionunet", 3):
        fields["strides"] = ((2, 2, 1), 2)
    return ModelConfig(dims, 1, 3, num_res_units=0, act=DEFAULT_ACT[name], name=name, **fields)


def batch(config: ModelConfig, *, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of different scales (so their gradient norms differ) and random labels."""
    shape = SHAPES[config.name, config.spatial_dims]
    scales = torch.linspace(0.5, 3.0, n).view(n, *[1] * (len(shape) + 1))
    images = torch.randn(n, config.in_channels, *shape) * scales
    return images, torch.randint(0, config.num_classes, (n, 1, *shape)).float()


CASES = [pytest.param(name, dims, id=f"{name}-{dims}D") for name in NEW_NETWORKS for dims in (2, 3)]
