"""Small cases written by tests: NIfTI volumes, the same volumes as DICOM series, datalists."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.dicom_writer import write_series

# Axes permuted and flipped, anisotropic spacing, an offset: not the RAS identity.
AFFINE = np.array([[0.0, -0.9, 0.0, 12.0], [0.8, 0.0, 0.0, -6.0], [0.0, 0.0, 2.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
SLOPE, INTERCEPT = 0.5, -1024.0


def ct_volume(seed: int, shape: tuple[int, int, int] = (20, 18, 8)) -> tuple[np.ndarray, np.ndarray]:
    """(image in HU, label 0/1): a brighter box in noise, values exact in int16 with SLOPE/INTERCEPT."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(1800, 2300, size=shape)
    label = np.zeros(shape, dtype=np.uint8)
    x, y, z = (int(rng.integers(2, s // 2)) for s in shape)
    label[x:x + shape[0] // 3, y:y + shape[1] // 3, z:z + max(2, shape[2] // 3)] = 1
    stored = stored + 400 * label.astype(np.int64)
    return (stored * SLOPE + INTERCEPT).astype(np.float32), label


def write_nifti_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray,
                     affine: np.ndarray = AFFINE) -> dict[str, str]:
    """Write image and label NIfTI files; return the datalist entry (relative paths)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"{name}.nii.gz")
    return {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}


def write_dicom_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray,
                     affine: np.ndarray = AFFINE) -> dict[str, str]:
    """Write the image as a DICOM CT series and the label as NIfTI; return the datalist entry."""
    write_series(image, affine, folder / "dicom" / name, modality="CT", slope=SLOPE, intercept=INTERCEPT)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"{name}.nii.gz")
    return {"image": f"dicom/{name}", "label": f"labels/{name}.nii.gz"}


def write_datalist(folder: Path, training: list[dict], *, validation: list[dict] | None = None,
                   modality: str = "CT", name: str = "datalist.json") -> Path:
    """Write a Decathlon-style datalist with one modality and two classes."""
    content: dict = {"modality": {"0": modality}, "labels": {"0": "background", "1": "lesion"},
                     "training": training}
    if validation is not None:
        content["validation"] = validation
    path = folder / name
    path.write_text(json.dumps(content, indent=2))
    return path
