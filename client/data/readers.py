"""Read one case's files with MONAI's readers; DICOM SEG labels with highdicom.

An image is a NIfTI file, a folder holding one DICOM series, a single DICOM
file, or a list of those (one per modality, stacked as channels). A label is a
NIfTI file or a DICOM SEG. Every failure becomes a :class:`DataError` naming
the file.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from client.data.dicom import check_dicom_series, is_dicom_seg
from shared.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_MARK = "fedseg_dicom_seg"


class LoadCased(MapTransform):
    """Load each key's file(s) as a channel-first MetaTensor that remembers its file."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        case = dict(data)
        for key in self.key_iterator(case):
            case[key] = load_image(case[key])
        return case


def load_image(source: str | list[str]) -> Any:
    """Read ``source`` (a path or a list of paths, one per channel) into ``[C, *spatial]``."""
    paths = [source] if isinstance(source, (str, Path)) else list(source)
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: file does not exist")
        if path.is_dir():
            check_dicom_series(path)
    if len(paths) == 1 and _is_seg(Path(paths[0])):
        return load_dicom_seg(Path(paths[0]))
    reader = _reader_name(Path(paths[0]))
    try:
        return _image_loader(reader)(paths[0] if len(paths) == 1 else paths)
    except DataError:
        raise
    except Exception as exc:  # readers raise many types for truncated/corrupt files
        raise DataError(f"{', '.join(map(str, paths))}: cannot read image ({_root_message(exc)})") from None


@functools.cache
def _image_loader(reader: str) -> Any:
    """One MONAI LoadImage per reader: building one instantiates every reader MONAI has (~0.2 ms)."""
    from monai.transforms import LoadImage

    return LoadImage(reader=reader, image_only=True, ensure_channel_first=True)


def load_dicom_seg(path: Path) -> Any:
    """Read a DICOM SEG into one channel of class indices (segment numbers) with a RAS affine."""
    import highdicom as hd
    import torch
    from monai.data import MetaTensor

    try:
        volume = hd.seg.segread(path).get_volume(combine_segments=True, relabel=False)
    except Exception as exc:  # highdicom raises many types for malformed SEGs
        raise DataError(f"{path}: cannot read DICOM SEG ({_root_message(exc)})") from None
    affine = LPS_TO_RAS @ np.asarray(volume.affine, dtype=float)
    array = np.asarray(volume.array).astype(np.int16)
    tensor = MetaTensor(torch.as_tensor(array).unsqueeze(0), affine=torch.as_tensor(affine))
    tensor.meta["filename_or_obj"] = str(path)
    tensor.meta[SEG_MARK] = True
    return tensor


class PlaceSegOnImageGridd(MapTransform):
    """Put a DICOM SEG label (which stores only its non-empty frames) onto its image's voxel grid.

    Run after both are in RAS orientation. The SEG's voxels must coincide with
    image voxels (same spacing, whole-voxel offset, inside the image); anything
    else is a geometry mismatch, reported naming the SEG file.
    """

    def __init__(self, *, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__((image_key, label_key), allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        case = dict(data)
        label = case.get(self.label_key)
        if label is None or not getattr(label, "meta", {}).get(SEG_MARK):
            return case
        case[self.label_key] = _embed(label, case[self.image_key])
        return case


def _embed(label: Any, image: Any) -> Any:
    import torch
    from monai.data import MetaTensor

    name = label.meta["filename_or_obj"]
    to_image = np.linalg.inv(np.asarray(image.affine, dtype=float)) @ np.asarray(label.affine, dtype=float)
    offset = np.round(to_image[:3, 3]).astype(int)
    size = np.array(label.shape[1:])
    if (not np.allclose(to_image[:3, :3], np.eye(3), atol=1e-3) or not np.allclose(to_image[:3, 3], offset, atol=1e-2)
            or (offset < 0).any() or (offset + size > np.array(image.shape[1:])).any()):
        raise DataError(f"{name}: DICOM SEG frames do not lie on the image's voxel grid "
                        "(different spacing, orientation or position)")
    placed = torch.zeros((1, *image.shape[1:]), dtype=label.dtype)
    region = tuple(slice(int(o), int(o + n)) for o, n in zip(offset, size))
    placed[(slice(None), *region)] = torch.as_tensor(label)
    result = MetaTensor(placed, meta=dict(image.meta))  # the image's grid: affine, space
    result.meta["filename_or_obj"] = name
    return result


def _reader_name(path: Path) -> str:
    """NibabelReader for NIfTI, PydicomReader for a DICOM series folder or file; nothing else."""
    import pydicom

    if path.name.endswith((".nii", ".nii.gz")):
        return "NibabelReader"
    if path.is_dir() or pydicom.misc.is_dicom(str(path)):
        return "PydicomReader"
    raise DataError(f"{path}: not a NIfTI file (.nii, .nii.gz), a DICOM file or a DICOM series folder")


def _is_seg(path: Path) -> bool:
    try:
        return is_dicom_seg(path)
    except Exception as exc:  # a damaged header
        raise DataError(f"{path}: unreadable DICOM file ({_root_message(exc)})") from None


def _root_message(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
