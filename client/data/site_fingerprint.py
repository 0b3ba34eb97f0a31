"""The aggregates this site sends for the federated plan (shown by ``python -m client fingerprint``).

Before round 1 of a run with ``plan = "auto"`` the server asks every site for
its fingerprint (:class:`shared.fingerprint.Fingerprint`): numbers of cases,
percentiles of voxel spacing and image extent, foreground intensity statistics
per channel and class fractions, each an aggregate over the site's training
cases, never a value of one case. The reply passes the egress guard and is
written to the audit log like every other; :mod:`client.commands.fingerprint`
shows a site what it would send, before it joins.

Cases are read as training reads them (same readers, RAS orientation, label
checks), without resampling. Intensity statistics use up to
:data:`SAMPLES_PER_CASE` foreground voxels per case (as nnU-Net does), drawn
with a fixed seed so that the fingerprint is reproducible.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from client.data.datalist import Datalist, load_datalist
from client.data.loading import preprocess_case
from client.data.transforms import PreprocessSettings, loading, voxel_spacing
from shared.errors import DataError
from shared.fingerprint import (
    ANISOTROPY_FOR_SLICING,
    GEOMETRY_PERCENTILES,
    INTENSITY_PERCENTILES,
    ChannelIntensity,
    Fingerprint,
    slicing_axis,
)

SAMPLES_PER_CASE = 10_000
#: Axis order of the sliced frame per slicing axis (in-plane axes first, in RAS order).
_SLICED_ORDER = {0: (1, 2, 0), 1: (0, 2, 1), 2: (0, 1, 2)}


def site_fingerprint(datalist: Path | str, *, num_classes: int | None = None, seed: int = 0,
                     dp_epsilon_left: float | None = None, dp_delta: float | None = None,
                     dp_required: bool = False) -> Fingerprint:
    """The fingerprint of a datalist's training cases.

    ``num_classes`` defaults to the datalist's ``labels``; the ``dp_*`` values
    are the site's privacy budget left, sent so the plan can warn a site
    whose budget is too small to learn under DP.
    """
    site = load_datalist(datalist)
    classes = num_classes or len(site.labels) or 2
    rng = np.random.default_rng(seed)
    geometry, intensities, fractions = [], [], []
    for case in site.training:
        loaded = preprocess_case(case, _loader(site, classes))
        geometry.append(_geometry(loaded["image"]))
        intensities.append(_foreground_samples(loaded["image"], loaded["label"], rng))
        fractions.append(_class_fractions(loaded["label"], classes))
    fingerprint = _aggregate(geometry, intensities, fractions, classes=classes, channels=len(intensities[0]),
                             dp=(dp_epsilon_left, dp_delta, dp_required))
    modalities = site.modalities
    ct = tuple(modalities[min(c, len(modalities) - 1)].upper() == "CT" for c in range(fingerprint.channels))
    return dataclasses.replace(fingerprint, ct_channels=ct)


def _loader(site: Datalist, num_classes: int) -> Any:
    from monai.transforms import Compose

    settings = PreprocessSettings(spatial_dims=3, target_spacing=(1.0, 1.0, 1.0), patch_size=(1, 1, 1),
                                  num_classes=num_classes, normalization=(),
                                  label_map=tuple(sorted(site.label_map.items())))
    return Compose(loading(settings))


def _geometry(image: Any) -> dict[str, tuple[float, ...]]:
    spacing = voxel_spacing(image)
    shape = tuple(int(n) for n in image.shape[1:])
    extent = tuple(n * s for n, s in zip(shape, spacing))
    order = _SLICED_ORDER[slicing_axis(spacing)]
    return {"spacing": spacing, "extent": extent, "sliced-spacing": tuple(spacing[a] for a in order),
            "sliced-extent": tuple(extent[a] for a in order), "axis": (float(slicing_axis(spacing)),),
            "isotropic": (float(max(spacing) < ANISOTROPY_FOR_SLICING * min(spacing)),)}


def _foreground_samples(image: Any, label: Any, rng: np.random.Generator) -> list[np.ndarray]:
    values = np.asarray(image.detach().cpu(), dtype=np.float64)
    mask = np.asarray(label.detach().cpu())[0] > 0
    samples = []
    for channel in values:
        foreground = channel[mask]
        if foreground.size > SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
        samples.append(foreground)
    return samples


def _class_fractions(label: Any, num_classes: int) -> np.ndarray:
    counts = np.bincount(np.asarray(label.detach().cpu(), dtype=np.int64).ravel(), minlength=num_classes)
    return counts[:num_classes] / max(1, counts.sum())


def _aggregate(geometry: list[dict[str, tuple[float, ...]]], intensities: list[list[np.ndarray]],
               fractions: list[np.ndarray], *, classes: int, channels: int,
               dp: tuple[float | None, float | None, bool]) -> Fingerprint:
    def table(name: str) -> dict[int, tuple[float, float, float]]:
        values = np.asarray([g[name] for g in geometry], dtype=np.float64)
        return {p: tuple(float(v) for v in np.percentile(values, p, axis=0)) for p in GEOMETRY_PERCENTILES}

    axes = [int(g["axis"][0]) for g in geometry]
    mean_fractions = np.mean(np.stack(fractions), axis=0)
    return Fingerprint(
        cases=len(geometry), channels=channels, classes=classes, spacing=table("spacing"), extent=table("extent"),
        sliced_spacing=table("sliced-spacing"), sliced_extent=table("sliced-extent"),
        thickest_axis_cases=tuple(axes.count(a) for a in range(3)),  # type: ignore[arg-type]
        isotropic_cases=int(sum(g["isotropic"][0] for g in geometry)),
        intensity=tuple(_channel_stats(np.concatenate([case[c] for case in intensities])) for c in range(channels)),
        class_fractions={k: float(mean_fractions[k]) for k in range(1, classes)},
        dp_epsilon_left=dp[0], dp_delta=dp[1], dp_required=dp[2])


def _channel_stats(values: np.ndarray) -> ChannelIntensity:
    if values.size == 0:
        raise DataError("no foreground voxel in any training case: the labels are empty, so intensity "
                        "statistics (and training) are impossible")
    return ChannelIntensity(voxels=int(values.size), mean=float(values.mean()), std=float(values.std()),
                            percentiles={p: float(np.percentile(values, p)) for p in INTENSITY_PERCENTILES})
