"""What the model factory knows about one network: :class:`Network`, and the helpers every builder shares.

A network is one :class:`Network` entry in :data:`shared.networks.NETWORKS`:
its MONAI builder, the activation a run config gets, the :class:`ModelConfig`
fields it takes beyond the common ones, its own rules, and how it turns the
plan's levels (nnU-Net's topology, or the run config's ``channels`` and
``strides``) into its own.

``ModelConfig.channels`` and ``ModelConfig.strides`` always describe the
network as built: the features at each resolution level and the downsampling
between consecutive levels, so the patch must be divisible by the strides'
product along every axis, whatever the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

#: One value for every spatial axis, or one per axis (anisotropic strides and kernels).
Axes = int | tuple[int, ...]
#: ModelConfig.act -> MONAI activation name
ACTIVATIONS = {"relu": "RELU", "prelu": "PRELU", "leakyrelu": "LEAKYRELU"}
#: ModelConfig fields only some networks take, with the value every other network must leave them at.
OPTIONAL_FIELDS: dict[str, Any] = {"kernels": (), "deep_supervision": 0, "num_res_units": 0, "backbone": ""}


class ModelConfigError(ConfigError):
    """A bad :class:`ModelConfig` field; ``field``, ``rule`` and ``value`` let a caller name its own key."""

    def __init__(self, field: str, rule: str, value: Any) -> None:
        super().__init__(f"model '{field}' {rule}, got {value!r}")
        self.field, self.rule, self.value = field, rule, value


def require(ok: bool, field: str, rule: str, value: Any) -> None:
    """Raise :class:`ModelConfigError` for ``field`` unless ``ok``."""
    if not ok:
        raise ModelConfigError(field, rule, value)


class Levels(NamedTuple):
    """A plan's network levels: strides between levels and kernels per level (per axis), features per level."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    channels: tuple[int, ...]


def same_levels(levels: Levels, **_context: Any) -> Levels:
    """Networks that take any per-axis strides and features per level keep the plan's levels."""
    return levels


def halvings(count: int, *, dims: int) -> tuple[tuple[int, ...], ...]:
    """``count`` downsamplings by 2 along every axis (networks whose downsampling MONAI fixes)."""
    return ((2,) * dims,) * count


def all_twos(strides: tuple[Axes, ...]) -> bool:
    """True if every stride halves every axis."""
    return all(a == 2 for s in strides for a in (s if isinstance(s, tuple) else (s,)))


def no_rules(config: ModelConfig) -> None:
    """A network whose common ModelConfig rules are all it needs."""


@dataclass(frozen=True)
class Network:
    """One network of the model factory (see the module docstring).

    ``build`` returns a fresh ``torch.nn.Module`` for a checked config;
    ``acts`` are the activations ``ModelConfig.act`` may name for it (the first
    is what a run config builds); ``takes`` the optional fields
    (:data:`OPTIONAL_FIELDS`) it reads; ``check`` its own rules (raising
    :class:`ModelConfigError`); ``levels`` maps a plan's levels to its own
    (called with keywords ``max_filters``, the run config's, and ``backbone``); ``fixed_halvings`` is the
    number of downsamplings by 2 MONAI fixes (None: the plan's strides);
    ``norm_conversion`` names what replaced MONAI's hard-coded BatchNorm
    (recorded in every ``ModelConfig`` and so in the model file); ``dp_modes``
    limits run config ``dp-grad-sample-mode`` (None: every mode); ``decoder``
    is a regular expression matching the names of the decoder's weights (run
    config ``train-layers = "decoder"``; None: not defined). A network
    with fixed downsampling takes no run config ``channels`` or ``strides``.
    """

    build: Callable[[ModelConfig], torch.nn.Module]
    acts: tuple[str, ...]
    takes: frozenset[str] = frozenset()
    check: Callable[[ModelConfig], None] = no_rules
    levels: Callable[..., Levels] = same_levels
    fixed_halvings: int | None = None
    norm_conversion: str = ""
    dp_modes: tuple[str, ...] | None = None
    decoder: str | None = None

    @property
    def act(self) -> str:
        """The activation a run config builds."""
        return self.acts[0]

    def divisor(self, *, dims: int) -> tuple[int, ...] | None:
        """What a patch edge must be divisible by when MONAI fixes the downsampling (else None: the plan's)."""
        return None if self.fixed_halvings is None else (2 ** self.fixed_halvings,) * dims


def doubling(first: int, levels: int) -> tuple[int, ...]:
    """``first`` features doubling at every level (what SegResNet and SwinUNETR build)."""
    return tuple(first * 2 ** level for level in range(levels))


def levels_within(base: int, *, max_filters: int, levels: int) -> int:
    """How many of ``levels`` levels a network doubling from ``base`` features has within ``max_filters``."""
    return max(2, min(levels, 1 + int(math.log2(max(max_filters // base, 1)))))
