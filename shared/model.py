"""The segmentation network (MONAI), 2D or 3D, built from a small config by the model factory.

Networks (run config ``model``): ``unet`` (``monai.networks.nets.UNet``) and
``dynunet`` (``monai.networks.nets.DynUNet``, nnU-Net's network: plain
convolution blocks, per-level and per-axis kernels and strides, optional
deep-supervision heads).

InstanceNorm (no running statistics) and no BatchNorm, so the same network
trains with and without differential privacy and its weights are exactly the
``state_dict`` that travels between hospitals and the server.

The U-Net's activation is ReLU, not MONAI's default PReLU (DynUNet: LeakyReLU,
never PReLU): PReLU has a weight that Opacus can only differentiate per sample
through its slow functorch fallback (one per layer), and ReLU is also faster
without DP (benchmarks/dp_step.py).
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
ACTIVATIONS = {"relu": "RELU", "prelu": "PRELU", "leakyrelu": "LEAKYRELU"}
#: The activation each network is built with from a run config (which has no key for it): ReLU for the
#: U-Net (see above), nnU-Net's LeakyReLU (slope 0.01, MONAI's default) for DynUNet.
DEFAULT_ACT = {"unet": "relu", "dynunet": "leakyrelu"}
#: One value for every spatial axis, or one per axis (anisotropic strides and kernels).
Axes = int | tuple[int, ...]


class ModelConfigError(ConfigError):
    """A bad :class:`ModelConfig` field; ``field``, ``rule`` and ``value`` let a caller name its own key."""

    def __init__(self, field: str, rule: str, value: Any) -> None:
        super().__init__(f"model '{field}' {rule}, got {value!r}")
        self.field, self.rule, self.value = field, rule, value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the network; saved beside the weights so a model can be rebuilt.

    ``channels`` are the features per level (DynUNet's ``filters``); ``strides``
    the downsampling between consecutive levels (``levels - 1`` entries, each
    an int or one int per axis: ``(2, 2)`` or ``((1, 2, 2), (2, 2, 2))``).
    ``kernels`` (DynUNet only) is the convolution kernel per level (``levels``
    entries, an odd int or one per axis; empty: 3 everywhere).
    ``deep_supervision`` (DynUNet only) is the number of deep-supervision heads
    below the full-resolution output (0: none; at most ``levels - 2``).
    ``num_res_units`` is MONAI UNet's residual units per block; DynUNet has
    nnU-Net's plain convolution blocks (0): MONAI's residual DynUNet blocks add
    in place to a hooked layer's output, which Opacus' backward hooks refuse.
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

    def __post_init__(self) -> None:
        for name in ("channels", "strides", "kernels"):  # hashable (the egress guard caches by config)
            object.__setattr__(self, name, _as_tuples(getattr(self, name)))
        _require(self.name in MODELS, "name", f"must be one of {sorted(MODELS)}", self.name)
        _require(self.spatial_dims in (2, 3), "spatial_dims", "must be 2 or 3", self.spatial_dims)
        _require(self.in_channels >= 1, "in_channels", "must be >= 1", self.in_channels)
        _require(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
        _require(self.act in ACTIVATIONS, "act", f"must be one of {sorted(ACTIVATIONS)}", self.act)
        levels = len(self.channels)
        _require(len(self.strides) == levels - 1, "strides",
                 f"needs {levels - 1} entries for {levels} channel levels", self.strides)
        self._check_axes("strides", self.strides, odd=False)
        self._check_axes("kernels", self.kernels, odd=True)
        _require(self.deep_supervision >= 0, "deep_supervision", "must be >= 0 (0 = off)", self.deep_supervision)
        if self.name == "dynunet":
            self._check_dynunet()
        else:
            _require(not self.kernels, "kernels", "is for model 'dynunet' only", self.kernels)
            _require(self.deep_supervision == 0, "deep_supervision",
                     "is for model 'dynunet' only (must be 0)", self.deep_supervision)

    def _check_axes(self, field: str, values: tuple[Axes, ...], *, odd: bool) -> None:
        """Every entry a positive int (odd for kernels), or a tuple of ``spatial_dims`` of them."""
        rule = "odd positive integers" if odd else "positive integers"
        for value in values:
            axes = value if isinstance(value, tuple) else (value,)
            _require(not isinstance(value, tuple) or len(value) == self.spatial_dims, field,
                     f"entries must be one int or {self.spatial_dims} (spatial_dims), one per axis", values)
            _require(all(isinstance(a, int) and a >= 1 and (a % 2 == 1 or not odd) for a in axes), field,
                     f"must hold {rule}", values)

    def _check_dynunet(self) -> None:
        levels = len(self.channels)
        _require(levels >= 3, "channels", "needs at least 3 levels for model 'dynunet'", self.channels)
        _require(not self.kernels or len(self.kernels) == levels, "kernels",
                 f"needs one entry per level ({levels}) or none (3 everywhere)", self.kernels)
        _require(self.deep_supervision <= levels - 2, "deep_supervision",
                 f"must be at most {levels - 2} (levels - 2) for {levels} levels", self.deep_supervision)
        _require(self.num_res_units == 0, "num_res_units",
                 "must be 0 for model 'dynunet' (nnU-Net's plain convolution blocks)", self.num_res_units)
        _require(self.act != "prelu", "act", "must not be prelu for model 'dynunet' (PReLU's weight forces "
                 "Opacus' slow functorch path)", self.act)

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


def _build_dynunet(config: ModelConfig) -> torch.nn.Module:
    """MONAI's DynUNet (nnU-Net's network) with affine instance norm.

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
        # not MONAI's in-place LeakyReLU: in place on a layer's output breaks Opacus' backward hooks
        act_name=ACTIVATIONS[config.act],
        deep_supervision=config.deep_supervision > 0,
        deep_supr_num=max(config.deep_supervision, 1),  # MONAI requires >= 1 even when it is off
        res_block=False,
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


def _as_tuples(values: Any) -> tuple[Any, ...]:
    """Lists (JSON) to tuples, one level down too: ``[2, [1, 2]]`` -> ``(2, (1, 2))``."""
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)


def _as_lists(values: tuple[Any, ...]) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in values]


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise ModelConfigError(field, rule, value)


#: Network name (run config ``model``) -> builder. Adding a network is one entry here plus its tests.
MODELS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {"unet": _build_unet, "dynunet": _build_dynunet}
