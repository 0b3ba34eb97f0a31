"""The segmentation network (MONAI), 2D or 3D, built from a small config by the model factory.

InstanceNorm (no running statistics) and no BatchNorm, so the same network
trains with and without differential privacy and its weights are exactly the
``state_dict`` that travels between hospitals and the server.

The activation is ReLU, not MONAI's default PReLU: PReLU has a weight that
Opacus can only differentiate per sample through its slow functorch fallback
(one per layer), and ReLU is also faster without DP (benchmarks/dp_step.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch

# ModelConfig.act -> MONAI activation name
ACTIVATIONS = {"relu": "RELU", "prelu": "PRELU"}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the U-Net; saved beside the weights so a model can be rebuilt."""

    spatial_dims: int
    in_channels: int
    num_classes: int
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int = 1
    act: str = "relu"
    name: str = "unet"

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"model 'name' must be one of {sorted(MODELS)}, got {self.name!r}")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"model 'spatial_dims' must be 2 or 3, got {self.spatial_dims!r}")
        if self.in_channels < 1:
            raise ConfigError(f"model 'in_channels' must be >= 1, got {self.in_channels!r}")
        if self.num_classes < 2:
            raise ConfigError(f"model 'num_classes' must be >= 2, got {self.num_classes!r}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"model 'act' must be one of {ACTIVATIONS}, got {self.act!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ConfigError(
                f"model 'strides' needs {len(self.channels) - 1} entries for "
                f"{len(self.channels)} channel levels, got {self.strides!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (lists instead of tuples)."""
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        data["strides"] = list(self.strides)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild a config saved with :meth:`to_dict`."""
        try:
            return cls(
                spatial_dims=int(data["spatial_dims"]),
                in_channels=int(data["in_channels"]),
                num_classes=int(data["num_classes"]),
                channels=tuple(int(c) for c in data["channels"]),
                strides=tuple(int(s) for s in data["strides"]),
                num_res_units=int(data.get("num_res_units", 1)),
                act=str(data.get("act", "prelu")),  # files written before 'act' existed used PReLU
                name=str(data.get("name", "unet")),
            )
        except KeyError as missing:
            raise ConfigError(f"model config is missing key {missing}") from None


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Return a freshly initialised network for ``config`` (the builder :data:`MODELS` names)."""
    return MODELS[config.name](config)


def _build_unet(config: ModelConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm="INSTANCE",
        act=ACTIVATIONS[config.act],
    )


#: Network name (run config ``model``) -> builder. Adding a network is one entry here plus its tests.
MODELS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {"unet": _build_unet}
