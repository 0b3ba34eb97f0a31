"""One federated plan from the sites' fingerprints, the way nnU-Net plans, without pooling any data.

The server sees one :class:`~shared.fingerprint.Fingerprint` per site
(aggregates only) and derives, as nnU-Net's ``ExperimentPlanner`` does from
its dataset fingerprint:

- target spacing: the median spacing over all cases (each site's median,
  weighted by its cases); for a clearly anisotropic 3D task the coarse axis
  takes the 10th percentile instead (nnU-Net's rule);
- patch size: nnU-Net's starting patch (a 256^3 or 2048^2 voxel budget shaped
  by the spacing), clipped to the median image size, then shrunk along its
  relatively largest axis until a batch of 2 fits the memory budget
  (run config ``memory-budget-mb``); the network topology follows from spacing
  and patch (:func:`shared.topology.pool_and_conv_props`);
- batch size: what the memory budget allows, at most 5% of the federation's
  voxels per step (nnU-Net's cap) without DP;
- intensity normalisation: CT channels clipped to the pooled foreground 0.5
  and 99.5 percentiles (the sites' percentiles, weighted by foreground voxels)
  and z-scored with the pooled mean and std (exact from the sites' counts,
  means and stds); other channels z-scored per case.

Keys the run config sets explicitly win over the derivation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.config import RunConfig
from shared.errors import ConfigError
from shared.fingerprint import Fingerprint
from shared.plan import MIN_BATCH, ChannelNorm, Plan, bytes_per_example, planned
from shared.topology import pool_and_conv_props

#: nnU-Net's anisotropy threshold: a coarse axis more than 3x the others gets special treatment.
ANISOTROPY_THRESHOLD = 3.0
#: nnU-Net caps a batch at this fraction of the dataset's voxels (an overfitting precaution).
MAX_DATASET_FRACTION_PER_STEP = 0.05
#: Cases with at least this many slices are volumes (a 3D model may suit them); fewer: 2D images or slabs.
VOLUME_SLICES = 16
#: Under DP a patch shrinks until this many cases fit a batch (or the median site's cases, if fewer), not
#: below MIN_DP_PATCH voxels along its longest axis.
DP_BATCH, MIN_DP_PATCH = 32, 32
#: nnU-Net's starting patch volumes (voxels) before clipping and shrinking.
INITIAL_PATCH_VOXELS = {3: 256 ** 3, 2: 2048 ** 2}


@dataclass(frozen=True)
class PooledFingerprint:
    """What the federation's data look like together (derived from the sites' aggregates only)."""

    sites: tuple[str, ...]
    cases: int
    median_spacing: tuple[float, ...]
    p10_spacing: tuple[float, ...]
    median_extent: tuple[float, ...]
    intensity: tuple[dict[str, float], ...]
    class_fractions: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The value at half of the total weight (each site's median stands for its cases)."""
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(np.asarray(values, dtype=np.float64)[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def pool_fingerprints(fingerprints: Mapping[str, Fingerprint], *, spatial_dims: int) -> PooledFingerprint:
    """Combine the sites' fingerprints; the geometry frame is RAS in 3D, the sliced frame in 2D."""
    if not fingerprints:
        raise ConfigError("run config key 'plan' = 'auto': no site sent a fingerprint, so no plan can be derived")
    _check_agreement(fingerprints)
    sites = sorted(fingerprints)
    weights = [float(fingerprints[s].cases) for s in sites]
    frame = (lambda f: (f.spacing, f.extent)) if spatial_dims == 3 else (lambda f: (f.sliced_spacing, f.sliced_extent))

    def pooled(table_index: int, pct: int) -> tuple[float, ...]:
        return tuple(weighted_median([frame(fingerprints[s])[table_index][pct][axis] for s in sites], weights)
                     for axis in range(3))

    channels = fingerprints[sites[0]].channels
    classes = fingerprints[sites[0]].classes
    fractions = {k: float(np.average([fingerprints[s].class_fractions[k] for s in sites], weights=weights))
                 for k in range(1, classes)}
    return PooledFingerprint(sites=tuple(sites), cases=int(sum(weights)), median_spacing=pooled(0, 50),
                             p10_spacing=pooled(0, 10), median_extent=pooled(1, 50),
                             intensity=tuple(pooled_intensity(fingerprints, c) for c in range(channels)),
                             class_fractions=fractions)


def pooled_intensity(fingerprints: Mapping[str, Fingerprint], channel: int) -> dict[str, float]:
    """Pooled foreground mean and std (exact, from counts, means and stds) and percentiles (voxel-weighted)."""
    stats = [f.intensity[channel] for f in fingerprints.values()]
    counts = np.asarray([s.voxels for s in stats], dtype=np.float64)
    means = np.asarray([s.mean for s in stats])
    second = np.asarray([s.std ** 2 + s.mean ** 2 for s in stats])
    mean = float(np.average(means, weights=counts))
    std = math.sqrt(max(float(np.average(second, weights=counts)) - mean ** 2, 0.0))
    result = {"voxels": float(counts.sum()), "mean": mean, "std": std}
    for pct in stats[0].percentiles:
        result[f"p{pct:g}"] = float(np.average([s.percentiles[pct] for s in stats], weights=counts))
    return result


def _check_agreement(fingerprints: Mapping[str, Fingerprint]) -> None:
    for attribute, meaning in (("channels", "input channels"), ("classes", "classes")):
        seen = {site: getattr(f, attribute) for site, f in fingerprints.items()}
        if len(set(seen.values())) > 1:
            raise ConfigError(f"the sites disagree on the number of {meaning}: {seen}; every site must train "
                              "the same task")


def target_spacing(pooled: PooledFingerprint, *, spatial_dims: int) -> tuple[float, ...]:
    """nnU-Net's target spacing: the median; the 10th percentile along a clearly anisotropic 3D axis."""
    if spatial_dims == 2:
        return pooled.median_spacing[:2]
    target = list(pooled.median_spacing)
    sizes = [e / s for e, s in zip(pooled.median_extent, target)]
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[a] for a in others)
    if aniso_spacing and aniso_voxels:
        target[worst] = max(pooled.p10_spacing[worst], max(target[a] for a in others) + 1e-5)
    return tuple(target)


def initial_patch(spacing: tuple[float, ...], median_shape: tuple[float, ...]) -> tuple[int, ...]:
    """nnU-Net's starting patch: a fixed voxel budget in the spacing's aspect ratio, clipped to the median shape."""
    inverse = 1.0 / np.asarray(spacing)
    dims = len(spacing)
    scaled = inverse * (INITIAL_PATCH_VOXELS[dims] / np.prod(inverse)) ** (1.0 / dims)
    return tuple(int(min(round(p), max(1, round(m)))) for p, m in zip(scaled, median_shape))


def derive_plan(config: RunConfig, fingerprints: Mapping[str, Fingerprint]) -> tuple[Plan, PooledFingerprint]:
    """The federated plan (see the module docstring) and the pooled view it came from.

    Under DP with the preset's width, the network is narrowed until DP-SGD can
    learn at the sites holding most cases (:mod:`server.dp_sizing`).
    """
    from server.dp_sizing import (
        LEARNABLE_CASE_SHARE,
        learnable_case_share,
        narrower_widths,
        width_is_the_presets,
    )

    plan, pooled = derive_sized_plan(config, fingerprints)
    if not config.patient_dp or not width_is_the_presets(config):
        return plan, pooled
    for narrower in narrower_widths(config):
        if learnable_case_share(config, plan, fingerprints) >= LEARNABLE_CASE_SHARE:
            break
        plan, pooled = derive_sized_plan(narrower, fingerprints)
    return plan, pooled


def derive_sized_plan(config: RunConfig, fingerprints: Mapping[str, Fingerprint]) -> tuple[Plan, PooledFingerprint]:
    """The plan for the network width the run config gives (see :func:`derive_plan`)."""
    dims = config.spatial_dims
    pooled = pool_fingerprints(fingerprints, spatial_dims=dims)
    first = next(iter(fingerprints.values()))
    if (first.channels, first.classes) != (config.in_channels, config.num_classes):
        raise ConfigError(f"run config keys 'in-channels', 'num-classes': {config.in_channels}, {config.num_classes}, "
                          f"but the sites' data have {first.channels} channel(s) and {first.classes} classes")
    spacing = config.target_spacing_tuple() or target_spacing(pooled, spatial_dims=dims)
    median_shape = tuple(e / s for e, s in zip(pooled.median_extent[:dims], spacing))
    voxels = pooled.cases * float(np.prod(median_shape))
    normalization = tuple(channel_norm(stats, ct=bool(ct)) for stats, ct in zip(pooled.intensity, _ct_flags(fingerprints)))
    max_batch = None if config.patient_dp else int(voxels * MAX_DATASET_FRACTION_PER_STEP)
    patch = config.patch_size_tuple()
    if patch is not None:
        return planned(config, spacing=spacing, patch=patch, normalization=normalization, source="auto",
                       max_batch=max_batch), pooled
    patch = pool_and_conv_props(spacing, initial_patch(spacing, median_shape)).patch_size
    batch, smallest = smallest_batch(config, fingerprints), MIN_DP_PATCH if config.patient_dp else 8
    budget = config.memory_budget_mb * 2**20
    while True:
        plan = planned(config, spacing=spacing, patch=patch, normalization=normalization, source="auto",
                       max_batch=max_batch, batch_size=config.batch_size or MIN_BATCH)
        if config.batch_size:
            break
        per_example = bytes_per_example(plan, per_sample_grads=config.patient_dp)
        if batch * per_example <= budget or max(patch) <= smallest:
            break
        # memory grows about linearly with the patch's voxels: shrink (cheaply) until the estimate fits,
        # then measure again (nnU-Net measures at every step; this measures two or three times)
        per_voxel = per_example / math.prod(patch)
        while batch * per_voxel * math.prod(patch) > budget and max(patch) > smallest:
            patch = _shrunk(patch, spacing, median_shape)
    return planned(config, spacing=spacing, patch=patch, normalization=normalization, source="auto",
                   max_batch=max_batch), pooled


def smallest_batch(config: RunConfig, fingerprints: Mapping[str, Fingerprint]) -> int:
    """The batch a patch must leave room for: nnU-Net's 2; under DP, as many cases as the median site
    has, up to :data:`DP_BATCH` (DP-SGD's noise on the averaged gradient is sigma / B: at a fixed budget
    it falls with B while B is a small fraction of the site's cases, and hardly at all beyond; see
    BENCHMARKS.md, "DP-SGD: noise per step by site size")."""
    if not config.patient_dp:
        return MIN_BATCH
    return max(MIN_BATCH, min(DP_BATCH, int(np.median([f.cases for f in fingerprints.values()]))))


def channel_norm(stats: Mapping[str, float], *, ct: bool) -> ChannelNorm:
    """nnU-Net's CT normalisation from pooled statistics, or per-case z-score."""
    if not ct:
        return ChannelNorm("zscore")
    return ChannelNorm("ct", low=stats["p0.5"], high=stats["p99.5"], mean=stats["mean"], std=max(stats["std"], 1e-8))


def _ct_flags(fingerprints: Mapping[str, Fingerprint]) -> list[bool]:
    first = next(iter(fingerprints.values()))
    return [all(f.ct_channels[c] if c < len(f.ct_channels) else False for f in fingerprints.values())
            for c in range(first.channels)]


def _shrunk(patch: tuple[int, ...], spacing: tuple[float, ...], median_shape: tuple[float, ...]) -> tuple[int, ...]:
    """Shrink the axis largest relative to the median shape by one step of the strides' divisor (nnU-Net)."""
    axis = int(np.argmax([p / m for p, m in zip(patch, median_shape)]))
    divisor = pool_and_conv_props(spacing, patch).divisor
    smaller = list(patch)
    smaller[axis] = max(divisor[axis], smaller[axis] - divisor[axis])
    if tuple(smaller) == tuple(patch):
        smaller[axis] = max(8, patch[axis] // 2)
    return pool_and_conv_props(spacing, smaller).patch_size


def plan_notes(config: RunConfig, fingerprints: Mapping[str, Fingerprint], plan: Plan | None = None) -> list[str]:
    """What the operator should know about the plan's fit to the data (written to ``plan.json``)."""
    notes = []
    if plan is not None and config.channels == "auto" and plan.channels[0] < config.base_filters:
        notes.append(f"DP: the network was narrowed from {config.base_filters}-{config.max_filters} to "
                     f"{plan.channels[0]}-{max(plan.channels)} filters so that DP-SGD can learn where most cases "
                     "are (server.dp_sizing)")
    cases = sum(f.cases for f in fingerprints.values())
    isotropic = sum(f.isotropic_cases for f in fingerprints.values())
    thick = {axis: sum(f.thickest_axis_cases[axis] for f in fingerprints.values()) for axis in range(3)}
    slices = [f.sliced_extent[50][2] / f.sliced_spacing[50][2] for f in fingerprints.values()]
    if config.spatial_dims == 2 and isotropic > cases / 2 and float(np.median(slices)) >= VOLUME_SLICES:
        notes.append(f"{isotropic} of {cases} cases are (near) isotropic volumes: a 3D model "
                     "(spatial-dims = 3) sees their context in all directions and may segment better")
    mixed = [axis for axis, n in thick.items() if n and axis != 2]
    if config.spatial_dims == 2 and mixed:
        names = {0: "sagittal (L-R)", 1: "coronal (A-P)"}
        notes.append("cases with thick " + ", ".join(f"{names[a]} slices: {thick[a]}" for a in mixed)
                     + f"; with slicing = {config.slicing!r} they are "
                     + ("sliced across their thick axis" if config.slicing == "lowest-resolution"
                        else "cut axially into strips (slicing = 'lowest-resolution' trains on whole slices)"))
    return notes
