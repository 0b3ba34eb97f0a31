"""The one preprocessing pipeline: MONAI dictionary transforms keyed "image"/"label".

Training, evaluation, ``check-data`` and ``predict`` all read data through the
functions here, so they see identical arrays and report identical problems.

Every case becomes a channel-first volume ``[C, X, Y, Z]`` (a 2D image is a
volume with one slice), in RAS orientation, resampled to the run's spacing
(a 2D model keeps the through-plane spacing), normalised per modality (CT: HU
window to [0, 1]; anything else: per-volume z-score per channel), labels
mapped to the configured classes. A 3D model trains on patches; a 2D model
trains on single slices of the volumes; both sampled with
foreground/background balance.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monai.transforms import MapTransform

from client.checks import CheckFinited, CheckGeometryd, CheckLabelValuesd
from client.readers import LoadCased, PlaceSegOnImageGridd

if TYPE_CHECKING:
    from monai.transforms import Compose

KEYS = ("image", "label")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # readers give RAS affines (NIfTI; DICOM converted)


@dataclass(frozen=True)
class PreprocessSettings:
    """The preprocessing of one site's cases; part of every cache key."""

    spatial_dims: int
    target_spacing: float
    patch_size: int
    num_classes: int
    modalities: tuple[str, ...] = ("MR",)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    label_map: tuple[tuple[int, int], ...] = ()

    @property
    def pixdim(self) -> tuple[float, ...]:
        """Target spacing; a 2D model keeps each volume's own slice spacing."""
        s = self.target_spacing
        return (s, s, s) if self.spatial_dims == 3 else (s, s, -1.0)

    @property
    def patch(self) -> tuple[int, ...]:
        """Patch cropped from a volume for training (a 2D model: one slice)."""
        p = self.patch_size
        return (p, p, p) if self.spatial_dims == 3 else (p, p, 1)

    @property
    def pad_size(self) -> tuple[int, ...]:
        p = self.patch_size
        return (p, p, p) if self.spatial_dims == 3 else (p, p, -1)


class AsVolumed(MapTransform):
    """Give a 2D image ``[C, X, Y]`` a third axis of one slice; volumes pass unchanged."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        case = dict(data)
        for key in self.key_iterator(case):
            if case[key].ndim == 3:
                case[key] = case[key].unsqueeze(-1)
        return case


class NormalizeByModalityd(MapTransform):
    """Per channel: CT -> clip to the HU window and scale to [0, 1]; other -> z-score."""

    def __init__(self, *, modalities: Sequence[str], ct_window: tuple[float, float], key: str = "image") -> None:
        super().__init__(key)
        self.modalities = tuple(modalities)
        self.ct_window = ct_window

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch
        from monai.transforms import NormalizeIntensity, ScaleIntensityRange

        case = dict(data)
        for key in self.key_iterator(case):
            image = case[key].to(dtype=torch.float32, copy=True)  # never normalise the caller's tensor
            low, high = self.ct_window
            for channel in range(image.shape[0]):
                modality = self.modalities[channel] if channel < len(self.modalities) else self.modalities[-1]
                if modality.upper() == "CT":
                    norm = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
                else:
                    norm = NormalizeIntensity()
                image[channel] = norm(image[channel])
            case[key] = image
        return case


def reading(keys: Sequence[str] = KEYS) -> list:
    """Read and check finiteness: channel-first volumes in the files' own geometry."""
    return [LoadCased(keys=keys), CheckFinited(keys="image"), AsVolumed(keys=keys)]


def orienting(settings: PreprocessSettings, keys: Sequence[str] = KEYS) -> list:
    """Canonical (RAS) orientation, then label checks and mapping against the image."""
    from monai.transforms import MapLabelValued, Orientationd

    steps: list = [Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)]
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
        NormalizeByModalityd(modalities=settings.modalities, ct_window=settings.ct_window),
        SpatialPadd(keys=keys, spatial_size=settings.pad_size),
    ]


def preprocessing(settings: PreprocessSettings, keys: Sequence[str] = KEYS, *, track_meta: bool = False) -> list:
    """Deterministic part of the pipeline: load, check, orient, resample, normalise, pad."""
    from monai.transforms import EnsureTyped

    steps = loading(settings, keys) + resampling(settings, keys)
    if not track_meta:
        steps.append(EnsureTyped(keys=keys, track_meta=False))
    return steps


def augmentation(settings: PreprocessSettings, *, samples_per_case: int = 2) -> list:
    """Random part of the training pipeline: balanced patches (or slices) plus augmentation."""
    from monai.transforms import (
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SqueezeDimd,
    )

    steps: list = [RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=settings.patch,
                                          pos=1, neg=1, num_samples=samples_per_case)]
    if settings.spatial_dims == 2:
        steps.append(SqueezeDimd(keys=KEYS, dim=3))
    steps += [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(settings.spatial_dims)]
    return steps + [
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandGaussianNoised(keys="image", std=0.05, prob=0.2),
    ]


def training_transforms(settings: PreprocessSettings, *, samples_per_case: int = 2) -> tuple[Compose, Compose]:
    """Return (deterministic, random) pipelines; the first is cacheable.

    Under DP ``samples_per_case`` is 1: one example the sampler draws is one
    case giving one patch, so per-sample clipping bounds a patient.
    """
    from monai.transforms import Compose

    return Compose(preprocessing(settings)), Compose(augmentation(settings, samples_per_case=samples_per_case))


def evaluation_transforms(settings: PreprocessSettings) -> Compose:
    """Return the evaluation pipeline (whole volumes, no augmentation)."""
    from monai.transforms import Compose

    return Compose(preprocessing(settings))
