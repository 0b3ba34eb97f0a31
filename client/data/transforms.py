"""The one preprocessing pipeline: MONAI dictionary transforms keyed "image"/"label".

Training, evaluation, ``check-data`` and ``predict`` all read data through the
functions here, so they see identical arrays and report identical problems.

Every case becomes a channel-first volume ``[C, X, Y, Z]`` (a 2D image is a
volume with one slice), in RAS orientation (for a 2D model, turned so that the
axis it is sliced across comes last), resampled to the plan's spacing (a 2D
model keeps the through-plane spacing), normalised per channel as the plan
says, labels mapped to the configured classes. A 3D model trains on patches; a
2D model on single slices; both drawn with foreground oversampling.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monai.transforms import MapTransform

from client.data.case_checks import CheckFinited, CheckGeometryd, CheckLabelValuesd
from client.data.readers import LoadCased, PlaceSegOnImageGridd
from shared.fingerprint import slicing_axcodes
from shared.plan import ChannelNorm, Plan

if TYPE_CHECKING:
    from monai.transforms import Compose

KEYS = ("image", "label")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # readers give RAS affines (NIfTI; DICOM converted)


@dataclass(frozen=True)
class PreprocessSettings:
    """The preprocessing of one site's cases (from the run's plan); part of every cache key.

    ``target_spacing`` and ``patch_size`` have one entry per model axis (2D: the
    two in-plane axes). ``normalization`` has one entry per channel.
    """

    spatial_dims: int
    target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    num_classes: int
    normalization: tuple[ChannelNorm, ...]
    slicing: str = "axial"
    label_map: tuple[tuple[int, int], ...] = ()

    @property
    def pixdim(self) -> tuple[float, ...]:
        """Target spacing; a 2D model keeps each volume's own slice spacing."""
        return self.target_spacing if self.spatial_dims == 3 else (*self.target_spacing, -1.0)

    @property
    def patch(self) -> tuple[int, ...]:
        """Patch cropped from a volume for training (a 2D model: one slice)."""
        return self.patch_size if self.spatial_dims == 3 else (*self.patch_size, 1)

    @property
    def pad_size(self) -> tuple[int, ...]:
        return self.patch_size if self.spatial_dims == 3 else (*self.patch_size, -1)


def channel_norms(plan: Plan, modalities: Sequence[str]) -> tuple[ChannelNorm, ...]:
    """Each channel's normalisation: the plan's, else by modality (CT: ``ct-window`` to [0, 1]; else z-score)."""
    if plan.normalization:
        return plan.normalization
    low, high = plan.ct_window
    names = [modalities[c] if c < len(modalities) else modalities[-1] for c in range(plan.in_channels)]
    return tuple(ChannelNorm("ct", low=low, high=high, mean=low, std=high - low) if name.upper() == "CT"
                 else ChannelNorm("zscore") for name in names)


def settings_for(plan: Plan, *, modalities: Sequence[str] = ("MR",),
                 label_map: tuple[tuple[int, int], ...] = ()) -> PreprocessSettings:
    """The preprocessing a plan asks for, for a site whose channels are ``modalities``."""
    return PreprocessSettings(spatial_dims=plan.spatial_dims, target_spacing=plan.target_spacing,
                              patch_size=plan.patch_size, num_classes=plan.num_classes,
                              normalization=channel_norms(plan, modalities), slicing=plan.slicing,
                              label_map=label_map)


class AsVolumed(MapTransform):
    """Give a 2D image ``[C, X, Y]`` a third axis of one slice; volumes pass unchanged."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        case = dict(data)
        for key in self.key_iterator(case):
            if case[key].ndim == 3:
                case[key] = case[key].unsqueeze(-1)
        return case


class NormalizeByPland(MapTransform):
    """Per channel, as the plan says: z-score per case, or CT clipping and the plan's mean and std."""

    def __init__(self, *, normalization: Sequence[ChannelNorm], key: str = "image") -> None:
        super().__init__(key)
        self.normalization = tuple(normalization)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch
        from monai.transforms import NormalizeIntensity

        case = dict(data)
        for key in self.key_iterator(case):
            image = case[key].to(dtype=torch.float32, copy=True)  # never normalise the caller's tensor
            for channel in range(image.shape[0]):
                norm = self.normalization[min(channel, len(self.normalization) - 1)]
                if norm.scheme == "ct":
                    clipped = image[channel].clamp(norm.low, norm.high)
                    image[channel] = NormalizeIntensity(subtrahend=norm.mean, divisor=norm.std)(clipped)
                else:
                    image[channel] = NormalizeIntensity()(image[channel])
            case[key] = image
        return case


