"""MONAI's ``DynUNet`` (nnU-Net's network): plain blocks, per-level per-axis kernels and strides, deep supervision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.networks.base import ACTIVATIONS, Network, require

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig


def check_dynunet(config: ModelConfig) -> None:
    """At least 3 levels, one kernel per level, at most ``levels - 2`` heads."""
    levels = len(config.channels)
    require(levels >= 3, "channels", "needs at least 3 levels for model 'dynunet'", config.channels)
    require(not config.kernels or len(config.kernels) == levels, "kernels",
            f"needs one entry per level ({levels}) or none (3 everywhere)", config.kernels)
    require(config.deep_supervision <= levels - 2, "deep_supervision",
            f"must be at most {levels - 2} (levels - 2) for {levels} levels", config.deep_supervision)


def build_dynunet(config: ModelConfig) -> torch.nn.Module:
    """MONAI's DynUNet with affine instance norm and out-of-place LeakyReLU.

    In train mode with deep supervision it returns the full-resolution output
    and every head's (upsampled to full resolution) stacked on dim 1:
    ``[B, heads + 1, C, ...]``; in eval mode the full-resolution output alone.
    """
    from monai.networks.nets import DynUNet

    levels = len(config.channels)
    model = DynUNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        kernel_size=config.kernels or (3,) * levels,
        strides=(1, *config.strides),  # the first level keeps the input's resolution
        upsample_kernel_size=config.strides,
        filters=config.channels,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=ACTIVATIONS[config.act],
        deep_supervision=config.deep_supervision > 0,
        deep_supr_num=max(config.deep_supervision, 1),  # MONAI requires >= 1 even when it is off
        res_block=False,  # nnU-Net's plain blocks
    )
    return _register_blocks_once(model)


def _register_blocks_once(model: torch.nn.Module) -> torch.nn.Module:
    """Keep DynUNet's ``skip_layers`` as a plain attribute so that each block is a registered submodule once.

    DynUNet registers every block twice: as ``input_block``, ``downsamples``,
    ... and again inside ``skip_layers``, the recursive chain its ``forward``
    runs. Opacus (1.6) attaches its hooks per registration, so every per-sample
    gradient came out twice its value (wrong clipping); and ``state_dict``
    held every weight twice (twice the bytes in each update and model file).
    ``skip_layers`` owns no tensor of its own and its layers do not depend on
    train/eval mode, so unregistering it changes neither the forward pass nor
    what ``parameters()``, ``to()`` and ``train()`` reach.
    """
    skip_layers = model._modules.pop("skip_layers")
    object.__setattr__(model, "skip_layers", skip_layers)  # bypasses nn.Module's registration
    return model


DYNUNET = Network(build=build_dynunet, acts=("leakyrelu", "relu"), takes=frozenset({"kernels", "deep_supervision"}),
                  check=check_dynunet, decoder=r"(upsamples|output_block|deep_supervision_heads)\..*")
