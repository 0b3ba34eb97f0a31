"""The plan: everything concrete a run trains with, known before round 1 and the same at every site.

A :class:`Plan` fixes the preprocessing (target spacing, 2D slicing,
intensity normalisation), the sampling (patch size, batch size, steps per
round, foreground oversampling) and the network (topology, filters). It comes
from the server (``server.planning``, derived from the sites' fingerprints,
run config ``plan = "auto"``), from the run config alone (:func:`manual_plan`,
``plan = "manual"``), or from a ``plan.json`` file. It travels to the sites as
JSON inside every train and evaluate message, is written to the run folder as
``plan.json`` and inside every model file, and ``predict`` reads it from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import AUTO, RunConfig, parse_int_list
from shared.errors import ConfigError
from shared.json_files import read_json
from shared.model import DEFAULT_ACT, MODELS, ModelConfig, default_deep_supervision
from shared.networks.base import Levels
from shared.networks.flexibleunet import DEFAULT_BACKBONE
from shared.topology import filters_per_level, pool_and_conv_props, training_bytes_per_example

PLAN_FORMAT = "fedseg-plan/1"
#: Key of the plan (JSON) in the config record of every train and evaluate message.
PLAN_KEY = "plan"
NORMALIZATIONS = ("zscore", "ct")
#: Patch edge a manual plan uses when ``patch-size`` is unset (per spatial dimension).
MANUAL_PATCH = {2: 64, 3: 32}
MIN_BATCH = 2


@dataclass(frozen=True)
class ChannelNorm:
    """Intensity normalisation of one input channel.

    ``zscore``: each case by its own mean and std (nnU-Net, MR); ``ct``: clip to
    ``[low, high]``, then subtract ``mean`` and divide by ``std``, the same numbers
    at every site (nnU-Net's CT normalisation, from the pooled foreground statistics).
    """

    scheme: str
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.scheme not in NORMALIZATIONS:
            raise ConfigError(f"plan 'normalization': scheme must be one of {NORMALIZATIONS}, got {self.scheme!r}")
        if self.scheme == "ct" and not (self.low < self.high and self.std > 0):
            raise ConfigError(f"plan 'normalization': CT needs low < high and std > 0, got {self}")


@dataclass(frozen=True)
class Plan:
    """A run's concrete training plan (see the module docstring).

    ``target_spacing`` and ``patch_size`` have one entry per spatial axis of the
    model: in 3D the RAS axes; in 2D the two in-plane axes of each case sliced
    as ``slicing`` says (``lowest-resolution``: across the case's own coarsest
    axis, as nnU-Net's 2D configuration; ``axial``: always across S).
    ``normalization`` has one entry per input channel; empty means "by
    modality at the site" (CT: clipped to ``ct_window`` and scaled; else z-score).
    ``strides`` (between levels) and ``kernels`` (per level) are per axis.
    """

    source: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    local_steps: int
    slicing: str
    foreground_fraction: float
    normalization: tuple[ChannelNorm, ...]
    ct_window: tuple[float, float]
    model: str
    channels: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    num_res_units: int = 1
    deep_supervision: int = 0
    backbone: str = ""

    def __post_init__(self) -> None:
        dims = self.spatial_dims
        for name in ("target_spacing", "patch_size"):
            if len(getattr(self, name)) != dims:
                raise ConfigError(f"plan '{name}': needs {dims} entries, got {getattr(self, name)!r}")
        if self.normalization and len(self.normalization) != self.in_channels:
            raise ConfigError(f"plan 'normalization': needs {self.in_channels} entries, got {len(self.normalization)}")
        if self.batch_size < 1 or self.local_steps < 1:
            raise ConfigError(f"plan: batch_size and local_steps must be >= 1, got {self.batch_size}, "
                              f"{self.local_steps}")
        divisor = [math.prod(level[a] for level in self.strides) for a in range(dims)]
        if any(size % d for size, d in zip(self.patch_size, divisor)):
            raise ConfigError(f"plan 'patch_size' {self.patch_size} (run config 'patch-size') is not divisible by "
                              f"the strides' product {divisor} of model {self.model!r}")

    def model_config(self) -> ModelConfig:
        """The network this plan trains."""
        return build_model_config(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples as lists), tagged with :data:`PLAN_FORMAT`."""
        data = dataclasses.asdict(self)
        data["normalization"] = [dataclasses.asdict(n) for n in self.normalization]
        return {"format": PLAN_FORMAT, **json.loads(json.dumps(data))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> Plan:
        """Rebuild a plan from :meth:`to_dict`; raise :class:`ConfigError` naming ``source`` if malformed."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{source}: not a fedseg plan (expected format {PLAN_FORMAT!r})")
        try:
            values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
            values["normalization"] = tuple(ChannelNorm(**n) for n in data["normalization"])
            for name in ("target_spacing", "patch_size", "channels", "ct_window"):
                values[name] = tuple(data[name])
            for name in ("strides", "kernels"):
                values[name] = tuple(tuple(level) for level in data[name])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed plan ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            return cls.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None


def build_model_config(plan: Plan) -> ModelConfig:
    """The :class:`ModelConfig` of a plan's network (the plan's levels are the network's own, see :func:`planned`)."""
    return ModelConfig(name=plan.model, spatial_dims=plan.spatial_dims, in_channels=plan.in_channels,
                       num_classes=plan.num_classes, channels=plan.channels, strides=plan.strides,
                       kernels=plan.kernels if "kernels" in MODELS[plan.model].takes else (),
                       num_res_units=plan.num_res_units, deep_supervision=plan.deep_supervision,
                       act=DEFAULT_ACT[plan.model], backbone=plan.backbone)


def read_plan_file(path: Path | str) -> Plan:
    """A ``plan.json`` written by a run (its ``plan`` entry) or by :meth:`Plan.to_dict` alone."""
    path = Path(path)
    data = read_json(path, error=ConfigError, context="run config key 'plan': ")
    return Plan.from_dict(data.get("plan", data) if isinstance(data, dict) else data, source=str(path))


def manual_plan(config: RunConfig, *, batch_size: int | None = None) -> Plan:
    """The plan the run config sets on its own (``plan = "manual"``; also tests and tools).

    Unset keys get fixed fallbacks: isotropic 1 mm, a patch of :data:`MANUAL_PATCH`,
    nnU-Net's topology for that patch, the batch that fits ``memory-budget-mb``.
    """
    dims = config.spatial_dims
    spacing = config.target_spacing_tuple() or (1.0,) * dims
    patch = config.patch_size_tuple() or (MANUAL_PATCH[dims],) * dims
    return planned(config, spacing=spacing, patch=patch, normalization=(), source="manual", batch_size=batch_size)


def planned(config: RunConfig, *, spacing: Sequence[float], patch: Sequence[int],
            normalization: tuple[ChannelNorm, ...], source: str, batch_size: int | None = None,
            max_batch: int | None = None) -> Plan:
    """A plan for ``patch`` voxels at ``spacing``: topology, filters and batch from the run config or derived.

    ``max_batch`` caps a derived batch size (nnU-Net: at most 5% of the dataset's voxels per step).
    """
    strides, kernels, channels, patch = topology_for(config, spacing=spacing, patch=patch)
    strides, kernels, channels = network_levels(config, Levels(strides, kernels, channels))
    patch = patch_for_network(config, patch=patch, strides=strides)
    plan = Plan(source=source, spatial_dims=config.spatial_dims, in_channels=config.in_channels,
                num_classes=config.num_classes, target_spacing=tuple(float(s) for s in spacing),
                patch_size=tuple(patch), batch_size=config.batch_size or MIN_BATCH, local_steps=config.local_steps,
                slicing=config.slicing, foreground_fraction=config.foreground_fraction, normalization=normalization,
                ct_window=config.ct_window_range(), model=config.model, channels=channels, strides=strides,
                kernels=kernels, num_res_units=(config.num_res_units if config.num_res_units >= 0 else 1) if config.model == "unet" else 0,
                deep_supervision=config.deep_supervision if config.deep_supervision >= 0
                else default_deep_supervision(config.model, levels=len(channels)), backbone=backbone_of(config))
    if batch_size is None:
        batch_size = config.batch_size or batch_for_memory(plan, budget_mb=config.memory_budget_mb,
                                                           per_sample_grads=config.patient_dp, maximum=max_batch)
    return dataclasses.replace(plan, batch_size=batch_size)


def topology_for(config: RunConfig, *, spacing: Sequence[float],
                 patch: Sequence[int]) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...],
                                                tuple[int, ...], tuple[int, ...]]:
    """(strides, kernels, channels, patch): from ``channels``/``strides`` if set, else nnU-Net's rule."""
    dims = config.spatial_dims
    if config.channels != AUTO:
        channels = parse_int_list(config.channels, key="channels")
        strides = tuple((s,) * dims for s in parse_int_list(config.strides, key="strides"))
        if config.patch_size_tuple() is None:
            # a derived patch must pass through every hand-set stride (a hand-set patch that does not is refused)
            divisor = math.prod(level[0] for level in strides)
            patch = tuple(max(divisor, size // divisor * divisor) for size in patch)
        return strides, ((3,) * dims,) * len(channels), channels, patch
    topology = pool_and_conv_props(spacing, patch)
    channels = filters_per_level(topology.levels, base=config.base_filters, maximum=config.max_filters)
    return topology.strides, topology.kernels, channels, topology.patch_size


def backbone_of(config: RunConfig) -> str:
    """FlexibleUNet's encoder: run config ``flexible-backbone``, else the default; empty for other networks."""
    if "backbone" not in MODELS[config.model].takes:
        return ""
    return DEFAULT_BACKBONE if config.flexible_backbone == AUTO else config.flexible_backbone


def network_levels(config: RunConfig, levels: Levels) -> Levels:
    """The network's own levels for the plan's (derived) ones; hand-set ``channels`` are the network's already
    (checked with the run config)."""
    if config.channels != AUTO:
        return levels
    return MODELS[config.model].levels(levels, max_filters=config.max_filters, backbone=backbone_of(config))


def patch_for_network(config: RunConfig, *, patch: Sequence[int],
                      strides: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """A derived patch rounded up until the network's strides divide it (twice, at least: instance norm needs
    more than one voxel at the lowest level); a hand-set ``patch-size`` that does not fit is refused."""
    divisor = [math.prod(level[axis] for level in strides) for axis in range(len(patch))]
    fitted = tuple(max(-(-size // d), 2) * d for size, d in zip(patch, divisor))
    if fitted != tuple(patch) and config.patch_size_tuple() is not None:
        raise ConfigError(f"run config keys 'patch-size', 'model': model {config.model!r} downsamples each axis by "
                          f"{divisor} in all; every patch edge must be a multiple of it and at least twice it, got "
                          f"{config.patch_size!r}")
    return fitted


def bytes_per_example(plan: Plan, *, per_sample_grads: bool) -> int:
    """Training memory of one example of a batch for the plan's network and patch (see
    :func:`shared.topology.training_bytes_per_example`)."""
    import torch

    from shared.model import build_model

    with torch.device("meta"):
        model = build_model(plan.model_config())
    return training_bytes_per_example(model, in_channels=plan.in_channels, patch_size=plan.patch_size,
                                      per_sample_grads=per_sample_grads)


def batch_for_memory(plan: Plan, *, budget_mb: int, per_sample_grads: bool, maximum: int | None = None) -> int:
    """The largest batch whose training memory fits ``budget_mb`` (at least :data:`MIN_BATCH`)."""
    batch = int(budget_mb * 2**20 // max(bytes_per_example(plan, per_sample_grads=per_sample_grads), 1))
    if maximum is not None:
        batch = min(batch, maximum)
    return max(MIN_BATCH, batch)


def resolve_plan_setting(config: RunConfig) -> Plan | None:
    """The plan a run config fixes without the sites (manual or a file), or None for ``plan = "auto"``."""
    if config.plan == "auto":
        return None
    if config.plan == "manual":
        return manual_plan(config)
    return read_plan_file(config.plan)