class OrientForSlicingd(MapTransform):
    """Turn a RAS case so that the axis a 2D model slices it across comes last (nnU-Net's 2D rule).

    The axis is the case's own coarsest one when clearly coarser
    (:func:`shared.fingerprint.slicing_axis`), so thick coronal or sagittal
    slices are trained on whole, not cut into strips. The affine follows.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import Orientation

        case = dict(data)
        orientation = Orientation(axcodes=slicing_axcodes(voxel_spacing(case["image"])), labels=RAS_LABELS)
        for key in self.key_iterator(case):
            case[key] = orientation(case[key])
        return case


def voxel_spacing(image: Any) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis, from a loaded image's affine."""
    import numpy as np

    affine = np.asarray(image.affine, dtype=float)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def reading(keys: Sequence[str] = KEYS) -> list:
    """Read and check finiteness: channel-first volumes in the files' own geometry."""
    return [LoadCased(keys=keys), CheckFinited(keys="image"), AsVolumed(keys=keys)]


def orienting(settings: PreprocessSettings, keys: Sequence[str] = KEYS) -> list:
    """Canonical (RAS) orientation, then label checks and mapping against the image."""
    from monai.transforms import MapLabelValued, Orientationd

    steps: list = [Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)]
    if settings.spatial_dims == 2 and settings.slicing == "lowest-resolution":
        steps.append(OrientForSlicingd(keys=keys))
    if "label" in keys:
        steps += [PlaceSegOnImageGridd(), CheckGeometryd()]
        if settings.label_map:
            original, target = zip(*settings.label_map)
            steps.append(MapLabelValued(keys="label", orig_labels=list(original), target_labels=list(target)))
        steps.append(CheckLabelValuesd(num_classes=settings.num_classes))
    return steps


def loading(settings: PreprocessSettings, keys: Sequence[str] = KEYS) -> list:
    """Read, check and orient: the arrays as stored, in canonical (RAS) orientation."""
    return reading(keys) + orienting(settings, keys)


def resampling(settings: PreprocessSettings, keys: Sequence[str] = KEYS) -> list:
    """Resample to the run's spacing, normalise intensities, pad to at least one patch."""
    from monai.transforms import Spacingd, SpatialPadd

    modes = tuple("nearest" if key == "label" else "bilinear" for key in keys)
    return [
        Spacingd(keys=keys, pixdim=settings.pixdim, mode=modes),
        NormalizeByPland(normalization=settings.normalization),
        SpatialPadd(keys=keys, spatial_size=settings.pad_size),
    ]


def preprocessing(settings: PreprocessSettings, keys: Sequence[str] = KEYS, *, track_meta: bool = False) -> list:
    """Deterministic part of the pipeline: load, check, orient, resample, normalise, pad.

    Without ``track_meta`` the arrays lose their affines; the voxel size is kept
    as ``case["spacing"]`` (mm per array axis) for distances in mm (HD95).
    """
    from monai.transforms import EnsureTyped

    steps = loading(settings, keys) + resampling(settings, keys)
    if not track_meta:
        steps += [RecordSpacingd(keys="image"), EnsureTyped(keys=keys, track_meta=False)]
    return steps


class RecordSpacingd(MapTransform):
    """Store the image's voxel size (mm per array axis) as ``case["spacing"]``, a float tensor of 3."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        case = dict(data)
        for key in self.key_iterator(case):
            case["spacing"] = torch.tensor(voxel_spacing(case[key]), dtype=torch.float64)
        return case


def augmentation(settings: PreprocessSettings, *, foreground_fraction: float) -> list:
    """Random part of the training pipeline: one patch (or slice) per draw, plus augmentation.

    A draw is centred on a foreground voxel with probability ``foreground_fraction``
    (a random foreground class, so small structures are seen as often as large
    ones), else on a background voxel: nnU-Net's foreground oversampling.
    """
    from monai.transforms import (
        RandCropByLabelClassesd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SqueezeDimd,
    )

    k = settings.num_classes
    ratios = [1.0 - foreground_fraction] + [foreground_fraction / (k - 1)] * (k - 1)
    steps: list = [RandCropByLabelClassesd(keys=KEYS, label_key="label", spatial_size=settings.patch,
                                           ratios=ratios, num_classes=k, num_samples=1, warn=False)]
    if settings.spatial_dims == 2:
        steps.append(SqueezeDimd(keys=KEYS, dim=3))
    steps += [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(settings.spatial_dims)]
    return steps + [
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandGaussianNoised(keys="image", std=0.05, prob=0.2),
    ]


def training_transforms(settings: PreprocessSettings, *, foreground_fraction: float) -> tuple[Compose, Compose]:
    """Return (deterministic, random) pipelines; the first is cacheable.

    Every draw of a case gives ONE patch, so under DP one example is one case
    (a patient) and per-sample clipping bounds what a patient contributes.
    """
    from monai.transforms import Compose

    return Compose(preprocessing(settings)), Compose(augmentation(settings, foreground_fraction=foreground_fraction))


def evaluation_transforms(settings: PreprocessSettings) -> Compose:
    """Return the evaluation pipeline (whole volumes, no augmentation)."""
    from monai.transforms import Compose

    return Compose(preprocessing(settings))
