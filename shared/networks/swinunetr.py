"""MONAI's ``SwinUNETR`` (shifted-window transformer encoder, convolutional decoder), 2D and 3D."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.networks.base import Levels, Network, all_twos, halvings, require

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

#: Patch embedding (2-voxel patches) and four patch mergings: MONAI requires every edge divisible by 2**5.
HALVINGS = 5
#: MONAI requires ``feature_size`` divisible by 12.
FEATURE_MULTIPLE = 12


def swin_channels(feature_size: int) -> tuple[int, ...]:
    """Features per level: ``f`` at full resolution and after the patch embedding, then doubling to ``16 f``."""
    return (feature_size, *(feature_size * 2 ** level for level in range(HALVINGS)))


def swinunetr_levels(levels: Levels, **_context: Any) -> Levels:
    """Six levels whose ``feature_size`` is the plan's first features rounded up to a multiple of 12
    (MONAI's rule; the default preset's 16 becomes MONAI's default 24)."""
    dims = len(levels.kernels[0])
    feature_size = -(-levels.channels[0] // FEATURE_MULTIPLE) * FEATURE_MULTIPLE
    return Levels(strides=halvings(HALVINGS, dims=dims), kernels=((3,) * dims,) * (HALVINGS + 1),
                  channels=swin_channels(feature_size))


def check_swinunetr(config: ModelConfig) -> None:
    """``feature_size`` (the first features) a multiple of 12, then MONAI's levels; five halvings."""
    feature_size = config.channels[0]
    require(feature_size % FEATURE_MULTIPLE == 0 and config.channels == swin_channels(feature_size), "channels",
            f"must be f, f, 2f, 4f, 8f, 16f with f (SwinUNETR's feature_size) a multiple of {FEATURE_MULTIPLE} "
            "for model 'swinunetr'", config.channels)
    require(all_twos(config.strides) and len(config.strides) == HALVINGS, "strides",
            f"must be {HALVINGS} times 2 for model 'swinunetr' (MONAI's patch embedding and patch mergings)",
            config.strides)


def build_swinunetr(config: ModelConfig) -> torch.nn.Module:
    """``monai.networks.nets.SwinUNETR`` with MONAI's defaults (window 7, depths 2-2-2-2, heads 3-6-12-24,
    instance norm and LeakyReLU in the convolutional blocks) and ``feature_size`` = the first features."""
    import torch
    from monai.networks.nets import SwinUNETR
    from monai.utils import optional_import

    require(optional_import("einops")[1], "name", "'swinunetr' needs einops, MONAI's optional dependency for "
            "SwinUNETR, which is not installed (pip install einops)", config.name)
    device = torch.get_default_device()
    with torch.device("cpu"):  # MONAI reads its drop-path rates with .item() while building: not on "meta"
        model = SwinUNETR(in_channels=config.in_channels, out_channels=config.num_classes,
                          feature_size=config.channels[0], spatial_dims=config.spatial_dims)
    return _index_as_constant(model).to(device)


def _index_as_constant(model: torch.nn.Module) -> torch.nn.Module:
    """Keep each window attention's ``relative_position_index`` as a plain tensor attribute, not a buffer.

    The index is a constant of the window size (which table row each pair of
    tokens in a window reads), not a statistic of any data; but Opacus refuses
    every trainable layer that holds a buffer (BatchNorm's running statistics
    would leak data), and the buffer was also saved in ``state_dict`` (sent in
    every update). The forward pass reads the same tensor. Not moved by
    ``model.to()``: indexing the table with a CPU index works on any device.
    """
    from monai.networks.nets.swin_unetr import WindowAttention

    for attention in model.modules():
        if isinstance(attention, WindowAttention):
            index = attention._buffers.pop("relative_position_index")
            object.__setattr__(attention, "relative_position_index", index)  # bypasses buffer registration
    return model


# functorch would take each attention window for an example (client/training/dp_windows.py): hooks only
SWINUNETR = Network(build=build_swinunetr, acts=("leakyrelu",), check=check_swinunetr, levels=swinunetr_levels,
                    fixed_halvings=HALVINGS, dp_modes=("auto", "hooks"), decoder=r"(decoder\d+|out)\..*")
