"""The segmentation network (MONAI), 2D or 3D, built from a small config by the model factory.

Networks (run config ``model``; one module each in :mod:`shared.networks`):
``unet`` (MONAI ``UNet``), ``dynunet`` (``DynUNet``, nnU-Net's network),
``segresnet`` (``SegResNet``), ``attentionunet`` (``AttentionUnet``),
``flexibleunet`` (``FlexibleUNet`` with a ResNet encoder) and ``swinunetr``
(``SwinUNETR``), every one built by MONAI itself.

No BatchNorm anywhere (instance, group or layer norm; where MONAI hard-codes
BatchNorm it is converted, and ``ModelConfig.norm_conversion`` says so in the
model file), so the same network trains with and without differential privacy
and its weights are exactly the ``state_dict`` that travels between hospitals
and the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError
from shared.networks import NETWORKS
from shared.networks.base import ACTIVATIONS, OPTIONAL_FIELDS, Axes, ModelConfigError, Network
from shared.networks.base import require as _require

if TYPE_CHECKING:
    import torch

__all__ = ["ACTIVATIONS", "DEFAULT_ACT", "MODELS", "ModelConfig", "ModelConfigError", "build_model",
           "default_deep_supervision"]

#: Network name (run config ``model``) -> its :class:`shared.networks.base.Network`. Adding a network is
#: one entry in :data:`shared.networks.NETWORKS` plus its tests.
MODELS: dict[str, Network] = NETWORKS
#: The activation each network is built with from a run config (which has no key for it): ReLU for the
#: U-Net, nnU-Net's LeakyReLU (slope 0.01, MONAI's default) for DynUNet, MONAI's own for the others.
DEFAULT_ACT = {name: network.act for name, network in MODELS.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the network; saved beside the weights so a model can be rebuilt.

    ``channels`` are the features per resolution level and ``strides`` the
    downsampling between consecutive levels (``levels - 1`` entries, each an
    int or one int per axis: ``(2, 2)`` or ``((1, 2, 2), (2, 2, 2))``), as the
    network is built: networks whose downsampling MONAI fixes (SegResNet,
    FlexibleUNet, SwinUNETR) hold their own (:mod:`shared.networks`).
    ``kernels`` (DynUNet only) is the convolution kernel per level (``levels``
    entries, an odd int or one per axis; empty: 3 everywhere).
    ``deep_supervision`` (DynUNet only) is the number of deep-supervision heads
    below the full-resolution output (0: none; at most ``levels - 2``).
    ``num_res_units`` (U-Net only) is MONAI UNet's residual units per block.
    ``backbone`` (FlexibleUNet only) names its ResNet encoder.
    ``norm_conversion`` names what replaced MONAI's hard-coded BatchNorm (set by
    the network; empty where there is none).
    """

    spatial_dims: int
    in_channels: int
    num_classes: int
    channels: tuple[int, ...]
    strides: tuple[Axes, ...]
    num_res_units: int = 1
    act: str = "relu"
    name: str = "unet"
    kernels: tuple[Axes, ...] = ()
    deep_supervision: int = 0
    backbone: str = ""
    norm_conversion: str | None = None  # None: the network's

    def __post_init__(self) -> None:
        for name in ("channels", "strides", "kernels"):  # hashable (the egress guard caches by config)
            object.__setattr__(self, name, _as_tuples(getattr(self, name)))
        _require(self.name in MODELS, "name", f"must be one of {sorted(MODELS)}", self.name)
        network = MODELS[self.name]
        if self.norm_conversion is None:
            object.__setattr__(self, "norm_conversion", network.norm_conversion)
        _require(self.spatial_dims in (2, 3), "spatial_dims", "must be 2 or 3", self.spatial_dims)
        _require(self.in_channels >= 1, "in_channels", "must be >= 1", self.in_channels)
        _require(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
        _require(self.act in network.acts, "act", f"must be one of {network.acts} for model {self.name!r}", self.act)
        _require(self.norm_conversion == network.norm_conversion, "norm_conversion",
                 f"must be {network.norm_conversion!r} for model {self.name!r}", self.norm_conversion)
        levels = len(self.channels)
        _require(levels >= 2, "channels", "needs at least two levels", self.channels)
        _require(len(self.strides) == levels - 1, "strides",
                 f"needs {levels - 1} entries for {levels} channel levels", self.strides)
        self._check_axes("strides", self.strides, odd=False)
        self._check_axes("kernels", self.kernels, odd=True)
        _require(self.deep_supervision >= 0, "deep_supervision", "must be >= 0 (0 = off)", self.deep_supervision)
        self._check_optional_fields(network)
        network.check(self)

    def _check_axes(self, field: str, values: tuple[Axes, ...], *, odd: bool) -> None:
        """Every entry a positive int (odd for kernels), or a tuple of ``spatial_dims`` of them."""
        rule = "odd positive integers" if odd else "positive integers"
        for value in values:
            axes = value if isinstance(value, tuple) else (value,)
            _require(not isinstance(value, tuple) or len(value) == self.spatial_dims, field,
                     f"entries must be one int or {self.spatial_dims} (spatial_dims), one per axis", values)
            _require(all(isinstance(a, int) and a >= 1 and (a % 2 == 1 or not odd) for a in axes), field,
                     f"must hold {rule}", values)

    def _check_optional_fields(self, network: Network) -> None:
        """A field only some networks take must keep its neutral value for every other network."""
        for field, neutral in OPTIONAL_FIELDS.items():
            if field not in network.takes:
                users = sorted(name for name, other in MODELS.items() if field in other.takes)
                _require(getattr(self, field) == neutral, field,
                         f"is for model {' and '.join(map(repr, users))} only (must be {neutral!r} for "
                         f"model {self.name!r})", getattr(self, field))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (lists instead of tuples)."""
        data = dataclasses.asdict(self)
        for name in ("channels", "strides", "kernels"):
            data[name] = _as_lists(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild a config saved with :meth:`to_dict` (also by fedseg versions without every field)."""
        try:
            return cls(
                spatial_dims=int(data["spatial_dims"]),
                in_channels=int(data["in_channels"]),
                num_classes=int(data["num_classes"]),
                channels=tuple(int(c) for c in data["channels"]),
                strides=_as_tuples(data["strides"]),
                num_res_units=int(data.get("num_res_units", 1)),
                act=str(data.get("act", "prelu")),  # files written before 'act' existed used PReLU
                name=str(data.get("name", "unet")),
                kernels=_as_tuples(data.get("kernels", ())),
                deep_supervision=int(data.get("deep_supervision", 0)),
                backbone=str(data.get("backbone", "")),
                norm_conversion=data.get("norm_conversion"),
            )
        except KeyError as missing:
            raise ConfigError(f"model config is missing key {missing}") from None


def default_deep_supervision(name: str, *, levels: int) -> int:
    """nnU-Net's deep supervision in DynUNet heads: ``levels - 3`` for dynunet, none for other networks.

    nnU-Net outputs a segmentation at every decoder level (``levels - 1``) and
    gives the lowest one weight 0 (nnUNetTrainer._build_loss), so it trains
    the full-resolution output plus ``levels - 3`` heads.
    """
    return max(levels - 3, 0) if name == "dynunet" else 0


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Return a freshly initialised network for ``config`` (the builder :data:`MODELS` names)."""
    return MODELS[config.name].build(config)


def _as_tuples(values: Any) -> tuple[Any, ...]:
    """Lists (JSON) to tuples, one level down too: ``[2, [1, 2]]`` -> ``(2, (1, 2))``."""
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)


def _as_lists(values: tuple[Any, ...]) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in values]
