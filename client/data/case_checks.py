"""Checks on a loaded case, placed in the MONAI pipeline while tensors still know their files.

Each raises :class:`DataError` naming the file and the problem, so training,
evaluation and ``check-data`` report identical problems.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform

from shared.errors import DataError

GEOMETRY_TOLERANCE_MM = 1e-3


def filename_of(tensor: Any) -> str:
    """The source file MONAI recorded in a loaded tensor's metadata."""
    meta = getattr(tensor, "meta", {}) or {}
    name = meta.get("filename_or_obj", "<unknown file>")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class CheckFinited(MapTransform):
    """Reject an image with NaN or Inf voxels."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        case = dict(data)
        for key in self.key_iterator(case):
            if not torch.isfinite(torch.as_tensor(case[key])).all():
                raise DataError(f"{filename_of(case[key])}: image has NaN or Inf voxels")
        return case


class CheckLabelValuesd(MapTransform):
    """Reject a label whose values are not integers in ``[0, num_classes)``."""

    def __init__(self, *, num_classes: int, keys: str = "label") -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        case = dict(data)
        for key in self.key_iterator(case):
            values = torch.unique(torch.as_tensor(case[key]))
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes
                                   or not torch.equal(values, values.round())):
                raise DataError(
                    f"{filename_of(case[key])}: label values {values.tolist()[:10]} are outside the "
                    f"configured classes 0..{self.num_classes - 1}"
                )
        return case


class CheckGeometryd(MapTransform):
    """Reject a label whose grid (shape and affine) differs from its image's.

    Run after both are in the same orientation, so a label stored in another
    axis order but covering the same voxels passes.
    """

    def __init__(self, *, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__((image_key, label_key), allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        case = dict(data)
        if self.label_key not in case:
            return case
        image, label = case[self.image_key], case[self.label_key]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise DataError(f"{filename_of(label)}: label shape {tuple(label.shape[1:])} differs from image "
                            f"shape {tuple(image.shape[1:])} ({filename_of(image)})")
        if label.shape[0] != 1:
            raise DataError(f"{filename_of(label)}: label has {label.shape[0]} channels; expected one "
                            "channel of class indices")
        image_affine = torch.as_tensor(image.affine, dtype=torch.float64)
        label_affine = torch.as_tensor(label.affine, dtype=torch.float64)
        if not torch.allclose(image_affine, label_affine, atol=GEOMETRY_TOLERANCE_MM, rtol=0):
            raise DataError(f"{filename_of(label)}: label geometry (affine) differs from the image's "
                            f"({filename_of(image)}): {label_affine[:3].tolist()} vs {image_affine[:3].tolist()}")
        return case


def check_not_empty_label(label: Any) -> str | None:
    """A warning if a label map has no foreground voxel, else None."""
    import torch

    if not bool((torch.as_tensor(label) > 0).any()):
        return f"{filename_of(label)}: label map is empty (no foreground voxel)"
    return None
