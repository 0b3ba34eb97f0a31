"""MONAI dictionary transforms (keys "image"/"label") for training and evaluation.

Every case is brought to a canonical orientation and the run's voxel spacing,
z-score normalised per image, and padded to at least one patch. Training then
samples patches balanced between lesion and background and augments them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monai.transforms import MapTransform

from shared.errors import DataError

if TYPE_CHECKING:
    from monai.transforms import Compose

KEYS = ("image", "label")


class CheckCased(MapTransform):
    """Reject an image with NaN/Inf voxels or a label outside ``[0, num_classes)``.

    Placed right after loading, while each tensor still knows its file name.
    """

    def __init__(self, *, num_classes: int, keys: Sequence[str] = ("image", "label")) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        case = dict(data)
        image, label = case["image"], case["label"]
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise DataError(f"{_filename(image)}: image has NaN or Inf voxels")
        values = torch.unique(torch.as_tensor(label))
        if values.numel() and (values.min() < 0 or values.max() >= self.num_classes
                               or not torch.equal(values, values.round())):
            raise DataError(
                f"{_filename(label)}: label values {values.tolist()[:10]} are outside the "
                f"configured classes 0..{self.num_classes - 1}"
            )
        return case


def _filename(tensor: Any) -> str:
    meta = getattr(tensor, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<unknown file>"))


@dataclass(frozen=True)
class PreprocessSettings:
    """The preprocessing a run applies; saved with the model so inference matches."""

    spatial_dims: int
    target_spacing: float
    patch_size: int
    num_classes: int

    @property
    def axcodes(self) -> str:
        return "RAS"[: self.spatial_dims]

    @property
    def patch(self) -> tuple[int, ...]:
        return (self.patch_size,) * self.spatial_dims


def preprocessing(settings: PreprocessSettings) -> list:
    """Deterministic part of the pipeline: load, orient, resample, normalise, pad."""
    from monai.transforms import (
        EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd,
        Orientationd, Spacingd, SpatialPadd,
    )

    return [
        LoadImaged(keys=KEYS, image_only=True),
        CheckCased(num_classes=settings.num_classes),
        EnsureChannelFirstd(keys=KEYS),
        Orientationd(keys=KEYS, axcodes=settings.axcodes),
        Spacingd(keys=KEYS, pixdim=(settings.target_spacing,) * settings.spatial_dims,
                 mode=("bilinear", "nearest")),
        NormalizeIntensityd(keys="image", channel_wise=True),
        SpatialPadd(keys=KEYS, spatial_size=settings.patch),
        EnsureTyped(keys=KEYS, track_meta=False),
    ]


def augmentation(settings: PreprocessSettings, *, samples_per_case: int = 2) -> list:
    """Random part of the training pipeline: balanced patches plus augmentation."""
    from monai.transforms import (
        RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised, RandScaleIntensityd,
        RandShiftIntensityd,
    )

    flips = [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(settings.spatial_dims)]
    return [
        RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=settings.patch,
                               pos=1, neg=1, num_samples=samples_per_case),
        *flips,
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
    """Return the evaluation pipeline (whole images, no augmentation)."""
    from monai.transforms import Compose

    return Compose(preprocessing(settings))
